"""DVC-native tracking: DVCLive files of train, metrics in `dvc exp show`, `dvc plots`, the model as an
artifact, the PNG curves drawn from the same files, and the progress line.

The resumed-after-a-kill equality of DVCLive's files is checked in tests/test_robustness.py, next to
the model's.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import re
import shutil
import subprocess

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import yaml

from stages import fetch
from stages.common import PipelineError, Progress, save_tensors
from stages.evaluate import confusion_csv
from stages.plot import (confusion_figure, curves_figure, main as plot_main, misclassified_figure, panels, read_confusion,
                         read_table, within_bounds)
from stages.runtime import numerics, resolve_device, resolve_precision
from stages.tracking import TrainLog, step_log_interval
from tests.conftest import PROJECT_ROOT, SMALL_PARAMS, VENV_BIN, run_bounded
from tests.test_fetch import http_mirrors, mirror  # noqa: F401  (fixtures)

LIVE = "metrics/train"
SERIES = {"step_loss", "train_loss", "val_loss", "val_accuracy", "lr"}
EPOCH_SERIES = SERIES - {"step_loss"}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_tsv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def live_digests(project) -> dict[str, str]:
    root = project.path(LIVE)
    return {str(f.relative_to(root)): digest(f) for f in sorted(root.rglob("*")) if f.is_file()}


def steps_per_epoch(project) -> int:
    """Optimizer steps per epoch of the fixture's run: augment doubles the train split."""
    n = len(torch.load(project.path("data/augmented/train.pt"), weights_only=True)["labels"])
    return -(-n // SMALL_PARAMS["train"]["batch_size"])


# ---------------------------------------------------------------------------------------------
# After a real `dvc repro` (the session's synthetic project)


@pytest.mark.integration
def test_dvclive_files_hold_one_row_per_epoch_and_a_step_series(built_project):
    p, epochs = built_project, SMALL_PARAMS["train"]["epochs"]
    spe = steps_per_epoch(p)
    files = {f.relative_to(p.path(LIVE)).as_posix() for f in p.path(LIVE).rglob("*") if f.is_file()}
    assert files == {"metrics.json", "params.yaml"} | {f"plots/metrics/{name}.tsv" for name in SERIES}
    for name in EPOCH_SERIES:
        rows = read_tsv(p.path(f"{LIVE}/plots/metrics/{name}.tsv"))
        assert list(rows[0]) == ["step", name], "no timestamp column: DVC hashes these files"
        assert [int(r["step"]) for r in rows] == [spe * e for e in range(1, epochs + 1)], name
    interval = step_log_interval(spe)
    steps = [int(r["step"]) for r in read_tsv(p.path(f"{LIVE}/plots/metrics/step_loss.tsv"))]
    assert steps == [e * spe + k * interval for e in range(epochs) for k in range(1, spe // interval + 1)]
    accuracy = [float(r["val_accuracy"]) for r in read_tsv(p.path(f"{LIVE}/plots/metrics/val_accuracy.tsv"))]
    assert all(0 <= a <= 1 for a in accuracy), "a fraction, as in eval.json"
    assert all(float(r["lr"]) > 0 for r in read_tsv(p.path(f"{LIVE}/plots/metrics/lr.tsv")))
    summary = json.loads(p.path(f"{LIVE}/metrics.json").read_text())
    assert summary["epoch"] == epochs and summary["step"] == epochs * spe
    assert summary["val_accuracy"] == accuracy[-1]


@pytest.mark.integration
def test_validation_metrics_in_exp_show_and_the_one_screen_view(built_project):
    p = built_project
    shown = json.loads(p.dvc("exp", "show", "--json").stdout)
    workspace = next(row for row in shown if row["rev"] == "workspace")
    metrics = workspace["data"]["metrics"]
    summary = json.loads(p.path(f"{LIVE}/metrics.json").read_text())
    assert metrics[f"{LIVE}/metrics.json"]["data"]["val_accuracy"] == summary["val_accuracy"]
    assert metrics[f"{LIVE}/metrics.json"]["data"]["val_loss"] == summary["val_loss"]
    # eval.json: accuracy, loss and per-class accuracy, no constant per-class counts.
    evaluated = metrics["metrics/eval.json"]["data"]
    assert set(evaluated) == {"accuracy", "loss", "per_class"}
    assert all(set(c) == {"accuracy"} for c in evaluated["per_class"].values())
    # The one-screen comparison of docs/tracking.md, exactly as written there.
    table = p.dvc("exp", "show", "--drop", ".*", "--keep",
                  "Experiment|^accuracy$|^val_|^train.(model|lr|epochs)$").stdout
    assert "val_accuracy" in table and "train.lr" in table and "per_class" not in table
    assert max(len(line) for line in table.splitlines()) <= 100


@pytest.mark.integration
def test_how_train_computed_is_a_params_file_dvc_shows(project):
    p = project
    recorded = yaml.safe_load(p.path(f"{LIVE}/params.yaml").read_text())
    # The fixture trains with device and precision auto, on one thread (OMP_NUM_THREADS=1); the
    # stage process resolves what this one does, on the same machine and torch.
    assert p.params()["train"]["precision"] == "auto" and p.params()["train"]["device"] == "auto"
    device = resolve_device("auto")
    # And the fixture's CNN's crop, train.crop: auto resolved (the synthetic digits' entry: 2).
    expected = {**numerics(device, resolve_precision("auto", device)), "crop": 2}
    if device.type == "cpu":
        assert p.env["OMP_NUM_THREADS"] == "1"
        expected["threads"] = 1
    assert recorded == expected and recorded["precision"] in ("fp32", "bf16")
    shown = json.loads(p.dvc("exp", "show", "--json").stdout)
    workspace = next(row for row in shown if row["rev"] == "workspace")
    assert workspace["data"]["params"][f"{LIVE}/params.yaml"]["data"] == recorded
    # What a run on another machine shows against the committed one: `dvc params diff` names the keys.
    other = {"fp32": "bf16", "bf16": "fp32"}[recorded["precision"]]
    p.path(f"{LIVE}/params.yaml").write_text(yaml.safe_dump({**recorded, "precision": other, "torch": "9.9"}))
    diff = json.loads(p.dvc("params", "diff", "--json").stdout)
    assert diff[f"{LIVE}/params.yaml"] == {"precision": {"old": recorded["precision"], "new": other},
                                           "torch": {"old": recorded["torch"], "new": "9.9"}}


@pytest.mark.integration
def test_plots_show_draws_every_series_with_named_axes_and_the_confusion_template(project, tmp_path):
    p = project  # a copy: `dvc plots show` writes its page (dvc_plots/) into the repository
    shown = json.loads(p.dvc("plots", "show", "--json").stdout)["data"]
    for name in SERIES:
        (plot,) = shown[f"{LIVE}/plots/metrics/{name}.tsv"]
        spec = plot["content"]
        assert spec["encoding"]["x"]["title"] == "optimizer step"
        assert re.search(rf'"title": "{name}"', json.dumps(spec)), f"{name}: y-axis not titled by its series"
        assert {row[name] for row in spec["data"]["values"]}, name
    (confusion,) = shown["Test confusion matrix"]
    spec = json.dumps(confusion["content"])
    assert '"rect"' in spec, "DVC's confusion template draws a grid of rects"
    assert '"predicted class"' in spec and '"actual class"' in spec
    # The HTML page a person opens: every series is on it.
    page = p.dvc("plots", "show", "-o", str(tmp_path / "plots")).stdout
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "index.html" in page
    for name in SERIES:
        assert f"{name}.tsv" in html


@pytest.mark.integration
def test_same_params_give_byte_identical_dvclive_files(project):
    before = live_digests(project)
    assert project.repro("--force", "--single-item", "train") == {"train"}
    assert live_digests(project) == before


@pytest.mark.integration
def test_artifacts_get_returns_the_model_byte_identical(project, tmp_path):
    """The model registered as a version (a GTO tag) is fetched from a local git repo's DVC remote,
    by someone outside the project: the project's own cache is moved aside first (DVC reads a
    local repository's cache when it can, and inside a DVC project its own), so the file must
    come from the remote; with the remote gone, the get fails as a forgotten `dvc push` does."""
    p = project
    p.dvc("remote", "add", "-d", "shared", str(tmp_path / "dvc-remote"))
    p.dvc("push")
    p.commit("a DVC remote")
    p.run("git", "tag", "-a", "mnist-classifier@v1.0.0", "-m", "mnist-classifier v1.0.0")
    p.path(".dvc/cache").rename(tmp_path / "cache-aside")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def get(name: str) -> subprocess.CompletedProcess:
        return run_bounded([str(VENV_BIN / "dvc"), "artifacts", "get", str(p.root), "mnist-classifier", "-o", name],
                           cwd=elsewhere, env=p.env)

    result = get("model.pt")
    assert result.returncode == 0 and "Downloaded 1 file(s)" in result.stdout, result.stdout + result.stderr
    assert digest(elsewhere / "model.pt") == digest(p.path("models/model.pt"))
    shutil.rmtree(tmp_path / "dvc-remote")
    missing = get("again.pt")
    assert missing.returncode != 0 and not (elsewhere / "again.pt").exists()
    assert "No storage files available: 'models/model.pt'" in missing.stderr, missing.stderr


def test_artifact_declared_in_dvc_yaml():
    artifacts = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["artifacts"]
    model = artifacts["mnist-classifier"]
    assert model["path"] == "models/model.pt" and model["type"] == "model"
    assert model["desc"] and model["labels"]


# ---------------------------------------------------------------------------------------------
# In process


def test_replayed_log_writes_the_same_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # DVCLive looks for a DVC repository from the working directory
    points = [(3, {"step_loss": 2.1}), (6, {"step_loss": 1.5}),
              (6, {"epoch": 1, "train_loss": 1.8, "val_loss": 1.2, "val_accuracy": 0.5, "lr": 0.1}),
              (9, {"step_loss": 0.9})]
    direct = TrainLog(tmp_path / "direct")
    for step, values in points:
        direct.log(step, values)
    replayed = TrainLog(tmp_path / "replayed")
    replayed.replay(direct.records)
    for path in sorted((tmp_path / "direct").rglob("*.*")):
        assert path.read_bytes() == (tmp_path / "replayed" / path.relative_to(tmp_path / "direct")).read_bytes()
    assert json.loads((tmp_path / "direct" / "metrics.json").read_text()) == {
        "step_loss": 0.9, "step": 9, "epoch": 1, "train_loss": 1.8, "val_loss": 1.2, "val_accuracy": 0.5, "lr": 0.1}
    assert not (tmp_path / "direct" / "plots" / "metrics" / "epoch.tsv").exists()
    assert not (tmp_path / "dvc.yaml").exists(), "DVCLive must leave the project's dvc.yaml alone"
    assert direct.epochs() == [{"step": 6, **points[2][1]}]


def test_a_directory_that_cannot_be_written_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").write_text("a file where the directory should be")
    with pytest.raises(PipelineError, match=r"^.*metrics/train: cannot write \(Not a directory"):
        TrainLog(tmp_path / "metrics" / "train")

    log = TrainLog(tmp_path / "live")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", full_disk)  # DVCLive's .tsv and metrics.json writes
    with pytest.raises(PipelineError, match=r"live: cannot write \(No space left on device\)$"):
        log.log(1, {"step_loss": 2.0})
    with pytest.raises(PipelineError, match=r"live: cannot write \(No space left on device\)$"):
        log.log_numerics({"device": "cpu"})


@pytest.mark.parametrize(("text", "problem"), [
    ("step\tstep_loss\n3\t0.5\n6\t", r"line 3: could not convert string to float: ''"),
    ("step\tstep_loss\n3\t0.5\n6\n", r"line 3: fewer cells than the header names"),
    ("step\tstep_loss\n3\t0.5\t9\n", r"line 2: more cells than the header names"),
    ("step\tstep_loss\n3\tq\n6\n", r"line 2: could not convert string to float: 'q'"),  # the first bad line
    ("", r"no rows"),
    (b"step\tstep_loss\n3\t\xff\n", r"cannot read \(UnicodeDecodeError: "),
], ids=["cut mid-row", "cut after a cell", "extra cell", "first of two", "empty", "not text"])
def test_a_damaged_table_is_one_line_naming_the_file_and_line(tmp_path, text, problem):
    """The plot stage reads DVCLive's .tsv series and evaluate's confusion.csv: a damaged one is named,
    with the line, not a traceback from float()."""
    path = tmp_path / "step_loss.tsv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}: {problem}"):
        read_table(path)
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(tmp_path))}: cannot read \(Is a directory\)$"):
        read_table(tmp_path)


@pytest.mark.parametrize(("rows", "problem"), [
    ("actual,predicted\na,b\nb,d\n", r"line 3: predicted class 'd' is not one of the test split's classes "
                                         r"\('a', 'b', 'c'\)"),
    ("actual,predicted\na,b\n1,b\n", r"line 3: actual class '1' is not one of"),  # a label number: the old form
    ("actual,predicted\na,b\nb\n", r"line 3: fewer cells than the header names"),
    ("actual,guess\na,b\nb,b\n", r"expected columns actual and predicted, found \['actual', 'guess'\]"),
    ("actual,predicted\n", r"no rows"),
], ids=["unknown name", "a number", "cut short", "column", "header only"])
def test_a_confusion_file_that_does_not_fit_the_test_split_is_refused(tmp_path, monkeypatch, rows, problem):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "params.yaml", "params.yaml")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "step_loss.tsv").write_text("step\tstep_loss\n1\t0.5\n")
    (tmp_path / "confusion.csv").write_text(rows)
    save_tensors(tmp_path / "test.pt", {"images": torch.zeros(2, 28, 28), "labels": torch.tensor([0, 1]),
                                        "classes": ["a", "b", "c"]})
    with pytest.raises(PipelineError, match=rf"^confusion\.csv: {problem}"):
        plot_main(["series", "confusion.csv", "test.pt", "plots"])
    assert not (tmp_path / "plots").exists()


def test_plot_writes_its_three_pngs_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "params.yaml", "params.yaml")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "step_loss.tsv").write_text("step\tstep_loss\n1\t0.5\n2\t0.4\n")
    (tmp_path / "confusion.csv").write_text('actual,predicted\na,b\nb,b\n"c, the third",a\n')  # names, quoted where needed
    save_tensors(tmp_path / "test.pt", {"images": torch.zeros(3, 28, 28), "labels": torch.tensor([0, 1, 2]),
                                        "classes": ["a", "b", "c, the third"]})
    plot_main(["series", "confusion.csv", "test.pt", "plots"])
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == [
        "confusion_matrix.png", "loss_curves.png", "misclassified.png"]
    assert capsys.readouterr().err.splitlines() == [
        "plot: wrote loss_curves.png, confusion_matrix.png and misclassified.png (2 of 2 misclassified test images) "
        "in plots"]


def test_the_confusion_data_evaluate_writes_is_what_plot_reads(tmp_path):
    """Class names through csv quoting and back to indices; the columns in either order."""
    classes = ["T-shirt/top", "Pull, over", 'Dress "x"', "Ankle boot"]
    labels, predicted = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 2, 2, 1, 1])
    path = tmp_path / "confusion.csv"
    path.write_text(confusion_csv(labels, predicted, classes))
    actual, found = read_confusion(path, classes)
    assert actual.tolist() == labels.tolist() and found.tolist() == predicted.tolist()
    path.write_text("predicted,actual\nAnkle boot,T-shirt/top\nAnkle boot,Ankle boot\n")
    assert [column.tolist() for column in read_confusion(path, classes)] == [[0, 3], [3, 3]]


def test_step_log_interval_is_a_tenth_of_an_epoch():
    assert step_log_interval(430) == 43
    assert step_log_interval(32) == 3
    assert step_log_interval(4) == 1


def test_curves_png_has_named_axes_within_range():
    steps = np.arange(1, 11) * 10.0
    series = {"step_loss": (steps, np.linspace(2.3, 0.1, 10)), "val_loss": (np.array([100.0]), np.array([0.2])),
              "val_accuracy": (np.array([50.0, 100.0]), np.array([0.97, 1.0])), "lr": (steps, np.full(10, 0.1))}
    assert panels(list(series)) == [["step_loss", "val_loss"], ["val_accuracy"], ["lr"]]
    fig = curves_figure(series)
    try:
        loss, accuracy, lr = fig.axes
        assert [ax.get_xlabel() for ax in fig.axes] == ["optimizer step"] * 3
        assert (loss.get_ylabel(), accuracy.get_ylabel(), lr.get_ylabel()) == (
            "loss", "val_accuracy", "lr")
        assert loss.get_ylim()[0] == 0 and accuracy.get_ylim()[1] == 1.0
        # Train's losses include label smoothing, val's does not: the legend says which is which.
        assert [t.get_text() for t in loss.get_legend().get_texts()] == [
            "step_loss (training objective)", "val_loss (cross-entropy)"]
    finally:
        plt.close(fig)
    fig = confusion_figure(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b"])
    try:
        assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("predicted class", "actual class")
    finally:
        plt.close(fig)


@pytest.mark.parametrize("low, high, expected", [
    (0.9, 1.0, (0.895, 1.0)),  # an accuracy never shows past 1
    (0.1, 2.3, (0.0, 2.41)),  # a loss never shows below 0
    (-1.0, 1.0, (-1.1, 1.0)),
    (1.0, 1.0, (0.95, 1.0)),  # one point: a margin, still capped
])
def test_within_bounds(low, high, expected):
    assert within_bounds(low, high) == pytest.approx(expected)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_plain_lines_every_interval_when_not_a_terminal():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("train", "training epoch 2/8", 100, "steps", rate_unit="images", rate_per_item=32,
                        after=300, stream=out, clock=clock)
    for _ in range(100):
        clock.now += 0.5  # 2 steps/s: 64 images/s
        progress.update()
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 + 1, "every 10 s over 50 s, then the final line"
    assert lines[0] == "train: training epoch 2/8: 20/100 steps (20%), 64 images/s, ETA 0:40 here, 3:10 in all"
    assert lines[-1] == "train: training epoch 2/8: 100/100 steps (100%), 64 images/s, ETA 0:00 here, 2:30 in all"
    assert "\r" not in out.getvalue()


def test_progress_rate_and_eta_leave_out_a_slow_first_step():
    """train.compile's first step compiles the model (about 12 s of an 18.5-s epoch of `fast` on an
    H200): a rate from the start put the epoch's ETA at 57 minutes. The first step's line gives
    none, later ones the rate of the steps after it."""
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("train", "training epoch 1/1", 100, "steps", rate_unit="images", rate_per_item=32,
                        stream=out, clock=clock)
    clock.now = 20.0
    progress.update()  # the compiling step, past the 10-s interval: a line at once
    for _ in range(99):
        clock.now += 0.5
        progress.update()
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "train: training epoch 1/1: 1/100 steps (1%)"
    assert lines[1] == "train: training epoch 1/1: 21/100 steps (21%), 64 images/s, ETA 0:40"
    assert lines[-1] == "train: training epoch 1/1: 100/100 steps (100%), 64 images/s, ETA 0:00"
    # a single update: the final line's rate is the whole run's
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("fetch", "downloading z", 100, "bytes", stream=out, clock=clock)
    clock.now = 4.0
    progress.update(100)
    progress.close()
    assert out.getvalue().splitlines() == ["fetch: downloading z: 100/100 bytes (100%), 25 bytes/s, ETA 0:00"]


def test_progress_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock, out = FakeClock(), Terminal()
    progress = Progress("fetch", "downloading x", 4_000_000, "bytes", stream=out, clock=clock)
    for _ in range(4):
        clock.now += 1.0
        progress.update(1_000_000)
    progress.close(summary=False)
    text = out.getvalue()
    assert "\n" not in text, "one line, rewritten"
    assert text.count("\r") == 5 and text.endswith("\r\x1b[K")
    assert "fetch: downloading x: 3,000,000/4,000,000 bytes (75%), 1.0M bytes/s, ETA 0:01" in text


def test_progress_without_a_total_counts_only():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress("fetch", "downloading y", None, "bytes", stream=out, clock=clock)
    clock.now = 2.0
    progress.update(5000)
    progress.close()
    assert out.getvalue().splitlines()[-1] == "fetch: downloading y: 5,000 bytes, 2,500 bytes/s"


def test_fetch_shows_download_progress(mirror, http_mirrors, capsys):
    directory, files = mirror
    good, _ = http_mirrors
    fetch.fetch_verified(good, files["train_images"], timeout_s=5)
    size = len((directory / files["train_images"].gz_name).read_bytes())
    err = capsys.readouterr().err
    assert re.search(rf"fetch: downloading {re.escape(good)}\S+: {size:,}/{size:,} bytes \(100%\)", err), err


def test_the_misclassified_grid_shows_at_most_its_limit():
    """plot.misclassified images of the wrong ones, in test order, the title saying how many of all."""
    actual, predicted = np.zeros(12, np.int64), np.array([1] * 10 + [0, 0])
    fig = misclassified_figure(np.zeros((12, 28, 28)), actual, predicted, ["a", "b"], limit=3)
    assert sum(bool(ax.images) for ax in fig.axes) == 3
    assert fig._suptitle.get_text() == "Misclassified test images, predicted / true (3 shown of 10)"


def test_a_confusion_file_of_another_length_than_the_test_split_is_refused(tmp_path, monkeypatch):
    """A stale confusion.csv (one row short) would put its predictions under the wrong images."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "params.yaml", "params.yaml")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "step_loss.tsv").write_text("step\tstep_loss\n1\t0.5\n")
    (tmp_path / "confusion.csv").write_text("actual,predicted\na,b\n")
    save_tensors(tmp_path / "test.pt", {"images": torch.zeros(2, 28, 28), "labels": torch.tensor([0, 1]),
                                        "classes": ["a", "b", "c"]})
    with pytest.raises(PipelineError, match=r"^confusion\.csv has 1 row for 2 test images$"):
        plot_main(["series", "confusion.csv", "test.pt", "plots"])
    assert not (tmp_path / "plots").exists()
    (tmp_path / "confusion.csv").write_text("actual,predicted\na,b\nb,b\nc,c\n")
    with pytest.raises(PipelineError, match=r"^confusion\.csv has 3 rows for 2 test images$"):
        plot_main(["series", "confusion.csv", "test.pt", "plots"])
