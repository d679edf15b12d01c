"""stages.evaluate: test metrics from logits, the confusion CSV, and a test split or model it refuses."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.common import PipelineError, save_tensors
from stages.evaluate import confusion_csv, main as evaluate_main, test_metrics as compute_metrics  # not collected as a test
from stages.model_config import ModelConfig
from stages.models import build_model, save_model
from tests.conftest import PROJECT_ROOT

# Six samples over 4 classes; class 3 never occurs in the labels.
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDICTED = torch.tensor([0, 1, 1, 1, 2, 3])  # 4 of 6 right: class 0 1/2, class 1 2/2, class 2 1/2
LOGITS = F.one_hot(PREDICTED, 4).float() * 3.0 + torch.linspace(-0.5, 0.5, 24).reshape(6, 4)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return compute_metrics(LOGITS, LABELS, ["0", "1", "2", "3"])


def test_accuracy(metrics):
    """Overall accuracy is the share of argmax predictions equal to the label."""
    assert torch.equal(LOGITS.argmax(1), PREDICTED)
    assert metrics["accuracy"] == pytest.approx(4 / 6)


def test_per_class(metrics):
    """Each class has its recall, and nothing else (counts are in the confusion data); a class never
    seen has no accuracy."""
    assert metrics["per_class"] == {
        "0": {"accuracy": pytest.approx(0.5)},
        "1": {"accuracy": pytest.approx(1.0)},
        "2": {"accuracy": pytest.approx(0.5)},
        "3": {"accuracy": None},
    }


def test_per_class_is_keyed_by_class_name():
    """Fashion-MNIST's garments by name: keyed by index, `dvc metrics diff` between an MNIST and a
    Fashion run lined digit 0 up with T-shirt/top as one metric, per_class.0.accuracy."""
    garments = ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    result = compute_metrics(LOGITS, LABELS, garments)
    assert list(result["per_class"]) == garments
    assert result["per_class"]["Trouser"] == {"accuracy": pytest.approx(1.0)}


def test_loss_is_cross_entropy(metrics):
    """The loss is the mean cross-entropy of the logits (no label smoothing), to 6 decimals."""
    assert metrics["loss"] == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), abs=1e-6)


def test_perfect_and_json_ready():
    """Logits that pick every label give accuracy 1; all values are plain Python (JSON-ready) types."""
    labels = torch.tensor([2, 0, 1])
    result = compute_metrics(F.one_hot(labels, 3).float() * 10, labels, ["a", "b", "c"])
    assert result["accuracy"] == 1.0 and type(result["accuracy"]) is float
    assert type(result["loss"]) is float and result["loss"] < 1e-3
    assert all(c["accuracy"] == 1.0 for c in result["per_class"].values())


def test_confusion_csv():
    """A header, then one `actual,predicted` row of class names per sample in order (what DVC's
    confusion template labels its axes with); csv quoting keeps a name with a comma one cell, and
    MNIST's names are its label numbers."""
    classes = ["T-shirt/top", "Trouser", "Bag, small", "Ankle boot"]
    text = confusion_csv(LABELS, PREDICTED, classes)
    assert text.splitlines()[:3] == ["actual,predicted", "T-shirt/top,T-shirt/top", "T-shirt/top,Trouser"]
    assert text.endswith("\n") and '"Bag, small",Ankle boot' in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["actual"], r["predicted"]) for r in rows] == [
        (classes[a], classes[p]) for a, p in zip(LABELS.tolist(), PREDICTED.tolist())]
    digits = [str(k) for k in range(10)]
    assert confusion_csv(LABELS, PREDICTED, digits) == "actual,predicted\n" + "".join(
        f"{a},{p}\n" for a, p in zip(LABELS.tolist(), PREDICTED.tolist()))


def write_model(path: Path, fill: float | None = None) -> None:
    """An 8x8-image softmax model of 3 classes, every weight and bias `fill` if given."""
    config = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1,
                         pool="end", image_size=8, num_classes=3, mean=0.5, std=0.25)
    model = build_model(config)
    with torch.no_grad():
        for weight in model.parameters():
            if fill is not None:
                weight.fill_(fill)
    save_model(path, model, config, ["a", "b", "c"])


def run_evaluate(tmp_path: Path, monkeypatch, images: torch.Tensor, labels: torch.Tensor, fill: float | None = None,
                 classes: tuple[str, ...] = ("a", "b", "c")):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    write_model(tmp_path / "model.pt", fill)
    save_tensors(tmp_path / "test.pt", {"images": images, "labels": labels, "classes": list(classes)})
    evaluate_main(["model.pt", "test.pt", "eval.json", "confusion.csv"])


GOOD_IMAGES = torch.rand(6, 8, 8)
GOOD_LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def test_evaluate_writes_metrics_for_a_matching_split(tmp_path, monkeypatch):
    run_evaluate(tmp_path, monkeypatch, GOOD_IMAGES, GOOD_LABELS)
    assert set(json.loads((tmp_path / "eval.json").read_text())) == {"accuracy", "loss", "per_class"}
    with open(tmp_path / "confusion.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["actual"] for row in rows] == ["a", "b", "c", "a", "b", "c"]  # the model's class names
    assert {row["predicted"] for row in rows} <= set(ABC)


ABC = ("a", "b", "c")


@pytest.mark.parametrize(("images", "labels", "classes", "problem"), [
    (torch.rand(6, 9, 9), GOOD_LABELS, ABC, r"images of shape \[6, 9, 9\], the model takes \[N, 8, 8\]"),
    (torch.rand(0, 8, 8), torch.tensor([], dtype=torch.long), ABC, r"no images"),
    (GOOD_IMAGES, GOOD_LABELS[:4], ABC, r"labels of shape \[4\] and type torch.int64 for 6 images"),
    (GOOD_IMAGES, GOOD_LABELS.float(), ABC, r"labels of shape \[6\] and type torch.float32 for 6 images"),
    (GOOD_IMAGES, GOOD_LABELS + 5, ABC, r"labels 5-7, the model has classes 0-2"),
    (GOOD_IMAGES, torch.tensor([0, 1, 2, 0, 1, 3]), ABC, r"labels 0-3, the model has classes 0-2"),
    (GOOD_IMAGES, GOOD_LABELS, ("x", "b", "c"), r"images of the classes x, b, c, the model's are a, b, c"),
], ids=["image size", "empty", "count", "float labels", "label range", "one label past", "other classes"])
def test_a_test_split_that_does_not_fit_the_model_is_one_line(tmp_path, monkeypatch, images, labels, classes, problem):
    """A test.pt swapped or edited by hand, or another dataset's (same size and class count, so
    eval.json would name garments' accuracies by digits): one line naming it, no metrics written
    (not a traceback from torch or scikit-learn, nor a silent score of the wrong images)."""
    with pytest.raises(PipelineError, match=rf"^test\.pt: {problem}; re-run `dvc repro` to rebuild it$"):
        run_evaluate(tmp_path, monkeypatch, images, labels, classes=classes)
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "confusion.csv").exists()


def test_a_model_whose_logits_overflow_writes_no_nan_metrics(tmp_path, monkeypatch):
    """Finite weights (load_model accepts them) whose logits overflow: eval.json would hold NaN,
    which is not JSON, beside a chance accuracy."""
    with pytest.raises(PipelineError, match=r"^model\.pt: the model's test loss is nan .*lower train\.lr$"):
        run_evaluate(tmp_path, monkeypatch, GOOD_IMAGES, GOOD_LABELS, fill=3.0e38)
    assert not (tmp_path / "eval.json").exists()
