"""Train and test presets of presets.yaml; print a markdown table of test accuracy and training time.

    python -m benchmarks.presets                            # the default list, see default_specs
    python -m benchmarks.presets fast cnn --out table.md    # rows are appended as runs finish
    python -m benchmarks.presets fast --set train.seed=1    # a preset with further overrides

Each run does in one process what `dvc repro` would do with the preset applied to params.yaml,
without touching the workspace: the prepared train split is augmented as the augment stage does,
the model is trained by the train stage's fit() on the train and val splits, and it is scored on
the test split as the evaluate stage does. "train seconds" is fit()'s wall time, the figure the
train stage logs as "trained in" (it includes the per-epoch val scoring, not the augmentation).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch

from stages import params as params_mod
from stages.augment import augmented_split
from stages.common import NO_CUDA_GPU, PipelineError, cannot_write, load_tensors, os_reason, parse_yaml, run_main
from stages.datasets import Dataset, load_table
from stages.evaluate import test_metrics
from stages.models import predict_logits
from stages.params import AugmentParams, Params, TrainParams
from stages.preprocess import raw_files_problem
from stages.presets import check, committed_params, leftover_keys, load_presets, resolve
from stages.runtime import resolve_device
from stages.train import fit

DATA_DIR = Path("data/prepared")  # the preprocess stage's outputs
RAW_DIR = Path("data/raw")  # the fetch stage's output: the four IDX files
AUG = "aug"  # the tutorials' augmentation, combined with each tutorial model as NAME+aug
TABLE_HEADER = "| preset | test accuracy | train seconds |\n|---|---:|---:|\n"


def default_specs(presets: dict[str, dict[str, Any]]) -> list[str]:
    """presets.yaml lists the tutorials' models, then `aug`, then this project's presets: each
    tutorial model runs as published and on the tutorials' augmentation, ours as they are."""
    names = list(presets)
    if AUG not in names:
        raise PipelineError(f"presets.yaml has no {AUG!r} entry; name the presets to run")
    split = names.index(AUG)
    tutorial, own = names[:split], names[split + 1:]
    return [spec for name in tutorial for spec in (name, f"{name}+{AUG}")] + own


def on_other_data(specs: list[str], all_params: list[Params], classes: list[str]) -> list[str]:
    """The specs whose fetch.dataset is not the one the prepared splits hold (told by its class
    names): trained and scored on those splits, they would report another dataset's accuracy."""
    table = load_table()
    return [spec for spec, params in zip(specs, all_params)
            if list(table[params.fetch.dataset].classes) != list(classes)]


def preset_params(spec: str, overrides: dict[str, Any] | None = None,
                  params_path: Path = params_mod.DEFAULT_PATH) -> Params:
    """params.yaml with the preset(s) of `spec` ('default': none) and then `overrides` applied, validated."""
    changes = {**resolve(spec, load_presets()), **(overrides or {})}
    return check(spec, changes, params_path)


def load_splits(data_dir: Path = DATA_DIR) -> tuple[dict, dict, dict]:
    """The prepared (train, val, test) splits, on the CPU."""
    return (load_tensors(data_dir / "train.pt", required=("images", "labels", "classes", "mean", "std")),
            load_tensors(data_dir / "val.pt", required=("images", "labels")),
            load_tensors(data_dir / "test.pt", required=("images", "labels")))


# --quick (frontier, screen): a tiny synthetic MNIST (tests/synthetic.py), for smoke tests. At least
# a few batches of 128 per epoch: OneCycleLR divides by zero when warm-up is under one step.
QUICK_TRAIN, QUICK_TEST, QUICK_VAL = 1200, 200, 100


def write_quick_mirror(directory: Path) -> Path:
    """--quick: writes the four .gz files of a tiny synthetic MNIST into `directory`; returns it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
    from tests.synthetic import write_mirror  # the test suite's generator: only --quick needs it
    write_mirror(directory, n_train=QUICK_TRAIN, n_test=QUICK_TEST)
    return directory


def augmented(train: dict, cfg: AugmentParams) -> dict:
    """The train split as the augment stage writes it for `cfg` (same generator, same seed)."""
    return augmented_split(train, cfg)


def synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a timer read without this would miss queued work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_fit(cfg: TrainParams, train: dict, val: dict,
              device: torch.device) -> tuple[torch.nn.Module, list[dict], float]:
    """(trained model, fit()'s per-epoch log rows, seconds of training) for train's fit(); the last
    row's val_accuracy is the val score train logs."""
    synchronize(device)
    start = time.perf_counter()
    model, _, rows = fit(cfg, train, val, device)
    synchronize(device)
    return model, rows, time.perf_counter() - start


def test_accuracy(model: torch.nn.Module, test: dict, classes: list[str], batch_size: int) -> float:
    """The evaluate stage's accuracy, in [0, 1], of `model` on the test split."""
    logits = predict_logits(model, test["images"], batch_size).cpu()  # test_metrics works in NumPy
    return test_metrics(logits, test["labels"], classes)["accuracy"]


def run_preset(params: Params, splits: tuple[dict, dict, dict]) -> tuple[float, float]:
    """(test accuracy in [0, 1], train seconds) of one preset's params."""
    train, val, test = splits
    device = resolve_device(params.train.device)
    model, _, seconds = timed_fit(params.train, augmented(train, params.augment), val, device)
    return test_accuracy(model, test, train["classes"], params.evaluate.batch_size), seconds


def table_row(label: str, accuracy: float, seconds: float) -> str:
    return f"| {label} | {100 * accuracy:.2f}% | {seconds:.1f} |\n"


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value`, the value read as YAML, as params.yaml is (stages.common.parse_yaml)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected section.key=value, got {text!r}")
    try:
        return key, parse_yaml(value, f"--set {key}")
    except PipelineError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def split_overrides_problem(overrides: dict[str, Any]) -> str | None:
    """Why --set's `overrides` cannot be honoured, or None: the runs train on the prepared splits
    (data/prepared, the preprocess stage's), so a preprocess.* value would label a row with a split
    it was not trained on."""
    keys = sorted(key for key in overrides if key.split(".")[0] == "preprocess")
    if keys:
        return (f"--set {', '.join(keys)}: the runs use the prepared splits as they are; prepare others with "
                "`dvc repro preprocess` (and point --data at them)")
    return None


def comma_list(text: str) -> list[str]:
    """An argparse type: "a, b,c" -> ["a", "b", "c"]; "" or " , ": [] (the caller says none was
    given). An empty item beside others ("0,,1", "a,") is refused: it is a name or number the user
    meant to type, not one to drop."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        return []
    if "" in items:
        raise argparse.ArgumentTypeError(f"{text!r}: an empty item between commas")
    return items


def output_file(text: str, renamed: bool = False) -> Path:
    """An argparse type for a file the benchmark appends to (a table, the sealed test accuracies):
    the path must not be a folder, and the file (or, while it does not exist, the nearest folder
    above it that exists) must take writes, so that a bad path is one line before any training, not
    a traceback after it. Nothing is made here: a refused run leaves no folder behind; the missing
    folders are made with the first write (append_text, made_parent). `renamed`: the file is
    written beside itself and renamed into place (the figure), so its folder must take new files in
    any case."""
    path = Path(text)
    # The path the writes will reach: `..` and symlinks resolved. os.path's tests, which never
    # raise: a folder the user may not enter reads as missing, and the one above it is tried.
    real = Path(os.path.realpath(path))
    if os.path.isdir(real) or text.endswith("/"):
        raise argparse.ArgumentTypeError(f"{text}: is a folder; name a file")
    folder = next(parent for parent in real.parents if os.path.exists(parent))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: cannot write (Not a directory: {folder})")
    try:
        if os.path.exists(real):
            path.open("ab").close()  # appends nothing: the file takes writes
    except OSError as exc:
        raise argparse.ArgumentTypeError(str(cannot_write(path, exc))) from None
    if renamed or not os.path.exists(real):
        try:
            with tempfile.TemporaryFile(dir=folder):  # made and gone: the folder takes new files
                pass
        except OSError as exc:  # named by the folder: the temporary's name means nothing to the user
            raise argparse.ArgumentTypeError(f"{text}: cannot write in {folder} ({os_reason(exc)})") from None
    return path


def made_parent(path: Path) -> Path:
    """The path a write to `path` reaches (`..` and symlinks resolved, as output_file checked it),
    its missing folders made: just before a benchmark's first write to an output_file
    (`new/../t.md` makes no `new`; a link to a file in a missing folder gets its folder)."""
    real = Path(os.path.realpath(path))
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    return real


def figure_file(text: str) -> Path:
    """output_file for a figure, which is renamed into place."""
    return output_file(text, renamed=True)


def lifetime_peak_rss() -> int:
    """Bytes: this process's peak resident memory over its whole life (getrusage's ru_maxrss, which
    is in KiB on Linux, in bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def append_text(path: Path, text: str, start: bool = False) -> None:
    """Appends to a benchmark's output file (`start`: the file starts afresh with `text`); a write
    that fails (a full disk) is one line naming it."""
    try:
        with made_parent(path).open("w" if start else "a", encoding="utf-8") as file:
            file.write(text)
    except OSError as exc:
        raise cannot_write(path, exc) from None


def params_line(also_set: set[str] = frozenset(), params_path: Path = Path(params_mod.DEFAULT_PATH)) -> str:
    """A benchmark's header line on the params every run starts from: params.yaml as committed, or
    a working copy that differs from the last commit (`dvc exp run -S` leaves its params there),
    naming the keys; keys the benchmark sets itself in every run (`also_set`: the seeds, --set's) are
    not counted."""
    committed = committed_params(params_path)
    if committed is None:
        return f"params: {params_path} (no commit to compare it with)"
    changed = leftover_keys(params_mod.load_raw(params_path), committed, dict.fromkeys(also_set))
    if not changed:
        return f"params: {params_path} as committed"
    return (f"params: {params_path} differs from the last commit in {', '.join(changed)}: every run below starts "
            "from this working copy's params, not the committed ones")


def check_raw(raw_dir: Path, dataset: Dataset) -> None:
    """Raises unless raw_dir holds `dataset`'s four IDX files (plain or .gz), checksums checked:
    MNIST's and Fashion-MNIST's files have the same names, so after a `fashion` repro data/raw
    holds garments."""
    missing = dataset.missing_from(raw_dir)
    if missing:
        raise PipelineError(f"{raw_dir}: {missing}; point --raw at the directory of {dataset.name}'s four IDX "
                            f"files (the fetch stage writes them to {RAW_DIR})")
    problem = raw_files_problem(raw_dir, dataset)
    if problem:
        raise PipelineError(f"{problem}. The benchmark's dataset is {dataset.name}: run `dvc repro fetch` with "
                            f"fetch.dataset: {dataset.name}, or point --raw at its files")


def check_preset_option(parser: argparse.ArgumentParser, option: str, specs: list[str]) -> None:
    """Preset names given on the command line (each a name or several joined by `+`) that
    presets.yaml lacks: a usage error naming `option`, exit status 2, before anything runs (a
    screen told it as every candidate's at every seed)."""
    known = load_presets()
    for spec in specs:
        try:
            resolve(spec, known)
        except PipelineError as exc:
            parser.error(f"{option}: {exc}")


def seeds_problem(seeds: list[int]) -> str | None:
    """What is wrong with a benchmark's --seeds (each seed k: one run with train.seed = augment.seed
    = k), or None: checked when the command line is read, not after minutes of other runs."""
    if not seeds:
        return "no seed given"
    if len(set(seeds)) < len(seeds):
        return "a seed given twice would count one run twice in the means"
    if max(seeds) > params_mod.SEED_MAX:
        return f"{max(seeds)} is over the largest seed, {params_mod.SEED_MAX} (2**32 - 1)"
    return None


def refuse_other_datasets(datasets: dict[str, str]) -> None:
    """The frontier's rule, for preset name -> its fetch.dataset: the reference recipe is
    torchvision's MNIST, so a preset of another dataset has no reference to be measured against."""
    other = [f"{name}: fetch.dataset is {dataset}" for name, dataset in sorted(datasets.items()) if dataset != "mnist"]
    if other:
        raise PipelineError(f"{'; '.join(other)}; the frontier measures MNIST presets against the MNIST "
                            "reference recipe")


def check_prepared_is_mnist(data_dir: Path, train: dict, mnist: Dataset) -> None:
    """Raises unless the prepared train split `train` (from data_dir) is `mnist`'s, by its class
    names: after a `fashion` repro data/prepared holds garments."""
    classes = list(train["classes"])
    if classes != list(mnist.classes):
        raise PipelineError(f"{data_dir} holds another dataset than MNIST (class names {classes[:3]}...); run "
                            "`dvc repro preprocess` with fetch.dataset: mnist, or point --data and --raw at "
                            "MNIST's files")


DEVICES = get_args(get_type_hints(TrainParams)["device"])  # train.device's choices: auto, cpu, cuda


def device_option(text: str) -> torch.device:
    """An argparse type for --device (auto | cpu | cuda), resolved by train's rule when the command line
    is read, so that `cuda` on a machine without a GPU is one line naming the option, before any work."""
    if text not in DEVICES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(DEVICES)})")
    try:
        return resolve_device(text)
    except PipelineError:
        raise argparse.ArgumentTypeError(NO_CUDA_GPU) from None


MAX_RANGE = 10_000  # numbers one range of comma_ints may name


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (counts of epochs, repeats, images; a negative one
    would slice off the last items instead of failing)."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: not a whole number >= 1")
    return number


def comma_ints(text: str) -> list[int]:
    """An argparse type: "0,1,2" -> [0, 1, 2]; "60-63,70" -> [60, 61, 62, 63, 70] (a range: both
    ends). Numbers >= 0 (seeds, widths, sizes)."""
    numbers = []
    for item in comma_list(text):
        first, dash, last = item.partition("-")
        try:
            start = int(first)
            stop = int(last) if dash else start
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: not a whole number >= 0, nor a range of them "
                                             "such as 60-79") from None
        if stop < start:
            raise argparse.ArgumentTypeError(f"{item!r}: a range runs from the lower number to the higher")
        if stop - start >= MAX_RANGE:
            raise argparse.ArgumentTypeError(f"{item!r}: more than {MAX_RANGE:,} numbers")
        numbers += range(start, stop + 1)
    return numbers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.presets", description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", metavar="PRESET",
                        help="preset names, or several joined by '+' (default: every tutorial model "
                             "with and without +aug, then this project's presets)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                        metavar="SECTION.KEY=VALUE", help="a further override applied after the preset (repeatable)")
    parser.add_argument("--out", type=output_file, help="also write the table here, a row as each run finishes")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="directory of train.pt, val.pt, test.pt")
    args = parser.parse_args(argv)
    overrides = dict(args.overrides)
    if problem := split_overrides_problem(overrides):
        parser.error(problem)
    specs = args.specs or default_specs(load_presets())
    all_params = [preset_params(spec, overrides) for spec in specs]  # every preset checked before any run
    splits = load_splits(args.data)
    other = on_other_data(specs, all_params, splits[0]["classes"])
    if other and (args.specs or len(other) == len(specs)):
        which = ", ".join(other) if args.specs else "every preset of the default list"
        raise PipelineError(f"{which}: fetch.dataset is not the dataset prepared in {args.data}; prepare "
                            "that one first (`dvc repro preprocess` with these params), or point --data at it")
    if other:  # the default list: those of the prepared dataset run, the rest are named
        print(f"benchmarks.presets: skipping {', '.join(other)}: another dataset than {args.data}'s",
              file=sys.stderr)
    runs = [(spec, params) for spec, params in zip(specs, all_params) if spec not in other]
    for _, params in runs:  # train.device: cuda on a machine without one, before any output
        resolve_device(params.train.device)
    suffix = "".join(f" {key}={value}" for key, value in overrides.items())
    print(params_line(set(overrides)), file=sys.stderr)  # stdout: the table alone, as in --out
    sys.stdout.write(TABLE_HEADER)
    for index, (spec, params) in enumerate(runs):
        row = table_row(spec + suffix, *run_preset(params, splits))
        sys.stdout.write(row)
        sys.stdout.flush()
        if args.out:  # the table starts afresh with its first row: a run that fails or is stopped
            # before it leaves the last table whole
            append_text(args.out, TABLE_HEADER + row if index == 0 else row, start=index == 0)


if __name__ == "__main__":
    run_main("benchmarks.presets", main)
