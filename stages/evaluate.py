"""Stage evaluate: score the model file on the test split into metrics/eval.json.

eval.json holds `accuracy`, `loss` (mean cross-entropy) and `per_class`, keyed by class name
("0".."9" for MNIST, "T-shirt/top".."Ankle boot" for Fashion-MNIST: `dvc metrics diff` across
datasets lines up no digit with a garment), each with the class's accuracy (its recall; null for a class with no test images).
Accuracies are fractions (0..1), as everywhere in the project. Class counts are not metrics (they
never change with the model, and ten constant columns made `dvc metrics show` unreadable): they are
the row counts of the confusion data, one `actual,predicted` row of class names per test image, in
test-set order, which is what DVC's `confusion` template draws (`dvc plots show`) and what the plot
stage reads.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix

from stages import params as params_mod
from stages.common import PipelineError, load_tensors, log, run_main, write_files_atomic
from stages.models import load_model, predict_logits

STAGE = "evaluate"


def test_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict:
    """Overall accuracy and loss, and per-class accuracy keyed by the names `classes` (class k's
    at k), from logits [N, C] and labels [N] on any device (scikit-learn needs them on the CPU)."""
    num_classes = len(classes)
    logits, labels = logits.cpu(), labels.cpu()
    predicted = logits.argmax(1)
    matrix = confusion_matrix(labels.numpy(), predicted.numpy(), labels=np.arange(num_classes))
    counts = matrix.sum(axis=1)
    per_class = {
        name: {"accuracy": float(matrix[k, k] / counts[k]) if counts[k] else None}
        for k, name in enumerate(classes)
    }
    return {"accuracy": float(np.trace(matrix) / matrix.sum()),
            "loss": round(F.cross_entropy(logits, labels).item(), 6),
            "per_class": per_class}


def split_problem(split: dict, image_size: int, classes: list[str]) -> str | None:
    """Why a split ({images, labels, classes}, as preprocess writes it) cannot be scored by a model
    of `image_size` and `classes`, or None. preprocess writes test.pt from the same dataset as the
    model's, so this meets only a file swapped or edited by hand (or a stage run by hand on another
    dataset's split: a Fashion-MNIST test set scored under digit names), which would otherwise fail
    deep in torch or be scored wrongly."""
    images, labels, num_classes = split["images"], split["labels"], len(classes)
    if tuple(split["classes"]) != tuple(classes):
        return f"images of the classes {', '.join(map(str, split['classes']))}, the model's are {', '.join(classes)}"
    if images.ndim != 3 or tuple(images.shape[1:]) != (image_size, image_size):
        return f"images of shape {list(images.shape)}, the model takes [N, {image_size}, {image_size}]"
    if len(images) == 0:
        return "no images"
    if labels.shape != (len(images),) or labels.dtype not in (torch.int64, torch.uint8):  # cross_entropy's
        return f"labels of shape {list(labels.shape)} and type {labels.dtype} for {len(images)} images"
    if labels.min() < 0 or labels.max() >= num_classes:
        return f"labels {labels.min().item()}-{labels.max().item()}, the model has classes 0-{num_classes - 1}"
    return None


def confusion_csv(labels: torch.Tensor, predicted: torch.Tensor, classes: Sequence[str]) -> str:
    """`actual,predicted` by class name, one row per image in order: DVC's confusion template labels
    its axes with them ("Ankle boot", not 9), as eval.json's per_class is keyed. csv's quoting keeps
    a name with a comma one cell; MNIST's names "0".."9" are the label numbers."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(labels.tolist(), predicted.tolist()))
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages/run {STAGE}", description=__doc__.splitlines()[0])
    parser.add_argument("model_in", type=Path)
    parser.add_argument("test_in", type=Path)
    parser.add_argument("metrics_out", type=Path)
    parser.add_argument("confusion_out", type=Path)
    args = parser.parse_args(argv)
    cfg = params_mod.load().evaluate
    model, meta = load_model(args.model_in)
    test = load_tensors(args.test_in, required=("images", "labels", "classes"))
    problem = split_problem(test, meta["config"]["image_size"], meta["classes"])
    if problem:
        raise PipelineError(f"{args.test_in}: {problem}; re-run `dvc repro` to rebuild it")
    logits = predict_logits(model, test["images"], cfg.batch_size)
    metrics = test_metrics(logits, test["labels"], meta["classes"])
    if not math.isfinite(metrics["loss"]):  # JSON has no NaN, and the accuracy would be chance
        raise PipelineError(f"{args.model_in}: the model's test loss is {metrics['loss']} (logits that "
                            "overflow: a diverged run?); retrain it with a lower train.lr")
    log(STAGE, f"test accuracy {100 * metrics['accuracy']:.2f}% on {len(test['labels']):,} images, "
               f"loss {metrics['loss']:.4f}")
    write_files_atomic({args.metrics_out: (json.dumps(metrics, indent=2) + "\n").encode("utf-8"),
                        args.confusion_out: confusion_csv(test["labels"], logits.argmax(1), meta["classes"]).encode("utf-8")})


if __name__ == "__main__":
    run_main(STAGE, main)
