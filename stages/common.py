"""Helpers every stage uses: errors, logging and progress, YAML, atomic outputs, tensor files, entry points.

Every stage imports this module, so a change here re-runs the whole pipeline: it holds only what
every stage needs. What only train needs of the stages (device, seeding, torchrun rank) is in
stages.runtime.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator


# train.device: cuda where torch sees no GPU. The params stage says it before any output is touched,
# stages.runtime.resolve_device at train time (a stage run by hand, a GPU gone since).
NO_CUDA_GPU = "'cuda' was requested but no CUDA GPU is available; use 'auto' (GPU when present, else CPU) or 'cpu'"


class PipelineError(Exception):
    """A problem with the user's input or environment: reported as one line, without a traceback."""


def log(stage: str, message: str) -> None:
    # stderr, flushed: DVC streams it live, and stdout stays free for machine-readable output.
    print(f"{stage}: {message}", file=sys.stderr, flush=True)


class Progress:
    """Progress of long work on stderr: `label: done/total unit (pct), rate, ETA`.

    On a terminal the line is redrawn in place a few times a second; otherwise (DVC captures the
    stage's output, a CI log) a plain line is printed every LOG_INTERVAL_S, so a log file gets a
    few lines a minute instead of thousands. `rate_unit`/`rate_per_item` turn the count into a
    throughput, e.g. steps counted at 128 images each give images/s. `after` is work still to come
    once this total is done (e.g. the rest of a training run's steps), at the same rate: with it the
    ETA names both this part and all of it. `clock` and `stream` are for tests.

    The rate is taken from the end of the first update on: a first step that compiles the model
    (train.compile) or sets up kernels, or a download's first chunk with its connection, would
    otherwise stand for every later one (an ETA of an hour for a minute's epoch). A line that only
    the first update precedes gives no rate; the final line does, the whole run's if it must.
    """

    TTY_INTERVAL_S = 0.25  # seconds between redraws on a terminal
    LOG_INTERVAL_S = 10.0  # seconds between lines elsewhere

    def __init__(self, stage: str, label: str, total: int | None, unit: str = "", *,
                 rate_unit: str | None = None, rate_per_item: float = 1.0, after: int = 0,
                 stream=None, clock: Callable[[], float] = time.monotonic):
        self.stage, self.label, self.total, self.unit = stage, label, total, unit
        self.rate_unit, self.rate_per_item, self.after = rate_unit or unit, rate_per_item, after
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = self.TTY_INTERVAL_S if self.tty else self.LOG_INTERVAL_S
        self.done = 0
        self._start = self._last = clock()
        self._first: tuple[float, int] | None = None  # (clock, done) at the end of the first update

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self._first is None:
            self._first = (now, self.done)
        if now - self._last >= self.interval_s:
            self._last = now
            self._print(self.line(now), final=False)

    def close(self, summary: bool = True) -> None:
        """Prints the final state, or with `summary=False` only erases the terminal line (for a
        caller that prints its own summary)."""
        if summary:
            self._print(self.line(self.clock(), final=True), final=True)
        elif self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _per_second(self, now: float, final: bool = False) -> float | None:
        """Items a second since the first update ended; None before a later one (on the final
        line: the rate since the start instead)."""
        if self._first is not None and self.done > self._first[1] and now > self._first[0]:
            return (self.done - self._first[1]) / (now - self._first[0])
        if final and self.done and now > self._start:
            return self.done / (now - self._start)
        return None

    def line(self, now: float, final: bool = False) -> str:
        """The status text at clock time `now`, e.g.
        `training epoch 2/8: 120/430 steps (28%), 5,210 images/s, ETA 0:59 here, 6:10 in all`."""
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            text = f"{self.label}: {self.done:,}/{self.total:,}{unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text = f"{self.label}: {self.done:,}{unit}"
        per_s = self._per_second(now, final)
        if per_s:
            rate_unit = f" {self.rate_unit}" if self.rate_unit else ""
            text += f", {_si(per_s * self.rate_per_item)}{rate_unit}/s"
            if self.total:
                left = max(self.total - self.done, 0)
                text += f", ETA {_duration(left / per_s)}"
                if self.after:
                    text += f" here, {_duration((left + self.after) / per_s)} in all"
        return text

    def _print(self, text: str, final: bool) -> None:
        text = f"{self.stage}: {text}"
        if self.tty:
            # \r returns to the line start, \x1b[K clears what a longer earlier line left behind.
            self.stream.write(f"\r{text}\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _si(value: float) -> str:
    """A rate for people: 5,210 or 3.1M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _duration(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ---------------------------------------------------------------------------------------------
# YAML: params.yaml, presets.yaml and datasets.yaml are read by one loader.


def parse_yaml(text: str, source: str) -> Any:
    """`text` read exactly as DVC reads params.yaml: ruamel.yaml's safe loader, YAML 1.2. PyYAML
    (YAML 1.1) disagreed with DVC on plain scalars: `seed: 010` trained with seed 8 while `dvc
    params diff` showed 10; `yes`/`on` were true (DVC: text), `1:30` was 90, `1e-5` text. A key
    given twice in one mapping is refused, as DVC refuses it.
    Text that is not valid YAML raises PipelineError: `source`, the problem and where it lies."""
    from ruamel.yaml import YAML, YAMLError  # here, not at the top: predict reads YAML only for IDX files

    try:
        return YAML(typ="safe").load(text)  # as dvc.utils.serialize.parse_yaml reads it
    except ValueError as exc:  # from a constructor: an integer of over 4,300 digits, a date like 2026-13-01
        raise PipelineError(f"{source}: not valid YAML: {exc}") from None
    except YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise PipelineError(f"{source}: not valid YAML: {problem}{at}") from None


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """YAML file `path` (`what` it holds, for the message), read by parse_yaml. A file that cannot
    be read (missing, a directory, no permission) is a one-line PipelineError too; a relative path
    is taken from the working directory, so that case says where the stages run."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")  # not the locale's: the same file reads the same everywhere
    except OSError as exc:
        where = "" if path.is_absolute() else "; the stages run from the repository root"
        raise PipelineError(f"{path}: cannot read {what} ({os_reason(exc)}{where})") from None
    except UnicodeDecodeError as exc:  # saved in another encoding, or not text at all
        raise PipelineError(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return parse_yaml(text, str(path))


# ---------------------------------------------------------------------------------------------
# Atomic outputs: DVC hashes whatever lies at an output path, so a file half-written by a crash
# or Ctrl-C must never appear there. Everything is written beside the target and renamed into
# place (an atomic rename on POSIX) only once complete.

_TMP_PREFIX = ".tmp-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    # Makes the names in it durable (a rename into it). Not every platform or file system lets a
    # directory be opened or synced (Windows; some network file systems say EINVAL): there the
    # rename is as durable as the system makes it, which is no reason to fail a finished stage.
    with contextlib.suppress(OSError):
        _fsync(path)


def _flush_to_disk(path: Path) -> None:
    """Forces the bytes of `path` (a file, or a directory's files and folders) to the disk before it
    is renamed into place. rename() makes the name change atomic, but the data may still be in the
    page cache: after a power cut, a file renamed unsynced can read back empty under its final name,
    which DVC would then hash and cache as the output."""
    if not path.is_dir():
        _fsync(path)
        return
    for inner in sorted(path.rglob("*")):
        if inner.is_file() and not inner.is_symlink():
            _fsync(inner)
        elif inner.is_dir() and not inner.is_symlink():
            _fsync_directory(inner)
    _fsync_directory(path)


def _remove_stale_temporaries(target: Path) -> None:
    # Left behind only by a SIGKILL (every other exit cleans up after itself). Only this target's:
    # tempfile's random part has no dot, so model.pt's pattern spares the live temporary of a
    # model.pt.sha256 that write_files_atomic is writing at the same time.
    own = re.compile(re.escape(f"{_TMP_PREFIX}{target.name}.") + r"[^.]+")
    for stale in target.parent.glob(f"{_TMP_PREFIX}{target.name}.*"):
        if own.fullmatch(stale.name):
            _remove(stale)


@functools.cache
def _umask() -> int:
    """The process's umask. POSIX reads it only by setting it: set and put back once, before any
    output is written (no stage changes it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False, flush: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `target`; renames it to `target` if the block succeeds, its
    bytes flushed to the disk first and the rename after (_flush_to_disk). `flush=False` leaves
    both flushes to the caller (write_files_atomic, which flushes a stage's files together).

    With `directory=True` the temporary path is an empty directory to fill. On any exception,
    KeyboardInterrupt included, the temporary path is removed and `target` is left untouched. An
    OSError (a full disk, no permission, a file where a directory should be) becomes a one-line
    PipelineError naming `target`.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        prefix = f"{_TMP_PREFIX}{target.name}."
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:
        raise cannot_write(target, exc) from None
    try:
        # mkdtemp/mkstemp create owner-only paths: given the mode open() and mkdir() would give
        # (umask 022: 644 and 755; 077 keeps them private). Set before the block: a caller that
        # flushes the temporary itself (flush=False) flushes the mode with the bytes.
        tmp.chmod((0o777 if directory else 0o666) & ~_umask())
        yield tmp
        if flush:
            _flush_to_disk(tmp)
        if directory and target.is_dir() and not target.is_symlink():  # DVC has usually removed it already
            _replace_directory(tmp, target)
        else:
            if directory and os.path.lexists(target):  # a file or a link where the directory goes
                _remove(target)
            os.replace(tmp, target)
        if flush:
            _fsync_directory(target.parent)
    except BaseException as exc:
        try:  # the error is read from the paths the temporary still holds, then the temporary goes
            error = cannot_write(target, exc, temporary=tmp) if isinstance(exc, OSError) else None
        finally:
            _remove(tmp)
        if error is not None:
            raise error from None
        raise


def _replace_directory(new: Path, target: Path) -> None:
    # rename() cannot replace a non-empty directory, and removing the old one first would leave it
    # half-deleted if interrupted. So the old one is renamed aside (onto an empty temporary, which
    # rename() may replace) and removed once `target` is the new one; if anything stops the swap
    # between the two renames (an error, Ctrl-C), the old one is put back. Only a SIGKILL there leaves
    # no `target`; an old one whose removal is cut short is a stale temporary, which the next write
    # of `target` removes.
    aside = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        os.replace(target, aside)
        os.replace(new, target)
    except BaseException:
        if not os.path.lexists(target):
            os.replace(aside, target)
        raise
    finally:
        _remove(aside)


def cannot_read(path: str | os.PathLike, exc: OSError) -> PipelineError:
    """The one-line error for an input the system refused to read (no permission, a directory)."""
    return PipelineError(f"{path}: cannot read ({os_reason(exc)})")


def cannot_write(target: Path, exc: OSError, temporary: Path | None = None) -> PipelineError:
    """The one-line error for an output that could not be written. A path in its `temporary` (an
    os.open in _flush_to_disk, a file of a directory output) is named as it would have been in the
    output: the temporary is removed before the user reads the error, and the output is its subject."""
    reason = os_reason(exc)
    # os functions give the name as a str; Path.open and Path.write_bytes as the Path they were given
    name = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes, os.PathLike)) else None
    if isinstance(exc, FileExistsError) and name and not Path(name).is_dir():
        # mkdir's word for a file where a parent directory should be; asked of the path itself, so
        # a caller builds this error before it removes a temporary that holds the path
        reason = "Not a directory"
    if name and temporary:
        # absolute on both sides: a library may name the file by its absolute path, the caller
        # the temporary by a relative one
        path, folder = Path(os.path.abspath(name)), Path(os.path.abspath(temporary))
        if path.is_relative_to(folder):
            inner = path.relative_to(folder)
            name = None if inner == Path(".") else str(target / inner)
    return PipelineError(f"{target}: cannot write ({reason}{f': {name}' if name else ''})")


@contextlib.contextmanager
def _signals_held_once_started() -> Iterator[Callable[[], None]]:
    """Yields `start`: from its call to the end of the block, Ctrl-C (SIGINT) and SIGTERM wait, and
    are delivered (to the handlers they would have met) as the block ends. In the main thread,
    where Python runs signal handlers; elsewhere `start` does nothing."""
    arrived: list[int] = []
    previous: dict[int, Any] = {}

    def start() -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, lambda caught, frame: arrived.append(caught))

    def restore() -> None:
        for signum, handler in previous.items():  # None: a handler not set from Python; the default then
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    try:
        yield start
    except BaseException:  # a rename failed: its error ends the run; a held signal adds nothing to it
        restore()
        raise
    restore()
    for signum in dict.fromkeys(arrived):
        signal.raise_signal(signum)


def write_files_atomic(files: dict[str | os.PathLike, bytes]) -> None:
    """Writes a stage's several outputs (preprocess's three splits, plot's three PNGs) each to a
    temporary file, and renames them into place only once every one is written: a failure while
    writing (a full disk, Ctrl-C) leaves every target untouched, never a new train split beside an
    old test split. The renames come last, one after another, each atomic; a Ctrl-C or SIGTERM
    that arrives between two of them waits until the last is done."""
    # Every temporary exists, and is on the disk, before any rename: the stack exits (renames, or on
    # an exception removes the temporaries) only after the loop has written and flushed them all. A
    # flush that fails (EIO; ENOSPC where a file system reports it only then) therefore renames
    # nothing. The folders' fsync, registered first, runs last: once for the renames into each.
    with _signals_held_once_started() as hold_signals, contextlib.ExitStack() as renames:
        for folder in dict.fromkeys(Path(target).parent for target in files):
            renames.callback(_fsync_directory, folder)
        for target, data in files.items():
            temporary = renames.enter_context(atomic_path(target, flush=False))
            temporary.write_bytes(data)
            _flush_to_disk(temporary)
        hold_signals()  # only the renames are left (the stack's exit): all of them, or Ctrl-C during a write


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    write_files_atomic({target: data})


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def tensor_bytes(payload: dict[str, Any]) -> bytes:
    """The bytes torch.save writes for `payload`, the same on every run: save_tensors' bytes.

    torch.save is given a file object, never a path: given a path, it names the records inside its
    zip archive after that file, so saving to a randomly named temporary file would make the bytes,
    and so DVC's hash, differ from run to run. Given a file object it names them "archive/...".
    """
    import torch  # here, not at the top: the params and fetch stages use this module without torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_tensors(target: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save to `target`, atomically and byte-for-byte reproducibly (the bytes of tensor_bytes).
    Streamed into the temporary file, not built in memory first: no second copy of the payload
    (augment's 2.2 GB at 50 copies)."""
    import torch  # see tensor_bytes

    with atomic_path(target) as tmp, tmp.open("wb") as file:
        try:
            torch.save(payload, file)
        except RuntimeError as exc:
            # A failed write (a full disk) reaches here as torch's zip writer's RuntimeError, raised
            # while it closed the archive, with the OSError as its context: that is the reason to
            # report (atomic_path makes it the one-line "cannot write").
            reason = exc.__context__
            while reason is not None and not isinstance(reason, OSError):
                reason = reason.__context__
            if reason is None:
                raise
            raise reason from None


def load_tensors(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Loads a file written by save_tensors. weights_only=True: a file can hold tensors and plain
    containers but never run code, which matters for files pulled from a shared remote."""
    import torch  # see save_tensors

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: file not found (run the stage that produces it: `dvc repro`)")
    if not path.is_file():
        raise PipelineError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: empty file (0 bytes)")
    check_crcs(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PipelineError(f"{path}: not a tensor file written by this pipeline, or one holding objects "
                            "that could run code (refused: files load with weights_only=True)") from None
    except Exception as exc:  # torch raises several types for a damaged zip archive
        raise damaged_tensor_file(path, exc) from None
    if not isinstance(payload, dict):
        raise PipelineError(f"{path}: expected a dict of tensors, found {type(payload).__name__}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise PipelineError(f"{path}: missing entries {missing}; was it written by another version?")
    return payload


def check_compile(device: torch.device) -> None:
    """train.compile: true needs what torch.compile's Inductor builds its code with: a C++ compiler
    that runs for the CPU ($CXX, else g++), Triton for a GPU. Inductor finds out at the first step,
    with a page of traceback; checked before training, the run stops with one line instead. (A
    compiler that runs may still lack headers or OpenMP: that stays Inductor's to report.) The
    check uses torch's private helpers; where a torch release has moved them, it is skipped.
    Here, not in stages.runtime: the params stage checks it too, before DVC deletes the last model,
    and stages.runtime is train's alone (a change to it must not re-run the download of MNIST)."""
    import torch  # see tensor_bytes

    try:
        from torch._inductor import config as inductor_config
        from torch._inductor import exc as inductor_errors
        from torch._inductor.cpp_builder import get_cpp_compiler  # runs `<compiler> --version`
        from torch.utils._triton import has_triton, has_triton_package
    except ImportError:
        return
    if device.type == "cuda":
        if not has_triton_package():
            raise PipelineError("train.compile: torch.compile on a GPU needs Triton, which is not installed "
                                "(pip install triton); or set train.compile: false")
        if not has_triton():
            raise PipelineError(f"train.compile: Triton does not support this GPU "
                                f"({torch.cuda.get_device_name(device)}, compute capability 7.0 or more needed); "
                                "set train.compile: false")
        return
    try:
        get_cpp_compiler()
    except inductor_errors.InvalidCxxCompiler:
        # torch's default: (None, $CXX or g++ (clang++ on macOS)); None stands for a conda-installed
        # g++, tried only with $TORCH_INDUCTOR_INSTALL_GXX set.
        search = inductor_config.cpp.cxx
        tried = " or ".join(str(cxx) for cxx in (search if isinstance(search, (tuple, list)) else [search]) if cxx)
        raise PipelineError(f"train.compile: torch.compile on the CPU needs a C++ compiler, and {tried} does not "
                            "run here: install one (or point $CXX to it), or set train.compile: false") from None


def check_crcs(path: Path) -> None:
    """PipelineError if a record of torch.save's zip archive fails the CRC-32 stored beside it, or
    cannot be read back at all. torch.load does not check them, so a flipped bit in the weights
    would load silently and predict wrong classes; checking costs 0.14 s for the 218 MB augmented
    train split."""
    try:
        with zipfile.ZipFile(path) as archive:
            # torch.save stores every record as is; a compressed one (a crafted file: 4 GB of
            # zeros deflate to 4 MB) would be inflated whole by testzip, and by torch.load.
            compressed = next((info for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED), None)
            failing = None if compressed else archive.testzip()
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            head = f.read(4)
        if b"PK\x03\x04".startswith(head):  # a zip archive's first record, and no readable end
            # (torch.load said "OSError: [Errno 22] Invalid argument" or miniz's five-sentence note)
            raise PipelineError(f"{path}: damaged tensor file ({path.stat().st_size:,} bytes; the zip archive's "
                                "closing index, which torch.save writes last, is missing or damaged: cut short?)"
                                ) from None
        # torch.load would try its pre-1.6 pickle format on it and fail with anything from
        # "KeyError: 101" (a text file) on; torch.save has written zip archives since 1.6.
        raise PipelineError(f"{path}: not a tensor file written by this pipeline (torch.save's zip archive)") from None
    except PermissionError as exc:  # the file may be fine: not "damaged"
        raise cannot_read(path, exc) from None
    except Exception as exc:  # an unknown compression method, an encryption flag, a cut-off record
        raise damaged_tensor_file(path, exc) from None
    if compressed:
        raise PipelineError(f"{path}: damaged, or no tensor file written by this pipeline (its record "
                            f"{compressed.filename} names compression method {compressed.compress_type}; torch.save "
                            "stores every record as is)")
    if failing:
        raise PipelineError(f"{path}: damaged tensor file (its record {failing} fails its CRC-32 check)")


def damaged_tensor_file(path: Path, exc: Exception) -> PipelineError:
    """The one-line error for a tensor file that torch.load or zipfile failed on."""
    return PipelineError(f"{path}: damaged tensor file ({exception_line(exc)})")


def exception_line(exc: BaseException) -> str:
    """`Type: first line of its message`, or `Type` alone when it has none: how an error raised by a
    library (torch, Pillow, zipfile), whose messages can run to many lines, is told in one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def os_reason(exc: OSError) -> str:
    """Why the system refused a read or a write, in its words ("Permission denied", "No space left on
    device"); the exception in one line where it gave none."""
    return exc.strerror or exception_line(exc)


# ---------------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where the program is, so that it unwinds as on Ctrl-C (atomic
    writes remove their temporaries) instead of dying where it stands."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


# Linux's prctl option: the signal this process gets when its parent dies (include/uapi/linux/prctl.h).
PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """Asks Linux for SIGTERM when this process's parent dies (elsewhere: nothing). For a stage
    that DVC runs (dvc.yaml's `exec` makes DVC the parent): a `dvc repro` that is killed would
    otherwise leave its stage running on, writing outputs and DVCLive logs that the next
    `dvc repro` then races with."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return  # refused (a sandbox's seccomp filter): the stage runs on without the tie, as before
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def ctrl_c_reached_my_group(exc: KeyboardInterrupt) -> bool:
    """Whether `exc` is Ctrl-C typed on the terminal this process runs in the foreground of: the
    terminal then sent SIGINT to the whole foreground process group, children included, so a
    child started without a session of its own has it already."""
    if isinstance(exc, Terminated):
        return False
    for fd in (0, 1, 2):  # any standard stream still on the terminal can name its foreground group
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:  # closed, or a terminal this process does not control
            continue
    return False  # no terminal: SIGINT came from `kill -INT` to this process alone


def stopped_by(signum: int) -> tuple[str, int]:
    """(what stopped the program, its exit status: 128 + the signal) for SIGINT (Ctrl-C) or SIGTERM."""
    return ("stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"), 128 + signum


def interruption(exc: KeyboardInterrupt) -> tuple[str, int]:
    """stopped_by for the exception Ctrl-C or SIGTERM raised (KeyboardInterrupt or Terminated)."""
    return stopped_by(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def run_main(stage: str, entry: Callable[[], None], kept: str = "no file was left half-written") -> None:
    """Runs a stage's entry function as a command: a PipelineError becomes one line on stderr and
    exit status 1; Ctrl-C and SIGTERM (`kill`, `timeout`, a cancelled CI job) a short message
    (`kept`: what the stage leaves on disk) and the conventional status, 130 or 143. Under DVC
    (which sets DVC_ROOT for a stage's command) the stage also stops when DVC dies; run by hand it
    outlives its shell like any command (nohup keeps working)."""
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers go
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        if "DVC_ROOT" in os.environ:
            stop_with_parent()
        entry()
    except PipelineError as exc:
        log(stage, f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
        stopped, status = interruption(exc)
        log(stage, f"{stopped}; {kept}")
        sys.exit(status)
    finally:
        if main_thread:  # a handler installed outside Python reads as None: the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
