"""Named param presets (presets.yaml): list them, check them, print them as `dvc exp run -S` options.

    python -m stages.presets                 # list the presets
    python -m stages.presets mlp-512+aug     # -S options for one; `+` combines presets in order
"""

from __future__ import annotations

import argparse
import copy
import shlex
from pathlib import Path
from typing import Any

import yaml

from stages import params as params_mod
from stages.common import PipelineError, run_main

PRESETS_PATH = Path("presets.yaml")


def load_presets(path: Path = PRESETS_PATH) -> dict[str, dict[str, Any]]:
    presets = yaml.safe_load(path.read_text())
    if not isinstance(presets, dict):
        raise PipelineError(f"{path}: expected a mapping of preset names to overrides")
    return {name: overrides or {} for name, overrides in presets.items()}


def resolve(spec: str, presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The dotted-key overrides of `spec`, one preset name or several joined by `+`."""
    overrides: dict[str, Any] = {}
    for name in spec.split("+"):
        if name not in presets:
            raise PipelineError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
        overrides.update(presets[name])
    return overrides


def apply(raw_params: dict, overrides: dict[str, Any]) -> dict:
    """A copy of raw params.yaml content with `section.key` overrides set; unknown keys are errors."""
    result = copy.deepcopy(raw_params)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in result or key not in result[section]:
            raise PipelineError(f"preset key {dotted!r} is not a key of params.yaml")
        result[section][key] = value
    return result


def as_set_options(overrides: dict[str, Any]) -> list[str]:
    # flow-style YAML: what `dvc exp run -S key=value` parses back into the same value
    return [f"-S{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in overrides.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.presets",
                                     description="Print a preset as `dvc exp run -S` options.")
    parser.add_argument("preset", nargs="?", help="a preset name, or several joined by '+'")
    parser.add_argument("--params", type=Path, default=params_mod.DEFAULT_PATH,
                        help="the params file the presets apply to (default: %(default)s)")
    args = parser.parse_args(argv)
    presets = load_presets()
    if args.preset is None:
        print("\n".join(presets))
        return
    overrides = resolve(args.preset, presets)
    # Fail here, not halfway through an experiment, if the result would not validate.
    params_mod.parse(apply(yaml.safe_load(args.params.read_text()), overrides))
    print(" ".join(shlex.quote(option) for option in as_set_options(overrides)))


if __name__ == "__main__":
    run_main("presets", main)
