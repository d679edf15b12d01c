"""params.yaml, read once and validated into typed values.

Every key is required and typed: an unknown key or section, a wrong type or an out-of-range value
raises ParamsError naming the key and what it accepts. There are no silent defaults.

As a command (`python -m stages.params OUTPUT`) it is the pipeline's first stage: it tracks the
whole params.yaml and writes a constant marker file that every other stage depends on. DVC deletes
a stage's outputs before running it, so a check inside the train stage would come too late; this
stage fails first and leaves every previous output in place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from stages.common import NO_CUDA_GPU, PipelineError, check_compile, read_yaml, run_main, write_text_atomic
from stages.datasets import Dataset, credentials_problem, is_url, load_table
from stages.model_config import (MAX_CONVS_PER_BLOCK, MAX_HIDDEN_LAYERS, MAX_NETWORKS, Architecture, ModelConfig, Pool,
                                  Stem, feature_side, is_valid_crop, is_valid_network_count, is_whole, largest_crop)

DEFAULT_PATH = Path("params.yaml")
VALID_MARKER = "params.yaml is valid\n"


class ParamsError(PipelineError):
    def __init__(self, key: str, problem: str, source: str | Path = DEFAULT_PATH):
        super().__init__(f"{source}: {key}: {problem}")
        self.key = key
        self.problem = problem


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ParamsError(key, problem)


# numpy's and scikit-learn's generators take seeds below 2**32 only (torch's below 2**64), and a
# seed outside that range would fail inside a stage after DVC has deleted its outputs.
SEED_MAX = 2**32 - 1


# Upper bounds that keep a typo from failing inside train, after DVC has deleted its outputs, with
# a traceback: a rate or decay above float32's range overflows in the optimizer's update (no SGD or
# Adam rate this high trains: the presets use 0.001-0.3), and a width of 10**12 asks the allocator
# for terabytes. The widths allow 16x mlp-best's 1,024 and 8x the default CNN's widest block; the
# largest MLP they allow, 16 layers of 16,384, is 4.0G weights, which no 2-core machine trains
# either, but only a typo reaches that far.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 1.0
MAX_WIDTH = 16_384  # units of one MLP hidden layer
MAX_CHANNELS = 1_024  # of one CNN block
# Lookahead (stages.train.Lookahead) syncs its slow weights every this many optimizer steps, airbench's.
LOOKAHEAD_SYNC_STEPS = 5


def steps_per_epoch(images: int, batch_size: int, drop_last: bool, processes: int = 1) -> int:
    """Optimizer steps in an epoch of `images` images: the last, partial batch counts unless
    drop_last, and under torchrun a partial batch with fewer images than processes is skipped by
    all of them (each process must get an image: DDP). stages.train.Batches counts its epochs with it."""
    steps = images // batch_size if drop_last else -(-images // batch_size)
    partial = 0 if drop_last else images % batch_size
    return steps - 1 if 0 < partial < processes else steps


def _check_seed(key: str, seed: int) -> None:
    _require(0 <= seed <= SEED_MAX, key, f"must be between 0 and {SEED_MAX} (2**32 - 1), got {seed}")


def _refuse_mirroring(key: str, mirrors: bool, off: str, what: str, dataset: Dataset, allow_flip: bool) -> None:
    """The one rule for every use of mirror images (augment.flip, train.tta_flip): a mirrored digit
    is another digit, or none, so a dataset marked `flippable: false` refuses them unless
    augment.allow_flip says otherwise. `off` is the value that turns `key` off, `what` its action."""
    _require(not mirrors or dataset.flippable or allow_flip, key,
             f"{dataset.name} images change class when mirrored (datasets.yaml: flippable: false), so {what} "
             f"is refused; set {key} to {off}, or augment.allow_flip to true to flip anyway")


@dataclass(frozen=True)
class FetchParams:
    dataset: str
    # Base URLs per dataset, tried in order after $MNIST_MIRROR; each serves `<name>.gz`.
    mirrors: dict[str, list[str]]
    timeout_s: float  # seconds a connection attempt, or any one read, may wait; the window of fetch.MIN_RATE

    def check(self, table: dict[str, Dataset]) -> None:
        _require(self.dataset in table, "fetch.dataset", f"must be one of {_choices(table)}, got {self.dataset!r}")
        for name in self.mirrors:
            _require(name in table, f"fetch.mirrors.{name}",
                     f"not a dataset of stages/datasets.yaml ({_choices(table)})")
        key = f"fetch.mirrors.{self.dataset}"
        _require(self.dataset in self.mirrors, key, "missing: list the base URLs to fetch this dataset from")
        _require(len(self.mirrors[self.dataset]) > 0, key, "must list at least one base URL")
        for name, mirrors in self.mirrors.items():
            for index, mirror in enumerate(mirrors):
                # A URL without its scheme (storage.googleapis.com/...) would be read as a relative
                # directory, and one that is relative breaks where DVC runs stages in a copy.
                _require(is_url(mirror) or Path(mirror).is_absolute(), f"fetch.mirrors.{name}[{index}]",
                         f"must be a base URL (https://...) or an absolute directory, got {mirror!r}")
                problem = credentials_problem(mirror)
                _require(problem is None, f"fetch.mirrors.{name}[{index}]", problem or "")
        # An hour: far beyond any useful wait, and far below what a socket's timer can hold.
        _require(0 < self.timeout_s <= 3600, "fetch.timeout_s",
                 f"must be > 0 and at most 3600 seconds, got {self.timeout_s}")


@dataclass(frozen=True)
class PreprocessParams:
    val_size: int  # images held out of the official training set for validation
    seed: int

    def check(self, dataset: Dataset) -> None:
        n, k = dataset.train_count, len(dataset.classes)
        # A stratified split needs at least one image per class on each side.
        _require(k <= self.val_size <= n - k, "preprocess.val_size",
                 f"must be between {k} and {n - k} (the {dataset.name} training set has {n} images), "
                 f"got {self.val_size}")
        _check_seed("preprocess.seed", self.seed)


@dataclass(frozen=True)
class AugmentParams:
    copies: int  # randomly transformed copies of the train split added to it; 0 = pass through
    # true: no views stored (copies must be 0); train draws a fresh view of every image each epoch,
    # batch by batch, with the transform below (stages.views.view_drawer)
    on_the_fly: bool
    rotation_deg: float  # each copy is rotated by U(-rotation_deg, rotation_deg) degrees
    translate: float  # and shifted by U(-translate, translate) of the image side, per axis
    scale_min: float  # and scaled by U(scale_min, scale_max)
    scale_max: float
    # and, when elastic_alpha > 0, displaced by an elastic field (Simard et al. 2003): per pixel and
    # axis U(-1, 1), smoothed by a Gaussian of elastic_sigma pixels, times elastic_alpha pixels.
    # Sampled once, with the affine warp.
    elastic_alpha: float
    elastic_sigma: float
    pad: int  # then shifted by whole pixels, U{-pad..pad} per axis (zero-pad, crop back); 0 = off
    flip: float  # then mirrored left-right with this probability; 0 = off
    allow_flip: bool  # true: flip even a dataset that datasets.yaml marks `flippable: false`
    erase: float  # then, with this probability, a black square is erased; 0 = off
    erase_area_min: float  # its area is U(erase_area_min, erase_area_max) of the image's
    erase_area_max: float
    seed: int

    def check(self, dataset: Dataset) -> None:
        _require(0 <= self.copies <= 50, "augment.copies", f"must be between 0 and 50, got {self.copies}")
        _require(not (self.on_the_fly and self.copies), "augment.copies",
                 f"must be 0 with augment.on_the_fly: true (train draws the views; stored ones would go unused), "
                 f"got {self.copies}")
        _require(0 <= self.rotation_deg <= 180, "augment.rotation_deg",
                 f"must be between 0 and 180 degrees, got {self.rotation_deg}")
        _require(0 <= self.translate <= 0.5, "augment.translate",
                 f"must be between 0 and 0.5 (a fraction of the image side), got {self.translate}")
        _require(0 < self.scale_min <= 4, "augment.scale_min", f"must be in (0, 4], got {self.scale_min}")
        _require(self.scale_min <= self.scale_max <= 4, "augment.scale_max",
                 f"must be between scale_min ({self.scale_min}) and 4, got {self.scale_max}")
        _require(0 <= self.elastic_alpha <= 100, "augment.elastic_alpha",
                 f"must be between 0 (off) and 100 (pixels per unit of the smoothed field), got {self.elastic_alpha}")
        _require(0.5 <= self.elastic_sigma <= dataset.image_size / 2, "augment.elastic_sigma",
                 f"must be between 0.5 and {dataset.image_size / 2:g} pixels (half the image side), "
                 f"got {self.elastic_sigma}")
        _require(0 <= self.pad <= dataset.image_size // 2, "augment.pad",
                 f"must be between 0 and {dataset.image_size // 2} pixels (half the image side), got {self.pad}")
        _require(0 <= self.flip <= 1, "augment.flip", f"must be a probability in [0, 1], got {self.flip}")
        _refuse_mirroring("augment.flip", self.flip > 0, "0", "flipping", dataset, self.allow_flip)
        _require(0 <= self.erase <= 1, "augment.erase", f"must be a probability in [0, 1], got {self.erase}")
        _require(0 < self.erase_area_min <= 1, "augment.erase_area_min",
                 f"must be in (0, 1] (a fraction of the image area), got {self.erase_area_min}")
        _require(self.erase_area_min <= self.erase_area_max <= 1, "augment.erase_area_max",
                 f"must be between erase_area_min ({self.erase_area_min}) and 1, got {self.erase_area_max}")
        _check_seed("augment.seed", self.seed)


@dataclass(frozen=True)
class TrainParams:
    model: Architecture  # the architectures are listed once, in stages.model_config
    hidden: list[int]  # mlp: hidden layer widths, input to output
    dropout: float  # mlp: dropout probability after each hidden layer
    channels: list[int]  # cnn: output channels of its three conv blocks
    convs_per_block: int  # cnn: 3x3 convs in each block
    pool: Pool  # cnn: each block's max-pool after its last ReLU, or right after its first conv
    stem: Stem  # cnn: the first block halves the image by its max-pool, or by a stride-2 first conv
    # cnn: pixels cut off each side of the image before the first conv; 0 = none. 'auto' is the
    # dataset's `crop` (stages/datasets.yaml); parse resolves it, so parsed params hold an int.
    crop: int | Literal["auto"]
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float  # onecycle: the peak; cosine: the start; constant: the rate throughout
    momentum: float  # sgd only
    nesterov: bool  # sgd only
    weight_decay: float
    # Which parameters weight_decay shrinks: "all"; "weights", those of two or more dimensions only:
    # the conv and linear weight matrices (BatchNorm's scales and shifts, and every bias, get none:
    # stages.train.parameter_groups). No effect with weight_decay 0.
    weight_decay_on: Literal["all", "weights"]
    schedule: Literal["constant", "onecycle", "cosine"]
    warmup: float  # onecycle: fraction of all steps spent rising to lr
    label_smoothing: float
    batch_size: int
    drop_last: bool
    epochs: int
    # With augment.copies = K views stored after the originals: false trains every epoch on the
    # originals and all K views; true on the originals and view ((epoch - 1) mod K) + 1 only, so that
    # each epoch sees freshly drawn views at the cost of one. No effect without views (copies 0),
    # and none with one view (both mean originals + view 1 every epoch).
    fresh_views: bool
    # Decay per step of an exponential moving average of the weights (and BatchNorm statistics),
    # e.g. 0.999; 0 = off. When on, the average is scored on val after the last epoch and saved
    # as the model if its val accuracy is at least the raw weights'.
    ema: float
    # Lookahead (stages.train.Lookahead): the largest fraction of the slow weights a sync every 5
    # steps keeps, reached at the end of the run; 0 = off. airbench uses 0.95^5 = 0.774. A run
    # needs at least 5 steps in all (parse checks it: one sync).
    lookahead: float
    # Test-time augmentation, stored in the model (stages.model_config): in eval mode its logits are
    # averaged over the image, its mirror image (tta_flip) and its shifts by tta_shift pixels in the
    # four directions (0 = none). Val scoring during training sees it too, so choices made on val
    # include it. Costs 1 + tta_flip + 4 * (tta_shift > 0) forward passes per image when scoring.
    tta_flip: bool
    tta_shift: int
    # Networks of this config trained side by side, each from its own initial weights (each on its
    # own loss: the step costs `networks` single steps); the model averages their logits. 1: a
    # single network.
    networks: int
    # With networks > 1: "shared", every network trains on the same batches and views; "own", each
    # draws its own batch order (stages.train.NetworkBatches) and takes the stored views in an order
    # of its own (network k: view epoch + k), or draws views on the fly from its own seed (a draw
    # per network each step). The first network trains on the single run's batches either way.
    network_batches: Literal["shared", "own"]
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    # bf16 autocast, or fp32; auto: bf16 on a CPU where bf16 trains faster (AMX, or AVX512_BF16 on
    # AMD: the CNN 1.3-1.9x on a Zen 4 EPYC); fp32 elsewhere: emulated bf16, Intel's AVX512_BF16
    # without AMX (1.4-1.6x slower than fp32 on a Xeon), and GPUs (no faster on an H200).
    # stages.runtime.resolve_precision decides; train logs the outcome.
    precision: Literal["fp32", "bf16", "auto"]
    compile: bool  # torch.compile the model
    deterministic: bool  # forbid nondeterministic CUDA kernels (CPU is deterministic regardless)
    processes: int  # > 1: the stage relaunches itself under torchrun, one process per shard (DDP)

    def check(self, train_split_size: int, image_size: int) -> None:
        _require(is_valid_crop(self.crop, image_size), "train.crop",
                 f"must be 'auto' (the dataset's, datasets.yaml) or between 0 and {largest_crop(image_size)} "
                 f"pixels (the CNN needs at least 8x8 of the {image_size}x{image_size} image), got {self.crop}")
        if self.model == "cnn" and self.pool == "early" and feature_side(image_size, self.crop, self.stem) == 1:
            # Pooled first, the last block's BatchNorm then normalises one value per channel and
            # image: a batch of one image (the last, partial one of an epoch can be) stops training
            # with PyTorch's "Expected more than 1 value per channel when training".
            fits = [crop for crop in range(largest_crop(image_size) + 1) if feature_side(image_size, crop, self.stem) > 1]
            smaller = f"a crop of at most {fits[-1]} or " if fits else ""
            raise ParamsError("train.crop", f"{self.crop} leaves the CNN's last block 1x1 pixels with train.pool: early, "
                              f"where BatchNorm cannot train on a batch of one image: use {smaller}train.pool: end")
        _require(all(1 <= h <= MAX_WIDTH for h in self.hidden) and len(self.hidden) <= MAX_HIDDEN_LAYERS,
                 "train.hidden", f"must be at most {MAX_HIDDEN_LAYERS} hidden sizes, each a positive integer "
                 f"up to {MAX_WIDTH:,}, got {self.hidden}")
        _require(self.model != "mlp" or len(self.hidden) > 0, "train.hidden",
                 "must list at least one hidden size for model 'mlp' (use model 'softmax' for none)")
        _require(0 <= self.dropout < 1, "train.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(len(self.channels) == 3 and all(1 <= c <= MAX_CHANNELS for c in self.channels), "train.channels",
                 f"must be three positive integers up to {MAX_CHANNELS:,} (one per conv block), got {self.channels}")
        _require(1 <= self.convs_per_block <= MAX_CONVS_PER_BLOCK, "train.convs_per_block",
                 f"must be between 1 and {MAX_CONVS_PER_BLOCK}, got {self.convs_per_block}")
        _require(0 < self.lr <= MAX_LR, "train.lr", f"must be > 0 and at most {MAX_LR:g}, got {self.lr}")
        _require(0 <= self.momentum < 1, "train.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.optimizer != "sgd" or not self.nesterov or self.momentum > 0, "train.nesterov",
                 "needs momentum > 0 (with optimizer sgd)")
        _require(0 <= self.weight_decay <= MAX_WEIGHT_DECAY, "train.weight_decay",
                 f"must be between 0 and {MAX_WEIGHT_DECAY:g}, got {self.weight_decay}")
        _require(0 <= self.warmup < 1, "train.warmup", f"must be in [0, 1), got {self.warmup}")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing",
                 f"must be in [0, 1), got {self.label_smoothing}")
        _require(1 <= self.batch_size <= train_split_size, "train.batch_size",
                 f"must be between 1 and the train split size ({train_split_size}), got {self.batch_size}")
        _require(1 <= self.epochs <= 1000, "train.epochs", f"must be between 1 and 1000, got {self.epochs}")
        _require(self.ema == 0 or 0.5 <= self.ema < 1, "train.ema",
                 f"must be 0 (off) or in [0.5, 1) (decay per step), got {self.ema}")
        _require(0 <= self.lookahead < 1, "train.lookahead",
                 f"must be 0 (off) or in (0, 1) (decay per sync), got {self.lookahead}")
        _require(0 <= self.tta_shift <= 2, "train.tta_shift", f"must be 0 (off), 1 or 2 pixels, got {self.tta_shift}")
        _require(is_valid_network_count(self.networks), "train.networks",
                 f"must be between 1 and {MAX_NETWORKS}, got {self.networks}")
        _check_seed("train.seed", self.seed)
        _require(1 <= self.processes <= 64, "train.processes", f"must be between 1 and 64, got {self.processes}")
        _require(self.batch_size >= self.processes, "train.batch_size",
                 f"must be at least train.processes ({self.processes}): each process takes a share "
                 f"of every batch, got {self.batch_size}")

    def model_config(self, image_size: int, num_classes: int, mean: float, std: float) -> ModelConfig:
        """The network these params describe, for images of the train split (side, class count, and
        pixel mean and std in [0, 1] units). The cnn-only crop is 0 for the other models, which take
        the whole image (like the other cnn-only params, train.crop does not apply to them)."""
        return ModelConfig(architecture=self.model, hidden=tuple(self.hidden), dropout=self.dropout,
                           channels=tuple(self.channels), convs_per_block=self.convs_per_block, pool=self.pool,
                           image_size=image_size, num_classes=num_classes, mean=mean, std=std,
                           tta_flip=self.tta_flip, tta_shift=self.tta_shift, stem=self.stem,
                           crop=self.crop if self.model == "cnn" else 0, networks=self.networks)


@dataclass(frozen=True)
class EvaluateParams:
    # Images per forward pass: memory, and the logits' last bits only (oneDNN may pick other kernels
    # for another batch: at batch 1 the committed model's test logits moved by up to 3e-6 against
    # batch 1000, at 137 and 500 not at all; no prediction changed).
    batch_size: int

    def check(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class PlotParams:
    misclassified: int  # test images shown in the misclassified grid

    def check(self) -> None:
        _require(0 <= self.misclassified <= 400, "plot.misclassified",
                 f"must be between 0 and 400, got {self.misclassified}")


@dataclass(frozen=True)
class Params:
    fetch: FetchParams
    preprocess: PreprocessParams
    augment: AugmentParams
    train: TrainParams
    evaluate: EvaluateParams
    plot: PlotParams

    @functools.cached_property
    def dataset(self) -> Dataset:
        """fetch.dataset's entry of stages/datasets.yaml, read on first use (parse checked it)."""
        return load_table()[self.fetch.dataset]


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def _as_yaml(value: Any) -> str:
    """A value as params.yaml spells it, for an error message: true, false and null rather than
    Python's True, False and None; strings quoted, so that a number read as text shows as one.
    Bounded, as the messages are built before their checks: YAML's aliases nest a list in itself,
    ten lines making 10**10 items. At most 32 list items and mapping entries in all."""
    return _yaml_text(value, [32])


def _yaml_text(value: Any, items_left: list[int]) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (list, dict)):
        shown = []
        for entry in value.items() if isinstance(value, dict) else value:
            if items_left[0] == 0:
                shown.append("...")
                break
            items_left[0] -= 1
            shown.append(f"{_yaml_text(entry[0], items_left)}: {_yaml_text(entry[1], items_left)}"
                         if isinstance(value, dict) else _yaml_text(entry, items_left))
        return ("{%s}" if isinstance(value, dict) else "[%s]") % ", ".join(shown)
    return repr(value)


def _describe(hint: Any) -> str:
    """What an annotation accepts, in words, for an option of a union's error message."""
    if get_origin(hint) is Literal:
        return _choices(get_args(hint))
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint not in words:
        raise TypeError(f"unsupported union option {hint!r}")  # a bug in this module, not in params
    return words[hint]


def _convert(key: str, value: Any, hint: Any) -> Any:
    """Checks `value` against the annotation `hint`; returns it typed (ints accepted as floats)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):  # int | Literal["auto"]: the first option that takes the value
        for option in get_args(hint):
            try:
                return _convert(key, value, option)
            except ParamsError:
                pass
        raise ParamsError(key, f"must be {' or '.join(_describe(option) for option in get_args(hint))}, got {_as_yaml(value)}")
    if origin is Literal:
        _require(value in get_args(hint), key, f"must be one of {_choices(get_args(hint))}, got {_as_yaml(value)}")
        return value
    if hint is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {_as_yaml(value)}")
        return value
    if hint is int:
        _require(is_whole(value), key, f"must be an integer, got {_as_yaml(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:  # a number in quotes, one YAML does not read as a number (.5e0), or nan without its dot
                raise ParamsError(key, f"must be a finite number, got the string {value!r}"
                                       + ("; write a plain number, without quotes: 0.001 or 1e-3"
                                          if math.isfinite(number) else ""))
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"must be a number, got {_as_yaml(value)}")
        # An integer too large for a float (10**400) would raise OverflowError below, not this.
        _require(isinstance(value, float) or abs(value) < 2**1023, key,
                 "must be a finite number, got an integer too large for a float")
        _require(math.isfinite(value), key, f"must be a finite number, got {_as_yaml(value)}")
        return float(value)
    if hint is str:
        _require(isinstance(value, str), key, f"must be a string, got {_as_yaml(value)}")
        return value
    if origin is list:
        _require(isinstance(value, list), key, f"must be a list, got {_as_yaml(value)}")
        (item_hint,) = get_args(hint)
        return [_convert(f"{key}[{i}]", item, item_hint) for i, item in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict), key, f"must be a mapping, got {_as_yaml(value)}")
        key_hint, item_hint = get_args(hint)
        return {_convert(key, k, key_hint): _convert(f"{key}.{k}", v, item_hint) for k, v in value.items()}
    raise TypeError(f"unsupported annotation {hint!r} for {key}")  # a bug in this module, not in params


def _build(cls: type, key: str, raw: Any) -> Any:
    _require(isinstance(raw, dict), key, f"must be a mapping, got {_as_yaml(raw)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in raw:
        _require(name in hints, f"{key}.{name}" if key else str(name),
                 f"unknown {'key' if key else 'section'}; {key or 'params.yaml'} takes: {', '.join(names)}")
    for name in names:
        _require(name in raw, f"{key}.{name}" if key else name, "missing")
    return cls(**{n: _convert(f"{key}.{n}", raw[n], hints[n]) if key else raw[n] for n in names})


def parse(raw: Any) -> Params:
    """Validates the parsed YAML of params.yaml and returns it typed; raises ParamsError."""
    _require(isinstance(raw, dict), "(top level)", "must be a mapping of sections")
    sections = _build(Params, "", raw)  # checks section names only
    params = Params(**{f.name: _build(get_type_hints(Params)[f.name], f.name, getattr(sections, f.name))
                       for f in dataclasses.fields(Params)})
    table = load_table()
    params.fetch.check(table)
    dataset = table[params.fetch.dataset]
    params.preprocess.check(dataset)
    params.augment.check(dataset)
    if params.train.crop == "auto":  # the crop the dataset's border allows (datasets.yaml)
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, crop=dataset.crop))
    train_split_size = dataset.train_count - params.preprocess.val_size
    params.train.check(train_split_size=train_split_size, image_size=dataset.image_size)
    _check_lookahead_steps(params, train_split_size)
    # Across sections: augment.allow_flip also allows mirror images at test time.
    _refuse_mirroring("train.tta_flip", params.train.tta_flip, "false", "averaging over mirror images", dataset,
                      params.augment.allow_flip)
    params.evaluate.check()
    params.plot.check()
    return params


def images_per_epoch(train_split_size: int, augment: AugmentParams, fresh_views: bool) -> int:
    """Images a training epoch covers: the train split, with one view of each (drawn on the fly, or
    a stored one in turn under train.fresh_views) or all augment.copies stored views of each."""
    one_view = augment.on_the_fly or (augment.copies > 0 and fresh_views)
    return train_split_size * (2 if one_view else 1 + augment.copies)


def _check_lookahead_steps(params: Params, train_split_size: int) -> None:
    """Lookahead in a run too short for one sync would leave the model as its initial weights (its
    slow copy): refused here, not inside train after DVC has deleted the last model."""
    train = params.train
    if not train.lookahead:
        return
    images = images_per_epoch(train_split_size, params.augment, train.fresh_views)
    steps = train.epochs * steps_per_epoch(images, train.batch_size, train.drop_last, train.processes)
    _require(steps >= LOOKAHEAD_SYNC_STEPS, "train.lookahead",
             f"syncs every {LOOKAHEAD_SYNC_STEPS} steps, and this run has {steps} (train.epochs times the steps of "
             f"an epoch: {images:,} images in batches of train.batch_size); train longer or set it to 0")


def load_raw(path: Path | str = DEFAULT_PATH) -> Any:
    """The YAML of params file `path`, not yet validated (presets are applied to it first)."""
    return read_yaml(path, "the params file")


def load(path: Path | str = DEFAULT_PATH) -> Params:
    raw = load_raw(path)
    with errors_naming(path):
        return parse(raw)


@contextlib.contextmanager
def errors_naming(path: Path | str) -> Iterator[None]:
    """ParamsErrors raised inside name `path` (they name params.yaml: the params stage's --params may
    name another file)."""
    try:
        yield
    except ParamsError as exc:
        if Path(path) == DEFAULT_PATH:
            raise
        raise ParamsError(exc.key, exc.problem, source=path) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stages/run params",
                                     description="Validate params.yaml and write a marker file.")
    parser.add_argument("marker", type=Path, help="file to write when params.yaml is valid")
    parser.add_argument("--params", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    params = load(args.params)
    # Checked here, not only by train: DVC deletes the last run's model before running train.
    # torch is imported only for this check: importing it costs 1.5-2 s of a 2-core CPU, and this
    # stage (like fetch, which imports this module) otherwise has no use for it.
    with errors_naming(args.params):
        if params.train.device == "cuda" or (params.train.device == "auto" and params.train.processes > 1):
            check_gpus(params.train)
        if params.train.compile:
            check_compile_toolchain(params.train)
    write_text_atomic(args.marker, VALID_MARKER)


def check_gpus(train: TrainParams) -> None:
    """What params.yaml asks of this machine's GPUs: `cuda` needs one, and on GPUs every process
    needs its own (NCCL refuses two processes on one GPU, mid-run, after DVC has deleted the model)."""
    import torch

    if train.device == "cuda":
        _require(torch.cuda.is_available(), "train.device", NO_CUDA_GPU)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpus = gpus > 0 and train.device in ("cuda", "auto")
    _require(not on_gpus or train.processes <= gpus, "train.processes",
             f"{train.processes} processes, but this machine has {gpus} CUDA GPU(s) and NCCL runs one process a GPU; "
             f"use at most {gpus}, or train.device: cpu")


def check_compile_toolchain(train: TrainParams) -> None:
    """train.compile: true needs a C++ compiler (CPU) or Triton (GPU) on the device train will use
    (stages.runtime.resolve_device's rule: auto is the GPU when there is one): checked here too, for
    the same reason as check_gpus."""
    import torch

    on_gpu = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    check_compile(torch.device("cuda" if on_gpu else "cpu"))


if __name__ == "__main__":
    run_main("params", main)
