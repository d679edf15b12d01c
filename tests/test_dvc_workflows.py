"""The DVC workflows the docs document, run for real on the synthetic project (issue 4).

Comparing branches (metrics, params and plots diffs), experiments (a run, a queued sweep, apply),
remotes (a local directory and a real OpenSSH server: push, clone, pull), the run-cache shared
between clones, which stages `dvc repro` re-runs after each kind of change, and `dvc gc` safety.

RERUNS below is the one table of "what re-runs when X changes": the test is parametrized from it
and docs/workflows.md's table is printed from it: `python -m tests.test_dvc_workflows`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, VENV_BIN, DvcProject
from tests.sshd import Sshd, SshdMissing

pytestmark = pytest.mark.integration

STAGES = ("params", "fetch", "preprocess", "augment", "train", "evaluate", "plot")  # pipeline order
ALL_STAGES = frozenset(STAGES)
OUTPUT_DIRS = ("data", "models", "metrics", "plots")


# ---------------------------------------------------------------------------------------------
# The table: one change each, and exactly the stages `dvc repro` then runs.

class Rerun(NamedTuple):
    change: dict | str  # a params.yaml edit (deep-merged), or a file that gets a comment appended
    what: str  # the change, for docs/workflows.md
    runs: frozenset[str]
    why: str


def _rerun(change: dict | str, what: str, runs: set[str], why: str) -> Rerun:
    return Rerun(change, what, frozenset(runs), why)


# Every params.yaml edit re-runs `params` (it validates the whole file); its output is a constant
# marker, so what follows depends only on which stages use the edited section.
RERUNS: dict[str, Rerun] = {
    "params-fetch": _rerun(
        {"fetch": {"mirrors": {"synthetic": ["http://127.0.0.1:9/", "http://127.0.0.1:9/second/"]}, "timeout_s": 7}},
        "`fetch.mirrors` or `fetch.timeout_s`", {"params"},
        "they say where and how to download, not what: the files are verified by sha256, so dvc.yaml's "
        "fetch stage does not track them and nothing is downloaded again (`fetch.dataset` is different: "
        "new data, everything re-runs)"),
    "params-preprocess": _rerun(
        {"preprocess": {"seed": 1}}, "`preprocess.seed` (any `preprocess` key)",
        {"params", "preprocess", "augment", "train", "evaluate", "plot"}, "a new train/val split"),
    "params-augment": _rerun(
        {"augment": {"seed": 1}}, "`augment.seed` (any `augment` key)",
        {"params", "augment", "train", "evaluate", "plot"}, "a new augmented train set"),
    "params-train": _rerun(
        {"train": {"lr": 0.04}}, "`train.lr` (any `train` key)",
        {"params", "train", "evaluate", "plot"}, "a new model"),
    "params-evaluate": _rerun(
        {"evaluate": {"batch_size": 50}}, "`evaluate.batch_size`", {"params", "evaluate"},
        "same predictions (a batch of a few images may move the logits, so `loss`, in their last bits), so "
        "`metrics/confusion.csv` is unchanged and `plot` does not run"),
    "params-plot": _rerun(
        {"plot": {"misclassified": 5}}, "`plot.misclassified`", {"params", "plot"}, "only the figures"),
    # Code: a comment appended changes the file's hash, so every stage depending on it re-runs;
    # stages further down run only if an output they read actually changed (none does here).
    "stages/params.py": _rerun(
        "stages/params.py", "`stages/params.py`", ALL_STAGES, "every stage depends on it"),
    "stages/datasets.py": _rerun(
        "stages/datasets.py", "`stages/datasets.py`", ALL_STAGES,
        "every stage reads params.yaml through `stages/params.py`, which checks it against the dataset table"),
    "stages/datasets.yaml": _rerun(
        "stages/datasets.yaml", "`stages/datasets.yaml`", ALL_STAGES,
        "as for `datasets.py`; its `crop` is what `train.crop: auto` takes"),
    "stages/model_config.py": _rerun(
        "stages/model_config.py", "`stages/model_config.py`", ALL_STAGES,
        "`stages/params.py` builds the model's config, so every stage imports it"),
    "stages/common.py": _rerun(
        "stages/common.py", "`stages/common.py`", ALL_STAGES, "every stage depends on it"),
    "stages/runtime.py": _rerun(
        "stages/runtime.py", "`stages/runtime.py` (device, seeding, allocator)", {"train"},
        "only train imports it; the model comes out bit-identical"),
    "stages/idx.py": _rerun("stages/idx.py", "`stages/idx.py`", {"fetch", "preprocess"}, "their outputs come out identical"),
    "stages/fetch.py": _rerun("stages/fetch.py", "`stages/fetch.py`", {"fetch"}, "its output comes out identical"),
    "stages/preprocess.py": _rerun(
        "stages/preprocess.py", "`stages/preprocess.py`", {"preprocess"}, "its outputs come out identical"),
    "stages/augment.py": _rerun("stages/augment.py", "`stages/augment.py`", {"augment"}, "its output comes out identical"),
    "stages/views.py": _rerun(
        "stages/views.py", "`stages/views.py` (the transforms)", {"augment", "train"},
        "augment stores views with it, train draws them on the fly with it (`augment.on_the_fly`); both outputs come out identical"),
    "stages/models.py": _rerun(
        "stages/models.py", "`stages/models.py`", {"train", "evaluate"},
        "both depend on it; training is deterministic, so `plot` does not run"),
    "stages/train.py": _rerun(
        "stages/train.py", "`stages/train.py`", {"train"}, "the model comes out bit-identical"),
    "stages/tracking.py": _rerun(
        "stages/tracking.py", "`stages/tracking.py` (DVCLive's layout)", {"train"},
        "only train logs through it; the model comes out bit-identical"),
    "stages/evaluate.py": _rerun(
        "stages/evaluate.py", "`stages/evaluate.py`", {"evaluate"}, "nothing downstream reads `metrics/eval.json`; `confusion.csv` comes out identical"),
    "stages/plot.py": _rerun("stages/plot.py", "`stages/plot.py`", {"plot"}, "nothing depends on the figures"),
    "stages/run": _rerun(
        "stages/run", "`stages/run` (the launcher)", set(),
        "no stage depends on it; `dvc repro -f` forces a run"),
    "stages/__main__.py": _rerun(
        "stages/__main__.py", "`stages/__main__.py` (the launcher's Python half)", set(),
        "no stage depends on it: it starts a stage, computes nothing"),
    "stages/presets.py": _rerun(
        "stages/presets.py", "`stages/presets.py`", set(), "used by `make exp`, not by any stage"),
    "stages/predict.py": _rerun(
        "stages/predict.py", "`stages/predict.py`", set(), "used by `make predict`, not by any stage"),
    "stages/remotes.py": _rerun(
        "stages/remotes.py", "`stages/remotes.py`", set(), "used by `make pull`, not by any stage"),
    "stages/__init__.py": _rerun(
        "stages/__init__.py", "`stages/__init__.py`", set(), "an empty package marker; no stage depends on it"),
}

TABLE_HEADER = "| Change | Stages `dvc repro` runs | Why |"


def rerun_table() -> str:
    """docs/workflows.md's "which stages re-run" table, in markdown."""
    rows = [TABLE_HEADER, "|---|---|---|"]
    for rerun in RERUNS.values():
        runs = ", ".join(f"`{stage}`" for stage in STAGES if stage in rerun.runs) or "nothing"
        rows.append(f"| {rerun.what} | {runs} | {rerun.why} |")
    return "\n".join(rows) + "\n"


def _check_reruns(project: DvcProject, case: str) -> None:
    rerun = RERUNS[case]
    if isinstance(rerun.change, dict):
        project.set_params(rerun.change)
    else:
        path = project.path(rerun.change)
        path.write_text(path.read_text() + "# an edit that changes nothing but the file's hash\n")
    ran = project.repro()
    assert ran == rerun.runs, f"{case}: ran {sorted(ran)}\n{project.last.stdout}"


# Two groups of the same table, so that a quick run can leave out the rows that train again
# (-k "not with_training"); the whole suite runs both.
TRAINING_CASES = [case for case, rerun in RERUNS.items() if "train" in rerun.runs]


@pytest.mark.parametrize("case", [case for case in RERUNS if case not in TRAINING_CASES])
def test_only_what_changed_reruns(project, case):
    _check_reruns(project, case)


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_only_what_changed_reruns_with_training(project, case):
    _check_reruns(project, case)


# ---------------------------------------------------------------------------------------------
# Helpers

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_digests(project: DvcProject) -> dict[str, str]:
    """sha256 of every file under the output folders (the .gitignore files DVC writes excepted)."""
    digests = {}
    for folder in OUTPUT_DIRS:
        for path in sorted(project.path(folder).rglob("*")):
            if path.is_file() and path.name != ".gitignore":
                digests[str(path.relative_to(project.root))] = sha256(path)
    return digests


def git_clone(source: DvcProject, destination: Path) -> DvcProject:
    source.run("git", "clone", "-q", str(source.root), str(destination))
    clone = DvcProject(destination, Path(source.env["MNIST_MIRROR"]))
    clone.env = dict(source.env)
    return clone


def add_local_remote(project: DvcProject, directory: Path, name: str = "storage") -> None:
    project.dvc("remote", "add", "-d", name, str(directory))
    project.commit(f"remote {name}")


def lock_md5(project: DvcProject, stage: str, out: str) -> str:
    lock = yaml.safe_load(project.path("dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


def in_cache(project: DvcProject, md5: str) -> bool:
    return (project.path(".dvc/cache/files/md5") / md5[:2] / md5[2:]).exists()


# ---------------------------------------------------------------------------------------------
# 1. Branches: metrics, params and plots compared across revisions

def _html_specs(html: str) -> dict[str, dict]:
    """The vega-lite spec of each plot in `dvc plots diff`'s page, by the div id it renders into."""
    specs, decoder = {}, json.JSONDecoder()
    for match in re.finditer(r'<div id\s*=\s*"([^"]+)">\s*<script[^>]*>\s*var spec = ', html):
        specs[match.group(1)], _ = decoder.raw_decode(html, match.end())
    return specs


def test_branches_metrics_params_and_plots_diff(project, tmp_path):
    p = project
    old = json.loads(p.path("metrics/eval.json").read_text())
    p.run("git", "checkout", "-q", "-b", "slow")
    # Low enough to lose accuracy even on the easy synthetic data, so the accuracies differ.
    p.set_params({"train": {"lr": 0.001, "epochs": 1}})
    assert p.repro() == {"params", "train", "evaluate", "plot"}
    p.commit("train: lr 0.001, 1 epoch")
    new = json.loads(p.path("metrics/eval.json").read_text())
    assert new["accuracy"] < old["accuracy"]

    table = p.dvc("metrics", "diff", "main", "slow").stdout
    assert re.search(r"metrics/eval\.json\s+accuracy\s", table), table
    changed = json.loads(p.dvc("metrics", "diff", "main", "slow", "--json").stdout)["metrics/eval.json"]
    assert changed["accuracy"] == {"old": old["accuracy"], "new": new["accuracy"],
                                   "diff": pytest.approx(new["accuracy"] - old["accuracy"])}
    # Without --all, only what changed is listed.
    moved = {k for k in old["per_class"] if old["per_class"][k]["accuracy"] != new["per_class"][k]["accuracy"]}
    assert moved, "some class's accuracy should have changed"
    assert {key for key in changed if key.startswith("per_class.")} == {f"per_class.{k}.accuracy" for k in moved}
    everything = json.loads(p.dvc("metrics", "diff", "main", "slow", "--all", "--json").stdout)["metrics/eval.json"]
    for k, values in old["per_class"].items():
        assert everything[f"per_class.{k}.accuracy"] == {
            "old": values["accuracy"], "new": new["per_class"][k]["accuracy"],
            "diff": pytest.approx(new["per_class"][k]["accuracy"] - values["accuracy"])}
    markdown = p.dvc("metrics", "diff", "main", "slow", "--md").stdout
    assert markdown.startswith("| Path")
    assert re.search(r"\| metrics/eval\.json\s*\| accuracy\s*\|", markdown), markdown

    params = json.loads(p.dvc("params", "diff", "main", "slow", "--json").stdout)
    assert params == {"params.yaml": {
        "train.lr": {"old": 0.05, "new": 0.001, "diff": pytest.approx(-0.049)},
        "train.epochs": {"old": 2, "new": 1, "diff": -1}}}
    assert re.search(r"params\.yaml\s+train\.lr\s+0\.05\s+0\.001", p.dvc("params", "diff", "main", "slow").stdout)

    out = tmp_path / "plots-diff"
    result = p.dvc("plots", "diff", "main", "slow", "-o", str(out))
    page = out / "index.html"
    assert page.is_file() and f"{page}" in result.stdout
    html = page.read_text()
    # Every plot of dvc.yaml's top-level `plots:` is on the page, for both revisions.
    plot_ids = [next(iter(entry)) if isinstance(entry, dict) else entry
                for entry in yaml.safe_load(p.path("dvc.yaml").read_text())["plots"]]
    specs = _html_specs(html)
    for plot_id in plot_ids:
        if plot_id.endswith(".png"):
            for rev in ("main", "slow"):
                image = f"static/{rev}_{plot_id.replace('/', '_')}"
                assert f'src="{image}"' in html and (out / image).is_file(), image
        elif plot_id == "metrics/train/plots/metrics":  # DVCLive's directory: one chart per series file
            for series in ("train_loss", "val_loss", "val_accuracy", "step_loss", "lr"):
                spec = specs[f"metrics_train_plots_metrics_{series}_tsv"]
                assert {row["rev"] for row in spec["data"]["values"]} == {"main", "slow"}, series
        else:
            spec = specs[plot_id.replace(" ", "_")]
            assert {row["rev"] for row in spec["data"]["values"]} == {"main", "slow"}, plot_id
    # The epoch train loss, by optimizer step: two epochs on main, one on the branch.
    loss = specs["metrics_train_plots_metrics_train_loss_tsv"]["data"]["values"]
    assert sorted((row["rev"], int(row["step"])) for row in loss) == [("main", 32), ("main", 64), ("slow", 32)]


# ---------------------------------------------------------------------------------------------
# 2. Experiments: one run, a queued sweep on two workers, show, apply the best

SWEEP = (0.01, 0.02)


def _experiments(project: DvcProject) -> dict[str, dict]:
    """`dvc exp show --json` flattened: experiment name -> {"lr", "accuracy", "loss"}."""
    found = {}
    for baseline in json.loads(project.dvc("exp", "show", "--json").stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev["data"]
                metrics = data["metrics"]["metrics/eval.json"]["data"]
                found[rev["name"]] = {"lr": data["params"]["params.yaml"]["data"]["train"]["lr"],
                                      "accuracy": metrics["accuracy"], "loss": metrics["loss"]}
    return found


# Where `dvc queue start` keeps its workers: dvc-exp-worker-N.json (pid, returncode) and .out (log).
QUEUE_DIR = ".dvc/tmp/exps/celery"


def _start_queue(project: DvcProject, jobs: int = 2) -> None:
    """`dvc queue start -j jobs`, one thread per worker (a core each on 2 cores).

    Its output goes to a file, not to pipes: the workers' launchers inherit the command's
    stdout and stderr and hold them until the workers exit, so reading pipes to their end would
    wait for the whole queue, or for ever if a worker never exits."""
    started = project.run("env", "OMP_NUM_THREADS=1", str(VENV_BIN / "dvc"), "queue", "start", "-j", str(jobs),
                          output=project.path(".dvc/tmp/queue-start.log"), timeout_s=120)
    assert "new experiments task queue worker" in started.stdout, started.stdout


def _queue_workers(project: DvcProject) -> dict[str, dict]:
    """Worker name -> its process info as dvc-task records it ({"pid", "returncode", ...})."""
    return {path.stem: json.loads(path.read_text()) for path in project.path(QUEUE_DIR).glob("dvc-exp-worker-*.json")}


def _worker_logs(project: DvcProject, lines: int = 40) -> str:
    return "".join(f"--- {path.name} (last {lines} lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
                   for path in sorted(project.path(QUEUE_DIR).glob("*.out")))


def _wait_for_queue(project: DvcProject, timeout_s: float = 600) -> str:
    """Polls `dvc queue status` until nothing is queued or running; fails on a failed task, or
    after `timeout_s` with the workers' logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = project.dvc("queue", "status", timeout_s=60).stdout
        tasks = [line for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
        failed = [line.split()[1] for line in tasks if "Failed" in line]
        if failed:
            logs = project.dvc("queue", "logs", failed[0], check=False, timeout_s=60)
            raise AssertionError(f"a queued experiment failed:\n{status}\n{logs.stdout}{logs.stderr}")
        if not any(word in line for line in tasks for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, (f"the queue did not finish in {timeout_s:g} s:\n{status}\n"
                                             f"{_worker_logs(project)}")
        time.sleep(3)


def _running_workers(project: DvcProject) -> dict[str, int]:
    """Worker name -> pid, for the workers that have not exited. dvc-task writes a worker's
    returncode when its launcher sees it exit; a pid checked without that could be a new process's."""
    return {name: info["pid"] for name, info in _queue_workers(project).items()
            if info.get("returncode") is None and "queue-worker" in _command_line(info["pid"])}


def _command_line(pid: int) -> str:
    """The process's command line; empty once it has exited (a zombie's is empty too)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def _stop_queue(project: DvcProject, grace_s: float = 60) -> None:
    """`dvc queue stop --kill`, then waits for every worker to exit. A worker still running after
    `grace_s` is killed with its process group (each launcher makes its own), with a warning: the
    test goes on, and no worker outlives it to hold a core or the test's temporary directory."""
    try:
        project.dvc("queue", "stop", "--kill", check=False, timeout_s=60)
        stop_failure = None
    except AssertionError as failure:  # `dvc queue stop` hung: the workers are still to be stopped
        stop_failure = failure
    deadline = time.monotonic() + grace_s
    while (alive := _running_workers(project)) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in alive.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != os.getpgrp():  # never this test run's own group
                os.killpg(group, signal.SIGKILL)
    if alive or stop_failure:
        said = [f"queue workers {alive} still ran {grace_s:g} s after dvc queue stop: killed"] if alive else []
        said += [f"dvc queue stop failed: {stop_failure}"] if stop_failure else []
        warnings.warn("\n".join([*said, _worker_logs(project)]), stacklevel=2)


def test_experiments_run_queue_show_apply(project):
    p = project
    result = p.dvc("exp", "run", "-S", "train.lr=0.003")
    assert "Running stage 'train'" in result.stdout
    assert p.params()["train"]["lr"] == 0.003, "exp run leaves its result in the workspace"

    # Queued experiments run in a temporary copy made from git (tracked files only) with the
    # DVC outputs checked out from the cache; stages/run finds the python3 on PATH there.
    for lr in SWEEP:
        p.dvc("exp", "run", "--queue", "-S", f"train.lr={lr}")
    try:
        _start_queue(p, jobs=2)
        status = _wait_for_queue(p)
    finally:
        _stop_queue(p)
    assert status.count("Success") == len(SWEEP), status

    runs = _experiments(p)
    assert sorted(run["lr"] for run in runs.values()) == sorted((0.003, *SWEEP)), runs
    assert all(0 <= run["accuracy"] <= 1 and run["loss"] > 0 for run in runs.values())
    table = p.dvc("exp", "show", "--csv").stdout.splitlines()
    header = table[0].split(",")
    assert {"train.lr", "accuracy", "per_class.0.accuracy"} <= set(header)
    assert {line.split(",")[0] for line in table[1:]} >= set(runs)

    best = max(runs, key=lambda name: (runs[name]["accuracy"], -runs[name]["loss"]))
    p.dvc("exp", "apply", best)
    p.commit(f"best of the sweep: {best}")
    assert p.params()["train"]["lr"] == runs[best]["lr"]
    metrics = json.loads(p.path("metrics/eval.json").read_text())
    assert (metrics["accuracy"], metrics["loss"]) == (runs[best]["accuracy"], runs[best]["loss"])
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    assert p.run("git", "status", "--porcelain").stdout == ""


# ---------------------------------------------------------------------------------------------
# 3. Remotes: push, then a fresh clone pulls everything back byte-identical

def _check_clone_matches(clone: DvcProject, original: DvcProject) -> None:
    assert output_digests(clone) == output_digests(original)
    assert clone.repro() == set()
    assert "Data and pipelines are up to date" in clone.last.stdout
    assert "Data and pipelines are up to date" in clone.dvc("status").stdout


def test_local_remote_push_then_clone_pull(project, tmp_path):
    p = project
    add_local_remote(p, tmp_path / "storage")
    assert "files pushed" in p.dvc("push").stdout
    clone = git_clone(p, tmp_path / "clone")
    assert not clone.path("models/model.pt").exists(), "only git-tracked files come with a clone"
    clone.dvc("pull")
    _check_clone_matches(clone, p)


@pytest.fixture
def sshd(tmp_path):
    """A throwaway OpenSSH server: skipped on a machine without OpenSSH installed (.ci/run installs
    it), an error where it is installed but does not start."""
    try:
        server = Sshd.start(tmp_path / "sshd")
    except SshdMissing as error:
        print(f"no OpenSSH server to test against: {error}")
        pytest.skip(f"no OpenSSH server to test against: {error}")
    yield server
    server.stop()


def test_ssh_remote_push_then_clone_pull(project, sshd, tmp_path):
    p = project
    # HOME: the client reads ~/.ssh from the throwaway one (known_hosts for this server, no keys
    # or config of the user's own).
    p.env["HOME"] = str(sshd.home)
    p.dvc("remote", "add", "-d", "ssh", sshd.url("remote"))
    p.dvc("remote", "modify", "--local", "ssh", "keyfile", str(sshd.client_key))
    # The URL is shared through git; the credential stays in the untracked .dvc/config.local.
    assert "keyfile" not in p.path(".dvc/config").read_text()
    assert str(sshd.client_key) in p.path(".dvc/config.local").read_text()
    p.run("git", "check-ignore", "-q", ".dvc/config.local")
    p.commit("ssh remote")
    assert "files pushed" in p.dvc("push").stdout
    assert list((sshd.dir / "remote" / "files" / "md5").iterdir()), "the remote holds the cache"
    assert f"Accepted publickey for {sshd.user}" in sshd.log.read_text()

    clone = git_clone(p, tmp_path / "clone")
    assert not clone.path(".dvc/config.local").exists()
    refused = clone.dvc("pull", check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, "no key, no access"
    clone.dvc("remote", "modify", "--local", "ssh", "keyfile", str(sshd.client_key))
    clone.dvc("pull")
    _check_clone_matches(clone, p)

    # dvc-ssh does not check the server's host key: sshfs connects with known_hosts=None, and
    # DVC has no option to change that, so even a known_hosts entry naming another key (with
    # StrictHostKeyChecking in ~/.ssh/config) does not stop it. If this starts failing, dvc-ssh
    # verifies host keys now: document the known_hosts setup in the README.
    other = sshd.dir / "other_host_key"
    shutil.copyfile(sshd.client_key.with_suffix(".pub"), other)
    kind, key = other.read_text().split()[:2]
    (sshd.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    (sshd.home / ".ssh" / "config").write_text("Host *\n  StrictHostKeyChecking yes\n")
    assert "in sync" in clone.dvc("status", "--cloud").stdout


def test_remote_credentials_in_config_local_work_on_every_branch(project):
    """`dvc remote modify --local NAME keyfile ...` alone writes a url-less section to
    .dvc/config.local; on any revision whose .dvc/config lacks NAME (a branch made before the
    remote was added) DVC then rejects its config: `dvc status` fails there, and diffs and
    `gc -a` from elsewhere skip or fail on that revision. Defining the remote in config.local too
    (`dvc remote add --local -f NAME URL`, then the credentials) keeps every revision readable."""
    p = project
    p.run("git", "branch", "before-remote")
    url = "ssh://user@example.invalid/srv/dvc-storage"  # never contacted
    p.dvc("remote", "add", "-d", "ssh", url)
    p.dvc("remote", "modify", "--local", "ssh", "keyfile", "/nonexistent/id_ed25519")
    p.commit("ssh remote")

    diff = p.dvc("metrics", "diff", "before-remote", "main", "--all", check=False)
    assert "failed to load metrics in revision 'before-remote'" in diff.stdout + diff.stderr
    p.run("git", "checkout", "-q", "before-remote")
    broken = p.dvc("status", check=False)
    assert broken.returncode != 0 and "expected 'url'" in broken.stderr, broken.stderr

    p.dvc("remote", "add", "--local", "-f", "ssh", url)
    p.dvc("remote", "modify", "--local", "ssh", "keyfile", "/nonexistent/id_ed25519")
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    p.run("git", "checkout", "-q", "main")
    diff = p.dvc("metrics", "diff", "before-remote", "main", "--all")
    assert "failed" not in diff.stdout + diff.stderr and "accuracy" in diff.stdout


# ---------------------------------------------------------------------------------------------
# 4. Run-cache: a run computed in one clone is restored in another instead of re-running

def _run_cache_entries(project: DvcProject, stage: str) -> list[Path]:
    runs = project.path(".dvc/cache/runs")
    return [entry for entry in runs.glob("*/*/*")
            if yaml.safe_load(entry.read_text())["cmd"].startswith(f"exec stages/run {stage} ")]


def test_run_cache_restores_a_run_made_elsewhere(project, tmp_path):
    a = project
    add_local_remote(a, tmp_path / "storage")
    a.dvc("push")
    b = git_clone(a, tmp_path / "b")
    b.dvc("pull")

    # A tries a learning rate and shares the run through the remote's run-cache, not through git.
    a.set_params({"train": {"lr": 0.04}})
    assert a.repro() == {"params", "train", "evaluate", "plot"}
    assert _run_cache_entries(a, "train"), "DVC saved no run-cache entry for the train stage"
    a.dvc("push", "--run-cache")

    # B sets the same params on its own: its dvc.lock still records the old run.
    b.set_params({"train": {"lr": 0.04}})
    b.dvc("pull", "--run-cache")
    assert _run_cache_entries(b, "train")
    # The entries alone do not do it: a plain `dvc repro` would still train, since the outputs
    # they name are not in B's cache. `dvc repro --pull` fetches them.
    assert "train" in b.repro("--dry")
    started = time.time()
    ran = b.repro("--pull")
    log = b.last.stdout + b.last.stderr
    assert "Stage 'train' is cached - skipping run, checking out outputs" in log, log
    assert "train" not in ran and "epoch" not in log, log
    # `params` always runs (its marker is an uncached output); `evaluate` re-runs, in seconds,
    # because its git-tracked metric is not restored from the run-cache. Training is what is saved.
    assert ran == {"params", "evaluate"}, ran
    # The outputs are A's, checked out now, not computed.
    for name in ("models/model.pt", "metrics/train/metrics.json", "metrics/eval.json", "plots/loss_curves.png"):
        assert sha256(b.path(name)) == sha256(a.path(name)), name
    assert b.path("models/model.pt").stat().st_mtime >= started - 1
    assert "Data and pipelines are up to date" in b.dvc("status").stdout


# ---------------------------------------------------------------------------------------------
# 6. gc never removes what the current workspace needs

def test_gc_workspace_keeps_what_the_workspace_needs(project):
    p = project
    main_model = lock_md5(p, "train", "models/model.pt")
    p.run("git", "checkout", "-q", "-b", "other")
    p.set_params({"train": {"lr": 0.04}})
    assert p.repro() == {"params", "train", "evaluate", "plot"}
    p.commit("other lr")
    other_model = lock_md5(p, "train", "models/model.pt")
    assert other_model != main_model
    # Switch back: git for the code, params and lock, dvc checkout for the outputs.
    p.run("git", "checkout", "-q", "main")
    p.dvc("checkout")
    assert lock_md5(p, "train", "models/model.pt") == main_model == hashlib.md5(
        p.path("models/model.pt").read_bytes()).hexdigest()

    # -a -T: keep what any branch or tag needs (use before pruning a shared remote with -c).
    p.dvc("gc", "-a", "-T", "-f")
    assert in_cache(p, main_model) and in_cache(p, other_model)

    # -w: keep only what the workspace needs; the other branch's model goes.
    p.dvc("gc", "-w", "-f")
    assert in_cache(p, main_model) and not in_cache(p, other_model)
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    before = output_digests(p)
    git_tracked = set(p.run("git", "ls-files", *OUTPUT_DIRS).stdout.split())
    for name in set(before) - git_tracked:  # every file that only DVC's cache holds
        p.path(name).unlink()
    p.dvc("checkout")  # no remote configured: the cache alone restores the workspace
    assert output_digests(p) == before
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    assert p.run("git", "status", "--porcelain").stdout == ""

    # What gc -w dropped is gone for good without a remote: checking out the other branch fails.
    p.run("git", "checkout", "-q", "other")
    missing = p.dvc("checkout", check=False)
    assert missing.returncode != 0
    assert "models/model.pt" in missing.stdout + missing.stderr



def test_gc_after_experiments_keeps_the_commit_with_the_wide_scope_and_not_with_w(project):
    """docs/sharing.md and workflows.md: drop experiments with `dvc exp remove`, then `dvc gc -a -T
    --all-experiments` keeps the commit's outputs and the remaining experiments (both check out
    again without training); `dvc gc -w` with an experiment's lock in the workspace deletes the
    commit's own model."""
    p = project
    head_model = lock_md5(p, "train", "models/model.pt")
    models = {}
    for name, lr in (("fast-lr-0.1", 0.04), ("seed-3", 0.03)):
        p.dvc("exp", "run", "-n", name, "-S", f"train.lr={lr}")
        models[name] = lock_md5(p, "train", "models/model.pt")
    assert len({head_model, *models.values()}) == 3
    p.run("git", "checkout", "--", ".")  # the commit's params and lock back; its outputs from the cache (as the docs)
    p.dvc("checkout")
    p.dvc("exp", "remove", "seed-3")
    p.dvc("gc", "-a", "-T", "--all-experiments", "-f")
    assert in_cache(p, head_model) and in_cache(p, models["fast-lr-0.1"]) and not in_cache(p, models["seed-3"])
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    p.dvc("exp", "apply", "fast-lr-0.1")  # the kept experiment's outputs, from the cache
    assert hashlib.md5(p.path("models/model.pt").read_bytes()).hexdigest() == models["fast-lr-0.1"]
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    # Its lock in the workspace, -w keeps its outputs and deletes the commit's model.
    p.dvc("gc", "-w", "-f")
    assert in_cache(p, models["fast-lr-0.1"]) and not in_cache(p, head_model)


if __name__ == "__main__":
    print(rerun_table(), end="")
