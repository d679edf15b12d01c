"""Stage train: fit the model chosen in params.yaml; write the model file and its DVCLive log.

Batches are drawn by indexing the in-memory tensors (on the GPU when training there), not through
a per-sample DataLoader: on MNIST the loader, not the model, is what makes tutorials slow. The
inner loop synchronises with the host only to log: losses are summed on the device and read every
tenth of an epoch (see StepLog) and once per epoch. Only the train and val splits are read; the
test split is evaluate's alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
# torch.use_deterministic_algorithms (see seed_everything) imports this on its first call, 1-3 s on
# a 2-core CPU: importing it here keeps that one-off cost out of the training time the stage logs.
import torch._inductor.config  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages import params as params_mod
from stages.common import (PipelineError, Progress, check_compile, ctrl_c_reached_my_group, load_tensors, log, run_main,
                           save_tensors)
from stages.model_config import MAX_NETWORKS
from stages.models import build_model, count_parameters, network_count, predict_logits, save_model
from stages.params import LOOKAHEAD_SYNC_STEPS, TrainParams, steps_per_epoch
from stages.runtime import (Rank, describe_device, describe_precision, numerics, rank_from_env,
                            resolve_device, resolve_precision, retain_freed_memory, seed_everything)
from stages.tracking import TrainLog, step_log_interval
from stages.views import view_drawer

STAGE = "train"
CODE_DIR = Path(__file__).resolve().parent  # the stages package: the code a checkpoint was written by
# What Ctrl-C leaves: the checkpoint (written after each epoch) and DVCLive's live log.
INTERRUPTED_KEEPS = ("the epochs completed, if any, are kept in the --checkpoint file (models/train-checkpoint.pt "
                     "under dvc repro), which a re-run with the same params, data, code and numerics resumes, and in "
                     "metrics/train (DVCLive's log)")
# Images per forward pass when scoring val. Small enough for a batch's activations to stay in the CPU's
# caches: the fashion preset's model (six test-time views, fp32) scored 5,000 images in 3.85 s at 500
# against 5.16 s at 2,000 (2-core Zen 4), the default CNN 0.32 s against 0.38 s. Another batch may move
# the logits in their last bits (see EvaluateParams.batch_size).
VAL_BATCH = 500


def parameter_groups(model: nn.Module, cfg: TrainParams) -> list[dict]:
    """The optimizer's parameter groups: one decayed by train.weight_decay, and with weight_decay_on
    "weights" a second without decay for every parameter of one dimension (BatchNorm's scales and
    shifts, biases): "no bias decay" (He et al. 2019). Under BatchNorm the conv before it is
    scale-free, so decay on its weights only raises its effective step; decay on a scale shrinks
    the layer's output itself. On the default CNN (issue 14, rule 29, benchmarks/README.md) it
    moved val by +0.013 points over 20 splits, under the 0.02 asked: the default stays "all"."""
    params = list(model.parameters())
    if cfg.weight_decay_on == "all":
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    matrices = [p for p in params if p.ndim > 1]  # conv [out, in, 3, 3], linear [out, in]
    vectors = [p for p in params if p.ndim <= 1]  # [features]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def make_optimizer(model: nn.Module, cfg: TrainParams) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    optimizer_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    # fused: one kernel for the whole update instead of about ten per parameter tensor. 1,000 steps
    # of MLP 784-512-10 at batch 20 took 0.66 s instead of 0.93 s on this project's 2-core CPU;
    # fused SGD was slower than the default there (0.64 s against 0.60 s), so SGD keeps the default.
    return optimizer_cls(groups, lr=cfg.lr, fused=True)


ONECYCLE_START_DIV = 25.0  # one-cycle starts at lr / 25
ONECYCLE_FINAL_DIV = 1e3  # and ends at that / 1,000


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainParams, total_steps: int):
    """A per-step learning-rate schedule, or None for a constant rate."""
    if cfg.schedule == "onecycle":
        # Linear warm-up to lr over `warmup` of the steps, then linear decay to ~0: the schedule
        # behind the fastest small-CNN MNIST runs. Momentum is left alone (SGD may have none).
        # OneCycleLR's warm-up ends at step warmup * total_steps - 1 and it divides by that length,
        # so a warm-up of one step or less (a run of a few steps: tiny data, a large batch) would
        # divide by zero or count backwards, and without one its first step is already past the
        # peak (a one-step run took its only step at the final rate, lr / 25,000). Such a run
        # starts at the peak and decays linearly to that final rate at its last step.
        if cfg.warmup * total_steps <= 1:
            final = 1 / (ONECYCLE_START_DIV * ONECYCLE_FINAL_DIV)
            # (Floored at the final rate: after the last step the count is total_steps, one past it.)
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: max(final, 1 - (1 - final) * step / max(1, total_steps - 1)))
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup, anneal_strategy="linear",
            cycle_momentum=False, div_factor=ONECYCLE_START_DIV, final_div_factor=ONECYCLE_FINAL_DIV)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


@dataclass
class Batches:
    """The mini-batches of one epoch, (images [B, H, W], labels [B]), each time it is iterated.

    Every iteration draws a fresh permutation of the split from `generator` (on the CPU, so the
    order is the same whatever the device) and slices it into batches of batch_size, the last one
    smaller unless drop_last. Under torchrun every process draws the same permutation (same seed)
    and takes every world-th image of each batch, so a step still covers batch_size images in all
    and the schedule is the one of a single process (but for a last batch with fewer images than
    processes, which all of them skip: one step less per epoch); DDP averages the gradients.

    With `rows` set, an epoch covers only those images (indices into `images`), in a fresh order:
    how an epoch trains on the originals and one augmented view (see epoch_rows).

    With `draw_view` set (augment.on_the_fly), an epoch covers every image twice, in a fresh order:
    as itself and as a view that draw_view makes when its batch comes up (train sets a new one,
    seeded for the epoch, before each epoch). The same cost in steps as the originals + one stored view.
    """

    images: torch.Tensor  # [N, H, W] uint8, on the training device
    labels: torch.Tensor  # [N] int64, on the same device
    batch_size: int
    drop_last: bool
    generator: torch.Generator
    rank: Rank = Rank()
    rows: torch.Tensor | None = None  # [M] int64 on the device: the images of this epoch; None: all
    draw_view: Callable[[torch.Tensor], torch.Tensor] | None = None  # [B, H, W] uint8 -> a view of each

    @property
    def count(self) -> int:
        """Images per epoch."""
        images = len(self.labels) if self.rows is None else len(self.rows)
        return 2 * images if self.draw_view is not None else images

    def __len__(self) -> int:
        """Steps per epoch, as the schedule counts them (under torchrun: stages.params.steps_per_epoch)."""
        return steps_per_epoch(self.count, self.batch_size, self.drop_last, self.rank.world)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.count, generator=self.generator).to(self.images.device)
        if self.rows is not None:
            order = self.rows[order]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = slice(self.rank.rank, None, self.rank.world)
            if self.draw_view is None:
                mine = batch[share]
                yield self.images[mine], self.labels[mine]
                continue
            # Order positions [0, 2N): below N the image itself, from N on a view of image (i - N).
            # Views are drawn for the whole batch, then shared out: every process draws the same
            # numbers, so the views are those of a single process whatever the process count.
            source = batch % len(self.labels)
            images, drawn = self.images[source], batch >= len(self.labels)  # [B, H, W], [B]
            images[drawn] = self.draw_view(images[drawn])
            yield images[share], self.labels[source[share]]


class NetworkBatches:
    """train.network_batches own: the batches of an ensemble whose networks each draw their own, one
    Batches per network (its own generator, so its own order; fit gives each its own view per
    epoch). Yields images [networks, B, H, W] and labels [networks, B]: the Ensemble runs network k
    on images[k]. Every stream has the same images, batch size and rank, so the same steps."""

    def __init__(self, streams: list[Batches]):
        self.streams = streams

    @property
    def images(self) -> torch.Tensor:  # the split: its device is the training device
        return self.streams[0].images

    @property
    def rank(self) -> Rank:
        return self.streams[0].rank

    def __len__(self) -> int:
        return len(self.streams[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for each in zip(*self.streams):
            yield torch.stack([images for images, _ in each]), torch.stack([labels for _, labels in each])


def stream_seed(seed: int, network: int) -> int:
    """The seed of network `network`'s batch order and views under train.network_batches own. The
    first network's is the run's seed (it trains on the batches of the single network of that seed);
    the others' lie above 2**40, beyond every train.seed (< 2**32) and distinct per (seed, network)."""
    return seed if network == 0 else 2**40 + seed * MAX_NETWORKS + network


def process_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s global generators after the model is built, under torchrun:
    distinct per (seed, rank), above 2**63, beyond stream_seed's and every train.seed."""
    return 2**63 + seed * 2**20 + rank  # seed < 2**32 and rank < 2**20: below 2**64, torch's limit


def epoch_rows(originals: int, views: int, epoch: int) -> torch.Tensor:
    """The images epoch `epoch` (from 1) trains on when train.fresh_views is set: indices [2 N] into
    the augment stage's [(views + 1) N, H, W] layout (originals, then view 1, ..., view K, N each),
    the originals and view ((epoch - 1) mod K) + 1. The view follows from the epoch number alone,
    so a resumed run picks the same one."""
    view = (epoch - 1) % views + 1
    return torch.cat([torch.arange(originals), torch.arange(view * originals, (view + 1) * originals)])


class Lookahead:
    """Lookahead (Zhang et al. 2019) on the schedule of KellerJordan's airbench: every `EVERY`
    steps a slow copy of the weights moves towards the trained ones by a fraction (1 - decay), and
    training goes on from the slow copy. decay grows as peak * (step / total)^3, so the first half
    of the run is nearly untouched and its last steps average the weights; after the last step
    the model takes the slow copy (that step's sync first, when it falls on one, as airbench does).
    Only parameters, unlike airbench, which also averages BatchNorm's running statistics: they are
    moving averages already.
    """

    EVERY = LOOKAHEAD_SYNC_STEPS  # steps between syncs, airbench's

    def __init__(self, model: nn.Module, peak: float, total_steps: int):
        if total_steps < self.EVERY:
            # No sync would ever run: the model would end as its initial weights, the slow copy.
            # The params stage refuses such a run first; this is for fit() called by other code.
            raise PipelineError(f"train.lookahead: syncs every {self.EVERY} steps, and this run has {total_steps} "
                                f"(train.epochs times the steps of an epoch); train longer or set it to 0")
        self.params = list(model.parameters())
        self.slow = [p.detach().clone() for p in self.params]
        self.peak, self.total, self.done = peak, total_steps, 0

    def decay(self, step: int) -> float:
        """The fraction of the slow weights that a sync after step `step` (from 1) keeps."""
        return self.peak * (step / self.total) ** 3

    @torch.no_grad()
    def step(self) -> None:
        self.done += 1
        # _foreach_*: one call over every tensor, as torch's own optimizers update them.
        if self.done % self.EVERY == 0:
            torch._foreach_lerp_(self.slow, self.params, 1.0 - self.decay(self.done))
            torch._foreach_copy_(self.params, self.slow)
        elif self.done >= self.total:
            torch._foreach_copy_(self.params, self.slow)

    def state_dict(self) -> dict:
        return {"slow": [w.clone() for w in self.slow], "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        torch._foreach_copy_(self.slow, state["slow"])
        self.done = state["done"]


@dataclass
class TrainingState:
    """Everything the rest of a run depends on, so that a run resumed from its state_dict() ends
    bit-identical to one that was never stopped. A new piece of such state (a generator, a buffer,
    a copy of the weights) goes here and into state_dict() and load_state_dict();
    tests/test_train.py's test_interrupted_fit_resumes_to_the_uninterrupted_result fails otherwise."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler | None  # None: a constant learning rate
    generators: list[torch.Generator]  # the batch order: one, or one per network (train.network_batches own)
    average: AveragedModel | None = None  # train.ema: the moving average of the weights; None: off
    lookahead: Lookahead | None = None  # train.lookahead; None: off

    def step(self) -> None:
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        if self.lookahead is not None:
            self.lookahead.step()
        if self.average is not None:
            self.average.update_parameters(self.model)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "average": self.average.state_dict() if self.average is not None else None,
                "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
                "batch_order_rng": [generator.get_state() for generator in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        for generator, saved in zip(self.generators, state["batch_order_rng"], strict=True):
            generator.set_state(saved)


def global_generators(device: torch.device, rank: Rank) -> list[dict]:
    """Every process's global generators, by rank: the CPU's and its GPU's. Dropout draws from them,
    and each process's have moved on by its own draws (an uneven last batch gives one process a
    larger share), so a resumed process needs its own. Under torchrun a collective: every process
    calls it."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if rank.world == 1:
        return [mine]
    everyone = [None] * rank.world
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def restore_global_generators(saved: list[dict], device: torch.device, rank: Rank) -> None:
    """This process's generators as global_generators saved them (the checkpoint's number of
    processes is this run's: it is in its fingerprint)."""
    mine = saved[rank.rank]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)


def make_loss(network: nn.Module, cfg: TrainParams, device: torch.device) -> Callable[..., torch.Tensor]:
    """loss(images, labels): the label-smoothed cross-entropy of `network` on a batch, a scalar, run
    under bf16 autocast when train.precision resolves to bf16 on `device` (the loss itself in float32).
    For an ensemble (train.networks > 1), the sum of its networks' losses: each network's gradient
    is then the one it would get training alone, at the same learning rate and weight decay. Its
    labels are [N], or [networks, N] when each network has its own batch (NetworkBatches)."""
    bf16 = resolve_precision(cfg.precision, device) == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = network(images).float()  # [N, C]; an ensemble's in training: [networks, N, C]
            if logits.dim() == 2:
                return F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            targets = labels if labels.dim() == 2 else labels.expand(len(logits), -1)  # [networks, N]
            return sum(F.cross_entropy(each, target, label_smoothing=cfg.label_smoothing)
                       for each, target in zip(logits, targets))
    return loss


def train_epoch(state: TrainingState, batches: Batches | NetworkBatches, loss_of: Callable[..., torch.Tensor],
                after_step: Callable[[torch.Tensor], None] | None = None) -> float:
    """One pass over `batches`; returns the mean train loss (over every process under torchrun; of
    one network: an ensemble's summed loss is divided by its count). `after_step`, if given, is
    called with the running [loss sum, images] after each step (StepLog)."""
    state.model.train()
    networks = network_count(state.model)
    total = torch.zeros(2, device=batches.images.device)  # [loss sum, images]: on device, no per-step sync
    for images, labels in batches:
        loss = loss_of(images, labels)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.step()
        images_per_network = labels.shape[-1]  # labels: [B], or [networks, B] (NetworkBatches)
        total[0] += loss.detach() * images_per_network / networks
        total[1] += images_per_network
        if after_step is not None:
            after_step(total)
    if batches.rank.world > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model on a labelled split."""
    logits = predict_logits(model, images, VAL_BATCH)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return loss, accuracy


class StepLog:
    """Called by train_epoch after every step of one epoch: advances the progress line (rank 0),
    every `interval` steps logs the mean train loss since the last point as `step_loss`, and keeps
    the learning rate the last step used (`used_lr`; the optimizer's rate after a step is the next
    step's, which for one-cycle after the last step is even below zero).

    Reading the loss is a host sync, hence only every `interval` steps. Under torchrun every
    process calls this (the loss is summed over the processes, a collective all must join).
    """

    def __init__(self, log: TrainLog, first_step: int, interval: int, optimizer: torch.optim.Optimizer,
                 progress: Progress | None, world: int):
        self.log, self.step, self.interval, self.progress, self.world = log, first_step, interval, progress, world
        self.optimizer = optimizer
        self.done = 0  # steps of this epoch
        self._mark = None  # the [loss sum, images] tensor at the last point
        self._next_lr = self.used_lr = optimizer.param_groups[0]["lr"]

    def __call__(self, total_loss: torch.Tensor) -> None:
        self.done += 1
        self.used_lr, self._next_lr = self._next_lr, self.optimizer.param_groups[0]["lr"]
        if self.progress is not None:
            self.progress.update()
        if self.done % self.interval:
            return
        window = total_loss - self._mark if self._mark is not None else total_loss.clone()
        self._mark = total_loss.clone()
        if self.world > 1:
            torch.distributed.all_reduce(window)
        self.log.log(self.step + self.done, {"step_loss": round((window[0] / window[1]).item(), 6)})


def file_sha256(path: Path) -> bytes:
    """The SHA-256 digest of the file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def fingerprint(cfg: TrainParams, computed: dict, processes: int, *input_files: Path, code_dir: Path = CODE_DIR) -> str:
    """Identifies a training run: its params, how it computes (stages.runtime.numerics: another
    thread count or precision would not continue the same run bit for bit; and the number of
    processes, which under a torchrun of one's own need not be train.processes: each holds its own
    generators and shard of every batch), the exact bytes of its
    inputs and the code (every *.py and *.yaml file of `code_dir`, by name). A checkpoint is resumed
    only by a run with the same fingerprint: one left by a run that was killed, with the code edited
    before `dvc repro` re-ran it, is not, as the model would mix two versions of the code while
    dvc.lock names only the second. The whole package, not train's code deps in dvc.yaml: an edit
    elsewhere (plot.py) starts training over, which costs time only, while a file missed would resume
    a run that the current code does not compute."""
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(cfg), computed, processes], sort_keys=True).encode())
    for path in input_files:  # read in pieces: train.pt holds 2.2 GB at augment.copies 50
        digest.update(file_sha256(path))
    # Regular files only, hidden ones left out: an editor's lock file (Emacs: .#train.py, a dangling
    # link) is no code and cannot be read.
    code = [path for path in [*code_dir.glob("*.py"), *code_dir.glob("*.yaml")]
            if path.is_file() and not path.name.startswith(".")]
    for path in sorted(code):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def save_checkpoint(path: Path, run_id: str, train_log: TrainLog, state: TrainingState, rng_states: list[dict]) -> None:
    """The run's state after the epochs logged so far, resumed from by a re-run with the same run_id.
    The log's points travel with it: the resumed run replays them into its fresh DVCLive files.
    `rng_states`: global_generators' list, every process's."""
    save_tensors(path, {"fingerprint": run_id, "epoch": len(train_log.epochs()), "log": train_log.records,
                        "training": state.state_dict(), "generators": rng_states})


def load_checkpoint(path: Path, run_id: str) -> dict | None:
    """The checkpoint at `path` if it belongs to this run; None (with a note) otherwise."""
    if not path.is_file():
        return None
    try:
        saved = load_tensors(path, required=("fingerprint", "epoch", "log", "training", "generators"))
    except PipelineError as exc:
        log(STAGE, f"ignoring unreadable checkpoint ({exc}); starting from epoch 1")
        return None
    if saved["fingerprint"] != run_id:
        log(STAGE, f"ignoring {path}: it belongs to other params or data, other code (stages/), or a run that "
                   "computed otherwise (device, precision, threads: metrics/train/params.yaml); starting from epoch 1")
        return None
    return saved


def fit(cfg: TrainParams, train: dict, val: dict, device: torch.device,
        checkpoint: Path | None = None, run_id: str = "", rank: Rank = Rank(), train_log: TrainLog | None = None):
    """Trains from scratch, or from `checkpoint` when it holds an earlier epoch of the same run
    (`run_id`, see fingerprint). Returns (model on `device`, model config, per-epoch log rows).
    Every point is logged to `train_log` (a resumed run first replays the checkpoint's points).

    Under torchrun (rank.world > 1) every process calls this; only rank 0 scores val, logs and
    writes the checkpoint, and its rows are the ones to keep.
    """
    seed_everything(cfg.seed, cfg.deterministic)
    retain_freed_memory()
    config = cfg.model_config(train["images"].shape[-1], len(train["classes"]), train["mean"], train["std"])
    model = build_model(config).to(device)  # first after seeding: the initial weights come from the seed
    if rank.world > 1:
        # Every process built the same initial weights; from here on each draws dropout masks of its
        # own (one generator state in all would give image j of every process's share the same mask).
        torch.manual_seed(process_seed(cfg.seed, rank.rank))
    if device.type == "cpu" and config.architecture == "cnn":
        # oneDNN's convolutions run ~1.7x faster on NHWC than on NCHW on CPU (measured here).
        model = model.to(memory_format=torch.channels_last)
    network = model  # what the steps run: the model, wrapped for DDP and compiled as asked
    if rank.world > 1:
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        check_compile(device)
        network = torch.compile(network)
    # The batch order, independent of model init: one stream, or one per network (network_batches own).
    own_batches = cfg.networks > 1 and cfg.network_batches == "own"
    generators = [torch.Generator().manual_seed(stream_seed(cfg.seed, k)) for k in range(cfg.networks if own_batches else 1)]
    train_images, train_labels = train["images"].to(device), train["labels"].to(device)
    streams = [Batches(train_images, train_labels, cfg.batch_size, cfg.drop_last, generator, rank)
               for generator in generators]
    batches = streams[0] if len(streams) == 1 else NetworkBatches(streams)
    # The augment stage records how many views follow the originals; a split straight from
    # preprocess has none.
    views = int(train.get("views", 0))
    originals = len(train["labels"]) // (views + 1)
    view_per_epoch = cfg.fresh_views and views > 0  # each epoch: the originals and one stored view of each
    on_the_fly = train.get("on_the_fly")  # augment.on_the_fly: the params to draw views with, or None

    def set_views(epoch: int) -> None:
        """The views each stream trains on in `epoch`: stream k (network k under network_batches own)
        the stored view k epochs further on, or views drawn from its own seed."""
        for k, stream in enumerate(streams):
            if view_per_epoch:
                stream.rows = epoch_rows(originals, views, epoch + k).to(device)
            if on_the_fly:
                stream.draw_view = view_drawer({**on_the_fly, "seed": stream_seed(on_the_fly["seed"], k)}, epoch, device)

    set_views(1)  # set per epoch below; here for len(): every epoch has as many images
    val_images, val_labels = val["images"].to(device), val["labels"].to(device)
    optimizer = make_optimizer(model, cfg)
    # use_buffers: BatchNorm's running statistics are averaged too, so the average is a model of its own.
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    total_steps = cfg.epochs * len(batches)
    lookahead = Lookahead(model, cfg.lookahead, total_steps) if cfg.lookahead else None
    state = TrainingState(model, optimizer, make_schedule(optimizer, cfg, total_steps), generators, average, lookahead)
    loss_of = make_loss(network, cfg, device)
    say = (lambda message: log(STAGE, message)) if rank.is_main else (lambda message: None)
    if view_per_epoch:  # the file holds 1 + views images per original, an epoch 2: count originals
        images = f"{originals:,} train images with {views} stored view{'s' * (views != 1)} of each"
    else:
        images = f"{len(train['labels']):,} train images"
    name = cfg.model if cfg.networks == 1 else (f"{cfg.networks} {cfg.model}s averaged, "
                                                 f"{'each on its own' if own_batches else 'on the same'} batches")
    say(f"{name}: {count_parameters(model):,} parameters; {images} and {len(val_labels):,} val images; "
        f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)} of {len(batches)} steps"
        + (", each over the originals and a view of each drawn on the fly" if on_the_fly else "")
        + (", each over the originals and one view of each" if view_per_epoch else "")
        + (f", each shared by {rank.world} processes" if rank.world > 1 else ""))
    train_log = train_log if train_log is not None else TrainLog()
    saved = load_checkpoint(checkpoint, run_id) if checkpoint else None
    if saved:
        state.load_state_dict(saved["training"])
        restore_global_generators(saved["generators"], device, rank)
        train_log.replay(saved["log"])
        say(f"resuming from {checkpoint} after epoch {saved['epoch']}")
    for epoch in range(len(train_log.epochs()) + 1, cfg.epochs + 1):
        start = time.perf_counter()
        set_views(epoch)
        # "training epoch", not "epoch": the line `train: epoch N/M: ...` says the epoch is done.
        progress = Progress(STAGE, f"training epoch {epoch}/{cfg.epochs}", len(batches), "steps", rate_unit="images",
                            rate_per_item=cfg.batch_size, after=(cfg.epochs - epoch) * len(batches)) if rank.is_main else None
        step_log = StepLog(train_log, (epoch - 1) * len(batches), step_log_interval(len(batches)), optimizer,
                           progress, rank.world)
        train_loss = train_epoch(state, batches, loss_of, step_log)
        if not math.isfinite(train_loss):  # the same all-reduced value in every process: all stop here
            if progress is not None:
                progress.close(summary=False)  # the error gets a line of its own
            raise diverged(epoch, "train", train_loss, cfg.lr)
        end_step = epoch * len(batches)
        rng_states = global_generators(device, rank) if checkpoint else None  # a collective: every process
        if not rank.is_main:
            train_log.log(end_step, {"epoch": epoch})  # keeps the epoch count; only rank 0's log is written
            continue
        progress.close(summary=False)
        val_loss, val_accuracy = score(model, val_images, val_labels)
        if not math.isfinite(val_loss):
            # The train loss is taken before each step's update, so a blow-up in the epoch's last
            # steps shows here first: weights still finite, but logits that overflow. (Under torchrun
            # the other processes are stopped by torchrun when this one fails.)
            raise diverged(epoch, "val", val_loss, cfg.lr)
        train_log.log(end_step, {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                                 "val_accuracy": round(val_accuracy, 6), "lr": round(float(step_log.used_lr), 9)})
        if checkpoint:  # rank 0 only: every process resumes from the one file
            save_checkpoint(checkpoint, run_id, train_log, state, rng_states)
        say(f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"val accuracy {100 * val_accuracy:.2f}% ({time.perf_counter() - start:.1f} s)")
    if average is not None and rank.is_main:
        # Scored again, not read from the log: it keeps 6 decimals, and a tie (2/3 logged as 0.666667)
        # would go to the last weights. Also right after a resume past the last epoch.
        _, last_accuracy = score(model, val_images, val_labels)
        model = pick_average(model, average.module, val_images, val_labels, last_accuracy, say)
    return model, config, train_log.epochs()


def diverged(epoch: int, split: str, loss: float, lr: float) -> PipelineError:
    return PipelineError(f"epoch {epoch}: the {split} loss is {loss}: training diverged; lower train.lr "
                         f"(now {lr:g}), rather than save a model that cannot classify")


def pick_average(model: nn.Module, averaged: nn.Module, val_images: torch.Tensor, val_labels: torch.Tensor,
                 model_accuracy: float, say: Callable[[str], None]) -> nn.Module:
    """The moving average of the weights if it scores at least as well on val as the weights of
    the last step, else those weights."""
    _, averaged_accuracy = score(averaged, val_images, val_labels)
    better = averaged_accuracy >= model_accuracy
    say(f"weight average (train.ema): val accuracy {100 * averaged_accuracy:.2f}% against "
        f"{100 * model_accuracy:.2f}%; saving {'the average' if better else 'the last weights'}")
    return averaged if better else model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages/run {STAGE}", description=__doc__.splitlines()[0])
    parser.add_argument("train_in", type=Path)
    parser.add_argument("val_in", type=Path)
    parser.add_argument("model_out", type=Path)
    parser.add_argument("live_dir", type=Path, help="DVCLive directory for the metrics (see stages/tracking.py)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="saved after every epoch and resumed from by a re-run with the same params "
                             "and inputs; removed once the model is written")
    args = parser.parse_args(argv)
    params = params_mod.load()
    cfg = params.train
    rank = rank_from_env()
    if cfg.processes > 1 and rank.world == 1:
        sys.exit(launch_torchrun(cfg.processes, sys.argv[1:] if argv is None else argv))
    device = resolve_device(cfg.device, rank.local_rank)
    if rank.world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # gloo: the CPU backend; nccl: the GPU one.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank.is_main:
        if cfg.device == "auto" and device.type == "cpu":
            log(STAGE, "device auto: no CUDA GPU available, training on the CPU")
        log(STAGE, f"device: {describe_device(device)}; precision {describe_precision(cfg.precision, device)}"
                   + (f"; crop {cfg.crop} pixels a side" if cfg.model == "cnn" else ""))
    train = load_tensors(args.train_in, required=("images", "labels", "classes", "mean", "std"))
    if tuple(train["classes"]) != params.dataset.classes:
        # The model file takes its class names from the data and its framing from the params: the
        # two must be of one dataset (DVC keeps them so; a stage run by hand may not).
        raise PipelineError(f"{args.train_in}: images of the classes {', '.join(map(str, train['classes']))}, but "
                            f"params.yaml's dataset is {params.dataset.name} ({', '.join(params.dataset.classes)}): "
                            "`dvc repro` prepares its splits first")
    val = load_tensors(args.val_in, required=("images", "labels"))
    start = time.perf_counter()
    computed = numerics(device, resolve_precision(cfg.precision, device))
    # Rank 0's alone counts (below), so only it reads and hashes the inputs and the code.
    run_id = fingerprint(cfg, computed, rank.world, args.train_in, args.val_in) if args.checkpoint and rank.is_main else ""
    if rank.world > 1:
        # Rank 0's, on every rank: all ranks must agree on resuming, even on unlike machines (or
        # checkouts that differ by a byte of code).
        shared = [computed, run_id]
        torch.distributed.broadcast_object_list(shared, src=0)
        computed, run_id = shared
    # Only rank 0 writes DVCLive files; a fresh log even on resume (fit replays the checkpoint's points).
    train_log = TrainLog(args.live_dir if rank.is_main else None)
    # Beside how it computed, what `auto` params resolved to: `dvc exp show` and `dvc params diff`
    # read params.yaml, where train.crop says "auto" whatever the dataset (precision is in `computed`).
    train_log.log_numerics({**computed, **({"crop": cfg.crop} if cfg.model == "cnn" else {})})
    model, config, _ = fit(cfg, train, val, device, args.checkpoint, run_id, rank, train_log)
    if rank.world > 1:
        torch.distributed.destroy_process_group()
    if not rank.is_main:
        return  # one run, one set of outputs: rank 0's
    log(STAGE, f"trained in {time.perf_counter() - start:.1f} s")
    save_model(args.model_out, model, config, train["classes"], params.dataset.framing)
    if args.checkpoint:
        args.checkpoint.unlink(missing_ok=True)


# Seconds torchrun gets to stop its workers after the terminal's Ctrl-C reached it, before SIGTERM.
TORCHRUN_STOP_S = 10.0


# What `python -m torch.distributed.run` runs, less its traceback and failure table when a worker
# fails: each worker has printed its one-line error (run_main), which they would bury. A worker
# killed by a signal (SIGKILL: out of memory) printed nothing, so that is said. Exits 1, as torchrun
# does. Source for `python -c`: the parent imports no more than torchrun does.
TORCHRUN = """
import sys
from torch.distributed import run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
try:
    run.run(run.parse_args(sys.argv[1:]))
except ChildFailedError as failed:
    rank, failure = failed.get_first_failure()
    if failure.exitcode < 0:
        print(f"train: error: worker {rank} was killed by {failure.signal_name()}", file=sys.stderr)
    sys.exit(1)
"""


def launch_torchrun(processes: int, argv: list[str]) -> int:
    """Re-runs this stage under torchrun, `processes` workers on this machine; its exit status.
    For several machines, run torchrun yourself (docs/reproducibility.md): the stage then trains as it is."""
    log(STAGE, f"train.processes = {processes}: launching torchrun")
    command = [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc-per-node={processes}",
               "-m", "stages.train", *argv]
    torchrun = subprocess.Popen(command)
    try:
        return torchrun.wait()
    except KeyboardInterrupt as exc:
        # torchrun's workers run in sessions of their own, so only torchrun can stop them: SIGTERM
        # makes it stop them and wait (subprocess.call's SIGKILL left them training). Ctrl-C on the
        # terminal reached torchrun too (our process group): a second signal in the middle of its
        # shutdown made a worker print a traceback, so then the stage gives it time to stop alone
        # (SIGINT from `kill` to this process only looks the same: torchrun then gets SIGTERM late).
        try:
            torchrun.wait(timeout=TORCHRUN_STOP_S if ctrl_c_reached_my_group(exc) else 0)
        except subprocess.TimeoutExpired:
            torchrun.terminate()
            torchrun.wait()
        raise


if __name__ == "__main__":
    run_main(STAGE, main, kept=INTERRUPTED_KEEPS)
