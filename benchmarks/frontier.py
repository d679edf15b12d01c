"""The speed frontier: test accuracy against training time of each preset, in reference epochs (`make frontier`).

    python -m benchmarks.frontier [--presets default,fast,cnn-max,mlp-best] [--seeds 0,1,2]
                                  [--reference-epochs 3] [--device auto|cpu|cuda] [--quick]
                                  [--set section.key=value ...]

In one process, interleaved (reference epoch 1, every preset for the first seed, reference epoch 2,
every preset for the next seed, ...) so that a change in the machine's load falls on both sides:

- the reference recipe (benchmarks.reference: pytorch/examples' MNIST CNN, torchvision DataLoader,
  Adadelta), epoch by epoch, with its training seconds and test accuracy after each epoch. The
  median of its epoch times is the *reference epoch*, the unit of every time below;
- each preset, for each seed (train.seed and augment.seed both set to it), run through the stages'
  own functions: the augment stage's augmented_split, the train stage's fit() on train and val, and
  the evaluate stage's accuracy on test. "Training seconds" is fit()'s wall time, as the train stage
  logs it; the augmentation is not in it. The val accuracy after the last epoch is reported beside
  the test accuracy: choices between candidates (`--set` runs every preset with a change, e.g. a
  lever to measure) are made on it.

`default` is params.yaml as committed; other names are entries of presets.yaml applied to it (a
workspace whose params.yaml differs from the last commit is named in the output's `params:` line).
The prepared splits come from data/prepared/*.pt, or are built from the raw IDX files (data/raw) by
the preprocess stage's function when they are missing. Prints the machine (CPU with its vector ISA,
threads, torch), the params line and a table; writes benchmarks/frontier.png (accuracy against
time, log x axis).
`--quick` runs everything on tiny synthetic data for one epoch, in a minute or two on 2 cores
(cnn-max's 12 stored views take the most), and draws benchmarks/frontier-quick.png: a smoke test of
the script (the test suite runs it), its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import presets
from benchmarks.presets import (DATA_DIR, QUICK_VAL, RAW_DIR, check_prepared_is_mnist, check_preset_option, check_raw,
                                comma_ints, comma_list, device_option, figure_file, lifetime_peak_rss, load_splits,
                                made_parent, params_line, parse_override, positive_int, refuse_other_datasets,
                                seeds_problem, split_overrides_problem, test_accuracy, timed_fit, write_quick_mirror)
from benchmarks.reference import torchvision_mnist, train_reference
from stages.augment import augmented_split
from stages.common import run_main, write_bytes_atomic
from stages.datasets import Dataset, load_table
from stages.params import Params, PreprocessParams
from stages.preprocess import prepare
from stages.presets import DEFAULT
from stages.runtime import (cpu_has_amx, cpu_has_bf16, cpu_model, describe_device, release_freed_memory,
                            resolve_precision, retain_freed_memory)

DEFAULT_PRESETS = (DEFAULT, "fast", "cnn-max", "mlp-best")
PLOT_PATH = Path("benchmarks/frontier.png")
QUICK_PLOT_PATH = Path("benchmarks/frontier-quick.png")  # a smoke test's figure never replaces a real one
QUICK_OVERRIDES = {"train.epochs": 1}  # --quick: one epoch of everything, on benchmarks.presets' tiny data


@dataclass
class PresetRun:
    preset: str
    seed: int
    test_accuracy: float  # in [0, 1]
    val_accuracy: float  # after the last epoch, as train logs it
    train_seconds: float
    peak_rss_mib: float  # the whole process's resident memory at its peak during this run


def preset_params(name: str, seed: int, extra: dict[str, Any]) -> Params:
    """params.yaml with preset `name` (none for 'default'), the seeds and `extra` applied, validated."""
    return presets.preset_params(name, {"train.seed": seed, "augment.seed": seed, **extra})


class PeakMemory:
    """Samples this process's resident set size every few ms; `peak` is the largest seen since
    reset(). ru_maxrss cannot do this: it is the peak of the whole process's life."""

    PERIOD_S = 0.01

    def __init__(self) -> None:
        self.peak = 0
        # Held while a sample is taken and stored, and by reset(): a sample read before a reset must
        # not be stored after it (the last run's peak in the next run's figure).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        try:  # Linux: /proc/self/statm's second field is resident pages
            return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
        except OSError:  # elsewhere: the lifetime peak, an upper bound
            return lifetime_peak_rss()

    def _sample(self) -> None:
        while not self._stop.wait(self.PERIOD_S):
            with self._lock:
                self.peak = max(self.peak, self.current())

    def reset(self) -> None:
        with self._lock:
            self.peak = self.current()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_preset(name: str, seed: int, params: Params, splits: dict[str, dict], device: torch.device,
               memory: PeakMemory) -> PresetRun:
    train = augmented_split(splits["train"], params.augment)
    release_freed_memory()  # so that the peak below is this run's: live data + what fit() needs
    memory.reset()
    model, rows, seconds = timed_fit(params.train, train, splits["val"], device)
    peak = max(memory.peak, memory.current())
    accuracy = test_accuracy(model, splits["test"], train["classes"], params.evaluate.batch_size)
    return PresetRun(name, seed, accuracy, rows[-1]["val_accuracy"], seconds, peak / 2**20)


def load_or_prepare(data_dir: Path, raw_dir: Path, preprocess: PreprocessParams, dataset: Dataset) -> dict[str, dict]:
    """The prepared splits: data_dir's files if all three are there, else built from raw_dir's
    IDX files (plain or .gz) of `dataset` by the preprocess stage's own function."""
    if all((data_dir / f"{name}.pt").is_file() for name in ("train", "val", "test")):
        return dict(zip(("train", "val", "test"), load_splits(data_dir)))
    return prepare(raw_dir, dataset, preprocess)


def quick_data(root: Path) -> tuple[Path, dict[str, dict]]:
    """--quick: (raw dir, prepared splits) of a tiny synthetic MNIST written under `root`."""
    raw_dir = write_quick_mirror(root / "raw")
    return raw_dir, prepare(raw_dir, load_table()["mnist"], PreprocessParams(val_size=QUICK_VAL, seed=0))


def machine_line(device: torch.device, precisions: dict[str, str]) -> str:
    # The vector ISA decides which oneDNN kernels run: "EPYC" alone names CPUs from AVX2-only to
    # AVX-512 with bf16. bf16 instructions and AMX decide what precision auto resolves to
    # (stages.runtime.cpu_bf16_is_faster: an Intel CPU without AMX trains faster in fp32).
    bf16 = "with" if cpu_has_bf16() else "without"
    amx = "with" if cpu_has_amx() else "without"
    return (f"CPU: {cpu_model()} (torch ISA {torch.backends.cpu.get_cpu_capability()}, {bf16} bf16 "
            f"instructions, {amx} AMX); torch threads "
            f"{torch.get_num_threads()}; torch {torch.__version__}; device {describe_device(device)}; "
            f"precision: {', '.join(f'{name} {value}' for name, value in precisions.items())}")


def table(runs: list[PresetRun], reference_epoch_s: float) -> str:
    lines = ["| preset | seeds | mean test acc. | min test acc. | mean val acc. | train s (mean) | reference epochs "
             "| peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(run.preset for run in runs):
        mine = [run for run in runs if run.preset == name]
        accuracies = [run.test_accuracy for run in mine]
        seconds = statistics.mean(run.train_seconds for run in mine)
        # The ratio to 3 significant digits: 0.0792 and 0.0835 both print as 0.08 at two decimals.
        lines.append(f"| {name} | {','.join(str(run.seed) for run in mine)} | {100 * statistics.mean(accuracies):.2f}% "
                     f"| {100 * min(accuracies):.2f}% | {100 * statistics.mean(run.val_accuracy for run in mine):.2f}% "
                     f"| {seconds:.1f} | {seconds / reference_epoch_s:.3g} "
                     f"| {max(run.peak_rss_mib for run in mine):.0f} |")
    return "\n".join(lines)


def plot(runs: list[PresetRun], reference: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    elapsed = list(torch.tensor([r.train_seconds for r in reference]).cumsum(0).tolist())
    axes.plot(elapsed, [100 * r.test_accuracy for r in reference], "k.-", label="reference recipe, by epoch")
    for name in dict.fromkeys(run.preset for run in runs):
        mine = [run for run in runs if run.preset == name]
        axes.scatter([run.train_seconds for run in mine], [100 * run.test_accuracy for run in mine], label=name)
    axes.set_xscale("log")
    axes.set_xlabel("training seconds (log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower left")  # the corner every point leaves empty: fast and below 99 %
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    write_bytes_atomic(made_parent(path), image.getvalue())  # a Ctrl-C or a full disk leaves the old figure whole


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", type=comma_list, default=list(DEFAULT_PRESETS),
                        help="comma-separated: 'default' (params.yaml) and presets.yaml names")
    parser.add_argument("--seeds", type=comma_ints, default=[0, 1, 2],
                        help="comma-separated, ranges as 60-79; each preset runs once per seed "
                             "(train.seed = augment.seed)")
    parser.add_argument("--reference-epochs", type=positive_int, default=3,
                        help="epochs of the reference recipe; the median epoch time is the unit")
    parser.add_argument("--device", type=device_option, default="cpu", metavar="{auto,cpu,cuda}",
                        help="where every run trains, presets' train.device overridden (default: cpu, the "
                             "machine issue 14's targets are set for)")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic data, one epoch: a smoke test")
    parser.add_argument("--raw", type=Path, help=f"directory of the MNIST IDX files, plain or .gz (default {RAW_DIR})")
    parser.add_argument("--data", type=Path, help=f"directory of train.pt, val.pt, test.pt (default {DATA_DIR})")
    parser.add_argument("--plot", type=figure_file, help=f"where to write the figure (default: {PLOT_PATH}; "
                                                          f"with --quick, {QUICK_PLOT_PATH})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                        metavar="SECTION.KEY=VALUE", help="a param for every preset, after its own (repeatable)")
    args = parser.parse_args(argv)
    if not args.presets:
        parser.error("--presets: name one or more")
    check_preset_option(parser, "--presets", args.presets)
    if problem := seeds_problem(args.seeds):
        parser.error(f"--seeds: {problem}")
    if args.quick and (args.raw or args.data):
        parser.error("--quick writes its own tiny data: it takes no --raw or --data")
    if args.data is not None and (missing := [name for name in ("train.pt", "val.pt", "test.pt")
                                              if not (args.data / name).is_file()]):
        # Without --data, missing splits are prepared from --raw; a folder named and wrong is a mistake.
        parser.error(f"--data {args.data}: no {', '.join(missing)} there (the preprocess stage's folder; "
                     "without --data the splits come from data/prepared, or are prepared from --raw)")
    args.raw, args.data = args.raw or RAW_DIR, args.data or DATA_DIR
    if args.plot is None:  # the default, checked as a given one is
        try:
            args.plot = figure_file(str(QUICK_PLOT_PATH if args.quick else PLOT_PATH))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --plot: {exc}")
    overrides = dict(args.overrides)
    if problem := split_overrides_problem(overrides):
        parser.error(problem)
    seeded = sorted({"train.seed", "augment.seed"} & overrides.keys())
    if seeded:
        parser.error(f"--set {', '.join(seeded)}: the seeds come from --seeds (each run sets both)")
    if "train.device" in overrides:
        parser.error("--set train.device: every run trains where --device says")
    device = args.device
    extra = {"train.device": device.type, **(QUICK_OVERRIDES if args.quick else {}), **overrides}
    # Every preset and seed checked before anything runs.
    all_params = {(name, seed): preset_params(name, seed, extra) for seed in args.seeds for name in args.presets}
    refuse_other_datasets({name: params.fetch.dataset for (name, _), params in all_params.items()})
    retain_freed_memory()  # the train stage's allocator setting, for the reference as much as the presets
    first = next(iter(all_params.values()))
    with tempfile.TemporaryDirectory(prefix="frontier-") as temp:
        if args.quick:
            raw_dir, splits = quick_data(Path(temp))
        else:
            raw_dir = args.raw
            # First: the reference recipe reads them, and missing splits are prepared from them. After a
            # `fashion` repro, data/raw holds garments under MNIST's names.
            mnist = load_table()["mnist"]
            check_raw(raw_dir, mnist)
            splits = load_or_prepare(args.data, raw_dir, first.preprocess, mnist)  # every preset's (checked above)
            check_prepared_is_mnist(args.data, splits["train"], mnist)
        train_set, test_set = torchvision_mnist(raw_dir, Path(temp, "torchvision"))
    precisions = {name: resolve_precision(p.train.precision, device) for (name, _), p in all_params.items()}
    print(machine_line(device, precisions), flush=True)
    print(params_line({"train.seed", "augment.seed", "train.device", *overrides}), flush=True)
    memory = PeakMemory()
    reference_epochs = train_reference(train_set, test_set, args.reference_epochs, seed=0, device=device)
    reference, runs = [], []
    for round_ in range(max(args.reference_epochs, len(args.seeds))):
        if round_ < args.reference_epochs:
            reference.append(next(reference_epochs))
            print(f"reference epoch {reference[-1].epoch}: {reference[-1].train_seconds:.1f} s, "
                  f"test accuracy {100 * reference[-1].test_accuracy:.2f}%", flush=True)
        if round_ < len(args.seeds):
            seed = args.seeds[round_]
            for name in args.presets:
                runs.append(run_preset(name, seed, all_params[(name, seed)], splits, device, memory))
                print(f"{name} seed {seed}: {runs[-1].train_seconds:.1f} s, test accuracy "
                      f"{100 * runs[-1].test_accuracy:.2f}%, val {100 * runs[-1].val_accuracy:.2f}%", flush=True)
    memory.stop()
    reference_epoch_s = statistics.median(r.train_seconds for r in reference)
    print(f"\nreference epoch (median of {len(reference)}): {reference_epoch_s:.1f} s")
    print(table(runs, reference_epoch_s))
    plot(runs, reference, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    run_main("benchmarks.frontier", main)
