"""dvc.yaml: each stage's code deps are exactly the project files its module imports, transitively.

DVC re-runs a stage when one of its deps changes, so a missing dep lets a stale output pass for
current and an extra one re-runs work for nothing (a change to train's allocator setting must not
download MNIST again). Imports are read from the source with `ast`, so an import inside a function
counts as much as one at the top of the module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

PACKAGE = "stages"
# Data files a module reads at run time: a stage importing the module lists them too.
DATA_FILES = {"stages.datasets": {"stages/datasets.yaml"}}
STAGES = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path:
    return PROJECT_ROOT / (module.replace(".", "/") + ".py")


def direct_imports(module: str) -> set[str]:
    """The project modules that `module`'s source imports, anywhere in the file."""
    tree = ast.parse(module_file(module).read_text(), str(module_file(module)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import; the project imports by absolute name"
            # `from stages import params` names a module; `from stages.common import log` a name in one.
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    # The package's __init__.py is empty and not listed; every other project module is a file.
    return {name for name in names if name.startswith(f"{PACKAGE}.") and module_file(name).is_file()}


def transitive_imports(module: str) -> set[str]:
    """`module` and every project module it imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += direct_imports(current)
    return seen


def stage_module(stage: dict) -> str:
    # Every stage runs as `exec stages/run NAME ...`, which runs `python -m stages NAME`: stages.NAME
    # (exec: the stage replaces the shell DVC starts it in, whatever that shell, so it stops with DVC).
    # The launcher itself (stages/run, stages/__main__.py) is no stage's dep, on purpose: it decides how
    # a stage starts and stops (its interpreter, signals, exit), never what the stage writes, so an
    # edit to it must not re-run the pipeline.
    exec_, launcher, name, *_ = stage["cmd"].split()
    assert (exec_, launcher) == ("exec", "stages/run"), stage["cmd"]
    return f"{PACKAGE}.{name}"


def test_transitive_imports_follow_every_import_form():
    """The walker sees `from stages import x`, `from stages.x import y` and imports through others:
    train reaches datasets only through params."""
    found = transitive_imports("stages.train")
    assert {"stages.train", "stages.params", "stages.common", "stages.models", "stages.datasets"} <= found
    assert "stages.fetch" not in found and "stages.predict" not in found


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_code_deps_are_exactly_its_imports(name):
    stage = STAGES[name]
    modules = transitive_imports(stage_module(stage))
    expected = {str(module_file(m).relative_to(PROJECT_ROOT)) for m in modules}
    expected |= {path for m in modules for path in DATA_FILES.get(m, ())}
    listed = {dep for dep in stage["deps"] if isinstance(dep, str) and dep.startswith(f"{PACKAGE}/")}
    assert listed == expected, (f"dvc.yaml stage {name!r}: missing {sorted(expected - listed)}, "
                                f"not imported {sorted(listed - expected)}")


def test_params_and_fetch_stages_run_without_torch(tmp_path):
    """Importing torch costs 1.5-2 s of a 2-core CPU, and every fresh `dvc repro` runs these two
    stages, which have no tensors: the params stage validates params.yaml (it imports torch only to
    check the GPUs that `train.device: cuda`, or `auto` with several processes, asks for) and fetch downloads files. Here the params stage runs on the
    committed params.yaml, then fetch's module loads, and torch must still be absent."""
    marker = tmp_path / "params-valid.txt"
    code = ("import sys; from stages import params, fetch; "
            f"params.main([{str(marker)!r}, '--params', 'params.yaml']); "
            "print(sorted(name for name in ('torch', 'sklearn', 'matplotlib') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, check=True)
    assert marker.is_file()
    assert result.stdout.strip() == "[]", result.stdout


def test_the_launcher_runs_exactly_the_stages_of_dvc_yaml_and_predict():
    """`python -m stages NAME` refuses the library modules (run as a stage, `models` did nothing and
    exited 0), so its list must follow dvc.yaml: a stage added there and not here would fail to start."""
    from stages.__main__ import STAGES as LAUNCHED
    assert set(LAUNCHED) == {stage_module(stage).removeprefix(f"{PACKAGE}.") for stage in STAGES.values()} | {"predict"}
