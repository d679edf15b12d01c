"""pyproject.toml declares exactly what the code imports: stages/ at run time, tests/ and
benchmarks/ through their extras, and constraints.txt pins every declared distribution."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import pytest

from tests.conftest import PROJECT_ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def distribution(requirement: str) -> str:
    """'dvc[ssh]>=3.67.1' -> 'dvc': the normalised distribution name of a requirement."""
    return normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group())


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions(folder: str) -> set[str]:
    """The installed distributions that the .py files under `folder` import, anywhere in a file."""
    modules = set()
    for path in (PROJECT_ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"stages", "tests", "benchmarks"}
    owners = importlib.metadata.packages_distributions()
    missing = sorted(m for m in third_party if m not in owners)
    assert not missing, f"{folder}/ imports {missing}, which no installed distribution provides"
    return {normalise(dist) for module in third_party for dist in owners[module]}


RUNTIME = {distribution(r) for r in PROJECT["dependencies"]}
EXTRAS = {name: {distribution(r) for r in reqs} for name, reqs in PROJECT["optional-dependencies"].items()}


def test_runtime_dependencies_are_what_the_stages_import():
    # dvc among them: it runs the pipeline, and stages.remotes (make pull's check) reads its config.
    assert RUNTIME == imported_distributions("stages")


# pytest loads its plugins itself; pytest refuses to start without these (pyproject.toml).
PYTEST_PLUGINS = {distribution(r) for r in PYPROJECT["tool"]["pytest"]["ini_options"].get("required_plugins", [])}


def test_tests_need_only_runtime_and_test_extra():
    assert imported_distributions("tests") <= RUNTIME | EXTRAS["test"]
    assert EXTRAS["test"] <= imported_distributions("tests") | PYTEST_PLUGINS
    assert PYTEST_PLUGINS <= EXTRAS["test"], "a required pytest plugin that `make setup` does not install"


def test_benchmarks_need_only_runtime_and_bench_extra():
    assert imported_distributions("benchmarks") <= RUNTIME | EXTRAS["bench"]
    assert EXTRAS["bench"] <= imported_distributions("benchmarks")


def test_constraints_pin_every_declared_distribution():
    lines = (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
    pinned = {distribution(line) for line in lines if line.strip() and not line.startswith("#")}
    declared = RUNTIME | set().union(*EXTRAS.values())
    assert declared <= pinned, f"not pinned in constraints.txt: {sorted(declared - pinned)}"
