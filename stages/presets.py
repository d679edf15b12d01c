"""Named param presets (presets.yaml): list them, check them, print them as `dvc exp run -S` options.

    python -m stages.presets                 # list the presets
    python -m stages.presets mlp-512+aug     # -S options for one; `+` combines presets in order
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import reprlib
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from stages import params as params_mod
from stages.common import PipelineError, parse_yaml, read_yaml, run_main

PRESETS_PATH = Path("presets.yaml")
# What every tool that takes a preset name also takes for params.yaml as it is: no overrides, as
# presets.yaml's `cnn` (the same run under its model's name). The frontier and screen label the
# committed params so; `make exp PRESET=default` runs them as an experiment.
DEFAULT = "default"


def load_presets(path: Path = PRESETS_PATH) -> dict[str, dict[str, Any]]:
    presets = read_yaml(path, "the presets file")
    if not isinstance(presets, dict):
        raise PipelineError(f"{path}: expected a mapping of preset names to overrides")
    if DEFAULT in presets:
        raise PipelineError(f"{path}: a preset may not be named {DEFAULT!r}: that name stands for params.yaml "
                            "as it is, with no overrides")
    for name, overrides in presets.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise PipelineError(f"{path}: preset {name!r}: expected a mapping of params.yaml keys to values "
                                f"(train.lr: 0.1), got {type(overrides).__name__}")
        bad_keys = [key for key in overrides or {} if not isinstance(key, str)]
        if bad_keys:
            raise PipelineError(f"{path}: preset {name!r}: key {bad_keys[0]!r} is not a params.yaml key "
                                "(section.key, as in train.lr)")
    return {name: overrides or {} for name, overrides in presets.items()}


def resolve(spec: str, presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The dotted-key overrides of `spec`, one preset name or several joined by `+` (DEFAULT: none)."""
    overrides: dict[str, Any] = {}
    for name in spec.split("+"):
        if name != DEFAULT and name not in presets:
            raise PipelineError(f"unknown preset {name!r}; presets: {', '.join(presets)} "
                                f"({DEFAULT}: params.yaml as it is)")
        overrides.update(presets.get(name, {}))
    return overrides


def apply(raw_params: dict, overrides: dict[str, Any]) -> dict:
    """A copy of raw params.yaml content with `section.key` overrides set; unknown keys are errors."""
    if overrides and not isinstance(raw_params, dict):  # an empty file, a list: `in` would be a TypeError
        raise PipelineError(f"cannot set {next(iter(overrides))!r}: the params file holds {_held(raw_params)}, "
                            "not a mapping of sections (fetch:, train:, ...)")
    result = copy.deepcopy(raw_params)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section in result and not isinstance(result[section], dict):  # `train:` left empty, or a value
            raise PipelineError(f"cannot set {dotted!r}: {section} in params.yaml is not a mapping of keys")
        if section not in result or key not in result[section]:
            raise PipelineError(f"{dotted!r} is not a key of params.yaml")  # a preset's, or a --set of a benchmark
        result[section][key] = value
    return result


def _held(raw: Any) -> str:
    """What a params file holds that is no mapping, in a few words."""
    if raw is None:
        return "nothing"
    return "a list" if isinstance(raw, list) else f"the value {reprlib.repr(raw)}"


def check(spec: str, overrides: dict[str, Any], params_path: Path, raw: dict | None = None) -> params_mod.Params:
    """`params_path` (or `raw`, its content as committed) with the overrides of preset(s) `spec`
    applied, validated. A ParamsError names the preset as well as the key: the bad value may be the
    preset's or the file's own."""
    raw = params_mod.load_raw(params_path) if raw is None else raw
    if not isinstance(raw, dict):
        raise PipelineError(f"{params_path} holds {_held(raw)}, not a mapping of sections (fetch:, train:, ...)")
    try:
        return params_mod.parse(apply(raw, overrides))
    except params_mod.ParamsError as exc:
        # train.channels[0] or fetch.mirrors.mnist is the override's when train.channels or fetch.mirrors is.
        overridden = any(exc.key == key or exc.key.startswith((f"{key}[", f"{key}.")) for key in overrides)
        source = "overridden" if overridden else f"as in {params_path}"
        # `default` alone is params.yaml as it is: presets.yaml has no part in the error.
        where = "" if spec == DEFAULT else f" ({PRESETS_PATH})"
        raise PipelineError(f"preset {spec!r}{where} on {params_path}: {exc.key} ({source}): "
                            f"{exc.problem}") from None


def as_set_options(overrides: dict[str, Any]) -> list[str]:
    # flow-style YAML: what `dvc exp run -S key=value` parses back into the same value
    return [f"-S{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in overrides.items()]


def committed_params(params_path: Path) -> dict | None:
    """`params_path` as the last commit of its repository holds it; None where there is nothing to
    compare with (no git, not in a git work tree, no commit yet, the file not committed)."""
    try:
        shown = subprocess.run(["git", "-C", str(params_path.parent), "show", f"HEAD:./{params_path.name}"],
                               capture_output=True, text=True, encoding="utf-8", errors="replace")
    except OSError:  # no git: no experiments either, which is what the check is for
        return None
    if shown.returncode != 0:
        return None
    return parse_yaml(shown.stdout, f"{params_path} (HEAD)")


# `dvc exp run`'s short options that take no value (DVC 3.67): argparse lets them share one dash with
# -S, as in `-fS train.seed=1`.
EXP_RUN_SHORT_FLAGS = frozenset("hqvfispPRk")


def set_param_keys(exp_args: list[str]) -> set[str]:
    """The params.yaml keys that `dvc exp run` options set (`-S train.seed=1`, `-Strain.lr=0.1`,
    `-fS train.seed=1`, `--set-param=...`, a grid's `train.lr=0.1,0.2`, Hydra's `+key`/`~key`,
    `params.yaml:key`)."""
    values = []
    for i, arg in enumerate(exp_args):
        if arg == "--set-param":
            values += exp_args[i + 1:i + 2]
        elif arg.startswith("--set-param="):
            values.append(arg.removeprefix("--set-param="))
        elif arg.startswith("-") and not arg.startswith("--"):
            # -S, then its value in this word (-Strain.lr=0.1) or the next one (-S train.lr=0.1),
            # after any value-less flags (-fS); -nS... is -n's value "S...", not an -S.
            flags, s, value = arg[1:].partition("S")
            if s and set(flags) <= EXP_RUN_SHORT_FLAGS:
                values += [value] if value else exp_args[i + 1:i + 2]
    keys = {value.split("=", 1)[0].lstrip("+~") for value in values}
    return {key.removeprefix(f"{params_mod.DEFAULT_PATH}:") for key in keys}


def experiment_name(preset: str) -> str:
    """make exp's name for the run of `preset` (DVC's experiment names take no +; the Makefile's
    EXP_NAME is the same)."""
    return preset.replace("+", "-")


def exp_run_options(exp_args: list[str]) -> argparse.Namespace | None:
    """`dvc exp run`'s options `exp_args` as DVC's own parser reads them (`--que` is `--queue`,
    the last `-n` wins); None for options it refuses, left to `dvc exp run` to report (said once,
    not twice)."""
    import logging

    from dvc.cli import DvcParserError, parse_args

    logging.disable(logging.CRITICAL)  # DVC logs a refusal as it parses; dvc exp run says it again
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parse_args(["exp", "run", *exp_args])
    except (DvcParserError, SystemExit):
        return None
    finally:
        logging.disable(logging.NOTSET)


def replace_problem(exp_args: list[str], name: str) -> str | None:
    """Why make exp REPLACE=1 cannot run with `dvc exp run` options `exp_args`, or None. It runs
    as NAME-replacing and renames that over `name` once the run ends: a queued run ends after make
    has returned, and a -n of EXP_ARGS would win over make's and leave the rename nothing to find."""
    options = exp_run_options(exp_args)
    if options is not None and options.queue:
        return (f"REPLACE=1 renames the new run over the old one when it ends, which a queued run does after "
                f"make has returned: remove the old run first (dvc exp remove {name}; a grid's are {name}-1, "
                f"{name}-2, ...), then queue without REPLACE")
    if options is not None and options.name:
        return (f"REPLACE=1 runs the preset under its own name, {name}, but EXP_ARGS names the run "
                f"{options.name} (-n): leave -n out, or run `dvc exp run -n {options.name}` yourself")
    return None


def taken_problem(exp_args: list[str], preset: str) -> str | None:
    """Why `dvc exp run` with `exp_args`, named after `preset`, would be refused when this commit
    has an experiment of that name, or None (-f overwrites it; a queued run, or a -n of
    `exp_args`, leaves DVC to decide). DVC's own refusal advises `dvc exp run -f`, which re-runs
    every stage, the download included; make exp's REPLACE=1 takes unchanged stages from the cache."""
    options = exp_run_options(exp_args)
    if options is None or options.force or options.queue or options.name:
        return None
    return (f"this commit has an experiment {experiment_name(preset)} already: `make exp PRESET={preset} REPLACE=1` "
            "runs it again under its name (DVC's `dvc exp run -f` would re-run every stage, the download included)")


def leftover_keys(workspace: dict, committed: dict, overrides: dict[str, Any]) -> list[str]:
    """`section.key`s whose value in the workspace's params differs from the committed one and that
    `overrides` does not set: what a preset run would silently inherit."""
    found = []
    for section in dict.fromkeys([*committed, *workspace]):
        here, there = workspace.get(section), committed.get(section)
        if not (isinstance(here, dict) and isinstance(there, dict)):
            found += [] if here == there else [section]
            continue
        found += [f"{section}.{key}" for key in dict.fromkeys([*there, *here])
                  if f"{section}.{key}" not in overrides and here.get(key, KeyError) != there.get(key, KeyError)]
    return found


def check_from_commit(spec: str, overrides: dict[str, Any], params_path: Path,
                      also_set: set[str] = frozenset()) -> dict | None:
    """Presets apply to the committed params; `dvc exp run` leaves the last experiment's params in
    the workspace, and a second preset run on top of them would train a mix of both under the
    second one's name. `also_set`: keys the run sets besides the preset's (EXP_ARGS's -S).
    Returns the committed params (None: nothing to compare with): the run's own but for those keys."""
    committed = committed_params(params_path)
    if committed is None:
        return None
    leftover = leftover_keys(params_mod.load_raw(params_path), committed, {**overrides, **dict.fromkeys(also_set)})
    if leftover:
        raise PipelineError(
            f"{params_path} differs from the last commit in {', '.join(leftover)}, which preset {spec!r} does not "
            "set, so the run would inherit them (dvc exp run leaves the last experiment's params in the "
            f"workspace). Start from the committed params: `git checkout {params_path}`; or commit your edits first")
    return committed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # After `--`: the options the run also gets (make exp's EXP_ARGS), for the keys their -S set.
    split = argv.index("--") if "--" in argv else len(argv)
    argv, exp_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m stages.presets",
                                     usage="%(prog)s [-h] [--params PARAMS] [--from-commit] [preset] "
                                           "[-- DVC_EXP_RUN_OPTIONS]",
                                     description="Print a preset as `dvc exp run -S` options.")
    parser.add_argument("preset", nargs="?", help=f"a preset name, or several joined by '+' ('{DEFAULT}' stands "
                                                  "for params.yaml as it is); without one, the names are listed")
    parser.add_argument("--params", type=Path, default=params_mod.DEFAULT_PATH,
                        help="the params file the presets apply to (default: %(default)s)")
    parser.add_argument("--from-commit", action="store_true",
                        help="refuse when the params file differs from the last commit in keys the preset does not "
                             "set (make exp)")
    parser.add_argument("--replace", action="store_true",
                        help="refuse DVC_EXP_RUN_OPTIONS that queue or name the run (make exp REPLACE=1 renames the "
                             "run over the old one once it ends)")
    parser.add_argument("--taken", action="store_true",
                        help="this commit has an experiment of the preset's name (make exp): refuse a run that DVC "
                             "would refuse for it, naming REPLACE=1")
    args = parser.parse_args(argv)
    if args.preset and args.replace:
        problem = replace_problem(exp_args, experiment_name(args.preset))
    else:
        problem = args.preset and args.taken and taken_problem(exp_args, args.preset)
    if problem:
        raise PipelineError(problem)
    presets = load_presets()
    if args.preset is None:
        print("\n".join([DEFAULT, *presets]))  # names only, each one a valid argument
        return
    overrides = resolve(args.preset, presets)
    base = None  # the params file itself
    if args.from_commit:  # first: another experiment's params would also fail the check below, misleadingly
        # The committed params then stand for the run's: the workspace's differ only where the run's
        # own -S set them, whose values the params stage checks when the run starts.
        base = check_from_commit(args.preset, overrides, args.params, set_param_keys(exp_args))
    # Fail here, not halfway through an experiment, if the result would not validate.
    check(args.preset, overrides, args.params, base)
    print(" ".join(shlex.quote(option) for option in as_set_options(overrides)))


if __name__ == "__main__":
    run_main("presets", main)
