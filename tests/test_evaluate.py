"""stages.evaluate: test metrics from logits, and the confusion CSV."""

from __future__ import annotations

import csv
import io

import pytest
import torch
import torch.nn.functional as F

from stages.evaluate import confusion_csv, test_metrics as compute_metrics  # not collected as a test

# Six samples over 4 classes; class 3 never occurs in the labels.
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDICTED = torch.tensor([0, 1, 1, 1, 2, 3])  # 4 of 6 right: class 0 1/2, class 1 2/2, class 2 1/2
LOGITS = F.one_hot(PREDICTED, 4).float() * 3.0 + torch.linspace(-0.5, 0.5, 24).reshape(6, 4)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return compute_metrics(LOGITS, LABELS, num_classes=4)


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


def test_loss_is_cross_entropy(metrics):
    """The loss is the mean cross-entropy of the logits (no label smoothing), to 6 decimals."""
    assert metrics["loss"] == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), abs=1e-6)


def test_perfect_and_json_ready():
    """Logits that pick every label give accuracy 1; all values are plain Python (JSON-ready) types."""
    labels = torch.tensor([2, 0, 1])
    result = compute_metrics(F.one_hot(labels, 3).float() * 10, labels, num_classes=3)
    assert result["accuracy"] == 1.0 and type(result["accuracy"]) is float
    assert type(result["loss"]) is float and result["loss"] < 1e-3
    assert all(c["accuracy"] == 1.0 for c in result["per_class"].values())


def test_confusion_csv():
    """A header, then one `actual,predicted` row per sample in order."""
    text = confusion_csv(LABELS, PREDICTED)
    assert text.splitlines()[0] == "actual,predicted"
    assert text.endswith("\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(int(r["actual"]), int(r["predicted"])) for r in rows] == list(zip(LABELS.tolist(), PREDICTED.tolist()))
