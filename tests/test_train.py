"""stages.train: fit() on tiny synthetic data, in process: learning, determinism, resume, schedules."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import stages.train as train_mod
from stages.common import PipelineError, run_main
from stages import params as params_mod
from stages.params import AugmentParams, parse, steps_per_epoch
import stages.runtime as runtime_mod
from stages.augment import augmented_split
from stages.runtime import Rank, resolve_precision, retain_freed_memory, seed_everything
from stages.models import Ensemble, build_model
from stages.train import (Batches, Lookahead, NetworkBatches, epoch_rows, fit, make_optimizer, make_schedule,
                          stream_seed)
from tests.conftest import PROJECT_ROOT
from tests.synthetic import make_split

TRAIN = parse(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())).train
CLASSES = [str(k) for k in range(10)]
# A small CNN and a small MLP on Adam: the two optimizer families the presets use.
SMALL_CNN = dataclasses.replace(TRAIN, model="cnn", channels=[4, 8, 16], epochs=2, batch_size=32, device="cpu")
SMALL_CNN_POOL_EARLY = dataclasses.replace(SMALL_CNN, pool="early")
SMALL_MLP = dataclasses.replace(TRAIN, model="mlp", hidden=[32], optimizer="adam", lr=0.01, schedule="constant",
                                epochs=2, batch_size=32, device="cpu")
SMALL_CNN_FRESH_VIEWS = dataclasses.replace(SMALL_CNN_POOL_EARLY, fresh_views=True, epochs=3)
SMALL_CNN_EMA = dataclasses.replace(SMALL_CNN, ema=0.9)
# Batches of 30: 11 steps an epoch, so the checkpoint after epoch 1 falls between two syncs, when the
# weights and the slow copy differ and both must be restored.
SMALL_CNN_LOOKAHEAD = dataclasses.replace(SMALL_CNN, lookahead=0.77, batch_size=30)
SMALL_CNN_ENSEMBLE = dataclasses.replace(SMALL_CNN, networks=2)
SMALL_CNN_DECAY_WEIGHTS = dataclasses.replace(SMALL_CNN, weight_decay_on="weights")  # two parameter groups
# Two networks, each on its own batch order and views (stored or drawn on the fly), for 3 epochs.
SMALL_CNN_OWN_BATCHES = dataclasses.replace(SMALL_CNN_FRESH_VIEWS, networks=2, network_batches="own")
# Each precision named: `auto` (TRAIN's) resolves by the CPU, so that neither branch would run on every CPU.
SMALL_CNN_FP32 = dataclasses.replace(SMALL_CNN, precision="fp32")
SMALL_CNN_BF16 = dataclasses.replace(SMALL_CNN, precision="bf16")
CPU = torch.device("cpu")


def split(n: int, seed: int) -> dict:
    images, labels = make_split(n, np.random.default_rng(seed))
    return {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels.astype(np.int64)),
            "classes": CLASSES, "mean": float(images.mean() / 255), "std": float(images.std() / 255)}


@pytest.fixture(scope="module")
def data() -> tuple[dict, dict]:
    return split(320, seed=1), split(100, seed=2)


@pytest.fixture(scope="module")
def views_data(data) -> tuple[dict, dict]:
    """The train split as the augment stage writes it with two views, and val."""
    train, val = data
    views = AugmentParams(copies=2, on_the_fly=False, rotation_deg=10.0, translate=0.1, scale_min=0.9, scale_max=1.1,
                          elastic_alpha=0.0, elastic_sigma=4.0, pad=0, flip=0.0,
                          allow_flip=False, erase=0.0, erase_area_min=0.02, erase_area_max=0.25, seed=0)
    return augmented_split(train, views), val


@pytest.fixture(scope="module")
def on_the_fly_data(data) -> tuple[dict, dict]:
    """The train split as the augment stage writes it with augment.on_the_fly (no views stored, the
    recipe to draw them with), and val."""
    train, val = data
    recipe = AugmentParams(copies=0, on_the_fly=True, rotation_deg=10.0, translate=0.1, scale_min=0.9, scale_max=1.1,
                           elastic_alpha=0.0, elastic_sigma=4.0, pad=0, flip=0.0,
                           allow_flip=False, erase=0.0, erase_area_min=0.02, erase_area_max=0.25, seed=0)
    return augmented_split(train, recipe), val


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def count_steps_per_epoch(monkeypatch) -> list[int]:
    """A list that each epoch of fit() appends its number of steps to, from now on."""
    seen: list[int] = []
    real_train_epoch = train_mod.train_epoch

    def counting(state, batches, loss_of, after_step=None):
        seen.append(len(batches))
        return real_train_epoch(state, batches, loss_of, after_step)

    monkeypatch.setattr(train_mod, "train_epoch", counting)
    return seen


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("cfg", [SMALL_CNN, SMALL_CNN_POOL_EARLY, SMALL_MLP, SMALL_CNN_ENSEMBLE, SMALL_CNN_OWN_BATCHES,
                                 SMALL_CNN_FP32, SMALL_CNN_BF16],
                         ids=["cnn-sgd", "cnn-pool-early", "mlp-adam", "cnn-ensemble", "cnn-ensemble-own-batches",
                              "cnn-fp32", "cnn-bf16"])
def test_fit_learns_and_is_bit_identical_when_repeated(data, cfg):
    train, val = data
    model_a, config, rows_a = fit(cfg, train, val, CPU)
    model_b, _, rows_b = fit(cfg, train, val, CPU)
    assert [row["epoch"] for row in rows_a] == list(range(1, cfg.epochs + 1))
    assert rows_a[-1]["val_accuracy"] >= 0.9  # the synthetic classes are trivially separable
    assert rows_a == rows_b
    assert_same_weights(weights(model_a), weights(model_b))
    assert config.architecture == cfg.model


def test_bf16_on_the_cpu_computes_in_bf16(data):
    """train.precision bf16 autocasts on the CPU too (what `auto` picks on CPUs where it pays): the
    weights it ends with are not fp32's, and both learn."""
    train, val = data
    (fp32, _, rows_fp32), (bf16, _, rows_bf16) = (fit(cfg, train, val, CPU) for cfg in (SMALL_CNN_FP32, SMALL_CNN_BF16))
    assert rows_fp32[-1]["val_accuracy"] >= 0.9 and rows_bf16[-1]["val_accuracy"] >= 0.9
    assert rows_fp32[-1]["train_loss"] != rows_bf16[-1]["train_loss"]
    assert any(not torch.equal(a, b) for a, b in zip(weights(fp32).values(), weights(bf16).values()))


@pytest.mark.parametrize("network_batches", ["shared", "own"])
@pytest.mark.parametrize("cfg, dataset", [(SMALL_CNN, "data"), (SMALL_MLP, "data"), (SMALL_CNN_FRESH_VIEWS, "views_data"),
                                          (SMALL_CNN_FRESH_VIEWS, "on_the_fly_data")],
                         ids=["cnn-sgd", "mlp-adam", "cnn-fresh-views", "cnn-on-the-fly"])
def test_each_network_of_an_ensemble_trains_as_it_would_alone(request, cfg, dataset, network_batches):
    """train.networks 3: the first network starts from the single run's weights (drawn first) and
    sees the same batches and views (network_batches own too: its stream is the single run's), and
    the summed loss gives it its own gradient, so it ends bit-identical to the single run's network;
    the others, drawn after it, end elsewhere. The saved model averages them. (Without dropout, as
    here: with it the networks share the global generator's masks.)"""
    train, val = request.getfixturevalue(dataset)
    alone, _, _ = fit(cfg, train, val, CPU)
    ensemble, config, rows = fit(dataclasses.replace(cfg, networks=3, network_batches=network_batches), train, val, CPU)
    assert config.networks == 3 and len(ensemble.networks) == 3
    assert_same_weights(weights(ensemble.networks[0]), weights(alone))
    output_layer = [name for name, _ in alone.named_parameters()][-1]
    assert not torch.equal(ensemble.networks[1].get_parameter(output_layer), alone.get_parameter(output_layer))
    assert rows[-1]["val_accuracy"] >= 0.9
    with torch.no_grad():
        each = torch.stack([network.eval()(val["images"]) for network in ensemble.networks])
        assert torch.allclose(ensemble.eval()(val["images"]), each.mean(0))


def test_network_batches_stack_a_batch_per_network_each_in_its_own_order():
    """network_batches own: a step gives network k the batch of stream k, [networks, B, H, W] with
    labels [networks, B]; stream 0 is the single run's (the run's seed), and each stream covers
    the split once per epoch in an order of its own."""
    ids = torch.arange(10, dtype=torch.uint8)[:, None, None]  # [N, 1, 1] "images" that name themselves

    def stream(network: int) -> Batches:
        return Batches(ids, torch.arange(10), 4, False, torch.Generator().manual_seed(stream_seed(5, network)))

    alone = list(Batches(ids, torch.arange(10), 4, False, torch.Generator().manual_seed(5)))
    together = NetworkBatches([stream(k) for k in range(3)])
    epoch = list(together)
    assert len(together) == len(epoch) == len(alone) == steps_per_epoch(10, 4, False)
    for (images, labels), (first_images, first_labels) in zip(epoch, alone):
        assert images.shape == (3, len(first_labels), 1, 1) and labels.shape == (3, len(first_labels))
        assert torch.equal(images[0], first_images) and torch.equal(labels[0], first_labels)
        assert torch.equal(images.flatten(1).long(), labels)  # each image beside its own label
    orders = [torch.cat([labels[k] for _, labels in epoch]).tolist() for k in range(3)]
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    assert len({stream_seed(seed, k) for seed in (0, 1, 2**32 - 1) for k in range(16)}) == 48


def test_own_batches_give_each_network_its_own_views(views_data, on_the_fly_data, monkeypatch):
    """network_batches own: in epoch e network k trains on the stored view e + k (in turn), or on
    views drawn from its own seed; with shared batches every network on the first one's."""
    seen: list[list] = []
    real_train_epoch, real_view_drawer = train_mod.train_epoch, train_mod.view_drawer

    def recording(state, batches, loss_of, after_step=None):
        streams = batches.streams if isinstance(batches, NetworkBatches) else [batches]
        seen.append([stream.rows.tolist() if stream.rows is not None else stream.draw_view.seed for stream in streams])
        return real_train_epoch(state, batches, loss_of, after_step)

    def drawer_with_its_seed(recipe, epoch, device):
        draw = real_view_drawer(recipe, epoch, device)
        draw.seed = (recipe["seed"], epoch)
        return draw

    monkeypatch.setattr(train_mod, "train_epoch", recording)
    monkeypatch.setattr(train_mod, "view_drawer", drawer_with_its_seed)
    fit(SMALL_CNN_OWN_BATCHES, *views_data, CPU)
    fit(dataclasses.replace(SMALL_CNN_OWN_BATCHES, network_batches="shared"), *views_data, CPU)
    fit(SMALL_CNN_OWN_BATCHES, *on_the_fly_data, CPU)
    n, seed = len(views_data[0]["labels"]) // 3, on_the_fly_data[0]["on_the_fly"]["seed"]
    stored = [[epoch_rows(n, 2, e).tolist(), epoch_rows(n, 2, e + 1).tolist()] for e in (1, 2, 3)]
    shared = [[epoch_rows(n, 2, e).tolist()] for e in (1, 2, 3)]
    drawn = [[(seed, e), (stream_seed(seed, 1), e)] for e in (1, 2, 3)]
    assert seen == stored + shared + drawn


def test_each_network_is_scored_against_the_labels_of_its_own_batch(data):
    """network_batches own: the loss is the sum over networks of network k's cross-entropy on batch
    k against batch k's labels (not the first batch's)."""
    train, _ = data
    cfg = dataclasses.replace(SMALL_MLP, networks=2, network_batches="own", precision="fp32")
    torch.manual_seed(0)
    ensemble = build_model(cfg.model_config(28, 10, train["mean"], train["std"])).train()
    images, labels = train["images"][:32], train["labels"][:32]
    batches, targets = torch.stack([images, images.flip(0)]), torch.stack([labels, labels.roll(1)])
    loss = train_mod.make_loss(ensemble, cfg, CPU)(batches, targets)
    with torch.no_grad():
        expected = sum(torch.nn.functional.cross_entropy(network(batch).float(), target, label_smoothing=cfg.label_smoothing)
                       for network, batch, target in zip(ensemble.networks, batches, targets))
    assert torch.allclose(loss, expected)


def test_an_ensembles_train_loss_is_that_of_one_network(data):
    """The loss an ensemble steps on is the sum of its networks' losses (each network's gradient is
    its own); the train loss logged is divided by their count: two copies of one network log that
    network's loss, bit for bit."""
    train, _ = data
    cfg = dataclasses.replace(SMALL_CNN, networks=2)
    torch.manual_seed(0)
    single = build_model(dataclasses.replace(cfg, networks=1).model_config(28, 10, train["mean"], train["std"]))
    twice = Ensemble([copy.deepcopy(single), copy.deepcopy(single)])
    losses = []
    for model in (single, twice):
        generator = torch.Generator().manual_seed(0)
        state = train_mod.TrainingState(model, make_optimizer(model, cfg), None, [generator])
        batches = Batches(train["images"], train["labels"], cfg.batch_size, cfg.drop_last, generator)
        losses.append(train_mod.train_epoch(state, batches, train_mod.make_loss(model, cfg, CPU)))
    assert losses[0] == losses[1]
    # Had the step used the mean of the two losses, each copy would have moved half as far.
    assert_same_weights(weights(twice.networks[0]), weights(single))


def test_a_diverging_run_stops_with_the_lr_to_lower(data):
    """A learning rate far too high makes the loss NaN: fit stops at that epoch, naming train.lr,
    instead of training on and saving a model whose every prediction is noise."""
    train, val = data
    cfg = dataclasses.replace(SMALL_MLP, optimizer="sgd", lr=1.0e12, momentum=0.0, nesterov=False)
    with pytest.raises(PipelineError, match=r"^epoch 1: the train loss is nan: training diverged; lower train\.lr \(now 1e\+12\)"):
        fit(cfg, train, val, CPU)


@pytest.mark.parametrize("cxx", [(None, "no-such-c++"), "no-such-c++"], ids=["tuple", "string"])
def test_compile_without_a_cpp_compiler_stops_with_one_line_before_training(data, cxx):
    """train.compile on a CPU whose C++ compiler does not run: one line naming the compiler tried and
    the way out, before the first step, instead of Inductor's traceback from inside it. Torch's own
    default is a tuple, (None, $CXX or g++); a plain name is taken too."""
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": cxx}), pytest.raises(
            PipelineError, match=r"^train\.compile: torch\.compile on the CPU needs a C\+\+ compiler, "
                                 r"and no-such-c\+\+ does not run here: .*set train\.compile: false$"):
        fit(dataclasses.replace(SMALL_CNN, compile=True), *data, CPU)


def test_a_run_that_diverges_in_its_last_step_is_stopped(data):
    """The train loss is taken before each update, so one step at a huge rate leaves it finite while
    the weights it leaves overflow every logit: the val loss catches it, and fit raises before the
    train stage could save the model."""
    train, val = data
    cfg = dataclasses.replace(SMALL_MLP, optimizer="sgd", lr=1.0e30, momentum=0.0, nesterov=False, epochs=1,
                              schedule="constant", batch_size=len(train["labels"]))
    with pytest.raises(PipelineError, match=r"^epoch 1: the val loss is nan: training diverged; lower train\.lr \(now 1e\+30\)"):
        fit(cfg, train, val, CPU)


@pytest.mark.parametrize("cfg, dataset", [(SMALL_CNN, "data"), (SMALL_MLP, "data"), (SMALL_CNN_FRESH_VIEWS, "views_data"),
                                          (SMALL_CNN_EMA, "data"), (SMALL_CNN_FRESH_VIEWS, "on_the_fly_data"),
                                          (SMALL_CNN_LOOKAHEAD, "data"), (SMALL_CNN_ENSEMBLE, "data"),
                                          (SMALL_CNN_OWN_BATCHES, "views_data"), (SMALL_CNN_OWN_BATCHES, "on_the_fly_data"),
                                          (SMALL_CNN_DECAY_WEIGHTS, "data"), (SMALL_CNN_FP32, "data"),
                                          (SMALL_CNN_BF16, "data")],
                         ids=["cnn-sgd", "mlp-adam", "cnn-fresh-views", "cnn-ema", "cnn-on-the-fly", "cnn-lookahead",
                              "cnn-ensemble", "cnn-ensemble-own-views", "cnn-ensemble-own-on-the-fly",
                              "cnn-decay-weights", "cnn-fp32", "cnn-bf16"])
def test_interrupted_fit_resumes_to_the_uninterrupted_result(request, cfg, dataset, tmp_path, monkeypatch):
    """Stopped after epoch 1's checkpoint, a second fit() picks up the model, optimizer (momentum,
    Adam moments), schedule, weight average, lookahead's slow weights and batch-order state, and the view of each epoch
    (stored or drawn on the fly), and ends exactly where one unbroken run ends."""
    train, val = request.getfixturevalue(dataset)
    unbroken, _, unbroken_rows = fit(cfg, train, val, CPU)

    checkpoint = tmp_path / "checkpoint.pt"
    real_score, calls = train_mod.score, []

    def score_then_stop(*args):
        calls.append(1)
        if len(calls) == 2:  # epoch 2, after epoch 1's checkpoint was written
            raise KeyboardInterrupt
        return real_score(*args)

    monkeypatch.setattr(train_mod, "score", score_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, train, val, CPU, checkpoint, run_id="run")
    monkeypatch.setattr(train_mod, "score", real_score)
    assert train_mod.load_checkpoint(checkpoint, "run") is not None, "epoch 1's checkpoint is readable"
    assert train_mod.load_checkpoint(checkpoint, "another run") is None, "only its own run resumes from it"
    trained = count_steps_per_epoch(monkeypatch)
    resumed, _, resumed_rows = fit(cfg, train, val, CPU, checkpoint, run_id="run")
    assert len(trained) == cfg.epochs - 1, "the second fit() resumed after epoch 1, not from the start"
    assert resumed_rows == unbroken_rows
    assert_same_weights(weights(resumed), weights(unbroken))


@pytest.mark.parametrize("size", [0, 5, 3 * (1 << 20) + 7])
def test_file_sha256_reads_in_pieces_to_the_whole_files_digest(tmp_path, size):
    """The fingerprint's input digest, read a MiB at a time, is the digest of all the bytes (so a
    checkpoint written before it was streamed still resumes)."""
    path = tmp_path / "train.pt"
    path.write_bytes(bytes(i % 251 for i in range(size)))  # no two MiB pieces alike
    assert train_mod.file_sha256(path) == hashlib.sha256(path.read_bytes()).digest()


def test_fingerprint_names_params_numerics_processes_inputs_and_code(tmp_path):
    """A checkpoint is resumed only by the run that wrote it: a changed param, way of computing
    (thread count), number of processes, input byte or line of the stages package's code (here a
    comment in a copy of it) gives another fingerprint."""
    code = tmp_path / "stages"
    code.mkdir()
    for path in [*train_mod.CODE_DIR.glob("*.py"), *train_mod.CODE_DIR.glob("*.yaml")]:
        (code / path.name).write_bytes(path.read_bytes())
    inputs = tmp_path / "train.pt"
    inputs.write_bytes(b"tensors")
    computed = {"precision": "fp32", "threads": 2}

    def run_id(cfg=SMALL_CNN, computed=computed, processes=1):
        return train_mod.fingerprint(cfg, computed, processes, inputs, code_dir=code)

    first = run_id()
    assert run_id() == first
    (code / ".#train.py").symlink_to(tmp_path / "user@host.1234")  # Emacs's lock: a dangling link
    assert run_id() == first
    assert train_mod.fingerprint(SMALL_CNN, computed, 1, inputs) == first  # the copy is the package's code
    assert run_id(dataclasses.replace(SMALL_CNN, lr=0.1)) != first
    assert run_id(computed={**computed, "threads": 4}) != first
    # A torchrun of one's own may start another number of processes than train.processes says.
    assert run_id(processes=2) != first
    (code / "models.py").write_text((code / "models.py").read_text() + "# edited\n")
    edited = run_id()
    assert edited != first
    (code / "datasets.yaml").write_text((code / "datasets.yaml").read_text() + "# edited\n")
    assert run_id() not in (first, edited)
    inputs.write_bytes(b"tensorz")
    assert train_mod.fingerprint(SMALL_CNN, computed, 1, inputs) != first


@pytest.mark.parametrize("stage, kept", [("augment", None), ("train", train_mod.INTERRUPTED_KEEPS)])
def test_ctrl_c_says_what_the_stage_leaves(stage, kept, capsys):
    """Ctrl-C: one line and status 130. A stage's outputs are renamed into place whole, so most say
    no file was left half-written; train says where the epochs it completed are."""
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_main(stage, interrupted) if kept is None else run_main(stage, interrupted, kept=kept)
    assert stopped.value.code == 130
    line = capsys.readouterr().err.strip()
    if kept is None:
        assert line == "augment: interrupted; no file was left half-written"
    else:
        assert line.startswith("train: interrupted; the epochs completed, if any, are kept in the --checkpoint file "
                               "(models/train-checkpoint.pt under dvc repro)")
        assert "metrics/train" in line and "\n" not in line


def test_seed_everything_sets_determinism_both_ways():
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        seed_everything(0, deterministic=False)  # a later, non-deterministic fit in the same process
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        seed_everything(0, deterministic=TRAIN.deterministic)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_weight_decay_on_weights_leaves_norms_and_biases_alone(optimizer):
    """train.weight_decay_on: a step with zero gradients, where decay alone can move a parameter,
    moves every conv and linear weight matrix and no BatchNorm scale or shift or bias with
    "weights", and every parameter with "all"; both with each optimizer."""
    torch.manual_seed(0)
    network = build_model(SMALL_CNN.model_config(28, 10, mean=0.13, std=0.31))
    with torch.no_grad():
        for parameter in network.parameters():  # nonzero everywhere: decay moves a zero nowhere
            parameter.uniform_(0.5, 1.5)
    initial = dict(network.named_parameters())
    names = set(initial)
    matrices = {name for name, parameter in initial.items() if parameter.ndim > 1}
    assert any(".weight" in name for name in names - matrices), "the CNN has BatchNorm scales"
    for decay_on, expected in [("weights", matrices), ("all", names)]:
        cfg = dataclasses.replace(SMALL_CNN, optimizer=optimizer, lr=0.1, schedule="constant", weight_decay=0.1,
                                  weight_decay_on=decay_on)
        model = copy.deepcopy(network)
        optimizer_obj = make_optimizer(model, cfg)
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer_obj.step()
        moved = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, initial[name])}
        assert moved == expected, decay_on


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_weight_decay_on_all_steps_as_the_optimizer_built_before_the_param(optimizer):
    """"all" is one group of every parameter with the decay: the same steps, bit for bit, as the
    optimizer every run trained with before train.weight_decay_on existed (model.parameters() and
    weight_decay given to the constructor; AdamW's own default decay, 0.01, must not leak in)."""
    cfg = dataclasses.replace(SMALL_CNN, optimizer=optimizer, lr=0.01, schedule="constant", weight_decay=0.05)
    torch.manual_seed(0)
    network = build_model(cfg.model_config(28, 10, mean=0.13, std=0.31))
    groups = train_mod.parameter_groups(network, cfg)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05
    assert len(groups[0]["params"]) == len(list(network.parameters()))
    assert all(a is b for a, b in zip(groups[0]["params"], network.parameters()))
    now, before = copy.deepcopy(network), copy.deepcopy(network)
    if optimizer == "sgd":
        old = torch.optim.SGD(before.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        old_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        old = old_cls(before.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    new = make_optimizer(now, cfg)
    gradients = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(now.parameters(), before.parameters()):
            a.grad = torch.randn(a.shape, generator=gradients)
            b.grad = a.grad.clone()
        new.step()
        old.step()
    assert all(torch.equal(a, b) for a, b in zip(now.parameters(), before.parameters()))


def test_weight_decay_on_weights_changes_what_training_ends_with(data):
    """With "weights" a run ends elsewhere: every one-dimensional parameter (BatchNorm's scales and shifts,
    the classifier's bias), undecayed, differs from the run with "all"."""
    train, val = data
    cfg = dataclasses.replace(SMALL_CNN, weight_decay=0.05, epochs=1)
    all_model, _, _ = fit(cfg, train, val, CPU)
    weights_model, _, _ = fit(dataclasses.replace(cfg, weight_decay_on="weights"), train, val, CPU)
    scales = [(a, b) for a, b in zip(all_model.parameters(), weights_model.parameters()) if a.ndim == 1]
    assert scales and not any(torch.equal(a, b) for a, b in scales)


def rates_of_each_step(cfg, total: int) -> tuple[list[float], torch.optim.Optimizer]:
    """(the learning rate each of `total` steps trains with, the optimizer after them) under
    make_schedule's schedule for `cfg`, stepped once per step as fit() does (OneCycleLR raises
    when stepped past its end)."""
    optimizer = make_optimizer(torch.nn.Linear(2, 2), cfg)
    schedule = make_schedule(optimizer, cfg, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return rates, optimizer


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 8])
def test_onecycle_of_a_few_steps_never_divides_by_zero(total):
    """Runs of a few steps: with warm-up 0.25, up to 4 steps leave at most one step to warm up,
    where OneCycleLR would divide by zero (4 steps) or count backwards; those runs start at the
    peak and only decay (a one-step run trains at the peak, not at the final rate). Every rate
    stays within [0, lr] and the last of a longer run is ~0."""
    cfg = dataclasses.replace(SMALL_MLP, schedule="onecycle", warmup=0.25)
    rates, optimizer = rates_of_each_step(cfg, total)
    assert all(0 < rate <= cfg.lr * (1 + 1e-9) for rate in rates)
    assert rates[-1] < cfg.lr / 1000 or total == 1
    if total <= 4:  # no warm-up: decaying from the peak at the first step
        assert rates == sorted(rates, reverse=True) and rates[0] == pytest.approx(cfg.lr, rel=1e-9)
        assert optimizer.param_groups[0]["lr"] > 0, "after the last step too (OneCycleLR's goes below 0)"
    else:
        assert rates[0] < rates[1]  # a warm-up step


@pytest.mark.parametrize("warmup", [0.1, 0.25, 0.5])
def test_onecycle_rises_linearly_for_warmup_of_the_steps_then_falls_linearly(warmup):
    """train.warmup is the share of steps rising from lr / 25 to lr (OneCycleLR's pct_start), and
    both legs are straight lines (anneal_strategy linear: the default's schedule, chosen on val)."""
    cfg = dataclasses.replace(SMALL_MLP, schedule="onecycle", warmup=warmup)
    total = 200
    rates, _ = rates_of_each_step(cfg, total)
    peak = int(np.argmax(rates))
    assert peak == round(warmup * total) - 1 and rates[peak] == pytest.approx(cfg.lr)
    assert rates[0] == pytest.approx(cfg.lr / train_mod.ONECYCLE_START_DIV)
    for leg in (rates[:peak + 1], rates[peak:]):
        assert np.allclose(np.diff(leg, 2), 0, atol=cfg.lr * 1e-6)


@pytest.mark.parametrize("schedule", ["constant", "onecycle", "cosine"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_schedule_covers_every_step_of_the_run(schedule, drop_last):
    """The per-step schedule is sized to the run: stepping it once per batch of every epoch never
    runs past its end (OneCycleLR raises if it does), and one-cycle ends near zero."""
    cfg = dataclasses.replace(SMALL_MLP, schedule=schedule, drop_last=drop_last, epochs=3)
    total = cfg.epochs * steps_per_epoch(1000, cfg.batch_size, cfg.drop_last)
    rates, _ = rates_of_each_step(cfg, total)
    if schedule == "constant":
        assert set(rates) == {cfg.lr}
    elif schedule == "onecycle":
        assert max(rates) == pytest.approx(cfg.lr, rel=0.02) and rates[-1] < cfg.lr / 1000
    else:
        assert rates[0] == cfg.lr and rates[-1] < cfg.lr / 1000


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_cover_the_split_once_per_epoch_in_a_fresh_order(drop_last):
    """Each iteration is one epoch: image/label pairs stay together, no image comes twice, the last
    partial batch is kept unless drop_last, and the next epoch draws another permutation."""
    ids = torch.arange(100)
    batches = Batches(ids, ids.clone(), 32, drop_last, torch.Generator().manual_seed(0))
    epoch = [(images.tolist(), labels.tolist()) for images, labels in batches]
    assert all(images == labels for images, labels in epoch)
    assert [len(images) for images, _ in epoch] == [32, 32, 32] + ([] if drop_last else [4])
    assert len(epoch) == len(batches)
    seen = [i for images, _ in epoch for i in images]
    assert len(set(seen)) == len(seen) and (drop_last or sorted(seen) == list(range(100)))
    assert [images.tolist() for images, _ in batches] != [images for images, _ in epoch]


def test_batches_shard_each_batch_across_processes():
    """Under torchrun every process draws the same order and takes its share of each batch: the
    shards of a step together are the single-process batch. A last batch with fewer images than
    processes is skipped by all of them, and not counted in the epoch's steps (the schedule's)."""
    ids = torch.arange(10)
    single = [images.tolist() for images, _ in Batches(ids, ids, 4, False, torch.Generator().manual_seed(0))]
    sharded = [Batches(ids, ids, 4, False, torch.Generator().manual_seed(0), Rank(rank, 3, rank)) for rank in range(3)]
    shards = [[images.tolist() for images, _ in batches] for batches in sharded]
    assert [len(steps) for steps in shards] == [2, 2, 2]  # batches of 4, 4 and 2 (< 3 processes: skipped)
    assert [len(batches) for batches in sharded] == [2, 2, 2]
    # A last batch of 2 is kept by 2 processes (one image each), and by a single process.
    assert len(Batches(ids, ids, 4, False, torch.Generator(), Rank(0, 2, 0))) == 3 == len(single)
    for step in range(2):
        assert sorted(i for steps in shards for i in steps[step]) == sorted(single[step])


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("on_the_fly", [False, True])
def test_batches_len_is_the_steps_an_epoch_takes(world, drop_last, on_the_fly):
    """The schedule counts len(batches) steps an epoch: exactly as many as every process takes."""
    ids = torch.arange(11)
    draw_view = (lambda images: images) if on_the_fly else None  # 22 images an epoch, else 11
    for rank in range(world):
        batches = Batches(ids, ids, 4, drop_last, torch.Generator().manual_seed(0), Rank(rank, world, rank),
                          draw_view=draw_view)
        assert len(list(batches)) == len(batches), (rank, world)


@pytest.mark.parametrize("dataset, fresh_views, copies, on_the_fly", [
    ("data", False, 0, False), ("views_data", True, 2, False), ("views_data", False, 2, False),
    ("on_the_fly_data", False, 0, True)], ids=["originals", "fresh-views", "all-views", "on-the-fly"])
def test_params_count_the_steps_that_fit_takes(request, dataset, fresh_views, copies, on_the_fly, monkeypatch):
    """The params stage's count of an epoch's steps (for train.lookahead's check) is fit()'s, for
    every way the augment stage's file can hold views."""
    train, val = request.getfixturevalue(dataset)
    augment = AugmentParams(copies=copies, on_the_fly=on_the_fly, rotation_deg=10.0, translate=0.1, scale_min=0.9,
                            scale_max=1.1, elastic_alpha=0.0, elastic_sigma=4.0, pad=0, flip=0.0, allow_flip=False,
                            erase=0.0, erase_area_min=0.02, erase_area_max=0.25, seed=0)
    cfg = dataclasses.replace(SMALL_CNN, epochs=1, fresh_views=fresh_views)
    trained = count_steps_per_epoch(monkeypatch)
    fit(cfg, train, val, CPU)
    images = params_mod.images_per_epoch(320, augment, fresh_views)  # `data`'s 320 originals
    assert trained == [steps_per_epoch(images, cfg.batch_size, cfg.drop_last)]


def test_steps_per_epoch_counts_the_last_partial_batch_unless_dropped():
    assert steps_per_epoch(100, 32, drop_last=False) == 4
    assert steps_per_epoch(100, 32, drop_last=True) == 3
    assert steps_per_epoch(96, 32, drop_last=False) == 3
    # Under torchrun a last batch of 4 images is taken by 4 processes, skipped by 5.
    assert steps_per_epoch(100, 32, drop_last=False, processes=4) == 4
    assert steps_per_epoch(100, 32, drop_last=False, processes=5) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's, on Linux")
def test_retain_freed_memory_is_accepted_by_glibc():
    """glibc refuses out-of-range values (an mmap threshold over 32 MiB, say) by returning 0."""
    assert retain_freed_memory() is True



def test_epoch_rows_take_the_originals_and_each_view_in_turn():
    """Layout [(K + 1) N]: originals, view 1, ..., view K. Epoch e trains on the originals and view
    ((e - 1) mod K) + 1."""
    n, views = 5, 3
    for epoch, view in [(1, 1), (2, 2), (3, 3), (4, 1), (7, 1)]:
        rows = epoch_rows(n, views, epoch)
        assert rows.tolist() == list(range(n)) + list(range(view * n, (view + 1) * n))


def test_batches_with_rows_cover_exactly_those_rows():
    ids = torch.arange(30)
    batches = Batches(ids, ids.clone(), 4, False, torch.Generator().manual_seed(0), rows=epoch_rows(10, 2, 2))
    seen = [i for images, labels in batches for i in images.tolist()]
    assert len(batches) == 5 and sorted(seen) == list(range(10)) + list(range(20, 30))


def test_fresh_views_train_on_one_view_per_epoch(views_data, monkeypatch, capsys):
    """With fresh_views each epoch sees 2 N images (originals + one view): as many steps as a run on
    one fixed copy; without it, all 3 N. The fresh-view run is bit-identical when repeated and
    differs from training on every view. Its first line counts originals, not the file's 3 N."""
    train, val = views_data
    seen = count_steps_per_epoch(monkeypatch)
    model_a, _, rows_a = fit(SMALL_CNN_FRESH_VIEWS, train, val, CPU)
    first_line = capsys.readouterr().err.splitlines()[0]
    assert first_line.endswith(f"parameters; 320 train images with 2 stored views of each and 100 val images; 3 epochs of "
                               f"{steps_per_epoch(640, 32, False)} steps, each over the originals and one view of each")
    model_b, _, rows_b = fit(SMALL_CNN_FRESH_VIEWS, train, val, CPU)
    all_views, _, _ = fit(dataclasses.replace(SMALL_CNN_FRESH_VIEWS, fresh_views=False), train, val, CPU)
    n = len(train["labels"]) // 3
    assert seen == [steps_per_epoch(2 * n, 32, False)] * 6 + [steps_per_epoch(3 * n, 32, False)] * 3
    assert rows_a == rows_b and rows_a[-1]["val_accuracy"] >= 0.9
    assert_same_weights(weights(model_a), weights(model_b))
    assert not torch.equal(weights(model_a)["1.weight"], weights(all_views)["1.weight"])


def test_batches_with_a_view_drawer_give_each_image_as_itself_and_as_a_view():
    """draw_view set: an epoch is 2 N images in a fresh order, each image once as itself and once
    as drawn (here: + 100), its label beside it, in as many steps as originals + one stored view."""
    ids = torch.arange(10, dtype=torch.uint8)[:, None, None]  # [N, 1, 1] "images" that name themselves
    batches = Batches(ids, torch.arange(10), 4, False, torch.Generator().manual_seed(0),
                      draw_view=lambda images: images + 100)
    epoch = [(images.flatten().tolist(), labels.tolist()) for images, labels in batches]
    assert len(batches) == len(epoch) == steps_per_epoch(20, 4, False)
    assert all(image % 100 == label for images, labels in epoch for image, label in zip(images, labels))
    assert sorted(i for images, _ in epoch for i in images) == list(range(10)) + list(range(100, 110))
    assert ids.flatten().tolist() == list(range(10))  # the split itself is left as it was


def test_views_drawn_on_the_fly_are_those_of_one_process_whatever_the_process_count():
    """Under torchrun every process draws the views of the whole batch from the same generator and
    keeps its share, so the shards of a step are exactly the single process's batch, views included
    (drawing per shard would give rank 0's k-th view the same transform as rank 1's k-th)."""
    ids = torch.arange(12, dtype=torch.uint8)[:, None, None]

    def batches(rank: Rank) -> list[tuple[list[int], list[int]]]:
        draws = torch.Generator().manual_seed(7)  # a random "view": a shift of the id by 100 + U{0..99}
        view = lambda images: images + 100 + torch.randint(0, 100, (len(images), 1, 1), generator=draws,
                                                           dtype=torch.uint8)
        return [(images.flatten().tolist(), labels.tolist())
                for images, labels in Batches(ids, torch.arange(12), 6, False, torch.Generator().manual_seed(0), rank,
                                              draw_view=view)]

    single = batches(Rank())
    shards = [batches(Rank(rank, 3, rank)) for rank in range(3)]
    for step, (images, labels) in enumerate(single):
        for rank in range(3):
            assert shards[rank][step] == (images[rank::3], labels[rank::3])


def test_fit_draws_each_epochs_views_with_that_epochs_drawer(on_the_fly_data, monkeypatch):
    """fit() makes a new drawer per epoch, for that epoch (a drawer seeded for epoch 1 throughout
    would draw the same views every epoch)."""
    epochs: list[int] = []
    real_view_drawer = train_mod.view_drawer

    def recording(recipe, epoch, device):
        epochs.append(epoch)
        return real_view_drawer(recipe, epoch, device)

    monkeypatch.setattr(train_mod, "view_drawer", recording)
    fit(SMALL_CNN_FRESH_VIEWS, *on_the_fly_data, CPU)
    assert epochs[-3:] == [1, 2, 3]


def test_batches_of_one_image_draw_views_or_none(on_the_fly_data):
    """A batch (or a process's share of one) may hold no view to draw: it trains as it is."""
    train = on_the_fly_data[0]
    n = 8
    batches = Batches(train["images"][:n], train["labels"][:n], 1, False, torch.Generator().manual_seed(0),
                      draw_view=train_mod.view_drawer(train["on_the_fly"], 1, CPU))
    epoch = list(batches)
    assert len(epoch) == 2 * n and all(images.shape == (1, 28, 28) for images, _ in epoch)


def test_on_the_fly_views_train_bit_identically_and_differ_from_the_originals_alone(data, on_the_fly_data, monkeypatch):
    """augment.on_the_fly: each epoch 2 N images (the steps of originals + one stored view), views
    drawn anew per epoch from a seeded generator, so a repeat is bit-identical; the run learns,
    and differs from training on the originals alone."""
    train, val = on_the_fly_data
    seen = count_steps_per_epoch(monkeypatch)
    model_a, _, rows_a = fit(SMALL_CNN_FRESH_VIEWS, train, val, CPU)
    model_b, _, rows_b = fit(SMALL_CNN_FRESH_VIEWS, train, val, CPU)
    originals_only, _, _ = fit(SMALL_CNN_FRESH_VIEWS, data[0], val, CPU)
    n = len(train["labels"])
    assert seen == [steps_per_epoch(2 * n, 32, False)] * 6 + [steps_per_epoch(n, 32, False)] * 3
    assert rows_a == rows_b and rows_a[-1]["val_accuracy"] >= 0.9
    assert_same_weights(weights(model_a), weights(model_b))
    assert not torch.equal(weights(model_a)["1.weight"], weights(originals_only)["1.weight"])
    assert torch.equal(train["images"], data[0]["images"])  # drawing views never writes into the split


def test_ema_saves_the_average_only_when_it_scores_at_least_as_well_on_val(data, monkeypatch):
    train, val = data
    chosen = {}
    real_pick = train_mod.pick_average

    def spy(model, averaged, *args):
        chosen["model"], chosen["average"] = model, averaged
        chosen["result"] = real_pick(model, averaged, *args)
        return chosen["result"]

    monkeypatch.setattr(train_mod, "pick_average", spy)
    model, _, rows = fit(SMALL_CNN_EMA, train, val, CPU)
    assert model is chosen["result"]
    averaged_accuracy = train_mod.score(chosen["average"], val["images"], val["labels"])[1]
    last_accuracy = train_mod.score(chosen["model"], val["images"], val["labels"])[1]
    expected = chosen["average"] if averaged_accuracy >= last_accuracy else chosen["model"]
    assert model is expected
    assert not torch.equal(weights(chosen["average"])["1.weight"], weights(chosen["model"])["1.weight"])
    say = lambda message: None  # noqa: E731
    # The average is saved when it scores at least the last weights' val accuracy (a tie included),
    # the last weights when they score more, by however little.
    pick = functools.partial(real_pick, chosen["model"], chosen["average"], val["images"], val["labels"])
    assert pick(averaged_accuracy, say) is chosen["average"]
    assert pick(math.nextafter(averaged_accuracy, 2.0), say) is chosen["model"]
    assert pick(math.nextafter(averaged_accuracy, -1.0), say) is chosen["average"]


def test_ema_judges_a_tie_on_exact_accuracies_not_the_logs_rounded_ones(data, monkeypatch):
    """The log keeps val accuracy to 6 decimals: an exact 2/3 there reads 0.666667, more than the
    average's 2/3, and the tie went to the last weights."""
    train, val = data
    monkeypatch.setattr(train_mod, "score", lambda model, images, labels: (0.5, 2 / 3))
    averages = []
    real_pick = train_mod.pick_average
    monkeypatch.setattr(train_mod, "pick_average",
                        lambda model, averaged, *args: averages.append(averaged) or real_pick(model, averaged, *args))
    model, _, rows = fit(SMALL_CNN_EMA, train, val, CPU)
    assert rows[-1]["val_accuracy"] == 0.666667
    assert model is averages[0]


@pytest.mark.parametrize("total", [10, 12])
def test_lookahead_pulls_the_weights_back_to_a_slow_copy_every_five_steps(total):
    """Between syncs the weights move freely; at a sync the slow copy moves (1 - decay) of the way
    to them and the weights restart from it; decay ramps as peak * (step / total)^3. After the last
    step the weights are the slow copy: that step's own sync first when it falls on one (total 10),
    else the last sync's (total 12: steps 11 and 12 are dropped, as in airbench)."""
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    lookahead = Lookahead(model, peak=0.5, total_steps=total)
    assert lookahead.decay(5) == 0.5 * (5 / total) ** 3
    expected_slow = torch.zeros(1, 2)
    for step in range(1, total + 1):
        with torch.no_grad():
            model.weight += 1.0  # an optimizer step
        before = model.weight.detach().clone()
        lookahead.step()
        if step % 5 == 0:
            decay = 0.5 * (step / total) ** 3
            expected_slow = decay * expected_slow + (1 - decay) * before
            assert torch.allclose(model.weight, expected_slow)
        elif step == total:
            assert torch.allclose(model.weight, expected_slow)
        else:
            assert torch.equal(model.weight, before)  # no sync: untouched
    assert model.weight[0, 0] < 10  # lagging the raw steps
    restored = Lookahead(model, peak=0.5, total_steps=total)
    restored.load_state_dict(lookahead.state_dict())
    assert restored.done == total and torch.equal(restored.slow[0], lookahead.slow[0])


def test_lookahead_refuses_a_run_too_short_for_one_sync(data):
    """Four steps and no sync: the model would have ended as its initial weights."""
    train, val = data
    cfg = dataclasses.replace(SMALL_CNN_LOOKAHEAD, epochs=1, batch_size=80)  # 320 images: 4 steps
    with pytest.raises(PipelineError, match=r"^train.lookahead: syncs every 5 steps, and this run has 4 "):
        fit(cfg, train, val, CPU)
    assert Lookahead(torch.nn.Linear(2, 1), peak=0.5, total_steps=5).total == 5  # one sync: allowed


def test_lookahead_changes_training(data):
    train, val = data
    plain, _, _ = fit(dataclasses.replace(SMALL_CNN_LOOKAHEAD, lookahead=0.0), train, val, CPU)
    ahead, _, rows = fit(SMALL_CNN_LOOKAHEAD, train, val, CPU)
    assert rows[-1]["val_accuracy"] >= 0.9
    assert not torch.equal(weights(plain)["1.weight"], weights(ahead)["1.weight"])


@pytest.mark.parametrize(("requested", "device", "cpu_bf16", "cuda_bf16", "expected"), [
    ("fp32", "cpu", True, False, "fp32"), ("bf16", "cpu", False, False, "bf16"),
    ("auto", "cpu", True, False, "bf16"), ("auto", "cpu", False, False, "fp32"),
    # On a GPU auto is fp32 even where bf16 is supported: measured no faster there (docs/gpu.md).
    ("auto", "cuda", False, True, "fp32"), ("auto", "cuda", True, False, "fp32"), ("bf16", "cuda", False, True, "bf16")])
def test_precision_auto_follows_the_hardware(monkeypatch, requested, device, cpu_bf16, cuda_bf16, expected):
    monkeypatch.setattr(runtime_mod, "cpu_bf16_is_faster", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda_bf16)
    assert resolve_precision(requested, torch.device(device)) == expected
    if requested == "auto" and device == "cuda":  # train's log says why
        assert runtime_mod.describe_precision(requested, torch.device(device)).startswith(
            "fp32 (auto: on a GPU bf16 measured no faster")


# (AVX512_BF16, AMX, /proc/cpuinfo vendor_id) -> whether auto trains in bf16 on the CPU. Measured:
# AMX (Sapphire Rapids) and AMD's AVX512_BF16 (Zen 4) pay; Intel's AVX512_BF16 alone does not.
@pytest.mark.parametrize(("avx512_bf16", "amx", "vendor", "faster"), [
    (True, True, "GenuineIntel", True), (True, False, "AuthenticAMD", True),
    (True, False, "GenuineIntel", False), (True, False, "", False),
    (False, False, "AuthenticAMD", False), (False, False, "GenuineIntel", False)])
def test_cpu_bf16_pays_with_amx_or_on_amd(monkeypatch, avx512_bf16, amx, vendor, faster):
    # _init_amx: the kernel grants AMX state where the CPU has it.
    features = {"_is_avx512_bf16_supported": avx512_bf16, "_is_amx_tile_supported": amx, "_init_amx": amx}
    monkeypatch.setattr(runtime_mod, "_cpu_supports", features.__getitem__)
    monkeypatch.setattr(runtime_mod, "cpuinfo_field", lambda name: vendor if name == "vendor_id" else "")
    assert runtime_mod.cpu_bf16_is_faster() is faster
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if faster else "fp32")
    reason = runtime_mod.describe_precision("auto", cpu)
    assert reason.startswith("bf16 (auto" if faster else "fp32 (auto")
    assert ("without AMX" in reason) == (avx512_bf16 and not faster)
    assert runtime_mod.describe_precision("fp32", cpu) == "fp32"


def test_numerics_names_how_a_run_computes(monkeypatch):
    monkeypatch.setattr(runtime_mod, "cpuinfo_field", lambda name: "AMD EPYC 9R14" if name == "model name" else "")
    monkeypatch.setattr(runtime_mod, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert runtime_mod.numerics(torch.device("cpu"), "bf16") == {
        "device": "cpu", "cpu": "AMD EPYC 9R14", "cpu_isa": "AVX512", "amx": False, "threads": 3,
        "precision": "bf16", "torch": torch.__version__}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    assert runtime_mod.numerics(torch.device("cuda", 0), "fp32") == {
        "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "cuda": "13.2", "cudnn": 91002, "precision": "fp32",
        "torch": torch.__version__}
    monkeypatch.setattr(torch.version, "cuda", None)  # a ROCm build
    monkeypatch.setattr(torch.version, "hip", "7.0.51831", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 30500)  # ROCm's cudnn.version() is MIOpen's
    assert runtime_mod.numerics(torch.device("cuda", 0), "bf16")["cuda"] == "hip 7.0.51831"
    assert runtime_mod.numerics(torch.device("cuda", 0), "bf16")["cudnn"] == "miopen 30500"
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: None)  # a build with neither library
    assert runtime_mod.numerics(torch.device("cuda", 0), "bf16")["cudnn"] == "none"
    # Plain values, as DVCLive's YAML writer takes them (torch.__version__ is a str subclass it refuses).
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert all(type(value) in (str, int, bool) for value in runtime_mod.numerics(device, "fp32").values())


def test_amx_refused_by_the_kernel_counts_as_none(monkeypatch):
    # oneDNN then runs its AVX-512 bf16 kernels, the slow path on an Intel CPU: fp32.
    features = {"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": True, "_init_amx": False}
    monkeypatch.setattr(runtime_mod, "_cpu_supports", features.__getitem__)
    monkeypatch.setattr(runtime_mod, "cpuinfo_field", lambda name: "GenuineIntel" if name == "vendor_id" else "")
    assert not runtime_mod.cpu_has_amx()
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_amd_is_found_without_proc_cpuinfo(monkeypatch):
    monkeypatch.setattr(runtime_mod, "cpuinfo_field", lambda name: "")
    monkeypatch.setattr(runtime_mod.platform, "processor", lambda: "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD")
    assert runtime_mod.cpu_is_amd()
    monkeypatch.setattr(runtime_mod.platform, "processor", lambda: "Intel64 Family 6 Model 143 Stepping 8, GenuineIntel")
    assert not runtime_mod.cpu_is_amd()


def test_cpuinfo_field_reads_the_first_match(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    # Real files list every processor in turn; "model" comes before "model name".
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9R14\n\n"
                       "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel\t\t: 207\nmodel name\t: Xeon\n")
    assert runtime_mod.cpuinfo_field("vendor_id", cpuinfo) == "AuthenticAMD"
    assert runtime_mod.cpuinfo_field("model name", cpuinfo) == "AMD EPYC 9R14"
    assert runtime_mod.cpuinfo_field("model", cpuinfo) == "17"
    assert runtime_mod.cpuinfo_field("flags", cpuinfo) == ""
    assert runtime_mod.cpuinfo_field("vendor_id", tmp_path / "absent") == ""



@pytest.mark.parametrize("terminal_ctrl_c, stops_alone, expected", [
    (False, True, [("wait", 0), ("terminate",), ("wait", None)]),  # SIGTERM or kill -INT: torchrun has no signal
    (True, True, [("wait", train_mod.TORCHRUN_STOP_S)]),  # the terminal's Ctrl-C reached torchrun: it stops
    (True, False, [("wait", train_mod.TORCHRUN_STOP_S), ("terminate",), ("wait", None)]),  # or it did not
])
def test_an_interrupted_torchrun_launch_stops_torchrun_and_waits_for_it(monkeypatch, terminal_ctrl_c, stops_alone,
                                                                        expected):
    """torchrun's workers run in sessions of their own: only torchrun can stop them, so an
    interruption gives torchrun SIGTERM and waits (a SIGKILL left the workers training). A Ctrl-C
    typed on the terminal reached torchrun itself (a second signal in its shutdown made a worker
    print a traceback): then it gets TORCHRUN_STOP_S seconds to stop alone before the SIGTERM."""
    calls = []
    monkeypatch.setattr(train_mod, "ctrl_c_reached_my_group", lambda exc: terminal_ctrl_c)

    class Torchrun:
        def __init__(self, command):
            calls.append(("start", command[command.index("-m", 3) + 1]))
            self.signalled = terminal_ctrl_c and stops_alone

        def wait(self, timeout=None):
            calls.append(("wait", timeout))
            if len(calls) == 2:
                raise KeyboardInterrupt  # arrives while the workers train
            if not self.signalled and timeout is not None:
                raise subprocess.TimeoutExpired("torchrun", timeout)
            return -signal.SIGTERM

        def terminate(self):
            calls.append(("terminate",))
            self.signalled = True

    monkeypatch.setattr(train_mod.subprocess, "Popen", Torchrun)
    with pytest.raises(KeyboardInterrupt):
        train_mod.launch_torchrun(2, ["in.pt"])
    assert calls == [("start", "stages.train"), ("wait", None), *expected]


def test_train_refuses_data_of_another_dataset_than_the_params(tmp_path, monkeypatch):
    """The model file takes its class names from the data and its framing from params.yaml's
    dataset: Fashion-MNIST's splits with params for MNIST (a stage run by hand) would write a model
    of garments that predict frames as digits. Refused before any training or output."""
    import shutil

    from stages.common import save_tensors
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")  # dataset: mnist
    images, labels = make_split(20, np.random.default_rng(0))
    garments = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                "Ankle boot"]
    save_tensors(tmp_path / "train.pt", {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                                         "classes": garments, "mean": 0.3, "std": 0.35})
    save_tensors(tmp_path / "val.pt", {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)})
    with pytest.raises(PipelineError, match=r"train.pt: images of the classes T-shirt/top, Trouser, .*, but "
                                            r"params.yaml's dataset is mnist \(0, 1, 2, "):
        train_mod.main(["train.pt", "val.pt", "model.pt", "live"])
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "live").exists()


def test_main_writes_the_model_then_removes_its_checkpoint(tmp_path, monkeypatch):
    """The checkpoint is for an interrupted run: once the model is written it goes (a leftover one
    would be resumed by a later run of the same fingerprint)."""
    from stages.common import save_tensors
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["train"].update(channels=[4, 8, 16], epochs=2, batch_size=8, device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    images, labels = make_split(24, np.random.default_rng(0))
    save_tensors(tmp_path / "train.pt", {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                                         "classes": CLASSES, "mean": 0.13, "std": 0.31})
    save_tensors(tmp_path / "val.pt", {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)})
    saved = []
    real_save = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda path, *args: saved.append(path) or real_save(path, *args))
    train_mod.main(["train.pt", "val.pt", "model.pt", "live", "--checkpoint", "ck.pt"])
    assert saved and (tmp_path / "model.pt").is_file() and not (tmp_path / "ck.pt").exists()
