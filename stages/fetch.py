"""Stage fetch: download the dataset's four IDX files into data/raw/, verified by SHA-256.

Sources are tried in order: $MNIST_MIRROR (a local directory or a base URL) first, then the mirrors
listed in params.yaml. A file is accepted only if the SHA-256 of its *uncompressed* content matches
the dataset table, and data/raw/ gets exactly that content, uncompressed: the very bytes the table
pins, whichever mirror served them and whichever zlib this machine has (mirrors' gzip headers
differ, and other zlib builds, e.g. zlib-ng, Fedora's zlib since version 40, deflate to other
bytes), so DVC sees the same output everywhere. MNIST_MIRROR is deliberately no DVC param (nor are
fetch.mirrors and fetch.timeout_s): the content is verified, so the source cannot change the output.
A source is read, and a .gz inflated, only up to the size the file can have (stages/datasets.yaml's
counts give it): a wrong URL's endless body or a gzip bomb is refused there, memory bounded. A
download slower than MIN_RATE over fetch.timeout_s seconds is refused too, and so is a step of it
(connecting and the headers, one read of the body) taking more than twice fetch.timeout_s: a trickle
cannot stall it.
"""

from __future__ import annotations

import argparse
import http.client
import os
import reprlib
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from stages import params as params_mod
from stages.common import PipelineError, Progress, atomic_path, log, os_reason, run_main
from stages.datasets import (FILE_ROLES, DataFile, Dataset, KnownFile, credentials_problem, digest_problem, is_url,
                             known_files, load_table)
from stages.idx import IdxFormatError, IdxTooLargeError, declared_dims, gunzip_if_compressed, stored_limit

STAGE = "fetch"
MIRROR_ENV = "MNIST_MIRROR"
_CHUNK = 1 << 20  # the most bytes one read of a download returns
# A download slower than this over fetch.timeout_s seconds is refused (as curl's --speed-limit
# with --speed-time): a server trickling a byte just inside each read's timeout would otherwise
# keep fetch waiting for days. 16 KiB/s moves MNIST's largest file (9.9 MB gzipped) in 10 minutes.
MIN_RATE = 16 * 1024  # bytes per second


class SourceError(Exception):
    """One source failed for one file; the reason ends up in the all-sources-failed message."""


def sources(mirrors: list[str], override: str | None) -> list[str]:
    """$MNIST_MIRROR first, then the params' mirrors; one given twice is tried (and blamed) once."""
    return list(dict.fromkeys(([override] if override else []) + list(mirrors)))


# Where a size limit comes from, said with each refusal: a table entry with too small a count
# would otherwise look like every mirror's fault.
_BY_THE_TABLE = "; the file's size follows from its dataset's counts in stages/datasets.yaml"


def served_limit(file: DataFile) -> int:
    """The most bytes a source may serve for `file`, gzipped or plain (idx.stored_limit). A source
    serving more (a wrong URL's endless or huge body, a gzip bomb's container) is refused as soon as
    it passes this, so a bad mirror cannot fill the memory."""
    return stored_limit(file.size)


class _Watchdog:
    """Cuts a download's connection when one blocking step runs past its time: connecting and
    receiving the response's status line and headers, or one read of the body. The socket's timeout
    bounds each recv() alone, and http.client reads the status line, each header and each
    chunk-size line a recv() at a time: a server sending one byte every timeout_s - 1 seconds kept
    fetch waiting for hours (a 64 KiB header line: weeks). One thread per download, armed and
    re-armed by the reading thread; cutting is shutdown() of the sockets it was given, which makes
    the blocked recv() return at once."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._deadline: float | None = None  # time.monotonic() seconds; None: disarmed
        self._sockets: list[socket.socket] = []
        self._stopped = False
        self.step = ""  # what the armed step is, for the refusal
        self.seconds = 0.0  # how long it was given
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._thread.join()

    def watch(self, sock: socket.socket) -> None:
        with self._condition:
            self._sockets.append(sock)
            if self.fired:  # a socket made after the step's time ran out (a slow name lookup) is cut too
                _shut(sock)

    def arm(self, step: str, seconds: float) -> None:
        with self._condition:
            if self.fired:  # keeps the step that stalled: a cut header read looks like their end
                return
            self.step, self.seconds = step, seconds
            self._deadline = time.monotonic() + seconds
            self._condition.notify()

    def _run(self) -> None:
        with self._condition:
            while not self._stopped:
                left = None if self._deadline is None else self._deadline - time.monotonic()
                if left is None or left > 0:
                    self._condition.wait(left)
                    continue
                self.fired, self._deadline = True, None
                for sock in self._sockets:
                    _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed, or handed over to its TLS socket
        pass


class _WatchedHandler:
    """Mixed into urllib's HTTP and HTTPS handlers: every connection they open (redirects included)
    is handed to the watchdog, its plain socket as soon as it exists (a proxy's CONNECT reply is
    read from it) and, for https, its TLS socket once connected."""

    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def do_open(self, http_class, request, **kwargs):  # urllib's hook, called by http_open / https_open
        watchdog = self.watchdog

        def connection(*args, **kw):  # do_open only calls its http_class, so a function will do
            conn = http_class(*args, **kw)
            create, connect = conn._create_connection, conn.connect

            def create_and_watch(*c_args, **c_kw):
                sock = create(*c_args, **c_kw)
                watchdog.watch(sock)
                return sock

            def connect_and_watch() -> None:
                connect()
                watchdog.watch(conn.sock)  # the TLS socket for https: shutting it ends its reads

            conn._create_connection, conn.connect = create_and_watch, connect_and_watch
            return conn

        return super().do_open(connection, request, **kwargs)


class _UnreadRedirects(urllib.request.HTTPRedirectHandler):
    """urllib reads a redirect's body whole before following it, whatever its size (an endless one
    took 2.7 GB in 4 s): it is closed unread."""

    def http_error_302(self, req, fp, code, msg, headers):
        fp.read = lambda *args, **kwargs: b""
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _WatchedHTTPHandler(_WatchedHandler, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPSHandler(_WatchedHandler, urllib.request.HTTPSHandler):
    pass


def _download(url: str, timeout_s: float, limit: int) -> bytes:
    """The body served at `url`, of at most `limit` bytes, or SourceError. Each step may take
    2 x timeout_s: connecting (timeout_s) and the status line and headers, or one read of the body;
    and the body must come at MIN_RATE or more, measured over timeout_s."""
    with _Watchdog() as watchdog:
        try:
            data = _transfer(url, timeout_s, limit, watchdog)
        except (SourceError, OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
            if watchdog.fired:  # a cut connection surfaces as any of these: a short body, a closed TLS socket
                raise _stalled(watchdog, timeout_s) from None
            raise _source_error(exc) from None
    if watchdog.fired:  # or as the end of a body without a length
        raise _stalled(watchdog, timeout_s)
    return data


def _source_error(exc: Exception) -> SourceError:
    """The one-line reason a download failed, as the all-sources-failed message lists it."""
    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, urllib.error.HTTPError):
        return SourceError(f"HTTP {exc.code} {exc.reason}")
    if isinstance(exc, urllib.error.URLError):
        return SourceError(f"cannot connect ({exc.reason})")
    if isinstance(exc, (ValueError, http.client.InvalidURL)):  # malformed: http://[::1/, a port that is no number
        return SourceError(f"not a valid URL ({exc})")
    return SourceError(f"transfer failed ({exc})")  # resets, time-outs, cut-off bodies


def _stalled(watchdog: _Watchdog, timeout_s: float) -> SourceError:
    return SourceError(f"stalled: {watchdog.step} took more than {watchdog.seconds:g} s "
                       f"(2 x fetch.timeout_s: {timeout_s:g}; refused)")


def _transfer(url: str, timeout_s: float, limit: int, watchdog: _Watchdog) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mnist-dvc-pipeline"})
    opener = urllib.request.build_opener(_WatchedHTTPHandler(watchdog), _WatchedHTTPSHandler(watchdog),
                                         _UnreadRedirects())
    watchdog.arm("connecting and the response's headers", 2 * timeout_s)
    with opener.open(request, timeout=timeout_s) as response:
        # None when the server sends no Content-Length; file:// responses have no such attribute.
        total = getattr(response, "length", None)
        if total is not None and total > limit:
            raise SourceError(f"announces {total:,} bytes, more than the file can take ({limit:,}; refused)"
                              + _BY_THE_TABLE)
        progress = Progress(STAGE, f"downloading {url}", total, "bytes")
        chunks, received = [], 0
        window_start, window_bytes = time.monotonic(), 0  # the rate's current window
        try:
            while True:
                # read1: what has arrived, up to _CHUNK (read() would wait for all _CHUNK bytes,
                # however slowly they come, before the rate could be checked).
                watchdog.arm("one read of the body", 2 * timeout_s)
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
                if received > limit:
                    raise SourceError(f"sent more than {limit:,} bytes, more than the file can take (refused)"
                                      + _BY_THE_TABLE)
                progress.update(len(chunk))
                window_bytes += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= timeout_s and received != total:  # a finished file is not refused
                    if window_bytes < MIN_RATE * elapsed:
                        raise SourceError(f"too slow: {window_bytes:,} bytes in the last {elapsed:.1f} s, under "
                                          f"{MIN_RATE // 1024} KiB/s (fetch.timeout_s: {timeout_s:g}; refused)")
                    window_start, window_bytes = time.monotonic(), 0
        finally:  # ends the progress line also when the transfer breaks off, before its error line
            progress.close()
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise SourceError(f"transfer ended after {len(data):,} of {total:,} bytes")
    return data


def describe_local(directory: Path) -> str:
    """The directory as a message names it: a relative path with what it resolved to, since the
    stage's working directory is not always the shell's (`dvc exp run --temp` and `--queue` run
    stages in a copy under .dvc/tmp/exps)."""
    if directory.is_absolute():
        return str(directory)
    return (f"{directory}, here {directory.resolve()} (a relative {MIRROR_ENV} is taken from the stage's "
            "working directory, which `dvc exp run --temp` and `--queue` move under .dvc/tmp/exps: give an "
            "absolute path)")


def _read_local(directory: Path, file: DataFile) -> bytes:
    # A local mirror may hold the files compressed (as served) or already unpacked (a data/raw).
    if not directory.is_dir():
        problem = "not a directory" if directory.exists() else "no such directory"
        raise SourceError(f"{problem}: {describe_local(directory)}")
    path = file.path_in(directory)
    if not path.is_file():
        raise SourceError(f"neither {file.gz_name} nor {file.name} is in {describe_local(directory)}")
    limit = served_limit(file)
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)  # at most one byte past the limit, whatever the file's size
    except OSError as exc:  # unreadable (permissions, an I/O error): the next source may serve it
        raise SourceError(f"cannot read {path}: {os_reason(exc)}") from None
    if len(data) > limit:
        raise SourceError(f"{path} holds more than {limit:,} bytes, more than the file can take (refused)"
                          + declared_dims(data[:1024]) + _BY_THE_TABLE)
    return data


def uncompressed(data: bytes, max_size: int) -> bytes:
    try:
        return gunzip_if_compressed(data, max_size=max_size)
    except IdxFormatError as exc:
        reason = str(exc).removeprefix("<bytes>: ")
        raise SourceError(reason + (_BY_THE_TABLE if isinstance(exc, IdxTooLargeError) else "")) from None


def fetch_verified(source: str, file: DataFile, timeout_s: float, known: dict[str, KnownFile] | None = None) -> bytes:
    """The uncompressed, digest-checked content of `file` from one source; raises SourceError.
    `known`: SHA-256 -> a file of the dataset table (known_files), named when the content is that file."""
    if is_url(source):
        data = _download(f"{source.rstrip('/')}/{file.gz_name}", timeout_s, served_limit(file))
    else:
        data = _read_local(Path(source), file)
    content = uncompressed(data, file.size)  # a gzip bomb stops one byte past the expected size
    problem = digest_problem(file, content, known)
    if problem:
        raise SourceError(problem)
    return content


def fetch_file(candidates: list[str], file: DataFile, timeout_s: float,
               known: dict[str, KnownFile] | None = None) -> bytes:
    failures = []
    for source in candidates:
        try:
            content = fetch_verified(source, file, timeout_s, known)
        except SourceError as exc:
            log(STAGE, f"{file.gz_name} from {source}: {exc}; trying the next source")
            failures.append(f"  {source}: {exc}")
            continue
        log(STAGE, f"{file.gz_name}: verified ({len(content):,} bytes, from {source})")
        return content
    raise PipelineError(
        f"could not fetch {file.gz_name} from any source:\n" + "\n".join(failures)
        + f"\nhint: set {MIRROR_ENV} to a directory holding the four files (.gz or plain), "
        "or to a base URL that serves them"
    )


def output_problem(out_dir: Path, table: dict[str, Dataset]) -> str | None:
    """Why fetch must not write `out_dir`, or None. It replaces the whole directory (so that a failed
    fetch leaves the old one whole), which under `dvc repro` DVC has removed first; run by hand, a
    directory of other files, or a file, at that path would be deleted: refused, before any download.
    A directory of the table's files only (an earlier fetch of either dataset) is replaced."""
    if out_dir.is_symlink() or not out_dir.exists():  # a link is replaced, never what it points to
        return None
    if not out_dir.is_dir():
        return f"{out_dir} is a file; fetch writes a directory there: remove it, or name another directory"
    ours = {file.name for dataset in table.values() for file in dataset.files.values()}
    try:
        # A link to a cache object (cache.type symlink) counts as the file, even where it is broken.
        others = sorted(entry.name for entry in out_dir.iterdir()
                        if entry.name not in ours or not (entry.is_file() or entry.is_symlink()))
    except OSError as exc:
        return f"{out_dir}: cannot read ({os_reason(exc)})"
    if others:
        return (f"{out_dir} holds {reprlib.repr(others)[1:-1]}, which fetch did not write, and fetch replaces the "
                "whole directory: empty it, or name another directory")
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages/run {STAGE}", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to hold the four verified IDX files (replaced "
                                                   "whole; refused if it holds other files)")
    args = parser.parse_args(argv)
    params = params_mod.load()
    table = load_table()
    if problem := output_problem(args.out_dir, table):
        raise PipelineError(problem)
    dataset = params.dataset
    override = os.environ.get(MIRROR_ENV)
    if override and (problem := credentials_problem(override)):
        raise PipelineError(f"{MIRROR_ENV}: {problem}")
    candidates = sources(params.fetch.mirrors[dataset.name], override)
    # Every file the table knows, to name one served in place of another (a mirror of the other dataset).
    known = known_files(table)
    # Everything goes to a temporary directory that becomes out_dir only once all four files are
    # verified: an interrupted or failed fetch leaves nothing in out_dir.
    with atomic_path(args.out_dir, directory=True) as tmp:
        for role in FILE_ROLES:
            file = dataset.files[role]
            content = fetch_file(candidates, file, params.fetch.timeout_s, known)
            (tmp / file.name).write_bytes(content)
    log(STAGE, f"{dataset.name}: four files verified in {args.out_dir}")


if __name__ == "__main__":
    run_main(STAGE, main)
