"""The train stage's metrics, logged through DVCLive into the layout dvc.yaml declares.

The DVCLive directory (`metrics/train/`, a cached output of train) holds:

    metrics.json                    the latest value of every series, plus `epoch` and `step`
    params.yaml                     how the run computed (stages.runtime.numerics): device and
                                    precision; CPU name, vector ISA, AMX and threads, or GPU and
                                    CUDA and cuDNN versions; torch version; and a CNN's crop in
                                    pixels (train.crop: auto resolved to the dataset's)
    plots/metrics/<series>.tsv      one row per logged point: `step<TAB><series>`

`step` is the number of optimizer steps done when the point was logged, the one x-axis of every
series, so the per-epoch points and the every-N-steps train loss share a chart. The series:

    step_loss       mean train loss over the last `step_log_interval()` steps (about a tenth of
                    an epoch), so even a one-epoch run draws a curve
    train_loss      mean train loss of the epoch (label smoothing included, as optimised)
    val_loss        mean cross-entropy on the validation split after the epoch
    val_accuracy    fraction (0..1) of validation images classified right after the epoch
    lr              learning rate the epoch's last step used

Nothing time-dependent is written (no timestamps, no durations): the same params on the same
machine give the same bytes, which DVC's run-cache and `dvc status` rely on. metrics.json is
rewritten after every logged point, so `dvc exp show` and the VS Code extension see a running
experiment.

DVCLive is used with the project's own dvc.yaml (it writes none), saves no experiment of its own
(`dvc exp run` does that) and makes no report (the plot stage draws the PNGs).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from dvclive import Live

from stages.common import cannot_write

POINTS_PER_EPOCH = 10  # step_loss points per epoch
SUMMARY_ONLY = ("epoch",)  # in metrics.json, no series of its own


def step_log_interval(steps_per_epoch: int) -> int:
    """Steps between two step_loss points: a tenth of an epoch, at least one step."""
    return max(1, steps_per_epoch // POINTS_PER_EPOCH)


class TrainLog:
    """Every point logged in a training run, kept in memory and, given a directory, in DVCLive's files.

    `records` is what a checkpoint stores: a resumed run replays it into a fresh log (DVC deletes a
    stage's outputs before running it, so the files of the killed run are gone), which makes its
    files byte-identical to those of an uninterrupted run. Under torchrun only rank 0 gets a
    directory; the other ranks keep records only.
    """

    def __init__(self, directory: Path | None = None):
        self.records: list[dict] = []  # {"step": int, series: value, ...}, in logging order
        self._live = None
        self._directory = directory
        if directory is not None:
            with self._writing():
                self._live = Live(str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=False)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        # DVCLive writes in place, not atomically (a running experiment must show its points), so a
        # full disk or a file where the directory should be surfaces here, as the stage's one-line
        # error naming the directory (stages.common.cannot_write), not a traceback from dvclive.
        try:
            yield
        except OSError as exc:
            raise cannot_write(self._directory, exc) from None

    def log(self, step: int, values: dict[str, float]) -> None:
        """Logs `values` at optimizer step `step` and rewrites metrics.json."""
        self.records.append({"step": step, **values})
        if self._live is None:
            return
        self._live.step = step
        with self._writing():
            for name, value in values.items():
                self._live.log_metric(name, value, plot=name not in SUMMARY_ONLY)
            # make_summary, and Studio's live update when the user has configured Studio.
            self._live.sync()

    def log_numerics(self, values: dict[str, str | int | bool]) -> None:
        """Writes params.yaml: how this run computed (stages.runtime.numerics) and what `auto`
        params resolved to, not a choice in params.yaml. Logged by every run, a resumed one too, so
        it is not one of `records`."""
        if self._live is not None:
            with self._writing():
                self._live.log_params(values)

    def replay(self, records: list[dict]) -> None:
        for record in records:
            self.log(record["step"], {name: value for name, value in record.items() if name != "step"})

    def epochs(self) -> list[dict]:
        """The per-epoch records: epoch, train_loss, val_loss, val_accuracy, lr and step."""
        return [record for record in self.records if "epoch" in record]
