"""Team sharing, run for real (issue 16, docs/sharing.md): an S3 remote on a local S3 server,
experiments shared through a git host, preset + grid sweeps, corrupt remote objects, an interrupted
push, and which branches a plain `dvc push` shares.

The servers (moto's S3 server, OpenSSH) run on 127.0.0.1 and are started and stopped here. Every
test works on a copy of the session's `built_project`, so none of them runs the whole pipeline.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from stages.presets import load_presets
from tests.conftest import PROJECT_ROOT, VENV_BIN, DvcProject
from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from tests.sshd import Sshd
from tests.test_dvc_workflows import (
    _check_clone_matches,
    _stop_queue,
    _wait_for_queue,
    git_clone,
    lock_md5,
    output_digests,
    sha256,
    sshd,  # noqa: F401 (a fixture: the real OpenSSH server, skipped only where OpenSSH is not installed)
)

pytestmark = pytest.mark.integration

MODEL = "models/model.pt"
DATA = "data/prepared/train.pt"  # a data file: DVC output of `preprocess`, read by `augment`
_buckets = itertools.count()


@pytest.fixture
def s3() -> S3Server:
    with S3Server.start(lifetime_s=900) as server:  # a test takes a few minutes at most
        yield server


def new_bucket(s3: S3Server) -> str:
    name = f"dvc-{next(_buckets)}"
    s3.create_bucket(name)
    return name


def without_aws_credentials(project: DvcProject, home: Path) -> None:
    """No AWS variables, and a HOME without ~/.aws: boto finds no credentials at all. (No instance
    metadata lookup either: that would leave 127.0.0.1.)"""
    for name in list(project.env):
        if name.startswith("AWS_"):
            del project.env[name]
    home.mkdir(parents=True, exist_ok=True)
    project.env.update(HOME=str(home), AWS_EC2_METADATA_DISABLED="true")


# ---------------------------------------------------------------------------------------------
# One remote of each kind, with direct access to its stored objects (as a failing disk would have)

class Store:
    """A DVC remote named `storage`: a local directory, an SSH server's directory, or an S3 bucket."""

    def __init__(self, kind: str, tmp_path: Path, s3: S3Server | None = None, ssh: Sshd | None = None):
        self.kind, self.s3, self.ssh = kind, s3, ssh
        if kind == "s3":
            self.bucket = new_bucket(s3)
            self.url = f"s3://{self.bucket}/mnist"
        elif kind == "ssh":
            self.dir = ssh.dir / "remote"
            self.url = ssh.url("remote")
        else:
            self.dir = tmp_path / "storage"
            self.url = str(self.dir)

    def add_to(self, project: DvcProject) -> None:
        """`dvc remote add` and the shared settings (committed), then this user's credentials."""
        project.dvc("remote", "add", "-d", "storage", self.url)
        if self.kind == "s3":
            project.dvc("remote", "modify", "storage", "endpointurl", self.s3.endpoint_url)
        project.dvc("remote", "modify", "storage", "verify", "true")
        project.commit("remote storage")
        self.credentials(project)

    def credentials(self, project: DvcProject) -> None:
        if self.kind == "s3":
            project.env.update(self.s3.env)
        elif self.kind == "ssh":
            project.env["HOME"] = str(self.ssh.home)
            project.dvc("remote", "modify", "--local", "storage", "keyfile", str(self.ssh.client_key))

    def _key(self, md5: str) -> str:
        return f"files/md5/{md5[:2]}/{md5[2:]}"

    def count(self) -> int:
        if self.kind == "s3":
            return len(self.s3.keys(self.bucket))
        return sum(1 for path in (self.dir / "files").rglob("*") if path.is_file())

    def read(self, md5: str) -> bytes:
        if self.kind == "s3":
            return self.s3.read(self.bucket, f"mnist/{self._key(md5)}")
        return (self.dir / self._key(md5)).read_bytes()

    def flip_a_byte(self, md5: str) -> None:
        """Changes one byte in the middle of the stored object, keeping its name, size and mode."""
        data = bytearray(self.read(md5))
        data[len(data) // 2] ^= 0xFF
        self.rewrite(md5, bytes(data))

    def rewrite(self, md5: str, data: bytes) -> None:
        """The stored object's bytes replaced by `data`, keeping its name and mode."""
        if self.kind == "s3":
            self.s3.write(self.bucket, f"mnist/{self._key(md5)}", data)
            return
        path = self.dir / self._key(md5)
        mode = path.stat().st_mode
        path.chmod(0o644)  # DVC stores objects read-only
        path.write_bytes(data)
        path.chmod(mode)  # bit rot keeps the mode: DVC re-hashes a writable local object itself

    def delete(self, md5: str) -> None:
        if self.kind == "s3":
            self.s3.client().delete_object(Bucket=self.bucket, Key=f"mnist/{self._key(md5)}")
        else:
            (self.dir / self._key(md5)).unlink()


@pytest.fixture(params=["local", "ssh", "s3"])
def store(request, tmp_path, s3) -> Store:
    ssh = request.getfixturevalue("sshd") if request.param == "ssh" else None
    return Store(request.param, tmp_path, s3=s3, ssh=ssh)


# ---------------------------------------------------------------------------------------------
# 1. S3: push, clone + pull, run-cache, credentials outside git

def test_s3_remote_push_pull_and_run_cache(project, s3, tmp_path):
    a = project
    bucket = new_bucket(s3)
    a.dvc("remote", "add", "-d", "s3store", f"s3://{bucket}/mnist")
    a.dvc("remote", "modify", "s3store", "endpointurl", s3.endpoint_url)
    a.commit("dvc remote: s3store")
    a.env.update(s3.env)  # credentials from the environment only
    assert "files pushed" in a.dvc("push").stdout
    assert any(key.startswith("mnist/files/md5/") for key in s3.keys(bucket))

    # What git shares: the URL and endpoint, never a credential.
    committed = a.run("git", "show", "HEAD:.dvc/config").stdout
    assert f"s3://{bucket}/mnist" in committed and s3.endpoint_url in committed
    for secret in (ACCESS_KEY_ID, SECRET_ACCESS_KEY, "access_key", "secret"):
        assert secret not in committed, secret

    b = git_clone(a, tmp_path / "b")
    without_aws_credentials(b, tmp_path / "home-b")
    refused = b.dvc("pull", check=False)
    assert refused.returncode != 0 and "Unable to locate credentials" in refused.stderr, refused.stderr
    # Credentials in the git-ignored config.local also work.
    b.dvc("remote", "modify", "--local", "s3store", "access_key_id", ACCESS_KEY_ID)
    b.dvc("remote", "modify", "--local", "s3store", "secret_access_key", SECRET_ACCESS_KEY)
    b.run("git", "check-ignore", "-q", ".dvc/config.local")
    assert b.run("git", "status", "--porcelain").stdout == ""
    b.dvc("pull")
    _check_clone_matches(b, a)

    # The run-cache: A's run with lr 0.04 reaches B through the bucket, not through git.
    a.set_params({"train": {"lr": 0.04}})
    assert "train" in a.repro()
    a.dvc("push", "--run-cache")
    b.set_params({"train": {"lr": 0.04}})
    b.dvc("pull", "--run-cache")
    ran = b.repro("--pull")
    log = b.last.stdout + b.last.stderr
    assert "Stage 'train' is cached - skipping run, checking out outputs" in log, log
    assert "train" not in ran, log
    assert sha256(b.path(MODEL)) == sha256(a.path(MODEL))


# ---------------------------------------------------------------------------------------------
# 2. Experiments through a git host

def _experiment_names(project: DvcProject) -> dict[str, dict]:
    """Experiment name -> its `data` (params, metrics, deps) from `dvc exp show --json`."""
    found = {}
    for baseline in json.loads(project.dvc("exp", "show", "--json").stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                found[rev["name"]] = rev["data"]
    return found


def test_experiment_shared_through_git_host(project, tmp_path):
    a = project
    host = tmp_path / "host.git"  # stands in for GitHub/GitLab
    a.run("git", "init", "-q", "--bare", str(host))
    a.run("git", "remote", "add", "origin", str(host))
    a.dvc("remote", "add", "-d", "storage", str(tmp_path / "storage"))
    a.commit("dvc remote: storage")
    a.run("git", "push", "-q", "origin", "main")
    a.dvc("push")

    a.dvc("exp", "run", "-n", "lr-0.04", "-S", "train.lr=0.04")
    model = sha256(a.path(MODEL))
    # Pushes the experiment's git ref to origin and its outputs to the default DVC remote.
    pushed = a.dvc("exp", "push", "origin", "lr-0.04")
    assert "Pushed experiment lr-0.04 to Git remote 'origin'" in pushed.stdout, pushed.stdout

    b = git_clone(a, tmp_path / "b")
    b.run("git", "remote", "set-url", "origin", str(host))
    assert "lr-0.04" not in _experiment_names(b)
    b.dvc("exp", "pull", "origin", "lr-0.04")
    runs = _experiment_names(b)
    assert runs["lr-0.04"]["params"]["params.yaml"]["data"]["train"]["lr"] == 0.04
    b.dvc("exp", "apply", "lr-0.04")
    b.dvc("pull")
    assert sha256(b.path(MODEL)) == model
    assert b.params()["train"]["lr"] == 0.04
    assert "Data and pipelines are up to date" in b.dvc("status").stdout


# ---------------------------------------------------------------------------------------------
# 3. A preset combined with a grid, through the Makefile, and the seed mean

def _make(project: DvcProject, *args: str, check: bool = True, output: Path | None = None) -> subprocess.CompletedProcess:
    """`make` in the copy, with the venv this test runs in (the copy has none: -o skips setup).
    `output`: a file for stdout and stderr together (DvcProject.run)."""
    venv = VENV_BIN.parent
    return project.run("make", "--no-print-directory", "-o", f"{venv}/.installed", f"VENV={venv}", *args,
                       check=check, output=output)


# The seed mean as docs/sharing.md shows it: CSV columns Experiment, accuracy, loss.
SEED_MEAN = ("dvc exp show --csv --drop '.*' --keep 'Experiment|^accuracy$|^loss$' | awk -F, "
             "'$1 ~ /^fast-/ {acc += $2; loss += $3; n++} END {print n, \"runs: accuracy\", acc / n, \"loss\", loss / n}'")


def test_preset_grid_sweep_through_make(project):
    p = project
    for name in ("Makefile", "presets.yaml"):
        shutil.copy2(PROJECT_ROOT / name, p.path(name))
    p.commit("Makefile and presets")  # queued runs see only what git tracks
    # A seed left in the workspace (by an earlier run): the grid sets it, so make exp's check of
    # leftovers lets the preset run (it reads EXP_ARGS's -S keys).
    p.set_params({"train": {"seed": 7}})

    queued = _make(p, "exp", "PRESET=fast", "EXP_ARGS=--queue -S 'train.seed=range(0,2)'")
    assert "Queued experiment 'fast-1'" in queued.stdout and "Queued experiment 'fast-2'" in queued.stdout
    env, p.env = p.env, {k: v for k, v in p.env.items() if k != "OMP_NUM_THREADS"}  # unset, as for a user
    try:
        # A file, not pipes: the queue's workers hold what `make queue` prints to (_start_queue).
        started = _make(p, "queue", "JOBS=2", output=p.path(".dvc/tmp/make-queue.log"))
        _wait_for_queue(p)
    finally:
        p.env = env
        _stop_queue(p)
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # make queue's share of the cores for 2 workers
    assert "thread(s) each" in started.stdout and f" {share} thread" in started.stdout, started.stdout

    runs = _experiment_names(p)
    fast = {name: data for name, data in runs.items() if name.startswith("fast-")}
    assert sorted(data["params"]["params.yaml"]["data"]["train"]["seed"] for data in fast.values()) == [0, 1]
    preset = load_presets()["fast"]
    for data in fast.values():  # the preset's params, on top of the grid's seed
        train = data["params"]["params.yaml"]["data"]["train"]
        assert (train["channels"], train["pool"], train["epochs"]) == (
            preset["train.channels"], preset["train.pool"], preset["train.epochs"]), train
        # Each worker's training took its share of the cores (torch's own default: every core).
        assert data["params"]["metrics/train/params.yaml"]["data"]["threads"] == share
    metrics = [data["metrics"]["metrics/eval.json"]["data"] for data in fast.values()]
    mean = p.run("bash", "-c", SEED_MEAN)
    runs, _, _, accuracy, _, loss = mean.stdout.split()  # "2 runs: accuracy A loss L"
    assert int(runs) == 2
    assert float(accuracy) == pytest.approx(sum(m["accuracy"] for m in metrics) / 2, abs=1e-5), mean.stdout
    assert float(loss) == pytest.approx(sum(m["loss"] for m in metrics) / 2, rel=1e-4), mean.stdout


# ---------------------------------------------------------------------------------------------
# 4. A corrupt object on the remote never lands silently in a workspace

def test_corrupt_remote_object_is_refused_with_verify_only(project, store, tmp_path):
    a = project
    store.add_to(a)  # with `verify = true`, committed, as docs/sharing.md recommends
    assert "files pushed" in a.dvc("push").stdout
    model, data = lock_md5(a, "train", MODEL), lock_md5(a, "preprocess", DATA)
    for md5 in (model, data):
        store.flip_a_byte(md5)

    b = git_clone(a, tmp_path / "b")
    store.credentials(b)
    refused = b.dvc("pull", check=False)
    assert refused.returncode != 0, refused.stdout
    assert "Checkout failed for following targets" in refused.stderr, refused.stderr
    assert {MODEL, DATA} <= set(refused.stderr.split()), refused.stderr
    # Neither the file nor the object: DVC deleted the download that failed its hash.
    assert not b.path(MODEL).exists() and not b.path(DATA).exists()
    assert not (b.path(".dvc/cache/files/md5") / model[:2] / model[2:]).exists()
    assert "not in cache" in b.dvc("status").stdout

    # DVC's default, `verify = false`, pinned here because it is why the project turns it on (if
    # this starts failing, DVC checks downloads by default now: update docs/sharing.md).
    c = git_clone(a, tmp_path / "c")
    store.credentials(c)
    c.dvc("remote", "modify", "--local", "storage", "verify", "false")
    c.dvc("pull")  # succeeds
    assert hashlib.md5(c.path(MODEL).read_bytes()).hexdigest() != model
    assert hashlib.md5(c.path(DATA).read_bytes()).hexdigest() != data
    # And nothing notices afterwards: DVC trusts the hashes it recorded when it placed the files.
    assert "Data and pipelines are up to date" in c.dvc("status").stdout
    assert "No changes" in c.dvc("data", "status").stdout
    assert "in sync" in c.dvc("status", "--cloud").stdout
    assert c.repro() == set()

    # `dvc push` only checks that an object exists, so it never repairs one: delete the bad
    # objects on the remote, then push from a clone that has good copies.
    assert "Everything is up to date" in a.dvc("push").stdout
    assert store.read(model) != a.path(MODEL).read_bytes()
    for md5 in (model, data):
        store.delete(md5)
    assert "2 files pushed" in a.dvc("push").stdout
    b.dvc("pull")
    assert output_digests(b) == output_digests(a)


def test_make_pull_refuses_a_remote_without_verify(project, tmp_path):
    p = project
    shutil.copy2(PROJECT_ROOT / "Makefile", p.path("Makefile"))
    p.dvc("remote", "add", "-d", "storage", str(tmp_path / "storage"))
    p.dvc("push")
    shutil.rmtree(p.path("models"))
    p.path(DATA).unlink()
    refused = _make(p, "pull", check=False)
    assert refused.returncode != 0
    assert "make pull: remote 'storage' has verify off" in refused.stdout, refused.stdout
    assert not p.path(MODEL).exists() and not p.path(DATA).exists(), "nothing pulled"
    p.dvc("remote", "modify", "storage", "verify", "true")
    p.dvc("remote", "add", "backup", str(tmp_path / "backup"))  # verify off, but not pulled from
    refused = _make(p, "pull", "PULL_ARGS=-r backup", check=False)
    assert refused.returncode != 0 and "make pull: remote 'backup' has verify off" in refused.stdout, refused.stdout
    pulled = _make(p, "pull")
    assert "make pull: dvc fetch" in pulled.stdout and "make pull: dvc checkout" in pulled.stdout, pulled.stdout
    assert "backup" not in pulled.stdout, pulled.stdout
    assert p.path(MODEL).is_file() and "Data and pipelines are up to date" in p.dvc("status").stdout


def test_make_pull_never_checks_out_a_damaged_directory_manifest(project, tmp_path):
    """A directory output's manifest (.dir: the files it holds, by name and md5) damaged on the
    remote: DVC's verify re-hashes the files it lists, and drops the manifest itself as it arrives,
    yet `dvc pull` checks the directory out from the listing it read. make pull fetches, then
    checks out only the outputs whose manifests the cache holds sound."""
    a = project
    store = Store("local", tmp_path)
    store.add_to(a)
    a.dvc("push")
    raw = lock_md5(a, "fetch", "data/raw")
    assert raw.endswith(".dir")
    store.rewrite(raw, store.read(raw).replace(b"t10k-images-idx3-ubyte", b"t10k-images-idx3-ubytX"))

    # DVC alone, verify on: the renamed file lands, and the pull succeeds (if this starts failing,
    # DVC checks manifests now: update docs/sharing.md).
    c = git_clone(a, tmp_path / "c")
    c.dvc("pull")
    assert sorted(path.name for path in c.path("data/raw").iterdir())[0] == "t10k-images-idx3-ubytX"

    b = git_clone(a, tmp_path / "b")
    shutil.copy2(PROJECT_ROOT / "Makefile", b.path("Makefile"))
    refused = _make(b, "pull", check=False)
    assert refused.returncode != 0
    assert f"make pull: data/raw: its manifest {raw} did not arrive intact" in refused.stdout, refused.stdout
    assert f"delete files/md5/{raw[:2]}/{raw[2:]} under the remote's URL" in refused.stdout
    assert not b.path("data/raw").exists()
    assert sha256(b.path(MODEL)) == sha256(a.path(MODEL)), "the sound outputs are checked out"
    # A target inside a sound directory output stays as asked: one file, not the directory.
    shutil.rmtree(b.path("metrics/train"))
    one_file = _make(b, "pull", "PULL_ARGS=data/raw metrics/train/metrics.json", check=False)
    assert one_file.returncode != 0 and "dvc checkout -- metrics/train/metrics.json\n" in one_file.stdout
    assert [path.name for path in b.path("metrics/train").iterdir()] == ["metrics.json"]
    # What the message warns of (DVC 3.67.1; if this starts failing, update docs/sharing.md): a plain
    # `dvc checkout` reads the manifest the cache lacks from the remote and places the damaged listing.
    d = git_clone(b, tmp_path / "d")
    shutil.copytree(b.path(".dvc/cache"), d.path(".dvc/cache"))
    d.dvc("checkout", "data/raw")
    assert (d.path("data/raw") / "t10k-images-idx3-ubytX").exists()
    # Without a remote nothing is fetched, and nothing is blamed on one: DVC's checkout says what
    # the cache lacks.
    e = git_clone(a, tmp_path / "e")
    shutil.copy2(PROJECT_ROOT / "Makefile", e.path("Makefile"))
    e.dvc("remote", "remove", "storage")
    alone = _make(e, "pull", check=False)
    assert alone.returncode != 0 and "no DVC remote is configured here" in alone.stdout, alone.stdout
    assert "dvc fetch" not in alone.stdout and "did not arrive intact" not in alone.stdout, alone.stdout
    # A remote, but no default and none named: nothing to download, nothing blamed on it either.
    e.dvc("remote", "add", "backup", str(tmp_path / "backup"))
    e.dvc("remote", "modify", "backup", "verify", "true")
    undefaulted = _make(e, "pull", check=False)
    assert "no default DVC remote, and the pull names none" in undefaulted.stdout, undefaulted.stdout
    assert "did not arrive intact" not in undefaulted.stdout, undefaulted.stdout

    # The repair docs/sharing.md gives: delete the manifest on the remote, push from a good clone.
    store.delete(raw)
    assert "1 file pushed" in a.dvc("push").stdout
    _make(b, "pull")
    assert output_digests(b) == output_digests(a)

    # A manifest damaged in this clone's own cache (a pull without verify put it there), the remote
    # sound: DVC would take it as it is; make pull removes it first and downloads it again.
    f = git_clone(a, tmp_path / "f")
    shutil.copy2(PROJECT_ROOT / "Makefile", f.path("Makefile"))
    shutil.copytree(a.path(".dvc/cache"), f.path(".dvc/cache"))
    cached = f.path(".dvc/cache/files/md5") / raw[:2] / raw[2:]
    cached.chmod(0o644)
    cached.write_bytes(cached.read_bytes().replace(b"t10k-images-idx3-ubyte", b"t10k-images-idx3-ubytX"))
    repaired = _make(f, "pull")
    assert f"the manifest {raw} in the cache was damaged" in repaired.stdout, repaired.stdout
    assert output_digests(f) == output_digests(a)


# ---------------------------------------------------------------------------------------------
# 5. A push killed mid-transfer, then pushed again

def test_interrupted_push_then_push_again_completes_the_remote(project, s3, tmp_path):
    a = project
    store = Store("s3", tmp_path, s3=s3)
    store.add_to(a)
    with s3.hold_uploads(allowed=1) as gate:
        push = subprocess.Popen([str(VENV_BIN / "dvc"), "push"], cwd=a.root, env=a.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert gate.held.wait(timeout=120), "dvc push never reached a second upload"
        finally:
            push.send_signal(signal.SIGKILL)  # mid-transfer: one object stored, more in flight
            push.wait(timeout=60)
    assert push.returncode == -signal.SIGKILL
    assert store.count() == 1, "exactly the one upload let through landed"

    again = a.dvc("push").stdout
    pushed = int(again.split(" files pushed")[0].split()[-1])
    assert store.count() == 1 + pushed, again
    assert "Everything is up to date" in a.dvc("push").stdout
    assert "in sync" in a.dvc("status", "--cloud").stdout

    b = git_clone(a, tmp_path / "b")
    store.credentials(b)
    b.dvc("pull")
    _check_clone_matches(b, a)


# ---------------------------------------------------------------------------------------------
# 6. Which revisions a push shares: the current one, unless --all-branches / --all-commits

def test_push_shares_other_branches_only_with_all_branches(project, tmp_path):
    a = project
    # DVC 3.67.1: `push -r NAME --all-branches` fails with "no remote specified" unless some
    # default remote is set (the data still goes to NAME, as the pulls from NAME below show).
    a.dvc("remote", "add", "-d", "plain", str(tmp_path / "plain"))
    for remote in ("branches", "commits"):
        a.dvc("remote", "add", remote, str(tmp_path / remote))
    a.commit("three remotes")  # before branching: every revision knows them
    a.run("git", "checkout", "-q", "-b", "lr")
    for lr in (0.04, 0.03):  # two commits on the branch: its tip, and one behind it
        a.set_params({"train": {"lr": lr}})
        assert "train" in a.repro()
        a.commit(f"train: lr {lr}")
    tip = output_digests(a)
    a.run("git", "checkout", "-q", "main")
    a.dvc("checkout")

    def teammate(remote: str, rev: str, name: str) -> tuple[DvcProject, subprocess.CompletedProcess]:
        b = git_clone(a, tmp_path / name)
        b.run("git", "checkout", "-q", rev)
        return b, b.dvc("pull", "-r", remote, check=False)

    a.dvc("push", "-r", "plain")  # from main: main's outputs only
    b, missing = teammate("plain", "origin/lr", "b-plain")
    assert missing.returncode != 0 and MODEL in missing.stderr, missing.stderr
    # Pushing from the branch itself shares it too.
    a.run("git", "checkout", "-q", "lr")
    a.dvc("checkout")
    a.dvc("push", "-r", "plain")
    a.run("git", "checkout", "-q", "main")
    a.dvc("checkout")
    b.dvc("pull", "-r", "plain")
    assert output_digests(b) == tip

    a.dvc("push", "-r", "branches", "--all-branches")
    b, pulled = teammate("branches", "origin/lr", "b-branches")
    assert pulled.returncode == 0, pulled.stderr
    assert output_digests(b) == tip
    _, behind = teammate("branches", "origin/lr~1", "b-behind")
    assert behind.returncode != 0 and MODEL in behind.stderr, "only the branch tips were pushed"

    a.dvc("push", "-r", "commits", "--all-commits")
    _, pulled = teammate("commits", "origin/lr~1", "b-commits")
    assert pulled.returncode == 0, pulled.stderr
