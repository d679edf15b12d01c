"""Interrupted work loses nothing: atomic outputs, resumable training, prompt Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import copy_project

pytestmark = pytest.mark.integration


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start(project, *args: str) -> subprocess.Popen:
    """Starts a command in the project in its own process group, merged output as text lines.

    With SIGINT at its default, as in a terminal: a test run started in the background by a
    non-interactive shell inherits SIGINT ignored, and Ctrl-C would then reach no one."""
    return subprocess.Popen(args, cwd=project.root, env=project.env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_until(process: subprocess.Popen, marker: str, timeout_s: float = 120) -> str:
    """Output lines up to and including the first containing `marker`."""
    deadline, seen = time.monotonic() + timeout_s, []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout_s} s:\n{''.join(seen)}"
    raise AssertionError(f"process ended before printing {marker!r}:\n{''.join(seen)}")


def test_training_killed_after_an_epoch_resumes_to_identical_results(built_project, tmp_path):
    reference = copy_project(built_project, tmp_path / "reference")
    reference.set_params({"train": {"epochs": 3}})
    reference.repro()

    interrupted = copy_project(built_project, tmp_path / "interrupted")
    interrupted.set_params({"train": {"epochs": 3}})
    process = start(interrupted, str(interrupted.env["PATH"].split(os.pathsep)[0] + "/dvc"), "repro")
    read_until(process, "train: epoch 1/3")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not interrupted.path("models/model.pt").exists()
    assert interrupted.path("models/train-checkpoint.pt").exists()
    # DVCLive's summary was updated live, after epoch 1, for `dvc exp show` to see a running run.
    assert json.loads(interrupted.path("metrics/train/metrics.json").read_text())["epoch"] == 1

    interrupted.repro()
    assert "resuming from models/train-checkpoint.pt after epoch 1" in interrupted.last.stdout + interrupted.last.stderr
    assert "epoch 1/3" not in interrupted.last.stdout + interrupted.last.stderr
    # DVCLive's files included: the resumed run replays the checkpoint's points into a fresh log.
    live_files = sorted(str(f.relative_to(reference.root)) for f in reference.path("metrics/train").rglob("*") if f.is_file())
    assert "metrics/train/plots/metrics/step_loss.tsv" in live_files
    for name in ("models/model.pt", "metrics/eval.json", *live_files):
        assert digest(interrupted.path(name)) == digest(reference.path(name)), name
    assert not interrupted.path("models/train-checkpoint.pt").exists()
    assert "up to date" in interrupted.dvc("status").stdout


def kill_after_first_epoch(project) -> None:
    process = start(project, str(project.env["PATH"].split(os.pathsep)[0] + "/dvc"), "repro")
    read_until(process, "train: epoch 1/3")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert project.path("models/train-checkpoint.pt").is_file()


def test_checkpoint_of_other_params_is_not_resumed(project):
    project.set_params({"train": {"epochs": 3}})
    kill_after_first_epoch(project)
    project.set_params({"train": {"epochs": 3, "lr": 0.04}})
    project.repro()
    output = project.last.stdout + project.last.stderr
    assert "belongs to other params or data" in output
    assert "epoch 1/3" in output


def test_checkpoint_computed_otherwise_is_not_resumed(project):
    # Written on one thread, continued on two: not the run an uninterrupted one-thread run is.
    project.set_params({"train": {"epochs": 3, "device": "cpu"}})
    kill_after_first_epoch(project)
    project.env["OMP_NUM_THREADS"] = "2"
    project.repro()
    output = project.last.stdout + project.last.stderr
    assert "computed otherwise" in output and "epoch 1/3" in output
    assert yaml.safe_load(project.path("metrics/train/params.yaml").read_text())["threads"] == 2


def test_ctrl_c_exits_promptly_without_a_traceback(project):
    project.set_params({"train": {"epochs": 50}})
    process = start(project, str(project.env["PATH"].split(os.pathsep)[0] + "/dvc"), "repro")
    read_until(process, "train: epoch 1/50")
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired as exc:
        os.killpg(process.pid, signal.SIGKILL)
        since = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output
        pytest.fail(f"dvc repro did not exit within 20 s of Ctrl-C; its output since:\n{since}")
    assert process.returncode != 0
    assert "train: interrupted" in output
    assert "Traceback" not in output


def test_corrupt_model_file_gives_one_line_error(project):
    project.path("models/model.pt").write_bytes(b"not a model")
    result = project.run(sys.executable, "-m", "stages.evaluate", "models/model.pt", "data/prepared/test.pt",
                         "metrics/eval.json", "metrics/confusion.csv", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("evaluate: error: models/model.pt:")
    assert len(result.stderr.strip().splitlines()) == 1
