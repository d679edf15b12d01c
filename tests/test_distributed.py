"""train under torchrun: 2 CPU processes (gloo), launched by the DVC stage itself."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from stages import train

pytestmark = pytest.mark.integration


def test_two_processes_train_to_the_same_band_and_write_one_set_of_outputs(project, built_project):
    project.set_params({"train": {"processes": 2}})
    assert project.repro() == {"params", "train", "evaluate", "plot"}
    output = project.last.stdout + project.last.stderr
    assert "launching torchrun" in output
    assert "each shared by 2 processes" in output
    assert output.count("train: trained in") == 1, "only rank 0 reports and writes"
    assert output.count("train: epoch 2/2") == 1
    assert sorted(p.name for p in project.path("models").iterdir()) == [".gitignore", "model.pt"]
    with open(project.path("metrics/train/plots/metrics/val_loss.tsv")) as f:
        assert len(list(csv.DictReader(f, delimiter="\t"))) == 2  # one row per epoch, rank 0's only
    single = json.loads(built_project.path("metrics/eval.json").read_text())["accuracy"]
    distributed = json.loads(project.path("metrics/eval.json").read_text())["accuracy"]
    # It failed once in CI under load with no record of which check or value; say so next time.
    assert distributed >= 0.9 and abs(distributed - single) <= 0.05, (
        f"accuracy: 2 processes {distributed}, 1 process {single}\n{output[-4000:]}")


def test_a_failing_worker_ends_with_its_error_line_not_torchrun_traceback(tmp_path, monkeypatch, capfd):
    """Each worker prints its one-line error; torchrun's own traceback and failure table (its
    ChildFailedError) would bury it, so the stage launches torchrun without them, and exits 1."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the workers fail as they start
    status = train.launch_torchrun(2, ["train.pt", "val.pt", "model.pt", "live"])
    err = capfd.readouterr().err
    assert status == 1
    # At least the first: torchrun stops the other worker when one fails, maybe before its line.
    assert "train: error: params.yaml: cannot read the params file" in err
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]


def test_a_worker_killed_by_a_signal_is_named(tmp_path):
    """A worker killed by a signal (SIGKILL: out of memory) prints nothing itself; torchrun's failure
    table said which signal, so without it the launch says so in one line."""
    script = tmp_path / "killed.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", train.TORCHRUN, "--standalone", "--nproc-per-node=1", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "train: error: worker 0 was killed by SIGKILL" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
