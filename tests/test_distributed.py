"""train under torchrun: 2 CPU processes (gloo), launched by the DVC stage itself."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing

from stages import train
from stages.runtime import Rank
from tests.test_train import SMALL_MLP, assert_same_weights, split

pytestmark = pytest.mark.integration


def test_two_processes_train_to_the_same_band_and_write_one_set_of_outputs(project, built_project):
    project.set_params({"train": {"processes": 2}})
    assert project.repro() == {"params", "train", "evaluate", "plot"}
    output = project.last.stdout + project.last.stderr
    assert "launching torchrun" in output
    assert "each shared by 2 processes" in output
    assert output.count("train: trained in") == 1, "only rank 0 reports and writes"
    assert output.count("train: epoch 2/2") == 1
    assert sorted(p.name for p in project.path("models").iterdir()) == [".gitignore", "model.pt"]
    with open(project.path("metrics/train/plots/metrics/val_loss.tsv")) as f:
        assert len(list(csv.DictReader(f, delimiter="\t"))) == 2  # one row per epoch, rank 0's only
    single = json.loads(built_project.path("metrics/eval.json").read_text())["accuracy"]
    distributed = json.loads(project.path("metrics/eval.json").read_text())["accuracy"]
    # It failed once in CI under load with no record of which check or value; say so next time.
    assert distributed >= 0.9 and abs(distributed - single) <= 0.05, (
        f"accuracy: 2 processes {distributed}, 1 process {single}\n{output[-4000:]}")


def test_a_failing_worker_ends_with_its_error_line_not_torchrun_traceback(tmp_path, monkeypatch, capfd):
    """Each worker prints its one-line error; torchrun's own traceback and failure table (its
    ChildFailedError) would bury it, so the stage launches torchrun without them, and exits 1."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the workers fail as they start
    status = train.launch_torchrun(2, ["train.pt", "val.pt", "model.pt", "live"])
    err = capfd.readouterr().err
    assert status == 1
    # At least the first: torchrun stops the other worker when one fails, maybe before its line.
    assert "train: error: params.yaml: cannot read the params file" in err
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]


def test_a_worker_killed_by_a_signal_is_named(tmp_path):
    """A worker killed by a signal (SIGKILL: out of memory) prints nothing itself; torchrun's failure
    table said which signal, so without it the launch says so in one line."""
    script = tmp_path / "killed.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", train.TORCHRUN, "--standalone", "--nproc-per-node=1", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "train: error: worker 0 was killed by SIGKILL" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


# Dropout draws from each process's global generator, and batches of 33 split 12 / 11 at the end of
# each epoch (320 images), so the two processes' generators part after epoch 1.
DROPOUT_MLP = dataclasses.replace(SMALL_MLP, dropout=0.3, batch_size=33, schedule="constant")


def fit_in_two_processes(rank: int, rendezvous: str, cfg, checkpoint, out) -> None:
    """torch.multiprocessing.spawn's worker: fit() as one of two gloo processes, as under torchrun;
    rank 0 saves the weights to `out`."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        model, _, _ = train.fit(cfg, split(320, seed=1), split(100, seed=2), torch.device("cpu"), checkpoint,
                                run_id="run", rank=Rank(rank, 2, rank))
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        torch.distributed.destroy_process_group()


def generators_at_first_epoch(rank: int, rendezvous: str, out) -> None:
    """torch.multiprocessing.spawn's worker: a one-epoch fit() as one of two gloo processes that
    saves its global CPU generator's state, which dropout draws from, as the first epoch starts."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    real_train_epoch = train.train_epoch

    def recording(*args, **kwargs):
        torch.save(torch.get_rng_state(), out / f"rank{rank}.pt")
        return real_train_epoch(*args, **kwargs)

    train.train_epoch = recording  # this spawned process's own module
    try:
        train.fit(dataclasses.replace(DROPOUT_MLP, epochs=1), split(320, seed=1), split(100, seed=2),
                  torch.device("cpu"), rank=Rank(rank, 2, rank))
    finally:
        torch.distributed.destroy_process_group()


def rendezvous(path) -> str:
    """Where two spawned processes meet: a file of their own (a new path each time). A free TCP port
    found by binding and closing could be taken by another test's worker before they bind it."""
    assert not path.exists()
    return f"file://{path}"


def test_a_resumed_two_process_run_ends_as_the_unbroken_one(tmp_path):
    """Each process resumes with its own generators: restoring rank 0's on both (as once) changed
    rank 1's dropout masks in epoch 2, and so the weights."""
    def run(cfg, checkpoint, out):
        meeting = rendezvous(out.with_suffix(".store"))
        torch.multiprocessing.spawn(fit_in_two_processes, args=(meeting, cfg, checkpoint, out), nprocs=2)
        return torch.load(out)

    unbroken = run(DROPOUT_MLP, None, tmp_path / "unbroken.pt")
    checkpoint = tmp_path / "checkpoint.pt"
    # A constant learning rate: epoch 1 of a one-epoch run is epoch 1 of the two-epoch run, and its
    # checkpoint (same run_id) is what a kill during epoch 2 would have left.
    run(dataclasses.replace(DROPOUT_MLP, epochs=1), checkpoint, tmp_path / "first.pt")
    saved = train.load_checkpoint(checkpoint, "run")
    assert saved["epoch"] == 1 and len(saved["generators"]) == 2
    assert not torch.equal(saved["generators"][0]["cpu"], saved["generators"][1]["cpu"])
    assert_same_weights(run(DROPOUT_MLP, checkpoint, tmp_path / "resumed.pt"), unbroken)


def test_each_process_draws_its_own_dropout_masks(tmp_path):
    """Both processes build the model from the seed, then draw from generators of their own: with
    one state in both, image j of each process's share of a batch got the same dropout mask."""
    torch.multiprocessing.spawn(generators_at_first_epoch, args=(rendezvous(tmp_path / "store"), tmp_path), nprocs=2)
    first, second = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert not torch.equal(first, second)
