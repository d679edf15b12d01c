"""train under torchrun: 2 CPU processes (gloo), launched by the DVC stage itself."""

from __future__ import annotations

import csv
import json

import pytest

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
