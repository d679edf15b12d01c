"""Shared fixtures: a synthetic mirror, and a copy of this project as a fresh DVC repository."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.synthetic import write_mirror

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a clone of the project holds that a pipeline run needs.
PROJECT_FILES = (".gitignore", "dvc.yaml", "params.yaml", "presets.yaml", "stages")
VENV_BIN = Path(sys.executable).parent

# Small enough that a full `dvc repro` takes seconds; the synthetic data is easy, so even this
# tiny CNN reaches high accuracy.
SMALL_PARAMS = {
    "fetch": {"dataset": "synthetic",
              # Port 9 on loopback refuses at once: a realistic dead mirror after $MNIST_MIRROR.
              "mirrors": {"synthetic": ["http://127.0.0.1:9/"]}, "timeout_s": 5},
    "preprocess": {"val_size": 100},
    "augment": {"copies": 1},
    "train": {"channels": [4, 8, 16], "epochs": 2, "batch_size": 32, "lr": 0.05},
    "evaluate": {"batch_size": 100},
    "plot": {"misclassified": 10},
}

# No command a test runs may run for ever: a hung `dvc` ends in a failure that shows what it
# printed, not in a CI job killed at its own limit with nothing to read. The slowest command in
# the suite (`make queue JOBS=2`, a whole sweep) takes about 25 s on 2 cores; 10 minutes is a hang.
COMMAND_TIMEOUT_S = 600
# After a kill: how long what the command printed is still read. A process that left the command's
# process group (its own setpgid or setsid) survives the kill and may hold the pipes open longer.
KILLED_READ_S = 10

os.environ["DVC_NO_ANALYTICS"] = "1"
# `make test` (CI) exports its level and flags: a `make` that a test runs would then be a sub-make
# and print "make[1]: Entering directory ..." around the output the test reads. It exports the
# variables given on its command line too (make test PYTEST_JOBS=0): a `make -n test` that a test
# runs would print them in place of the Makefile's defaults. Tests see the same make whether
# pytest was started by make or by hand.
for variable in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "PYTEST_JOBS", "PYTEST_ARGS"):
    os.environ.pop(variable, None)


# `make test` runs one pytest-xdist worker per CPU, up to this many: each holds a project copy and a
# torch, and beyond four the suite's longest test files, not the worker count, set its time.
MAX_TEST_WORKERS = 4


def xdist_worker_count(allowed_cpus: int) -> int:
    """How many pytest-xdist workers `-n auto` starts, given how many CPUs this process may run on."""
    return max(1, min(MAX_TEST_WORKERS, allowed_cpus))


def pytest_xdist_auto_num_workers(config) -> int:
    # pytest-xdist's own count (psutil) is every CPU of the machine, whatever this process's
    # affinity (taskset, a container's cpuset) allows; pytest_configure below shares the allowed
    # ones between the workers, so count those. An explicit `-n N` (PYTEST_JOBS=N) is not capped.
    return xdist_worker_count(len(os.sched_getaffinity(0)))


def pytest_configure(config) -> None:
    isolate_user_config(config)
    # Under pytest-xdist (make test), one torch thread pool per worker, each its share of the CPUs
    # this process may run on: two OpenMP pools of all of them, spinning against each other, slow
    # both several times. `workerinput` is set in the workers only: the controller trains nothing.
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the commands tests start, as DvcProject sets


# A unit test's own limit (pytest-timeout; pyproject.toml's 20 minutes are the integration tests'):
# the slowest takes about 6 s on 2 cores, so a hung one fails CI after 5 minutes, not 20.
UNIT_TEST_TIMEOUT_S = 300


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("integration") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TEST_TIMEOUT_S))


def isolate_user_config(config) -> None:
    """Points DVC and git, in this process and every command a test starts, at configs of their own:
    empty global and system configs, and a site cache (`/var/tmp/dvc/repo/...`, 80 KB per repository
    a test creates) under a temporary folder removed at the end. A developer's global DVC config
    reached every test repository: its `cache.dir` took the tests' outputs, and a test's `dvc gc`
    deleted the developer's objects from that shared cache; its `core.remote` or `core.autostage`,
    or git's `commit.gpgsign`, would change what the tests see. Commits get a test author. (DVC's
    libgit2, used for experiments, reads ~/.gitconfig whatever GIT_CONFIG_GLOBAL says.)"""
    home = Path(tempfile.mkdtemp(prefix="tests-config-"))
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    for level in ("GLOBAL", "SYSTEM"):
        (home / f"dvc-{level.lower()}").mkdir()
        os.environ[f"DVC_{level}_CONFIG_DIR"] = str(home / f"dvc-{level.lower()}")
    os.environ["DVC_SITE_CACHE_DIR"] = str(home / "dvc-site-cache")
    # Every folder is safe: a checkout owned by another user (a bind mount) is read with `git show`.
    (home / "gitconfig").write_text("[safe]\n\tdirectory = *\n")
    os.environ.update(GIT_CONFIG_GLOBAL=str(home / "gitconfig"), GIT_CONFIG_NOSYSTEM="1",
                      GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                      GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")


@pytest.fixture(autouse=True)
def torch_process_state():
    """What a test changes of torch's process-wide state is put back after it: fit() sets the
    deterministic-algorithms flag and NaN-filling (stages.runtime.seed_everything), the benchmarks
    the thread count, and any test torch's CPU random generator, so a test's outcome cannot depend
    on which tests its pytest-xdist worker ran before it (Python's and NumPy's generators, which
    seed_everything seeds too, are left: every user of them seeds them first)."""
    import torch

    deterministic, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def params_yaml_changes(path: Path = PROJECT_ROOT / "params.yaml") -> str:
    """'' when params.yaml is as committed; else a line naming the keys it changes. The tests build
    on its values (tests/synthetic.py, the params and train tests, the projects the integration
    tests copy), and `dvc exp run` leaves an experiment's there: a failure caused by them must not
    look like the code's. Never raises: it runs in pytest's own hooks, where an error ends the run."""
    advice = ("and the tests build on its values (an experiment's, left by `dvc exp run`?): `git stash` or "
              "`git checkout params.yaml` first, or commit it")
    try:
        from stages.params import load_raw  # here: a module that fails to import must not end the run
        from stages.presets import committed_params, leftover_keys

        committed = committed_params(path)
        if not isinstance(committed, dict):  # nothing committed to compare with, or no mapping there
            return ""
        workspace = load_raw(path)
        if not isinstance(workspace, dict):
            return f"params.yaml holds no mapping of sections, {advice}"
        changed = leftover_keys(workspace, committed, {})
    except Exception as exc:  # a file neither parser reads; the params tests say what is wrong
        return f"params.yaml cannot be read ({exc}), {advice}"
    return f"params.yaml differs from the last commit in {', '.join(changed)}, {advice}" if changed else ""


def pytest_report_header(config) -> str | None:
    return params_yaml_changes() or None


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    # Again at the end, where a failure is read, when there was one
    if exitstatus != 0 and (changes := params_yaml_changes()):
        terminalreporter.write_sep("=", "params.yaml", yellow=True)
        terminalreporter.write_line(changes)


def run_bounded(args, timeout_s: float = COMMAND_TIMEOUT_S, output: Path | None = None,
                killed_read_s: float = KILLED_READ_S, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(args, capture_output=True, text=True, **kwargs)` that fails after
    `timeout_s` seconds, killing the command's process group (the command and the children that
    stay in its group) and showing what it printed.

    `output`: a file that takes stdout and stderr together instead of pipes, read back into the
    result's stdout. Use it for commands that leave a daemon behind on purpose (`dvc queue
    start`): a daemon inherits the pipes, and reading a pipe to its end waits for the daemon."""
    with contextlib.ExitStack() as stack:
        if output is None:
            streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        else:
            sink = stack.enter_context(open(output, "w"))
            streams = {"stdout": sink, "stderr": subprocess.STDOUT}
        # Its own process group (a new session), so that a timeout kills its children too.
        process = stack.enter_context(subprocess.Popen(args, text=True, start_new_session=True, **streams, **kwargs))
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            try:
                stdout, stderr = process.communicate(timeout=killed_read_s)
            except subprocess.TimeoutExpired as still_open:  # a process outside the group holds the pipes
                stdout, stderr = (_text(still_open.stdout) + "\n(output cut: a process that left the command's "
                                  "process group holds its stdout or stderr open)", _text(still_open.stderr))
                for pipe in (process.stdout, process.stderr):
                    pipe.close()
                process.wait()  # the killed leader: reaped, not left a zombie
            if output is not None:
                stdout, stderr = _read(output), "(with stdout)"
            raise AssertionError(f"{' '.join(map(str, args))} did not finish in {timeout_s:g} s and was killed\n"
                                 f"stdout:\n{stdout}\nstderr:\n{stderr}") from None
        except BaseException:  # Ctrl-C, or pytest-timeout's alarm: its own session would outlive the test
            _kill_group(process.pid)
            raise
    if output is not None:
        stdout, stderr = _read(output), ""
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _text(partial: bytes | str | None) -> str:
    """A TimeoutExpired's partial output (bytes even in text mode) as text."""
    return partial.decode(errors="replace") if isinstance(partial, bytes) else partial or ""


def _read(path: Path) -> str:
    return Path(path).read_text(errors="replace")  # a kill may cut a character in two


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


class DvcProject:
    """A copy of the project in its own git + DVC repository, driven through the real CLI."""

    def __init__(self, root: Path, mirror: Path):
        self.root = root
        self.env = {
            **os.environ,
            # The copy has no .venv, so stages/run falls back to the python3 on PATH: this one.
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "MNIST_MIRROR": str(mirror),
            # One thread per stage: the tiny models don't gain from two, and two threads fighting
            # another process slow training 30x. The same in every copy, so outputs stay comparable.
            "OMP_NUM_THREADS": "1",
            # DVC_NO_ANALYTICS, the commit author and the isolated DVC and git configs come from
            # os.environ (this module's top and isolate_user_config).
        }

    def run(self, *args: str, check: bool = True, timeout_s: float = COMMAND_TIMEOUT_S,
            output: Path | None = None) -> subprocess.CompletedProcess:
        """Runs a command in the copy; fails with its output when it exits non-zero (`check`) or
        runs past `timeout_s`. `output`: see run_bounded."""
        result = run_bounded(args, timeout_s, output, cwd=self.root, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def dvc(self, *args: str, check: bool = True, timeout_s: float = COMMAND_TIMEOUT_S,
            output: Path | None = None) -> subprocess.CompletedProcess:
        return self.run(str(VENV_BIN / "dvc"), *args, check=check, timeout_s=timeout_s, output=output)

    def repro(self, *args: str, check: bool = True) -> set[str]:
        """Runs `dvc repro`; returns the names of the stages that actually ran."""
        result = self.dvc("repro", *args, check=check)
        self.last = result
        return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")}

    def path(self, relative: str) -> Path:
        return self.root / relative

    def params(self) -> dict:
        return yaml.safe_load(self.path("params.yaml").read_text())

    def set_params(self, changes: dict) -> None:
        self.path("params.yaml").write_text(yaml.safe_dump(deep_update(self.params(), changes), sort_keys=False))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)


def make_project(root: Path, mirror_dir: Path) -> DvcProject:
    """Copies the project into `root`, adds the synthetic dataset, shrinks params, inits git + DVC."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    entry = write_mirror(mirror_dir)
    table = root / "stages" / "datasets.yaml"
    table.write_text(table.read_text() + "\n" + yaml.safe_dump({"synthetic": entry}, sort_keys=False))
    project = DvcProject(root, mirror_dir)
    project.set_params(SMALL_PARAMS)
    project.run("git", "init", "-q", "-b", "main")
    project.dvc("init", "-q")
    project.commit("project")
    return project


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> DvcProject:
    """The project after one complete `dvc repro` on synthetic data, committed. Do not modify:
    tests that change it take the `project` fixture, a copy."""
    base = tmp_path_factory.mktemp("built")
    project = make_project(base / "repo", base / "mirror")
    project.first_run = project.repro()
    project.commit("reproduced")
    return project


def copy_project(source: DvcProject, root: Path) -> DvcProject:
    """A private copy of `source`, outputs and DVC cache included."""
    shutil.copytree(source.root, root, symlinks=True)
    return DvcProject(root, Path(source.env["MNIST_MIRROR"]))


@pytest.fixture
def project(built_project, tmp_path) -> DvcProject:
    return copy_project(built_project, tmp_path / "repo")
