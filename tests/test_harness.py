"""The test harness's own guarantees: a command a test runs cannot hang the suite (conftest.run_bounded);
`make test` starts as many pytest-xdist workers as this process may use CPUs, at most four; a
params.yaml an experiment left changed is said in the report's header and after a failure."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import MAX_TEST_WORKERS, PROJECT_ROOT, params_yaml_changes, run_bounded, xdist_worker_count

# Starts a daemon the way `dvc queue start` starts its workers' launchers: in a process group of
# its own, holding the command's stdout and stderr, outliving the command. Writes its pid to argv[1].
LEAVES_A_DAEMON = [sys.executable, "-c", "import pathlib, subprocess, sys\n"
                   "daemon = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
                   "pathlib.Path(sys.argv[1]).write_text(str(daemon.pid))"]


def process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped by its parent) counts as ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows the command's "(name)"


def _wait_until_dead(pid: int, timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_hung_command_fails_with_its_output_and_its_children_die(tmp_path):
    child_pid = tmp_path / "child.pid"
    hung = ["bash", "-c", f"echo started; sleep 300 & echo $! > {shlex.quote(str(child_pid))}; wait"]
    with pytest.raises(AssertionError, match=r"did not finish in 5 s and was killed") as failure:
        run_bounded(hung, timeout_s=5, killed_read_s=1)
    assert "started" in str(failure.value)
    assert _wait_until_dead(int(child_pid.read_text())), "the hung command's child outlived it"


def _kill(pid_file) -> None:
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    assert _wait_until_dead(pid)


def test_a_daemon_holding_the_pipes_fails_the_pipe_call_not_the_file_call(tmp_path):
    pid_file = tmp_path / "daemon.pid"
    # With pipes, the call waits for the daemon (bounded: it fails, and says why).
    try:
        with pytest.raises(AssertionError, match="holds its stdout or stderr open"):
            run_bounded([*LEAVES_A_DAEMON, str(pid_file)], timeout_s=5, killed_read_s=1)
    finally:
        if pid_file.exists():  # else the command was killed before it started the daemon: said above
            _kill(pid_file)
    # With a file, it returns when the command exits; the daemon goes on.
    result = run_bounded([*LEAVES_A_DAEMON, str(pid_file)], timeout_s=30, output=tmp_path / "out.log")
    try:
        assert result.returncode == 0 and process_alive(int(pid_file.read_text()))
    finally:
        _kill(pid_file)


def test_a_command_that_ends_returns_its_streams_and_status(tmp_path):
    command = ["bash", "-c", "echo out; echo err >&2; exit 3"]
    result = run_bounded(command)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    together = run_bounded(command, output=tmp_path / "both.log")
    assert (together.returncode, sorted(together.stdout.splitlines()), together.stderr) == (3, ["err", "out"], "")


def test_a_queue_worker_that_outlives_dvc_queue_stop_is_killed_with_a_warning(tmp_path):
    """tests.test_dvc_workflows._stop_queue: a worker still running after the grace time is killed,
    with its process group; one whose record says it exited is left alone (its pid may be reused)."""
    from tests.conftest import DvcProject
    from tests.test_dvc_workflows import QUEUE_DIR, _stop_queue

    project = DvcProject(tmp_path, tmp_path)  # no DVC repository: `dvc queue stop` fails, the rest goes on
    queue = project.path(QUEUE_DIR)
    queue.mkdir(parents=True)
    # A stand-in worker that ignores `dvc queue stop`, in its own process group as dvc-task's are.
    worker = subprocess.Popen(["bash", "-c", "exec -a dvc-exp-queue-worker sleep 300"], start_new_session=True)
    exited = subprocess.Popen(["sleep", "300"], start_new_session=True)  # recorded as exited: not ours to kill
    try:
        for number, process, returncode in ((1, worker, None), (2, exited, 0)):
            (queue / f"dvc-exp-worker-{number}.json").write_text(json.dumps(
                {"pid": process.pid, "stdin": None, "stdout": None, "stderr": None, "returncode": returncode}))
        (queue / "dvc-exp-worker-1.out").write_text("a worker's last words\n")
        with pytest.warns(UserWarning, match=r"(?s)still ran 1 s after dvc queue stop: killed.*a worker's last words"):
            _stop_queue(project, grace_s=1)
        assert worker.wait(timeout=5) == -signal.SIGKILL
        assert exited.poll() is None
    finally:
        for process in (worker, exited):
            process.kill()
            process.wait()


@pytest.mark.parametrize(("allowed_cpus", "workers"), [(1, 1), (2, 2), (4, 4), (64, MAX_TEST_WORKERS)])
def test_one_test_worker_per_allowed_cpu_at_most_four(allowed_cpus, workers):
    assert xdist_worker_count(allowed_cpus) == workers


def test_auto_worker_count_is_the_affinity_not_the_machine(pytestconfig, monkeypatch):
    # The hook `-n auto` asks (first answer wins): this suite's conftest answers before
    # pytest-xdist's own, which counts every CPU of the machine with psutil.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert pytestconfig.hook.pytest_xdist_auto_num_workers(config=pytestconfig) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert pytestconfig.hook.pytest_xdist_auto_num_workers(config=pytestconfig) == MAX_TEST_WORKERS


def test_a_params_yaml_an_experiment_changed_is_named(tmp_path):
    """The tests build on params.yaml's values; after `dvc exp run -S` (which leaves them there)
    dozens failed with messages about the code. The keys that differ from the commit are named,
    and a file that cannot be read is said, never raised (the hooks that call it would end the run)."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    params = tmp_path / "params.yaml"
    assert params_yaml_changes(params) == ""  # nothing committed: nothing to compare with
    committed = subprocess.run(["git", "-C", str(PROJECT_ROOT), "show", "HEAD:params.yaml"], check=True,
                               capture_output=True, text=True).stdout  # the workspace's may be an experiment's
    params.write_text(committed)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "params"], check=True)
    assert params_yaml_changes(params) == ""
    assert "  seed: 0\n" in committed
    params.write_text(committed.replace("  seed: 0\n", "  seed: 7\n", 1) + "extra: 1\n")
    changed = params_yaml_changes(params)
    assert re.match(r"params\.yaml differs from the last commit in [a-z_]+\.seed, extra, and the tests build on "
                    r"its values .*`git checkout params\.yaml` first", changed), changed
    for text, said in (("train: [\n", "params.yaml cannot be read ("), ("", "params.yaml holds no mapping"),
                       ("- 1\n", "params.yaml holds no mapping")):
        params.write_text(text)
        assert params_yaml_changes(params).startswith(said), text


def test_the_summary_names_a_changed_params_yaml_after_a_failure_only(monkeypatch):
    class Reporter:
        def __init__(self):
            self.lines = []

        def write_sep(self, sep, title, **markup):
            self.lines.append(f"{sep * 3} {title}")

        def write_line(self, line):
            self.lines.append(line)

    monkeypatch.setattr(conftest, "params_yaml_changes", lambda: "params.yaml differs from the last commit in x")
    for status, expected in ((0, []), (1, ["=== params.yaml", "params.yaml differs from the last commit in x"])):
        reporter = Reporter()
        conftest.pytest_terminal_summary(reporter, status, None)
        assert reporter.lines == expected
    assert conftest.pytest_report_header(None) == "params.yaml differs from the last commit in x"


def test_a_unit_test_has_a_limit_of_its_own(request):
    """pyproject.toml's 20 minutes are sized for the integration tests; a hung unit test fails sooner."""
    from tests.conftest import UNIT_TEST_TIMEOUT_S
    assert request.node.get_closest_marker("timeout").args == (UNIT_TEST_TIMEOUT_S,)
    assert UNIT_TEST_TIMEOUT_S < 1200
