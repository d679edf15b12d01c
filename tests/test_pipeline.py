"""`dvc repro` end to end on a synthetic mirror: outputs, no-op re-runs, selective re-runs."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest
import torch
import yaml

from tests.synthetic import write_mirror

pytestmark = pytest.mark.integration

ALL_STAGES = {"params", "fetch", "preprocess", "augment", "train", "evaluate", "plot"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_run_writes_every_output(built_project):
    p = built_project
    assert p.first_run == ALL_STAGES
    if not torch.cuda.is_available():
        assert "device auto: no CUDA GPU available, training on the CPU" in p.last.stdout + p.last.stderr
    assert sorted(f.name for f in p.path("data/raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    metrics = json.loads(p.path("metrics/eval.json").read_text())
    assert set(metrics) == {"accuracy", "loss", "per_class"}
    assert set(metrics["per_class"]) == {str(k) for k in range(10)}
    assert metrics["accuracy"] >= 0.9, "the synthetic classes are trivially separable"
    assert json.loads(p.path("metrics/train/metrics.json").read_text())["epoch"] == 2  # details: test_tracking
    with open(p.path("metrics/confusion.csv")) as f:
        assert len(list(csv.DictReader(f))) == 200
    for name in ("loss_curves", "confusion_matrix", "misclassified"):
        assert p.path(f"plots/{name}.png").read_bytes()[:8] == PNG_MAGIC
    # Every output is accounted for: nothing to do, nothing uncommitted.
    assert "up to date" in p.dvc("status").stdout


def test_second_repro_runs_nothing(project):
    assert project.repro() == set()


def test_train_param_reruns_train_evaluate_plot_only(project):
    project.set_params({"train": {"lr": 0.04}})
    assert project.repro() == {"params", "train", "evaluate", "plot"}


def test_augment_param_does_not_rerun_fetch_or_preprocess(project):
    project.set_params({"augment": {"seed": 1}})
    assert project.repro() == {"params", "augment", "train", "evaluate", "plot"}


def test_views_drawn_on_the_fly_store_nothing_and_train(project):
    """augment.on_the_fly through the stages: augment stores the originals alone with the recipe,
    train draws the views and learns (that an epoch takes as many steps as originals + one stored
    view is counted in tests/test_train.py)."""
    project.set_params({"augment": {"copies": 0, "on_the_fly": True}})
    assert project.repro() == {"params", "augment", "train", "evaluate", "plot"}
    stored = torch.load(project.path("data/augmented/train.pt"), weights_only=True)
    prepared = torch.load(project.path("data/prepared/train.pt"), weights_only=True)
    assert torch.equal(stored["images"], prepared["images"]) and stored["views"] == 0
    assert stored["on_the_fly"]["on_the_fly"] is True and stored["on_the_fly"]["rotation_deg"] > 0
    assert "a view of each drawn on the fly" in project.last.stdout + project.last.stderr
    assert json.loads(project.path("metrics/eval.json").read_text())["accuracy"] >= 0.9


def test_plot_param_reruns_plot_only(project):
    project.set_params({"plot": {"misclassified": 5}})
    assert project.repro() == {"params", "plot"}


def test_same_params_give_identical_metrics_and_model(project):
    before = {name: digest(project.path(name)) for name in ("metrics/eval.json", "models/model.pt")}
    ran = project.repro("--force", "--single-item", "train")
    assert ran == {"train"}
    project.repro()
    assert {name: digest(project.path(name)) for name in before} == before


@pytest.mark.parametrize("edit, key", [
    ({"trian": {"lr": 0.1}}, "trian"),
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"train": {"lr": -0.1}}, "train.lr"),
    ({"fetch": {"mirrors": {"synthetic": []}}}, "fetch.mirrors.synthetic"),
    # Asking for a GPU where there is none is an error, never a silent CPU run.
    pytest.param({"train": {"device": "cuda"}}, "train.device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_invalid_params_fail_before_outputs_are_touched(project, edit, key):
    outputs = ("models/model.pt", "metrics/eval.json", "data/prepared/train.pt", "plots/loss_curves.png")
    before = {name: digest(project.path(name)) for name in outputs}
    project.set_params(edit)
    result = project.dvc("repro", check=False)
    assert result.returncode != 0
    assert f"params.yaml: {key}:" in result.stderr + result.stdout
    assert {name: digest(project.path(name)) for name in outputs} == before


def test_switching_dataset_reruns_everything_and_carries_class_names(project, tmp_path):
    """A second dataset of the same format is one table entry more; its class names reach the
    model file and key the per-class metrics (keyed by index, `dvc metrics diff` lined digit 0 up
    with T-shirt/top), and the default params' train.crop: auto takes its crop (the synthetic
    digits': 2; this one's: 0)."""
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert torch.load(project.path("models/model.pt"), weights_only=True)["config"]["crop"] == 2
    assert yaml.safe_load(project.path("metrics/train/params.yaml").read_text())["crop"] == 2
    entry = write_mirror(tmp_path / "other-mirror", seed=1)
    entry["classes"] = names
    entry["crop"] = 0
    table = project.path("stages/datasets.yaml")
    table.write_text(table.read_text() + yaml.safe_dump({"other": entry}, sort_keys=False))
    project.set_params({"fetch": {"dataset": "other", "mirrors": {"other": ["http://127.0.0.1:9/"]}}})
    project.env["MNIST_MIRROR"] = str(tmp_path / "other-mirror")
    assert project.repro() == ALL_STAGES
    model = torch.load(project.path("models/model.pt"), weights_only=True)
    assert model["classes"] == names
    assert model["config"]["crop"] == 0
    # params.yaml says "auto" either way: the run record, a `dvc exp show` column, says which.
    assert yaml.safe_load(project.path("metrics/train/params.yaml").read_text())["crop"] == 0
    metrics = json.loads(project.path("metrics/eval.json").read_text())
    assert list(metrics["per_class"]) == names
    assert "per_class.Sneaker.accuracy" in project.dvc("metrics", "show").stdout
