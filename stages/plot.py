"""Stage plot: PNGs of the loss curves, the confusion matrix and misclassified test images.

Reads only what train and evaluate wrote (the per-epoch log and the per-image confusion data)
plus the test images: no model is loaded and nothing is recomputed.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix  # noqa: E402

from stages import params as params_mod  # noqa: E402
from stages.common import PipelineError, load_tensors, run_main, write_bytes_atomic  # noqa: E402

STAGE = "plot"


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a numeric CSV file with a header row."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run `dvc repro`)") from None
    if not rows:
        raise PipelineError(f"{path}: no rows")
    return {key: np.array([float(row[key]) for row in rows]) for key in rows[0]}


def loss_curves_figure(log: dict[str, np.ndarray]) -> plt.Figure:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(log["epoch"], log["train_loss"], marker="o", label="train")
    ax_loss.plot(log["epoch"], log["val_loss"], marker="o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss", yscale="log")
    ax_loss.legend()
    ax_acc.plot(log["epoch"], 100 * log["val_accuracy"], marker="o", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_figure(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> plt.Figure:
    matrix = confusion_matrix(actual, predicted, labels=np.arange(len(classes)))
    fig, ax = plt.subplots(figsize=(8, 7))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues",
                                                                 xticks_rotation=45)
    ax.set_title(f"Test confusion matrix ({int(np.trace(matrix)):,} of {int(matrix.sum()):,} correct)")
    fig.tight_layout()
    return fig


def misclassified_figure(images: np.ndarray, actual: np.ndarray, predicted: np.ndarray,
                         classes: list[str], limit: int) -> plt.Figure:
    """A grid of the first `limit` misclassified test images, titled predicted / true."""
    wrong = np.flatnonzero(actual != predicted)[:limit]
    cols = max(1, min(10, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"{classes[int(predicted[i])]} / {classes[int(actual[i])]}", fontsize=8, color="tab:red")
    fig.suptitle(f"Misclassified test images, predicted / true ({len(wrong)} shown of "
                 f"{int((actual != predicted).sum())})", fontsize=10)
    fig.tight_layout()
    return fig


def save_png(fig: plt.Figure, target: Path) -> None:
    buffer = io.BytesIO()
    # No timestamp or version metadata: the same data gives the same bytes, hence the same DVC hash.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    write_bytes_atomic(target, buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_log", type=Path)
    parser.add_argument("confusion", type=Path)
    parser.add_argument("test_in", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    cfg = params_mod.load().plot
    log = read_csv(args.train_log)
    confusion = read_csv(args.confusion)
    actual, predicted = confusion["actual"].astype(int), confusion["predicted"].astype(int)
    test = load_tensors(args.test_in, required=("images", "labels", "classes"))
    if len(actual) != len(test["labels"]):
        raise PipelineError(f"{args.confusion} has {len(actual)} rows for {len(test['labels'])} test images")
    classes = test["classes"]
    save_png(loss_curves_figure(log), args.out_dir / "loss_curves.png")
    save_png(confusion_figure(actual, predicted, classes), args.out_dir / "confusion_matrix.png")
    save_png(misclassified_figure(test["images"].numpy(), actual, predicted, classes, cfg.misclassified),
             args.out_dir / "misclassified.png")


if __name__ == "__main__":
    run_main(STAGE, main)
