"""The test harness's own guarantee: a command a test runs cannot hang the suite (conftest.run_bounded)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests.conftest import process_alive, run_bounded

# Starts a daemon the way `dvc queue start` starts its workers' launchers: in a process group of
# its own, holding the command's stdout and stderr, outliving the command. Writes its pid to argv[1].
LEAVES_A_DAEMON = [sys.executable, "-c", "import pathlib, subprocess, sys\n"
                   "daemon = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
                   "pathlib.Path(sys.argv[1]).write_text(str(daemon.pid))"]


def _wait_until_dead(pid: int, timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_hung_command_fails_with_its_output_and_its_children_die(tmp_path):
    child_pid = tmp_path / "child.pid"
    hung = ["bash", "-c", f"echo started; sleep 300 & echo $! > {child_pid}; wait"]
    with pytest.raises(AssertionError, match=r"did not finish in 1 s and was killed") as failure:
        run_bounded(hung, timeout_s=1)
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
        with pytest.raises(AssertionError, match="holds its output open"):
            run_bounded([*LEAVES_A_DAEMON, str(pid_file)], timeout_s=1)
    finally:
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
