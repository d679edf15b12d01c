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
download slower than MIN_RATE over fetch.timeout_s seconds is refused too, so a trickle cannot stall it.
"""

from __future__ import annotations

import argparse
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from stages import params as params_mod
from stages.common import PipelineError, Progress, atomic_path, log, os_reason, run_main
from stages.datasets import FILE_ROLES, DataFile, KnownFile, digest_problem, is_url, known_files, load_table
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


def _download(url: str, timeout_s: float, limit: int) -> bytes:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mnist-dvc-pipeline"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            # None when the server sends no Content-Length; file:// responses have no such attribute.
            total = getattr(response, "length", None)
            if total is not None and total > limit:
                raise SourceError(f"announces {total:,} bytes, more than the file can take ({limit:,}; refused)"
                                  + _BY_THE_TABLE)
            progress = Progress(STAGE, f"downloading {url}", total, "bytes")
            chunks, received = [], 0
            window_start, window_bytes = time.monotonic(), 0  # the rate's current window
            try:
                # read1: what has arrived, up to _CHUNK (read() would wait for all _CHUNK bytes,
                # however slowly they come, before the rate could be checked).
                while chunk := response.read1(_CHUNK):
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
    except urllib.error.HTTPError as exc:
        raise SourceError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise SourceError(f"cannot connect ({exc.reason})") from None
    except (ValueError, http.client.InvalidURL) as exc:  # malformed: http://[::1/, a port that is no number
        raise SourceError(f"not a valid URL ({exc})") from None
    except (OSError, TimeoutError, http.client.HTTPException) as exc:  # resets, time-outs, cut-off bodies
        raise SourceError(f"transfer failed ({exc})") from None
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to hold the four verified IDX files")
    args = parser.parse_args(argv)
    params = params_mod.load()
    dataset = params.dataset
    candidates = sources(params.fetch.mirrors[dataset.name], os.environ.get(MIRROR_ENV))
    # Every file the table knows, to name one served in place of another (a mirror of the other dataset).
    known = known_files(load_table())
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
