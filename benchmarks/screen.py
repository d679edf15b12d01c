"""A validation screen: candidate params compared on val over rotating splits (`make screen`).

    python -m benchmarks.screen --candidates '{now: {}, crop3: {train.crop: 3}}' [--preset fast]
                                [--seeds 0,1,2,3,4,5] [--sealed-test FILE] [--raw data/raw] [--quick]

How this project chooses a param (issue 14): candidates are scored on validation data, with a rule
written down before the runs, and test accuracy is read only once the choice is made. A rule
scored on one val split of 5,000 images cannot see a 0.05-point effect: every seed meets the same
images, so their draw never averages out (twice, test then disagreed with it). Here seed k trains
and validates on the split that `preprocess.seed: k` gives (the preprocess stage's own function on
the raw IDX files; class-stratified, val_size images each), with train.seed and augment.seed k: a
mean over n seeds is a mean over n different val splits. The 10,000 test images are the same for
every split, and never part of one. The seeds come from --seeds: a candidate may not set them.

Candidates are params.yaml with `--preset` and then their own overrides applied (YAML, as
`dvc exp run -S` reads values), all validated before anything runs; they take turns within each
seed, starting one later each seed, so a change in the machine's load falls on all of them. Prints
one line per run (val accuracy after the last epoch and fit() seconds, both as train logs them;
the augmentation's seconds) and a table: each candidate's val per seed, mean and lowest, the seeds
where it scored at least the first candidate's val, and its mean fit() as a ratio to the first's.
Test accuracy is computed only with `--sealed-test FILE`, and only appended there (a header line
naming the screen, then one line per run), for reading after the decision.
`--quick` runs on tiny synthetic data for one epoch: a smoke test (the test suite runs it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.presets import (QUICK_VAL, RAW_DIR, append_text, check_preset_option, check_raw, comma_ints,
                               output_file, params_line, preset_params, seeds_problem, test_accuracy, timed_fit,
                               write_quick_mirror)
from stages.augment import augmented_split
from stages.common import PipelineError, parse_yaml, run_main
from stages.datasets import load_table
from stages.presets import DEFAULT
from stages.params import Params, PreprocessParams
from stages.preprocess import prepare
from stages.runtime import resolve_device

SEED_KEYS = ("train.seed", "augment.seed", "preprocess.seed")  # set from --seeds, for every candidate


@dataclass
class Run:
    candidate: str
    seed: int  # train.seed = augment.seed = the split's preprocess.seed
    val_accuracy: float  # in [0, 1]
    fit_seconds: float
    augment_seconds: float


def parse_candidates(text: str) -> dict[str, dict[str, Any]]:
    """--candidates: a YAML mapping of names to {section.key: value} overrides."""
    try:
        raw = parse_yaml(text, "the mapping")  # a name given twice is refused, not silently merged
    except PipelineError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(raw, dict) or not raw:
        raise argparse.ArgumentTypeError("expected a YAML mapping of names to overrides, "
                                         "e.g. '{now: {}, crop3: {train.crop: 3}}'")
    for name, overrides in raw.items():
        if not isinstance(overrides, dict) or not all(isinstance(key, str) for key in overrides):
            raise argparse.ArgumentTypeError(f"candidate {name!r}: expected a mapping of section.key to a value")
        seeded = [key for key in SEED_KEYS if key in overrides]
        if seeded:
            raise argparse.ArgumentTypeError(f"candidate {name!r}: {', '.join(seeded)} come from --seeds "
                                             "(seed k sets all three)")
    return {str(name): overrides for name, overrides in raw.items()}


def seed_order(names: list[str], seed_index: int) -> list[str]:
    """The candidates in turn for the seed_index-th seed: the list rotated by seed_index."""
    shift = seed_index % len(names)
    return names[shift:] + names[:shift]


def summary(runs: list[Run]) -> str:
    """A markdown table: per candidate its val per seed, mean, lowest, seeds at or above the first
    candidate's val, mean fit() seconds and their ratio to the first candidate's."""
    names = list(dict.fromkeys(run.candidate for run in runs))
    seeds = list(dict.fromkeys(run.seed for run in runs))
    val = {(run.candidate, run.seed): run.val_accuracy for run in runs}
    fit_s = {name: statistics.mean(run.fit_seconds for run in runs if run.candidate == name) for name in names}
    first = names[0]
    lines = ["| candidate | val per seed (" + ", ".join(map(str, seeds)) + ") | mean val | lowest "
             f"| seeds >= {first} | fit() s (mean) | x {first} |", "|---|---|---:|---:|---:|---:|---:|"]
    for name in names:
        mine = [val[(name, seed)] for seed in seeds]
        at_least = sum(val[(name, seed)] >= val[(first, seed)] for seed in seeds)
        lines.append(f"| {name} | {' / '.join(f'{100 * v:.2f}' for v in mine)} | {100 * statistics.mean(mine):.3f}% "
                     f"| {100 * min(mine):.2f}% | {at_least} of {len(seeds)} | {fit_s[name]:.2f} "
                     f"| {fit_s[name] / fit_s[first]:.3f} |")
    return "\n".join(lines)


def screen_params(preset: str, candidates: dict[str, dict[str, Any]], seeds: list[int],
                  extra: dict[str, Any]) -> dict[tuple[str, int], Params]:
    """Every candidate's params for every seed, validated, before anything runs."""
    all_params = {}
    for seed in seeds:
        for name, overrides in candidates.items():
            try:
                all_params[(name, seed)] = preset_params(preset, {**extra, **overrides,
                                                                  **{key: seed for key in SEED_KEYS}})
            except PipelineError as exc:
                raise PipelineError(f"candidate {name!r}, seed {seed}: {exc}") from None
    # What the splits are built from, and where every candidate trains: one for all of them.
    shared = {"fetch.dataset": {p.fetch.dataset for p in all_params.values()},
              "preprocess.val_size": {p.preprocess.val_size for p in all_params.values()},
              "train.device": {p.train.device for p in all_params.values()}}
    differing = [f"{key} ({', '.join(map(str, sorted(values)))})" for key, values in shared.items() if len(values) > 1]
    if differing:
        raise PipelineError(f"the candidates must share {', '.join(differing)}: the splits they are scored on "
                            "and the device they train on are the same for all")
    return all_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.screen", description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=parse_candidates, required=True,
                        help="YAML mapping: name -> {section.key: value}; the first is the one compared against")
    parser.add_argument("--preset", default=DEFAULT,
                        help=f"presets.yaml entry the candidates start from ({DEFAULT}: params.yaml as it is, "
                             "as presets.yaml's cnn)")
    parser.add_argument("--seeds", type=comma_ints, default=[0, 1, 2, 3, 4, 5],
                        help="comma-separated, ranges as 60-79; seed k: preprocess.seed, train.seed and "
                             "augment.seed k")
    parser.add_argument("--sealed-test", type=output_file, metavar="FILE",
                        help="append each run's test accuracy here (nothing about test is printed)")
    parser.add_argument("--raw", type=Path,
                        help=f"directory of the dataset's IDX files, plain or .gz (default {RAW_DIR})")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic data, one epoch: a smoke test")
    args = parser.parse_args(argv)
    if problem := seeds_problem(args.seeds):
        parser.error(f"--seeds: {problem}")
    if args.quick and args.raw:
        parser.error("--quick writes its own tiny data: it takes no --raw")
    check_preset_option(parser, "--preset", [args.preset])
    extra = {"train.epochs": 1, "preprocess.val_size": QUICK_VAL} if args.quick else {}
    all_params = screen_params(args.preset, args.candidates, args.seeds, extra)
    first = next(iter(all_params.values()))
    dataset = load_table()[first.fetch.dataset]
    device = resolve_device(first.train.device)
    names = list(args.candidates)
    runs: list[Run] = []
    print(params_line({"preprocess.seed", "train.seed", "augment.seed"}), flush=True)  # every run sets these
    with tempfile.TemporaryDirectory(prefix="screen-") as temp:
        if args.quick:
            raw_dir = write_quick_mirror(Path(temp, "raw"))
        else:
            raw_dir = args.raw or RAW_DIR
            check_raw(raw_dir, dataset)
        if args.sealed_test:  # once the screen can run (a refused one claims nothing there)
            candidates = yaml.safe_dump(args.candidates, default_flow_style=True, width=10**6).strip()
            append_text(args.sealed_test, f"# benchmarks.screen {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: "
                                          f"preset {args.preset}, seeds {','.join(map(str, args.seeds))}, candidates "
                                          f"{candidates}\n")
        for index, seed in enumerate(args.seeds):
            # Raises on a missing file, a wrong size or labels out of range, as the stage does.
            splits = prepare(raw_dir, dataset, PreprocessParams(val_size=first.preprocess.val_size, seed=seed))
            for name in seed_order(names, index):
                params = all_params[(name, seed)]
                start = time.perf_counter()
                train = augmented_split(splits["train"], params.augment)
                augment_s = time.perf_counter() - start
                model, rows, fit_s = timed_fit(params.train, train, splits["val"], device)
                runs.append(Run(name, seed, rows[-1]["val_accuracy"], fit_s, augment_s))
                print(f"{name} seed {seed}: val {100 * runs[-1].val_accuracy:.2f}%, fit {runs[-1].fit_seconds:.2f} s, "
                      f"augment {augment_s:.2f} s", flush=True)
                if args.sealed_test:
                    accuracy = test_accuracy(model, splits["test"], list(dataset.classes), params.evaluate.batch_size)
                    append_text(args.sealed_test, f"{name} seed {seed}: test {100 * accuracy:.2f}%\n")
    print()
    print(summary(runs))
    if args.sealed_test:
        print(f"test accuracies appended to {args.sealed_test}: read them after the decision")


if __name__ == "__main__":
    run_main("benchmarks.screen", main)
