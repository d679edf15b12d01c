"""Stage plot: PNGs of the training curves, the confusion matrix and misclassified test images.

Reads only what train and evaluate wrote (DVCLive's series files and the per-image confusion data)
plus the test images: no model is loaded and nothing is recomputed. The curves are the series files
that `dvc plots show` draws (dvc.yaml declares their directory), in the same units on the same
x-axis: whatever series train logs appears in both, so a series is defined once, where it is logged.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
# Figure, not pyplot: figures written to files need no display backend and no global figure
# registry (nothing to select at import, nothing to close).
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from stages import params as params_mod
from stages.common import PipelineError, cannot_read, exception_line, load_tensors, log, run_main, write_files_atomic

STAGE = "plot"


X_LABEL = "optimizer step"  # the x_label of the series plots in dvc.yaml
MARKER_POINTS = 20  # series this short get a marker on each point (a one-epoch val series is one point)


T = TypeVar("T")  # what read_rows' parse makes of a row


def read_rows(path: Path, parse: Callable[[dict[str, str]], T], delimiter: str = ",",
              columns: tuple[str, ...] | None = None) -> tuple[list[str], list[T]]:
    """The header of a CSV (or, with delimiter "\t", TSV) file and `parse` of each row (a dict by
    column). A file that cannot be read, other `columns` (in any order), a row of more or fewer cells
    than the header names (a file cut short, edited by hand), or one `parse` refuses (ValueError) is
    a one-line PipelineError naming the file and the first bad line."""
    parsed = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = list(reader.fieldnames or [])
            if columns is not None and header and sorted(header) != sorted(columns):
                raise PipelineError(f"{path}: expected columns {' and '.join(columns)}, found {header}")
            for row in reader:
                if None in row or None in row.values():  # DictReader's key, or value, for a cell too many, or missing
                    problem = f"{'more' if None in row else 'fewer'} cells than the header names"
                else:
                    try:
                        parsed.append(parse(row))
                        continue
                    except ValueError as exc:
                        problem = str(exc)
                raise PipelineError(f"{path}: line {reader.line_num}: {problem} (a damaged file? `dvc repro` "
                                    "rebuilds it)")
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run `dvc repro`)") from None
    except OSError as exc:
        raise cannot_read(path, exc) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{path}: cannot read ({exception_line(exc)})") from None
    if not parsed:
        raise PipelineError(f"{path}: no rows")
    return header, parsed


def read_table(path: Path, delimiter: str = "\t") -> dict[str, np.ndarray]:
    """Columns of a numeric TSV (DVCLive's series; or CSV) file with a header row (read_rows)."""
    header, rows = read_rows(path, lambda row: [float(row[key]) for key in row], delimiter)
    return {key: np.array([values[k] for values in rows]) for k, key in enumerate(header)}


def read_confusion(path: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(actual, predicted) class indices [N] from evaluate's confusion data, which names each class
    (`classes`, the test split's, in label order); a name that is none of them (a file edited, or
    of another dataset) is refused naming the line."""
    index = {name: k for k, name in enumerate(classes)}

    def indices(row: dict[str, str]) -> tuple[int, int]:
        for column in ("actual", "predicted"):
            if row[column] not in index:
                raise ValueError(f"{column} class {row[column]!r} is not one of the test split's classes "
                                 f"({', '.join(map(repr, classes))})")
        return index[row["actual"]], index[row["predicted"]]

    _, rows = read_rows(path, indices, columns=("actual", "predicted"))
    pairs = np.array(rows, dtype=np.int64)  # [N, 2]
    return pairs[:, 0], pairs[:, 1]


def read_series(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """DVCLive's series files (`<name>.tsv`, columns step and <name>): name -> (steps, values)."""
    files = sorted(directory.rglob("*.tsv"))
    if not files:
        raise PipelineError(f"{directory}: no DVCLive series (*.tsv) found (run `dvc repro train`)")
    series = {}
    for path in files:
        table = read_table(path)
        name = path.relative_to(directory).with_suffix("").as_posix()
        if set(table) != {"step", path.stem}:
            raise PipelineError(f"{path}: expected columns step and {path.stem}, found {sorted(table)}")
        series[name] = (table["step"], table[path.stem])
    return series


def panels(names: list[str]) -> list[list[str]]:
    """Series drawn together: every `*loss` series on one panel (one unit, nats), each other
    series on its own."""
    losses = [name for name in names if name.endswith("loss")]
    return ([losses] if losses else []) + [[name] for name in names if name not in losses]


def loss_label(name: str) -> str:
    """A loss series' legend entry, saying what it measures: train's losses are the objective the
    optimiser minimised, train.label_smoothing included (at 0.1 it stays above about 0.5 however
    well the model fits), val's is the plain cross-entropy, as evaluate reports (stages/tracking.py)."""
    return f"{name} (cross-entropy)" if name.startswith("val") else f"{name} (training objective)"


def within_bounds(low: float, high: float) -> tuple[float, float]:
    """y-limits for data spanning [low, high]: a 5 % margin, but never below 0 for data that are
    not negative (losses, rates) nor above 1 for data that are at most 1 (accuracies, fractions)."""
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05  # one value: 5 % of it
    bottom, top = low - margin, high + margin
    if low >= 0:
        bottom = max(bottom, 0.0)
    if high <= 1:
        top = min(top, 1.0)
    return bottom, top


def curves_figure(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    groups = panels(list(series))
    fig = Figure(figsize=(5 * len(groups), 4))
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for name in group:
            steps, values = series[name]
            ax.plot(steps, values, marker="o" if len(steps) <= MARKER_POINTS else None,
                    label=loss_label(name) if len(group) > 1 else name)
        values = np.concatenate([series[name][1] for name in group])
        ax.set_ylim(*within_bounds(float(values.min()), float(values.max())))
        ax.set(xlabel=X_LABEL, ylabel="loss" if len(group) > 1 else group[0])
        if len(group) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_figure(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> Figure:
    matrix = confusion_matrix(actual, predicted, labels=np.arange(len(classes)))
    fig = Figure(figsize=(8, 7))
    ax = fig.subplots()
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues",
                                                                 xticks_rotation=45)
    ax.set(xlabel="predicted class", ylabel="actual class")  # as the dvc.yaml confusion plot
    ax.set_title(f"Test confusion matrix ({int(np.trace(matrix)):,} of {int(matrix.sum()):,} correct)")
    fig.tight_layout()
    return fig


def misclassified_figure(images: np.ndarray, actual: np.ndarray, predicted: np.ndarray,
                         classes: list[str], limit: int) -> Figure:
    """A grid of the first `limit` misclassified test images, titled predicted / true."""
    wrong = np.flatnonzero(actual != predicted)[:limit]
    cols = max(1, min(10, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig = Figure(figsize=(1.3 * cols, 1.5 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"{classes[int(predicted[i])]} / {classes[int(actual[i])]}", fontsize=8, color="tab:red")
    fig.suptitle(f"Misclassified test images, predicted / true ({len(wrong)} shown of "
                 f"{int((actual != predicted).sum())})", fontsize=10)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No timestamp or version metadata: the same data gives the same bytes, hence the same DVC hash.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages/run {STAGE}", description=__doc__.splitlines()[0])
    parser.add_argument("series_dir", type=Path, help="DVCLive's plots/metrics directory of the train stage")
    parser.add_argument("confusion", type=Path)
    parser.add_argument("test_in", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    cfg = params_mod.load().plot
    series = read_series(args.series_dir)
    test = load_tensors(args.test_in, required=("images", "labels", "classes"))
    classes = list(test["classes"])
    actual, predicted = read_confusion(args.confusion, classes)
    if len(actual) != len(test["labels"]):
        rows = f"{len(actual)} row{'' if len(actual) == 1 else 's'}"
        raise PipelineError(f"{args.confusion} has {rows} for {len(test['labels'])} test images")
    write_files_atomic({
        args.out_dir / "loss_curves.png": png_bytes(curves_figure(series)),
        args.out_dir / "confusion_matrix.png": png_bytes(confusion_figure(actual, predicted, classes)),
        args.out_dir / "misclassified.png": png_bytes(misclassified_figure(
            test["images"].numpy(), actual, predicted, classes, cfg.misclassified)),
    })
    wrong = int((actual != predicted).sum())
    shown = f"{min(wrong, cfg.misclassified)} of {wrong:,} misclassified test images" if wrong else "no test image misclassified"
    log(STAGE, f"wrote loss_curves.png, confusion_matrix.png and misclassified.png ({shown}) in {args.out_dir}")


if __name__ == "__main__":
    run_main(STAGE, main)
