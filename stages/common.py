"""Helpers every stage uses: errors, logging and progress, atomic outputs, tensor files, entry points.

Every stage imports this module, so a change here re-runs the whole pipeline: it holds only what
every stage needs. What train alone needs (device, seeding, torchrun rank) is in stages.runtime.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


class PipelineError(Exception):
    """A problem with the user's input or environment: reported as one line, without a traceback."""


def log(stage: str, message: str) -> None:
    # stderr, flushed: DVC streams it live, and stdout stays free for machine-readable output.
    print(f"{stage}: {message}", file=sys.stderr, flush=True)


class Progress:
    """Prints `label: done/total (pct)` at most every `interval_s` seconds, and once at the end."""

    def __init__(self, stage: str, label: str, total: int | None, interval_s: float = 2.0):
        self.stage, self.label, self.total, self.interval_s = stage, label, total, interval_s
        self.done = 0
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._print()

    def close(self) -> None:
        self._print()

    def _print(self) -> None:
        if self.total:
            log(self.stage, f"{self.label}: {self.done:,}/{self.total:,} ({100 * self.done / self.total:.0f}%)")
        else:
            log(self.stage, f"{self.label}: {self.done:,}")


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


def _remove_stale_temporaries(target: Path) -> None:
    # Left behind only by a SIGKILL (every other exit cleans up after itself).
    for stale in target.parent.glob(f"{_TMP_PREFIX}{target.name}.*"):
        _remove(stale)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `target`; renames it to `target` if the block succeeds.

    With `directory=True` the temporary path is an empty directory to fill. On any exception,
    KeyboardInterrupt included, the temporary path is removed and `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    prefix = f"{_TMP_PREFIX}{target.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o755 if directory else 0o644)  # mkdtemp/mkstemp create owner-only paths
        if directory and target.exists():
            _remove(target)  # rename() cannot replace a non-empty directory; DVC usually removed it
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def save_tensors(target: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save to `target`, atomically and byte-for-byte reproducibly.

    Serialising to memory first matters: torch.save names the records inside its zip archive after
    the file it writes to, so saving to a randomly named temporary file would make the bytes, and
    so DVC's hash, differ from run to run.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(target, buffer.getvalue())


def load_tensors(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Loads a file written by save_tensors. weights_only=True: a file can hold tensors and plain
    containers but never run code, which matters for files pulled from a shared remote."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (run the stage that produces it: `dvc repro`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PipelineError(f"{path}: not a tensor file written by this pipeline, or one holding objects "
                            "that could run code (refused: files load with weights_only=True)") from None
    except Exception as exc:  # torch raises several types for a damaged zip archive
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PipelineError(f"{path}: damaged tensor file ({type(exc).__name__}: {reason})") from None
    if not isinstance(payload, dict):
        raise PipelineError(f"{path}: expected a dict of tensors, found {type(payload).__name__}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise PipelineError(f"{path}: missing entries {missing}; was it written by another version?")
    return payload


# ---------------------------------------------------------------------------------------------


def run_main(stage: str, entry: Callable[[], None]) -> None:
    """Runs a stage's entry function as a command: a PipelineError becomes one line on stderr and
    exit status 1; Ctrl-C becomes a short message and the conventional status 130."""
    try:
        entry()
    except PipelineError as exc:
        log(stage, f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        log(stage, "interrupted; no partial output was kept")
        sys.exit(130)
