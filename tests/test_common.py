"""stages.common's writers (a stage's several outputs all written, or none) and its YAML loader."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import stages.__main__ as launcher
from stages import common
from stages.common import (PipelineError, Terminated, atomic_path, ctrl_c_reached_my_group, exception_line,
                           load_tensors, os_reason, parse_yaml, raise_terminated, run_main, save_tensors,
                           tensor_bytes, write_files_atomic, write_text_atomic)
from tests.conftest import PROJECT_ROOT, VENV_BIN


def test_ctrl_c_while_writing_leaves_every_target_as_it_was(tmp_path, monkeypatch):
    targets = {tmp_path / name: f"new {name}".encode() for name in ("a.pt", "b.pt", "c.pt")}
    for target in targets:
        target.write_bytes(b"old")
    real_write_bytes, writes = Path.write_bytes, []

    def interrupted_at_the_second(path, data):
        writes.append(path.name)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real_write_bytes(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", interrupted_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            write_files_atomic(targets)
    assert writes[0].startswith(".tmp-a.pt."), "the first file was written, to a temporary"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"], "no temporary is left"
    assert all(target.read_bytes() == b"old" for target in targets)

    write_files_atomic(targets)
    assert {target: target.read_bytes() for target in targets} == targets
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"]


def test_an_output_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A file where the output's directory should be, or a full disk while writing: one line from
    run_main (status 1), no temporary left, the old output untouched."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        run_main("x", lambda: write_files_atomic({tmp_path / "afile" / "out.json": b"{}"}))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"x: error: {tmp_path}/afile/out.json: cannot write (Not a directory: "
                                       f"{tmp_path}/afile)\n")

    target = tmp_path / "out.pt"
    target.write_bytes(b"old")

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(PipelineError) as info:
        write_files_atomic({target: b"new"})
    assert str(info.value) == f"{target}: cannot write (No space left on device)"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile", "out.pt"] and target.read_bytes() == b"old"


def test_outputs_reach_the_disk_before_their_rename_and_the_rename_after(tmp_path, monkeypatch):
    """A power cut after a rename must not leave an empty file under an output's name: each
    temporary's bytes (a directory's: every file and folder in it) are fsynced before it is
    renamed into place, and the parent folder after, so that the new name lasts too."""
    events, modes = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).relative_to(tmp_path).as_posix()))
        modes.append(os.fstat(fd).st_mode & 0o777)  # the mode the output will have: flushed with the bytes
        real_fsync(fd)

    def replace(source, target):
        events.append(("rename", Path(target).relative_to(tmp_path).as_posix()))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_files_atomic({tmp_path / "a.pt": b"a", tmp_path / "b.pt": b"b"})
    written = [(kind, name if kind == "rename" or name == "." else "temporary") for kind, name in events]
    # both temporaries flushed before the first rename, each once; their folder once, after the last
    assert written == [("fsync", "temporary"), ("fsync", "temporary"),
                       ("rename", "b.pt"), ("rename", "a.pt"), ("fsync", ".")]
    assert modes[:2] == [0o666 & ~common._umask()] * 2  # 0o644 under umask 022: not mkstemp's owner-only 0o600
    events.clear()
    (tmp_path / "sub").mkdir()
    write_files_atomic({tmp_path / "sub" / "c.pt": b"c", tmp_path / "d.pt": b"d"})
    assert [(kind, name) for kind, name in events if kind == "rename" or "tmp" not in name] == [
        ("rename", "d.pt"), ("rename", "sub/c.pt"), ("fsync", "."), ("fsync", "sub")]  # each folder written to
    events.clear()
    with atomic_path(tmp_path / "metrics", directory=True) as folder:
        (folder / "plots").mkdir()
        (folder / "plots" / "loss.tsv").write_text("step\tloss\n")
        (folder / "metrics.json").write_text("{}")
    synced = [name.split("/", 1)[1] if "/" in name else name for kind, name in events if kind == "fsync"]
    assert synced[:-2] == ["metrics.json", "plots", "plots/loss.tsv"] and synced[-1] == "."
    assert events[-2] == ("rename", "metrics")  # after its files and itself, before its parent
    assert (tmp_path / "metrics" / "plots" / "loss.tsv").read_text() == "step\tloss\n"


def test_a_flush_that_fails_renames_none_of_a_stages_outputs(tmp_path, monkeypatch):
    """An fsync error on the second of two outputs (EIO; or ENOSPC, which some file systems
    report only then) leaves both as they were, no temporary behind, and one line naming it."""
    targets = {tmp_path / "a.pt": b"new a", tmp_path / "b.pt": b"new b"}
    for target in targets:
        target.write_bytes(b"old")
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(PipelineError, match=r"b\.pt: cannot write \(Input/output error\)$"):
        write_files_atomic(targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]
    assert all(target.read_bytes() == b"old" for target in targets)


def test_an_error_inside_the_temporary_names_the_output_not_the_temporary(tmp_path, monkeypatch):
    """The temporary is removed by the time the error is read, so the error names the path the
    failing file would have had in the output (nothing more where that is the output itself)."""
    real_open = os.open

    def refused(path, flags, *args, **kwargs):  # _fsync's open
        if flags == os.O_RDONLY and (Path(path).name == "loss.tsv" or Path(path).name.startswith(".tmp-out.pt.")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(PipelineError) as info:
        write_files_atomic({tmp_path / "out.pt": b"x"})
    assert str(info.value) == f"{tmp_path / 'out.pt'}: cannot write (Permission denied)"
    with pytest.raises(PipelineError) as info:
        with atomic_path(tmp_path / "metrics", directory=True) as folder:
            (folder / "plots").mkdir()
            (folder / "plots" / "loss.tsv").write_text("step\tloss\n")
    assert str(info.value) == (f"{tmp_path / 'metrics'}: cannot write (Permission denied: "
                               f"{tmp_path / 'metrics' / 'plots' / 'loss.tsv'})")
    monkeypatch.setattr(os, "open", real_open)
    with pytest.raises(PipelineError) as info:  # Path.write_bytes names the Path it was given
        with atomic_path(tmp_path / "metrics", directory=True) as folder:
            (folder / "plots").write_text("a file where a folder should be")
            (folder / "plots" / "loss.tsv").write_bytes(b"step\tloss\n")
    assert str(info.value) == (f"{tmp_path / 'metrics'}: cannot write (Not a directory: "
                               f"{tmp_path / 'metrics' / 'plots' / 'loss.tsv'})")
    with pytest.raises(PipelineError) as info:  # the folder is gone by then: no "Not a directory" for it
        with atomic_path(tmp_path / "metrics", directory=True) as folder:
            (folder / "plots").mkdir()
            (folder / "plots").mkdir()
    assert str(info.value) == f"{tmp_path / 'metrics'}: cannot write (File exists: {tmp_path / 'metrics' / 'plots'})"
    with pytest.raises(PipelineError) as info:  # a file there: read before the temporary is removed
        with atomic_path(tmp_path / "metrics", directory=True) as folder:
            (folder / "plots").write_text("a file where a folder should be")
            (folder / "plots").mkdir(exist_ok=True)
    assert str(info.value) == (f"{tmp_path / 'metrics'}: cannot write (Not a directory: "
                               f"{tmp_path / 'metrics' / 'plots'})")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as info:  # a relative target, a library that names absolute paths
        with atomic_path("metrics", directory=True) as folder:
            (folder / "plots").write_text("a file where a folder should be")
            (folder.resolve() / "plots" / "loss.tsv").write_bytes(b"step\tloss\n")
    assert str(info.value) == "metrics: cannot write (Not a directory: metrics/plots/loss.tsv)"
    with pytest.raises(PipelineError) as info:  # and the other way round (mkdtemp's path is absolute from 3.12)
        with atomic_path(tmp_path / "metrics", directory=True) as folder:
            (folder / "plots").write_text("a file where a folder should be")
            (Path(os.path.relpath(folder)) / "plots" / "loss.tsv").write_bytes(b"step\tloss\n")
    assert str(info.value) == f"{tmp_path / 'metrics'}: cannot write (Not a directory: {tmp_path}/metrics/plots/loss.tsv)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_temporary_goes_even_when_the_error_cannot_be_built(tmp_path, monkeypatch):
    """atomic_path removes its temporary before anything else escapes: here building the one-line
    error itself fails (a bug in it, or a Ctrl-C while it reads the paths)."""
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "cannot_write", broken)
    for directory in (True, False):
        with pytest.raises(KeyboardInterrupt):
            with atomic_path(tmp_path / "out", directory=directory) as temporary:
                raise OSError(28, "No space left on device", str(temporary))
        assert list(tmp_path.iterdir()) == []


def test_save_tensors_streams_the_bytes_of_tensor_bytes_atomically(tmp_path, monkeypatch):
    """save_tensors writes into the temporary file as torch.save goes (no copy of the payload in
    memory) the very bytes of tensor_bytes, whatever the temporary's name; a disk that fills up
    halfway through torch.save's writes gives the one-line error and leaves the old file and no
    temporary."""
    payload = {"images": torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4), "classes": ["a", "b"]}
    target = tmp_path / "train.pt"
    save_tensors(target, payload)
    assert target.read_bytes() == tensor_bytes(payload)
    target.write_bytes(b"old")

    class FullAfter64Bytes:
        """The temporary file on a disk that fills up after 64 bytes: every later write fails."""

        def __init__(self, file):
            self.file, self.room = file, 64

        def write(self, data):
            if len(data) > self.room:
                raise OSError(28, "No space left on device")
            self.room -= len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

    real_open = Path.open

    def open_on_a_full_disk(path, *args, **kwargs):
        file = real_open(path, *args, **kwargs)
        return FullAfter64Bytes(file) if path.name.startswith(".tmp-") else file

    monkeypatch.setattr(Path, "open", open_on_a_full_disk)
    with pytest.raises(PipelineError, match=rf"^{target}: cannot write \(No space left on device\)$"):
        save_tensors(target, payload)
    assert [path.name for path in tmp_path.iterdir()] == ["train.pt"] and target.read_bytes() == b"old"


@pytest.fixture
def stage_signal_handlers():
    """Ctrl-C and SIGTERM handled as in a stage under run_main (a test run started in the background,
    as CI's may be, begins with SIGINT ignored); put back afterwards."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_terminated)
    yield
    for signum, handler in before.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_between_the_renames_waits_for_the_last(tmp_path, monkeypatch, stage_signal_handlers, signum):
    """Ctrl-C or SIGTERM arriving after the first of three renames: all three outputs are the new
    ones, then the signal takes effect (KeyboardInterrupt, or run_main's Terminated); the handlers
    are back as they were."""
    targets = [tmp_path / name for name in ("train.pt", "val.pt", "test.pt")]
    for target in targets:
        target.write_bytes(b"old")
    real_replace, renamed = os.replace, []

    def signal_after_the_first(src, dst):
        real_replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(os, "replace", signal_after_the_first)
    with pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt):
        write_files_atomic({target: b"new" for target in targets})
    assert [target.read_bytes() for target in targets] == [b"new"] * 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is raise_terminated


def test_a_rename_that_fails_while_a_signal_waits_ends_the_run_with_its_own_error(tmp_path, monkeypatch,
                                                                                  stage_signal_handlers):
    """Ctrl-C held after the first rename, then the second fails: the failure is what the run ends
    with (one line, exit status 1), not an "interrupted" that would claim nothing was half-written."""
    real_replace, renamed = os.replace, []

    def first_renames_then_the_disk_is_full(src, dst):
        renamed.append(dst)
        if len(renamed) > 1:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", first_renames_then_the_disk_is_full)
    with pytest.raises(PipelineError, match=r"cannot write \(No space left on device\)$"):
        write_files_atomic({tmp_path / "a.json": b"new", tmp_path / "b.json": b"new"})
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """fetch's data/raw: the old directory stays complete until the new one is in place, comes back
    if the swap fails, and an old copy whose removal was cut short is cleaned up by the next write."""
    target = tmp_path / "raw"
    target.mkdir()
    (target / "old.gz").write_bytes(b"old")

    def fill(files):
        with atomic_path(target, directory=True) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)

    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(PipelineError, match=r"raw: cannot write \(No space left on device\)$"):
        fill({"new.gz": b"new"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls[0][0] == "raw" and calls[1][1] == "raw" and calls[2] == (calls[0][1], "raw")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw"]
    assert [path.name for path in target.iterdir()] == ["old.gz"]

    monkeypatch.setattr("stages.common._remove", lambda path: None)  # as if cut short by a SIGKILL
    fill({"new.gz": b"new"})
    assert [path.name for path in target.iterdir()] == ["new.gz"]
    assert len(list(tmp_path.glob(".tmp-raw.*"))) == 1
    monkeypatch.undo()
    fill({"newer.gz": b"newer"})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw"]
    assert [path.name for path in target.iterdir()] == ["newer.gz"]

    elsewhere = tmp_path / "elsewhere"  # a file, or a link to a directory, where the output goes
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"someone's")
    for occupant in (lambda: target.write_bytes(b"a file"), lambda: target.symlink_to(elsewhere)):
        shutil.rmtree(target)
        occupant()
        fill({"new.gz": b"new"})
        assert target.is_dir() and not target.is_symlink() and [p.name for p in target.iterdir()] == ["new.gz"]
        assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere", "raw"]
    assert (elsewhere / "keep").read_bytes() == b"someone's", "the link goes, not what it points to"


def test_a_target_named_like_anothers_temporary_is_spared(tmp_path):
    """model.pt's clean-up of temporaries a SIGKILL left behind must not remove the live temporary
    of model.pt.sha256, written in the same call; a real leftover of model.pt's goes."""
    (tmp_path / ".tmp-model.pt.k1ll3d00").write_bytes(b"left by a SIGKILL")
    targets = {tmp_path / "model.pt.sha256": b"digest", tmp_path / "model.pt": b"weights"}
    write_files_atomic(targets)
    assert {target: target.read_bytes() for target in targets} == targets
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pt", "model.pt.sha256"]


def test_parse_yaml_reads_every_scalar_as_dvc_does_and_refuses_duplicate_keys():
    """One loader for params.yaml, presets.yaml and datasets.yaml, reading what DVC's own parser
    reads (YAML 1.2): PyYAML's YAML 1.1 trained with seed 8 from `seed: 010` while `dvc params
    diff` showed 10, and read `yes`, `on` and `1:30` as true, true and 90 where DVC reads text. Merge
    keys allowed; a repeated key (at any depth) refused in one line that says where."""
    from dvc.utils.serialize import parse_yaml as dvc_parse_yaml

    scalars = ["010", "0o17", "0x1F", "1_000", "yes", "No", "on", "OFF", "y", "1:30", "1e-5", "1.0e-3", "1e-3x",
               ".5", "1.", "+1", "-.inf", "~", "null", "True", "false", "2026-01-01", "'010'"]
    text = "base: &b {lr: 0.1, n: 2}\nrun:\n  <<: *b\n  lr: 1.0e-3\n" + "".join(
        f"k{i}: {scalar}\n" for i, scalar in enumerate(scalars))
    ours, dvcs = parse_yaml(text, "x.yaml"), dvc_parse_yaml(text, "x.yaml")
    assert ours == dvcs and [type(ours[key]) for key in ours] == [type(dvcs[key]) for key in dvcs]
    assert ours["run"] == {"lr": 0.001, "n": 2}
    assert [ours[f"k{i}"] for i in range(5)] == [10, 15, 31, 1000, "yes"] and ours["k9"] == "1:30"
    assert yaml.safe_load(text)["k0"] == 8 and yaml.safe_load(text)["k4"] is True  # what PyYAML read
    with pytest.raises(PipelineError, match=r'^x\.yaml: not valid YAML: found duplicate key "lr" with value "0\.05" '
                                            r'\(original value: "0\.2"\) \(line 3, column 3\)$'):
        parse_yaml("train:\n  lr: 0.2\n  lr: 0.05\n", "x.yaml")
    with pytest.raises(PipelineError, match=r"^x\.yaml: not valid YAML: expected .* \(line 2, column 1\)$"):
        parse_yaml("train: [unclosed\n", "x.yaml")
    with pytest.raises(PipelineError, match=r"^x\.yaml: not valid YAML: month must be in 1\.\.12"):
        parse_yaml("date: 2026-13-01\n", "x.yaml")  # a constructor's ValueError, not a traceback


def test_exception_line_is_the_type_and_the_first_line_of_the_message():
    assert exception_line(RuntimeError("size mismatch for fc.weight\n  copying a param ...")) == \
        "RuntimeError: size mismatch for fc.weight"
    assert exception_line(OSError("  \n")) == "OSError"  # no message: the type alone
    assert exception_line(KeyError("fc.bias")) == "KeyError: 'fc.bias'"


def test_os_reason_is_the_systems_words_else_the_exception_in_one_line():
    assert os_reason(PermissionError(13, "Permission denied", "/x")) == "Permission denied"
    assert os_reason(OSError("tar member is a device\nmore")) == "OSError: tar member is a device"


def test_sigterm_stops_a_stage_as_ctrl_c_does_and_the_handler_is_put_back(capsys):
    """`kill`, `timeout` and a cancelled CI job send SIGTERM: one line and status 143, with the
    clean-up of Ctrl-C (Terminated is a KeyboardInterrupt, so atomic writes remove their temporaries)."""
    before = signal.getsignal(signal.SIGTERM)

    def killed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, at once
        raise AssertionError("SIGTERM did not stop the entry function")

    with pytest.raises(SystemExit) as stopped:
        run_main("augment", killed)
    assert stopped.value.code == 143
    assert capsys.readouterr().err == "augment: stopped by SIGTERM; no file was left half-written\n"
    assert signal.getsignal(signal.SIGTERM) == before


# A stage that says it is running, then works for a minute (the test stops it long before).
STAGE = """
import time
from stages.common import log, run_main
def work():
    log("stage", "running")
    time.sleep(60)
run_main("stage", work)
"""
# Its parent: starts it, prints its pid, and waits (until the test kills it).
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stderr=open(sys.argv[2], "w"))
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.parametrize("under_dvc", [True, False], ids=["run-by-dvc", "run-by-hand"])
def test_a_stage_run_by_dvc_stops_when_dvc_is_killed(tmp_path, under_dvc):
    """Killing `dvc repro` left its stage training on, and the next `dvc repro` then wrote beside
    it (DVCLive's logs got both runs' rows). DVC sets DVC_ROOT for a stage's command: there the
    stage gets SIGTERM when its parent dies. Run by hand, it outlives its parent (nohup works)."""
    env = {key: value for key, value in os.environ.items() if key != "DVC_ROOT"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    if under_dvc:
        env["DVC_ROOT"] = str(tmp_path)
    log = tmp_path / "stage.log"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, STAGE, str(log)], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while "running" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "stage: running" in log.read_text()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + (30 if under_dvc else 3)
        while "stopped" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        if under_dvc:
            assert log.read_text().endswith("stage: stopped by SIGTERM; no file was left half-written\n")
        else:
            assert log.read_text() == "stage: running\n", "still working after its parent died"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("stopped_by, status, line", [
    (KeyboardInterrupt, 130, "train: interrupted while starting; nothing was written\n"),
    (Terminated, 143, "train: stopped by SIGTERM while starting; nothing was written\n")])
def test_the_launcher_tells_an_interruption_during_a_stages_imports_in_one_line(monkeypatch, capsys, stopped_by,
                                                                                 status, line):
    """stages/run starts every stage as `python -m stages NAME`; importing torch takes seconds, and
    Ctrl-C there printed Python's traceback."""
    ran = []

    def importing(module, run_name, alter_sys):
        ran.append((module, run_name, list(sys.argv)))
        raise stopped_by

    monkeypatch.setattr(launcher.runpy, "run_module", importing)
    monkeypatch.setattr(sys, "argv", ["stages", "train", "in.pt", "--checkpoint", "c.pt"])
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            launcher.main()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped.value.code == status and capsys.readouterr().err == line
    assert ran == [("stages.train", "__main__", ["stages.train", "in.pt", "--checkpoint", "c.pt"])]


@pytest.mark.parametrize("code, finished", [(None, True), (0, True), (1, False), ("error text", False)])
def test_the_launcher_finishes_a_stage_that_exits_0_and_passes_a_failure_on(monkeypatch, code, finished):
    """train with train.processes > 1 ends with sys.exit(torchrun's status), --help with
    SystemExit(0): a 0 is a success like a return, ended by finish(); any other status passes."""
    def stage_exiting(module, run_name, alter_sys):
        raise SystemExit(code)

    calls = []
    monkeypatch.setattr(launcher.runpy, "run_module", stage_exiting)
    monkeypatch.setattr(launcher, "finish", calls.append)
    monkeypatch.setattr(sys, "argv", ["stages", "train", "in.pt"])
    before = signal.getsignal(signal.SIGTERM)
    try:
        if finished:
            launcher.main()
        else:
            with pytest.raises(SystemExit) as exited:
                launcher.main()
            assert exited.value.code == code
    finally:
        signal.signal(signal.SIGTERM, before)
    assert calls == (["train"] if finished else [])


def test_the_launcher_runs_the_stage_as_python_m_does(tmp_path):
    """`python -m stages NAME ARGS` is `python -m stages.NAME ARGS`: same output, same status."""
    for args in (["params", "--help"], ["params", str(tmp_path / "out.txt")]):
        direct, launched = (subprocess.run([sys.executable, "-m", *module, *args[1:]], cwd=tmp_path,
                                           env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                                           capture_output=True, text=True)
                            for module in (["stages.params"], ["stages", "params"]))
        assert (launched.returncode, launched.stdout, launched.stderr) == (direct.returncode, direct.stdout, direct.stderr)
    assert direct.returncode == 1 and "params.yaml" in direct.stderr  # no params.yaml here: one line
    # A stage that succeeds (the launcher ends it through finish()): the same output and status 0.
    direct, launched = (subprocess.run([sys.executable, "-m", *module, str(tmp_path / "valid.txt")],
                                       cwd=PROJECT_ROOT, capture_output=True, text=True)
                        for module in (["stages.params"], ["stages", "params"]))
    assert (launched.returncode, launched.stdout, launched.stderr) == (direct.returncode, direct.stdout, direct.stderr)
    assert launched.returncode == 0 and (tmp_path / "valid.txt").is_file()
    usage = subprocess.run([sys.executable, "-m", "stages"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert usage.returncode == 1 and usage.stderr.startswith("usage: python -m stages NAME") and not usage.stdout
    for flag in ("-h", "--help"):  # asked for: on stdout, status 0
        asked = subprocess.run([sys.executable, "-m", "stages", flag], cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert (asked.returncode, asked.stderr) == (0, "") and asked.stdout == usage.stderr
    # A typo, a file name, and modules of stages/ that are no stage (they did nothing and exited 0)
    for typo in ("trian", "train.py", "models", "common", "presets", "__main__"):
        said = subprocess.run([sys.executable, "-m", "stages", typo], cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert (said.returncode, said.stdout) == (1, "")
        assert said.stderr == (f"python -m stages: no stage '{typo}' (one of params, fetch, preprocess, augment, "
                               "train, evaluate, plot, predict)\n")


def test_stages_run_works_from_any_folder_and_says_its_usage(tmp_path):
    """stages/run finds the project from its own path, not the caller's folder (from data/ it said
    `No module named stages`), and with no stage named it prints a usage line, not sh's `shift`
    error. Paths in the arguments stay the caller's."""
    launcher = str(PROJECT_ROOT / "stages" / "run")
    env = {key: value for key, value in os.environ.items() if key not in ("DVC_ROOT", "PYTHONPATH")}
    bare = subprocess.run([launcher], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (bare.returncode, bare.stdout) == (2, "") and bare.stderr.startswith("usage: stages/run NAME")
    # From a folder with a `stages` package of its own (another checkout): still this project's code
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "__main__.py").write_text("print('the other package ran')\n")
    ran = subprocess.run([launcher, "params", "--params", str(PROJECT_ROOT / "params.yaml"), "valid.txt"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "valid.txt").is_file() and "other package" not in ran.stdout


def test_the_launcher_says_in_one_line_that_a_python_lacks_the_packages(tmp_path):
    """stages/run falls back to the python3 on PATH where the copy has no .venv: one without the
    packages (here, this one without its site-packages: -S) is named in one line, not a traceback
    from a stage's imports; a package it has that fails inside, or a module of the project's own
    that is missing, stays a traceback (a bug)."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    said = subprocess.run([sys.executable, "-S", "-m", "stages", "train", "a", "b"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert (said.returncode, said.stderr) == (1, f"train: error: {sys.executable} has no module 'torch': it lacks "
                                                 "the project's packages; `make setup` installs them into .venv "
                                                 "(which stages/run prefers), or activate the environment that has "
                                                 "them\n")
    # A package this Python finds whose part is missing; the project's own module missing
    for package, body in (("numpy", "import numpy.no_such_part\n"), ("torch", "import stages.no_such_module\n")):
        shadow = tmp_path / package / package
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(body)
        env = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{PROJECT_ROOT}"}
        said = subprocess.run([sys.executable, "-m", "stages", "train", "a", "b"], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True)
        assert said.returncode == 1 and "Traceback" in said.stderr, (package, said.stderr[-300:])
        assert "no_such" in said.stderr.splitlines()[-1]


def test_a_package_is_lacking_only_where_this_python_finds_none(tmp_path, monkeypatch):
    from stages.__main__ import lacks_package
    (tmp_path / "nsx" / "other").mkdir(parents=True)  # a namespace package, as ruamel beside ruamel.yaml
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lacks_package("no_such_package_anywhere") and lacks_package("nsx.yaml")
    assert not lacks_package("numpy") and not lacks_package("stages.no_such_module") and not lacks_package(None)
    assert not lacks_package("numpy.no_such_part")  # numpy is there: a broken install, its traceback says more


FINISH = """
import atexit, os, signal, sys
from stages import __main__ as launcher
print("the stage's last output", end="")  # unflushed: finish() must flush it
atexit.register(lambda: print(" and atexit's", end=""))
if sys.argv[1] == "SIGINT-ignored":  # as a command started in a script's background inherits it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:  # as Python starts a command from a terminal (this test may itself run with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.argv[1] != "none":  # a signal while exiting (here from the last atexit function, run first)
    atexit.register(lambda: os.kill(os.getpid(), getattr(signal, sys.argv[1].removesuffix("-ignored"))))
launcher.finish("stage")
"""


@pytest.mark.parametrize("signal_name, status, line", [
    ("none", 0, ""),
    ("SIGINT-ignored", 0, ""),
    ("SIGINT", 130, "stage: interrupted while exiting; its outputs were complete, but DVC does not record a stage "
                    "that did not exit 0\n"),
    ("SIGTERM", 143, "stage: stopped by SIGTERM while exiting; its outputs were complete, but DVC does not record "
                     "a stage that did not exit 0\n")])
def test_a_finished_stage_exits_at_once_and_says_a_late_signal(signal_name, status, line):
    """After a stage's work, Python's teardown of torch took 0.8 s, where Ctrl-C printed nothing and
    left status -2. finish() runs atexit's functions, flushes, and exits without it; a signal in
    those moments is one line and the signal's status (DVC then stops rather than go on). A SIGINT
    the process was started ignoring stays ignored."""
    done = subprocess.run([sys.executable, "-c", FINISH, signal_name], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stderr) == (status, line)
    assert done.stdout == ("the stage's last output and atexit's" if status == 0 else "the stage's last output")


@pytest.mark.integration
def test_a_stage_stops_when_dvc_repro_is_killed_whatever_the_shell(tmp_path):
    """DVC runs a stage's command through `$SHELL -c`; dash (/bin/sh on Debian) stays as the
    stage's parent and outlives a killed `dvc`, unless the command starts with `exec`, as every
    command of dvc.yaml does. A real `dvc repro` with SHELL=/bin/sh, killed while its stage runs."""
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "SHELL": "/bin/sh", "PYTHONPATH": str(PROJECT_ROOT), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "-q"], cwd=project, env=env, check=True)
    (project / "stage.py").write_text(STAGE)
    (project / "dvc.yaml").write_text(f"stages:\n  s:\n    cmd: echo $$ > stage.pid; exec {sys.executable} stage.py 2> stage.log\n"
                                      "    deps: [stage.py]\n")  # exec keeps the shell's pid: the stage's
    dvc = subprocess.Popen([str(VENV_BIN / "dvc"), "repro"], cwd=project, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = project / "stage.log"
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "running" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "stage: running" in log.read_text()
        dvc.kill()
        dvc.wait()
        deadline = time.monotonic() + 30
        while "stopped" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.read_text().endswith("stage: stopped by SIGTERM; no file was left half-written\n")
    finally:
        dvc.kill()
        dvc.wait()
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((project / "stage.pid").read_text()), signal.SIGKILL)



def _in_a_terminal(check) -> int:
    """Runs `check()` in a child process that leads a session on a pseudo-terminal of its own (its
    controlling terminal, as a shell's job would have); the child's exit status."""
    import pty

    pid, terminal = pty.fork()
    if pid == 0:  # the child: only os calls, then _exit (nothing of pytest's may run here)
        try:
            os._exit(check())
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    os.close(terminal)
    return os.waitstatus_to_exitcode(status)


def test_ctrl_c_reached_my_group_only_for_ctrl_c_on_a_terminal_whose_foreground_we_are():
    """Ctrl-C on a terminal goes to its whole foreground process group; `kill -INT` or SIGTERM to
    one process, or any signal with no terminal, reach that process alone."""
    def foreground(exc):
        return lambda: 0 if ctrl_c_reached_my_group(exc) else 1

    def background_group(exc):
        def check():  # a session leader cannot leave its group: a child of it does
            child = os.fork()
            if child == 0:
                try:
                    os.setpgid(0, 0)  # a group of its own, not the terminal's foreground one
                    os._exit(0 if ctrl_c_reached_my_group(exc) else 1)
                finally:
                    os._exit(99)
            return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        return check

    assert _in_a_terminal(foreground(KeyboardInterrupt())) == 0
    assert _in_a_terminal(foreground(Terminated())) == 1
    assert _in_a_terminal(background_group(KeyboardInterrupt())) == 1


def test_a_tensor_file_that_cannot_be_read_is_not_called_damaged(tmp_path, monkeypatch):
    """As root, chmod 000 does not stop a read, so the refusal is simulated where zipfile opens it."""
    path = tmp_path / "train.pt"
    save_tensors(path, {"images": torch.zeros(2, 3)})
    assert torch.equal(load_tensors(path, required=("images",))["images"], torch.zeros(2, 3))

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(zipfile, "ZipFile", refused)
    with pytest.raises(PipelineError, match=rf"^{path}: cannot read \(Permission denied\)$"):
        load_tensors(path)


@pytest.mark.parametrize(("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                                (0o002, 0o664, 0o775)])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, mask, file_mode, folder_mode):
    """As open() and mkdir() would: under umask 077 a stage's outputs stay private (they were
    always 644 and 755), under 002 a group may write them."""
    previous = os.umask(mask)
    common._umask.cache_clear()
    try:
        write_text_atomic(tmp_path / "a.txt", "a")
        with atomic_path(tmp_path / "folder", directory=True) as folder:
            (folder / "inside").write_text("b")
    finally:
        os.umask(previous)
        common._umask.cache_clear()
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "folder").stat().st_mode & 0o777 == folder_mode


def test_sigkill_mid_write_leaves_no_partial_output(tmp_path):
    target = tmp_path / "out" / "model.pt"
    writer = textwrap.dedent(f"""
        import sys, time
        from stages.common import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 100_000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.kill()
    process.wait()
    assert not target.exists(), "a killed writer must never leave a file at the output path"
    leftovers = list(target.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-model.pt.")
    write_text_atomic(target, "complete\n")  # the next run recovers and cleans up
    assert target.read_text() == "complete\n"
    assert list(target.parent.iterdir()) == [target]
