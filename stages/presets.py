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
from stages.common import PipelineError, parse_yaml, run_main

PRESETS_PATH = Path("presets.yaml")


def load_presets(path: Path = PRESETS_PATH) -> dict[str, dict[str, Any]]:
    presets = parse_yaml(path.read_text(), str(path))
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


def check(spec: str, overrides: dict[str, Any], params_path: Path) -> params_mod.Params:
    """`params_path` with the overrides of preset(s) `spec` applied, validated. A ParamsError names the
    preset as well as the key: the bad value may be the preset's or the file's own."""
    raw = params_mod.load_raw(params_path)
    try:
        return params_mod.parse(apply(raw, overrides))
    except params_mod.ParamsError as exc:
        # train.channels[0] or fetch.mirrors.mnist is the override's when train.channels or fetch.mirrors is.
        overridden = any(exc.key == key or exc.key.startswith((f"{key}[", f"{key}.")) for key in overrides)
        source = "overridden" if overridden else f"as in {params_path}"
        raise PipelineError(f"preset {spec!r} (presets.yaml) on {params_path}: {exc.key} ({source}): "
                            f"{exc.problem}") from None


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
    check(args.preset, overrides, args.params)
    print(" ".join(shlex.quote(option) for option in as_set_options(overrides)))


if __name__ == "__main__":
    run_main("presets", main)
