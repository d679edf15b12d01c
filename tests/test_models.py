"""stages.models: the three architectures, and a model file that round-trips or fails cleanly."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import shlex
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn as nn
import yaml

from stages.model_config import ARCHITECTURES, ModelConfig
from stages.datasets import load_table
from stages.model_config import digit_framing
from stages.models import (FORMAT_VERSION, Ensemble, ModelFileError, Network, build_model, count_parameters,
                           load_model, network_count, save_model, shifted)
from stages.params import parse
from tests.conftest import PROJECT_ROOT

CLASSES = [str(k) for k in range(10)]
TRAIN = parse(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())).train
# crop 0: the whole image, as files of every older format were (the crop tests set it).
SMALL = dataclasses.replace(TRAIN, hidden=[32, 16], dropout=0.2, channels=[4, 8, 16], crop=0)


def config(model: str, **changes) -> ModelConfig:
    """The ModelConfig of a small `model` (params.yaml's train section, shrunk)."""
    return dataclasses.replace(SMALL, model=model, **changes).model_config(28, 10, mean=0.13, std=0.31)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path) -> tuple:
    """A saved mlp: (path, model, config)."""
    torch.manual_seed(0)
    cfg = config("mlp")
    model = build_model(cfg).eval()
    path = tmp_path / "model.pt"
    save_model(path, model, cfg, CLASSES)
    return path, model, cfg


def save_and_load(tmp_path, cfg: ModelConfig, seed: int, as_older=None) -> tuple:
    """Saves a fresh model of `cfg` (weights drawn after seeding with `seed`), rewritten by `as_older`
    into an older file format if given, and loads the file: (saved model, loaded model, metadata)."""
    torch.manual_seed(seed)
    net = build_model(cfg).eval()
    path = tmp_path / "model.pt"
    save_model(path, net, cfg, CLASSES)
    if as_older:
        rewrite(path, as_older)
    loaded, meta = load_model(path)
    return net, loaded, meta


def rewrite(path, change) -> None:
    """Loads the model file's payload, applies `change` to it and saves the result back."""
    payload = torch.load(path, weights_only=True)
    payload = change(payload) or payload
    torch.save(payload, path)


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_architecture_maps_images_to_logits(images, model):
    """Each architecture takes uint8 [N, 28, 28] and returns finite float logits [N, 10]."""
    net = build_model(config(model)).eval()
    with torch.no_grad():
        logits = net(images)
    assert logits.shape == (len(images), 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])  # depends on the input


def test_config_selects_layers():
    """hidden, channels and convs_per_block shape the network; dropout only appears when > 0."""
    mlp = build_model(config("mlp"))
    assert [m.out_features for m in mlp if isinstance(m, torch.nn.Linear)] == [32, 16, 10]
    assert any(isinstance(m, torch.nn.Dropout) for m in mlp)
    assert not any(isinstance(m, torch.nn.Dropout) for m in build_model(config("mlp", dropout=0.0)))
    cnn = build_model(config("cnn"))
    assert [m.out_channels for m in cnn if isinstance(m, torch.nn.Conv2d)] == [4, 8, 16]
    deeper = build_model(config("cnn", convs_per_block=2))
    assert [m.out_channels for m in deeper if isinstance(m, torch.nn.Conv2d)] == [4, 4, 8, 8, 16, 16]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in deeper) == 3


def layer_kinds(net: torch.nn.Module) -> list[str]:
    short = {torch.nn.Conv2d: "conv", torch.nn.MaxPool2d: "pool", torch.nn.BatchNorm2d: "bn", torch.nn.ReLU: "relu"}
    return [short[type(m)] for m in net if type(m) in short]


@pytest.mark.parametrize("convs", [1, 2])
def test_pool_places_each_blocks_max_pool(images, convs):
    """pool "end" pools after a block's last ReLU; "early" right after its first conv, before
    BatchNorm, so every later layer of the block works at half the resolution. Both map
    [N, 28, 28] to [N, 10] with the same weights' shapes."""
    tail = ["conv", "bn", "relu"] * (convs - 1)
    end = build_model(config("cnn", convs_per_block=convs, pool="end"))
    early = build_model(config("cnn", convs_per_block=convs, pool="early"))
    assert layer_kinds(end) == ["conv", "bn", "relu", *tail, "pool"] * 3
    assert layer_kinds(early) == ["conv", "pool", "bn", "relu", *tail] * 3
    assert [p.shape for p in end.parameters()] == [p.shape for p in early.parameters()]
    with torch.no_grad():
        assert early.eval()(images).shape == (len(images), 10)


@pytest.mark.parametrize("pool, convs", [("early", 1), ("early", 2), ("end", 2)])
def test_stride_stem_halves_the_image_in_the_first_conv(images, pool, convs):
    """stem "stride": the first block's first conv steps 2 pixels and that block has no max-pool, so
    its output is 14x14 as with the pool, from 28x28 input, without any 28x28 activations; the other
    blocks keep theirs, and the weights have the pool stem's shapes (same parameter count)."""
    tail = ["conv", "bn", "relu"] * (convs - 1)
    stride = build_model(config("cnn", convs_per_block=convs, pool=pool, stem="stride"))
    pooled = build_model(config("cnn", convs_per_block=convs, pool=pool))
    block = ["conv", "pool", "bn", "relu", *tail] if pool == "early" else ["conv", "bn", "relu", *tail, "pool"]
    assert layer_kinds(stride) == ["conv", "bn", "relu", *tail, *block, *block]
    convs_of = [m for m in stride if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs_of] == [(2, 2)] + [(1, 1)] * (len(convs_of) - 1)
    assert [p.shape for p in stride.parameters()] == [p.shape for p in pooled.parameters()]
    first_block = torch.nn.Sequential(*list(stride)[:1 + 3 * convs])  # Normalize, then the block's layers
    with torch.no_grad():
        assert first_block(images).shape == (len(images), 4, 14, 14)
        assert stride.eval()(images).shape == (len(images), 10)


@pytest.mark.parametrize("side", [28, 31, 15])
def test_stride_stem_sizes_the_classifier_for_any_image_side(side):
    """A stride-2 conv with padding 1 rounds the side up (31 -> 16), where a 2x2 pool floors it
    (31 -> 15): the Linear layer takes what the last block gives."""
    cfg = dataclasses.replace(config("cnn", stem="stride"), image_size=side)
    images = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert build_model(cfg).eval()(images).shape == (3, 10)


def test_stride_stem_round_trips_through_the_model_file(tmp_path, images):
    cfg = config("cnn", stem="stride")
    net, loaded, meta = save_and_load(tmp_path, cfg, 6)
    assert meta["config"]["stem"] == "stride" and ModelConfig.from_dict(meta["config"]) == cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))


@pytest.mark.parametrize("key, value", [("stem", "strided"), ("pool", "before"), ("architecture", "resnet")])
def test_model_file_with_an_unknown_choice_is_refused(tmp_path, key, value):
    """A stored choice (stem, pool, architecture) that the code does not know is an error naming it,
    not a network of another shape (an unknown stem would otherwise build the pool stem)."""
    cfg = config("cnn")
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model(path, build_model(cfg), cfg, CLASSES)
    rewrite(path, lambda payload: payload["config"].update({key: value}))
    with pytest.raises(ModelFileError, match=f"configuration {key} '{value}' is not one of"):
        load_model(path)


def as_format_8(payload):
    """A current payload as format 8 wrote it: one network, before `networks`."""
    del payload["config"]["networks"]
    payload["format_version"] = 8


def as_format_7(payload):
    """A current payload as format 7 wrote it: format 8's, before `framing`."""
    as_format_8(payload)
    del payload["framing"]
    payload["format_version"] = 7


def as_format_6(payload):
    """A current payload as format 6 wrote it: format 7's, before `crop`."""
    as_format_7(payload)
    del payload["config"]["crop"]
    payload["format_version"] = 6


def as_format_5(payload):
    """A current payload as format 5 wrote it: format 6's, before `stem`."""
    as_format_6(payload)
    del payload["config"]["stem"]
    payload["format_version"] = 5


def as_format_4(payload):
    """A current payload as format 4 wrote it: format 5's, before the test-time augmentation fields."""
    as_format_5(payload)
    for key in ("tta_flip", "tta_shift"):
        del payload["config"][key]
    payload["format_version"] = 4


def as_format_3(payload):
    """A current payload as format 3 wrote it: format 4's, with the architecture under the key `model`."""
    as_format_4(payload)
    config = payload["config"]
    payload["config"] = {"model": config.pop("architecture"), **config}
    payload["format_version"] = 3


def as_format_2(payload):
    """A current payload as format 2 wrote it: format 3's, before `pool` existed."""
    as_format_3(payload)
    del payload["config"]["pool"]
    payload["format_version"] = 2


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_format_6_file_loads_uncropped(tmp_path, images, model):
    """Model files of format 6 (no crop in the config) load as the network they were: on the whole image."""
    cfg = config(model)
    net, loaded, meta = save_and_load(tmp_path, cfg, 6, as_format_6)
    assert meta["format_version"] == 6 and meta["config"]["crop"] == 0
    assert ModelConfig.from_dict(meta["config"]) == cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_format_8_file_loads_as_one_network(tmp_path, images, model):
    """Model files of format 8 (no `networks` in the config) load as the single network they were."""
    cfg = config(model)
    net, loaded, meta = save_and_load(tmp_path, cfg, 8, as_format_8)
    assert meta["format_version"] == 8 and meta["config"]["networks"] == 1
    assert ModelConfig.from_dict(meta["config"]) == cfg and isinstance(loaded, Network)
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_an_ensemble_averages_its_networks_logits_in_eval_and_returns_each_in_training(images, model):
    """networks > 1: an Ensemble whose first network is the single network of the same seed (the
    others drawn after it, so different); in eval mode the mean of their logits [N, C], in training
    mode each one's [networks, N, C]."""
    torch.manual_seed(3)
    single = build_model(config(model, dropout=0.0)).eval()
    torch.manual_seed(3)
    ensemble = build_model(config(model, dropout=0.0, networks=3)).eval()
    assert isinstance(ensemble, Ensemble) and network_count(ensemble) == 3 and network_count(single) == 1
    assert count_parameters(ensemble) == 3 * count_parameters(single)
    with torch.no_grad():
        each = torch.stack([network(images) for network in ensemble.networks])  # [3, N, 10], eval
        assert torch.equal(each[0], single(images)) and not torch.equal(each[1], each[0])
        assert ensemble(images).shape == (len(images), 10) and torch.allclose(ensemble(images), each.mean(0))
        ensemble.train()
        in_training = ensemble(images)
        assert in_training.shape == (3, len(images), 10)
        # (Training mode: a cnn's BatchNorm normalises by the batch's statistics, the same each call.)
        assert all(torch.equal(in_training[k], network(images)) for k, network in enumerate(ensemble.networks))


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_an_ensemble_in_training_runs_each_network_on_its_own_batch(images, model):
    """train.network_batches own: images [networks, N, H, W] give network k the batch k (logits
    [networks, N, C]); eval mode, or another count of batches, is refused."""
    ensemble = build_model(config(model, dropout=0.0, networks=2)).train()
    batches = torch.stack([images, images.flip(0)])  # [2, N, 28, 28]
    with torch.no_grad():
        logits = ensemble(batches)
        assert logits.shape == (2, len(images), 10)
        assert all(torch.equal(logits[k], network(batches[k])) for k, network in enumerate(ensemble.networks))
        with pytest.raises(ValueError, match="needs training mode and 2 batches, got 3"):
            ensemble(torch.stack([images] * 3))
        with pytest.raises(ValueError, match="got eval mode"):
            ensemble.eval()(batches)


def test_an_ensemble_round_trips_through_the_model_file(tmp_path, images):
    """An ensemble's file holds every network's weights and loads as the same averaged model."""
    cfg = config("cnn", networks=2, tta_shift=1)
    net, loaded, meta = save_and_load(tmp_path, cfg, 5)
    assert isinstance(loaded, Ensemble) and meta["config"]["networks"] == 2
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))


@pytest.mark.parametrize("networks", [0, -1, 1.0, True, "2", 17, 10**9])
def test_model_file_with_a_network_count_out_of_range_is_refused_before_building(tmp_path, networks):
    """A damaged count is refused before any network is built (10**9 would exhaust memory first)."""
    path = tmp_path / "model.pt"
    cfg = config("mlp")
    save_model(path, build_model(cfg), cfg, CLASSES)
    rewrite(path, lambda payload: payload["config"].update(networks=networks))
    with pytest.raises(ModelFileError, match="configuration networks .* is not a whole number in 1-16"):
        load_model(path)


@pytest.mark.parametrize("crop", [2, 3])
@pytest.mark.parametrize("stem", ["pool", "stride"])
def test_crop_makes_the_cnn_see_only_the_central_square(images, crop, stem):
    """With `crop` the network's logits are those of its layers on the central (28 - 2 crop)-pixel
    square: the border pixels change nothing, the classifier is sized for the smaller side, and
    the weights are the uncropped network's but for that classifier."""
    cfg = config("cnn", crop=crop, stem=stem)
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    inner = slice(crop, 28 - crop)
    changed = 255 - images  # every pixel inverted, then the central square put back
    changed[:, inner, inner] = images[:, inner, inner]
    with torch.no_grad():
        logits = net(images)
        assert torch.equal(net(changed), logits)
        assert torch.equal(nn.Sequential(*net)(images[:, inner, inner]), logits)
    whole = build_model(config("cnn", stem=stem))
    shapes = {name: p.shape for name, p in net.named_parameters()}
    uncropped = {name: p.shape for name, p in whole.named_parameters()}
    classifier = [name for name in shapes if shapes[name] != uncropped[name]]
    # The last layer only: 22x22 leaves 2x2 after three halvings where 28x28 leaves 3x3 (24x24 too).
    assert classifier == ([] if crop == 2 else [f"{len(net) - 1}.weight"])


@pytest.mark.parametrize(("model", "crop", "reason"), [
    ("mlp", 2, "crop 2 for a 'mlp': only a cnn crops"),
    ("cnn", -1, "crop -1 is not a whole number of pixels in 0-10"),
    ("cnn", 11, "crop 11 is not a whole number of pixels in 0-10"),
    ("cnn", True, "crop True is not a whole number"),
])
def test_model_file_with_a_crop_the_network_cannot_take_is_refused(tmp_path, model, crop, reason):
    """A stored crop the network cannot take (on an mlp, whose first layer takes the whole image; out
    of range; not a whole number) is an error naming it when the file loads, not a shape error at
    the first forward pass."""
    cfg = config(model)
    path = tmp_path / "model.pt"
    save_model(path, build_model(cfg), cfg, CLASSES)
    rewrite(path, lambda payload: payload["config"].update(crop=crop))
    with pytest.raises(ModelFileError, match=f"configuration {reason}"):
        load_model(path)


def test_batchnorm_on_a_1x1_last_block_fails_on_one_image(images):
    """Why train.crop is refused where pool: early leaves a 1x1 last block (stages/params.py): one
    image then gives BatchNorm one value per channel, and training stops with PyTorch's error; a
    crop of 6, or pool: end, trains on a single image."""
    one = images[:1]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        build_model(config("cnn", crop=7, pool="early")).train()(one)
    for crop, pool in [(6, "early"), (7, "end")]:
        assert build_model(config("cnn", crop=crop, pool=pool)).train()(one).shape == (1, 10)


def test_crop_is_applied_to_each_test_time_view(images):
    """Shifted test-time views are formed on the whole image and then cropped: a one-pixel shift
    brings the pixels just outside the crop into view, so in eval mode they count."""
    cfg = config("cnn", crop=2, tta_shift=1)
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    changed = images.clone()
    changed[:, 1] = 255 - changed[:, 1]  # a row just outside the central 24x24
    with torch.no_grad():
        assert not torch.equal(net(changed), net(images))
        net.train()
        net.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)  # training path, fixed statistics
        assert torch.equal(net(changed), net(images))


def test_format_5_file_loads_with_the_pool_stem(tmp_path, images):
    """Model files of format 5 (no stem in the config) load as the network they were: the first
    block halves the image by its max-pool."""
    cfg = config("cnn")
    net, loaded, meta = save_and_load(tmp_path, cfg, 5, as_format_5)
    assert meta["format_version"] == 5 and meta["config"]["stem"] == "pool"
    assert ModelConfig.from_dict(meta["config"]) == cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_format_4_file_loads_without_test_time_augmentation(tmp_path, images, model):
    """Model files of format 4 (no tta fields) load as the network they were: no averaging."""
    cfg = config(model)
    net, loaded, meta = save_and_load(tmp_path, cfg, 4, as_format_4)
    assert meta["format_version"] == 4 and meta["config"]["tta_flip"] is False and meta["config"]["tta_shift"] == 0
    assert ModelConfig.from_dict(meta["config"]) == cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_format_3_file_loads_as_written(tmp_path, images, model):
    """Model files of format 3 (the config's architecture under `model`) still load, giving the
    same outputs, with the config upgraded to the current one."""
    cfg = config(model)
    net, loaded, meta = save_and_load(tmp_path, cfg, 3, as_format_3)
    assert meta["format_version"] == 3 and ModelConfig.from_dict(meta["config"]) == cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))


def test_format_2_file_loads_as_pool_end(tmp_path, images):
    """Model files written before `pool` existed (format 2, no pool in the config) still load, as
    the network they described: pooling at the end of each block."""
    cfg = config("cnn", pool="end")
    net, loaded, meta = save_and_load(tmp_path, cfg, 2, as_format_2)
    assert meta["config"]["pool"] == "end" and meta["format_version"] == 2
    assert ModelConfig.from_dict(meta["config"]) == cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))


def test_model_file_stores_the_config_as_plain_values(saved):
    """The stored config is builtins only (a file loads with weights_only, which refuses project
    classes) and rebuilds the same ModelConfig."""
    path, _, cfg = saved
    stored = torch.load(path, weights_only=True)["config"]
    assert stored == {"architecture": "mlp", "hidden": [32, 16], "dropout": 0.2, "channels": [4, 8, 16],
                      "convs_per_block": cfg.convs_per_block, "pool": cfg.pool, "image_size": 28,
                      "num_classes": 10, "mean": 0.13, "std": 0.31, "tta_flip": False, "tta_shift": 0,
                      "stem": "pool", "crop": 0, "networks": 1}
    assert ModelConfig.from_dict(stored) == cfg


def test_shifted_moves_pixels_and_shifts_in_background():
    image = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 3, 3)
    assert shifted(image, 1, 0).tolist() == [[[0, 1, 2], [0, 4, 5], [0, 7, 8]]]  # right
    assert shifted(image, 0, -1).tolist() == [[[4, 5, 6], [7, 8, 9], [0, 0, 0]]]  # up
    assert torch.equal(shifted(image, 0, 0), image)


@pytest.mark.parametrize("tta_flip, tta_shift", [(True, 0), (False, 1), (True, 2)])
def test_test_time_augmentation_averages_the_views_logits_in_eval_only(images, tta_flip, tta_shift):
    """With tta_flip / tta_shift the model in eval mode returns the mean of the plain network's
    logits over the image, its mirror image and its four shifts; in training mode the plain
    network's; and the weights are the same tensors under the same names, so a file loads either way."""
    torch.manual_seed(5)
    plain = build_model(config("cnn")).eval()
    tta = build_model(config("cnn", tta_flip=tta_flip, tta_shift=tta_shift))
    tta.load_state_dict(plain.state_dict(), strict=True)
    tta.eval()
    views = [images] + ([images.flip(-1)] if tta_flip else []) + (
        [shifted(images, dx, dy) for dx, dy in ((tta_shift, 0), (-tta_shift, 0), (0, tta_shift), (0, -tta_shift))]
        if tta_shift else [])
    with torch.no_grad():
        expected = torch.stack([plain(view) for view in views]).mean(0)
        assert torch.allclose(tta(images), expected, atol=1e-6)
        assert not torch.allclose(tta(images), plain(images), atol=1e-4)  # the views do change the logits
        tta.train(), plain.train()
        assert torch.equal(tta(images), plain(images))  # BatchNorm in batch mode: the same batch, the same output


def test_predict_imports_no_params_datasets_or_yaml():
    """The model file alone classifies: importing predict (and so stages.models) pulls in neither
    params.yaml's reader, the dataset table, nor a YAML parser."""
    code = ("import sys, stages.predict; "
            "print(sorted(m for m in sys.modules if m == 'yaml' or m.startswith(('stages.', 'yaml.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            check=True).stdout
    for module in ("yaml", "stages.params", "stages.datasets"):
        assert repr(module) not in loaded, loaded
    assert "'stages.models'" in loaded  # the check above looked at a real import


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_save_load_round_trip(tmp_path, images, model):
    """A loaded model gives exactly the outputs of the saved one, and the file's metadata comes back."""
    cfg = config(model)
    net, loaded, meta = save_and_load(tmp_path, cfg, 1)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))
    assert meta == {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "classes": CLASSES,
                    "framing": {"box": 20, "centre": "mass"}}


def test_framing_travels_in_the_model_file(tmp_path):
    """The dataset's framing (datasets.yaml), stored by train, comes back for predict; a format-7
    file, from before it was stored, reads as MNIST's (what predict assumed then)."""
    cfg = config("cnn")
    path = tmp_path / "model.pt"
    fashion = load_table()["fashion-mnist"].framing
    assert fashion == {"box": 28, "centre": "box"} and load_table()["mnist"].framing == digit_framing(28)
    save_model(path, build_model(cfg), cfg, CLASSES, fashion)
    assert load_model(path)[1]["framing"] == fashion
    rewrite(path, as_format_7)
    _, meta = load_model(path)
    assert meta["format_version"] == 7 and meta["framing"] == {"box": 20, "centre": "mass"}


def test_an_older_file_of_small_images_loads_with_a_scaled_framing(tmp_path):
    """Before format 8 predict scaled MNIST's 20-of-28 box to the image size: a format-7 file of
    15x15 images (a synthetic dataset) reads with a box of 10, not an impossible 20."""
    cfg = dataclasses.replace(config("cnn"), image_size=15, crop=0)
    path = tmp_path / "model.pt"
    save_model(path, build_model(cfg), cfg, CLASSES)
    assert load_model(path)[1]["framing"] == {"box": 10, "centre": "mass"}
    rewrite(path, as_format_7)
    assert load_model(path)[1]["framing"] == {"box": 10, "centre": "mass"}


def test_a_framing_the_loader_would_refuse_is_not_saved(tmp_path):
    cfg = config("cnn")
    with pytest.raises(ModelFileError, match="framing: box: expected whole pixels in 1-28, got 40"):
        save_model(tmp_path / "model.pt", build_model(cfg), cfg, CLASSES, {"box": 40, "centre": "box"})
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("framing, problem", [
    (None, "framing: expected {box, centre}, got None"),
    ({"box": 29, "centre": "mass"}, "framing: box: expected whole pixels in 1-28, got 29"),
    ({"box": 20, "centre": "middle"}, "framing: centre: expected one of mass, box, got 'middle'"),
])
def test_a_bad_framing_is_refused(tmp_path, framing, problem):
    cfg = config("cnn")
    path = tmp_path / "model.pt"
    save_model(path, build_model(cfg), cfg, CLASSES)
    rewrite(path, lambda payload: payload.update(framing=framing))
    with pytest.raises(ModelFileError) as raised:
        load_model(path)
    assert str(raised.value) == f"{path}: {problem}"


def expect_model_file_error(path, *words: str) -> None:
    """Asserts load_model(path) raises ModelFileError naming the path and the given words."""
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


def test_missing_file(tmp_path):
    """A model file that is not there is a ModelFileError naming it."""
    expect_model_file_error(tmp_path / "none.pt", "not found")


@pytest.mark.parametrize("data", [b"not a model" + random.Random(0).randbytes(4096), b"e-mail notes\n"],
                         ids=["random bytes", "text"])
def test_bytes_that_are_no_tensor_file_are_named_so(tmp_path, data):
    """Not torch.save's zip archive at all: said so, not as torch.load's pickle error (`KeyError: 101`
    for a text file starting with 'e')."""
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    expect_model_file_error(path, "not a tensor file written by this pipeline (torch.save's zip archive)")


def test_truncated_file(saved):
    """A model file cut short is refused with the path, saying so."""
    path = saved[0]
    data = path.read_bytes()
    for size in (len(data) // 2, len(data) - 1, 3):  # torch.load's words differed by where it was cut
        path.write_bytes(data[:size])
        expect_model_file_error(path, f"damaged tensor file ({size:,} bytes; the zip archive's closing index, "
                                      "which torch.save writes last, is missing or damaged: cut short?)")


@pytest.mark.parametrize("change", [
    lambda p: p["config"].update(hidden=[50]),
    lambda p: p["config"].update(hidden=[32, 16, 8]),
    lambda p: p["config"].update(architecture="cnn"),
    lambda p: p["config"].update(image_size=32),
    lambda p: p["config"].pop("dropout"),
    lambda p: p["config"].update(architecture="resnet"),
    lambda p: p["config"].update(extra=1),
    lambda p: p.update(config=[1, 2]),
    lambda p: p.update(classes=CLASSES[:9]),
    lambda p: p.update(classes=10),
], ids=["fewer hidden", "more hidden", "other architecture", "image size", "key missing",
        "unknown architecture", "unknown key", "config not a dict", "nine classes", "classes not a list"])
def test_config_that_does_not_fit_the_weights(saved, change):
    """A stored configuration that does not describe the stored weights is a ModelFileError."""
    path = saved[0]
    rewrite(path, change)
    expect_model_file_error(path)


def test_wrong_format_version(saved):
    """A file of another format version is refused, saying so."""
    path = saved[0]
    rewrite(path, lambda p: p.update(format_version=FORMAT_VERSION + 1))
    expect_model_file_error(path, "format")


@pytest.mark.parametrize("version", [torch.tensor([8, 8]), "8", 8.0, True], ids=["tensor", "string", "float", "bool"])
def test_a_format_version_that_is_no_integer_is_refused(saved, version):
    """A crafted file whose version is a tensor (truth value ambiguous) or another type is a
    ModelFileError, not a traceback from comparing it."""
    path = saved[0]
    rewrite(path, lambda p: p.update(format_version=version))
    expect_model_file_error(path, "format_version must be an integer")


def test_flipped_bits_in_the_weights_fail_their_checksum(saved):
    """torch.load does not check the CRC-32 of each record in the file: a damaged copy (the same
    length, 64 bytes of the weights inverted) would load and predict noise. It is refused."""
    path = saved[0]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the weights: the small metadata records come first
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    expect_model_file_error(path, "fails its CRC-32 check")


@pytest.mark.parametrize(("offset", "value", "reason"), [
    (10, 99, "damaged, or no tensor file written by this pipeline (its record"), (8, 1, "encrypted")],
    ids=["unknown compression", "encryption flag"])
def test_a_record_the_zip_reader_cannot_read_back_is_damage_not_a_traceback(saved, offset, value, reason):
    """The CRC check reads every record back; a central directory entry naming a compression
    method zipfile lacks, or an encryption flag, makes it raise: one line, as torch.load's own
    errors are."""
    path = saved[0]
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first record's central directory entry
    data[entry + offset:entry + offset + 2] = value.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    expect_model_file_error(path, "damaged", reason)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_weights_that_are_not_finite_are_refused(saved, value):
    """NaN weights (a diverged run) would give NaN probabilities and a class picked at random."""
    path = saved[0]

    def poison(payload):
        weights = next(t for t in payload["state_dict"].values() if t.is_floating_point() and t.numel())
        weights.view(-1)[0] = value

    rewrite(path, poison)
    expect_model_file_error(path, "hold NaN or infinite values")


def test_a_config_of_absurd_widths_is_refused_without_building_its_layers(saved):
    """A 2 KB file whose config asks for two hidden layers of 30,000 (3.6 GB of weights) took
    4.2 GB and 9.5 s before its weights were found not to fit. Run with the process's data
    segment capped at 1 GiB over what it holds: the layers must never be allocated."""
    path = saved[0]
    rewrite(path, lambda p: p["config"].update(hidden=[30_000, 30_000]))
    script = f"""
import resource, sys
from stages.models import ModelFileError, load_model
held = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:"))
resource.setrlimit(resource.RLIMIT_DATA, (held + 2**30, resource.getrlimit(resource.RLIMIT_DATA)[1]))
try:
    load_model({str(path)!r})
except ModelFileError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    assert "weights do not fit the stored configuration (architecture=mlp, hidden=[30000, 30000]" in done.stdout
    assert "(RuntimeError: Error(s) in loading state_dict for Network:)" in done.stdout


def test_class_names_are_checked_without_printing_them_whole(saved):
    """Pickle shares objects: 1,000,000 nested names in a small file. The check never formats the
    list (the old message's {classes!r:.80} built all of it first: 50 GB at depth 10)."""
    path = saved[0]
    nested = ["x"] * 10
    for _ in range(5):
        nested = [nested] * 10
    rewrite(path, lambda p: p.update(classes=nested))
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert str(info.value) == f"{path}: class names: expected a list of at least two names"


def test_a_model_files_class_names_need_only_be_names(saved):
    """The dataset table's rules for names (no '.', no control character, distinct, at most 100
    characters) came after models were written with such names: those still load (predict
    escapes what it prints). Names that are not a list of strings, or too few, are refused."""
    path = saved[0]
    older = ["St. Bernard", "x" * 200, "\x1b[31mred"] + CLASSES[3:]
    rewrite(path, lambda p: p.update(classes=older))
    assert load_model(path)[1]["classes"] == older
    rewrite(path, lambda p: p.update(classes=CLASSES[:9]))
    expect_model_file_error(path, "9 class names do not match the model's 10 outputs")
    rewrite(path, lambda p: p.update(classes=[1] * 10))
    expect_model_file_error(path, "class names: expected a list of at least two names")


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("make", [lambda t: torch.zeros((), dtype=t.dtype).expand(t.shape),
                                  lambda t: t.to_sparse()], ids=["stride-0 view", "sparse"])
def test_weights_that_do_not_hold_their_own_elements_are_refused(saved, make):
    """The right shape, almost no storage: a 2.7 KB file of a stride-0 weight for a 2,000,000-wide
    layer took 11 GB once its finiteness was checked. A sparse weight failed in the kernels."""
    path = saved[0]

    def hollow(payload):
        name = next(k for k, v in payload["state_dict"].items() if v.dim() == 2)
        payload["state_dict"][name] = make(payload["state_dict"][name])

    rewrite(path, hollow)
    expect_model_file_error(path, "weights do not fit the stored configuration", "is not a dense tensor holding "
                                                                                 "its own elements")


def test_weights_stored_channels_last_load_in_the_standard_layout(tmp_path, images):
    """CPU training leaves conv weights channels-last in the file; the loaded model computes as a
    freshly built one does (the same layout, hence the same bits)."""
    torch.manual_seed(0)
    cfg = config("cnn")
    net = build_model(cfg).eval()
    path = tmp_path / "model.pt"
    save_model(path, net.to(memory_format=torch.channels_last), cfg, CLASSES)
    loaded, _ = load_model(path)
    fresh = net.to(memory_format=torch.contiguous_format)
    assert all(t.stride() == fresh.state_dict()[name].stride() for name, t in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(images), fresh(images))


def test_weights_of_another_dtype_are_refused(saved):
    """Assigned as they are, float64 weights would make every forward pass fail on float32 images."""
    path = saved[0]
    rewrite(path, lambda p: p.update(state_dict={k: v.double() if v.is_floating_point() else v
                                                 for k, v in p["state_dict"].items()}))
    expect_model_file_error(path, "weights do not fit the stored configuration", "is torch.float64, not torch.float32")


def test_a_compressed_record_is_refused_before_it_is_inflated(saved):
    """torch.save stores records as they are; a crafted file deflates gigabytes of zeros into
    megabytes, which the CRC check (and torch.load) would inflate whole."""
    path = saved[0]
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in records:
            archive.writestr(name, data)
    expect_model_file_error(path, "damaged, or no tensor file written by this pipeline (its record",
                            "names compression method 8; torch.save stores every record as is")


@pytest.mark.parametrize("payload", [[1, 2, 3], torch.zeros(3), {"config": {}}], ids=["list", "tensor", "partial"])
def test_not_a_model_payload(tmp_path, payload):
    """A tensor file that is not a dict with every model entry is refused."""
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    expect_model_file_error(path)


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_in_a_model_file_never_runs(tmp_path, writer):
    """Loading uses weights_only: a pickle that would call os.system is refused and never executed."""
    marker = tmp_path / "pwned"
    payload = {"format_version": FORMAT_VERSION, "config": Exploit(marker), "classes": CLASSES, "state_dict": {}}
    path = tmp_path / "model.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    expect_model_file_error(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Exploit(tmp_path / "control")))  # the exploit does work when unpickled
    assert (tmp_path / "control").exists()


def test_normalize_maps_the_train_statistics_to_zero_mean_and_unit_std():
    """Pixels in [0, 255] with the train split's mean and std (in [0, 1] units) -> mean 0, std 1,
    a channel axis added: [N, H, W] -> [N, 1, H, W]. Every model file's first layer."""
    from stages.models import Normalize
    out = Normalize(mean=0.5, std=0.25)(torch.tensor([[[0, 127.5, 255]]]))
    assert out.shape == (1, 1, 1, 3) and torch.allclose(out.flatten(), torch.tensor([-2.0, 0.0, 2.0]))


def test_predict_logits_leaves_the_model_in_the_mode_it_found(images):
    """Scored in eval mode (BatchNorm's running statistics, no dropout), then put back: train's
    val pass happens between training steps."""
    from stages.models import predict_logits
    torch.manual_seed(0)
    model = build_model(config("cnn"))
    for training in (True, False):
        model.train(training)
        seen = []
        handle = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
        predict_logits(model, images, batch_size=2)
        handle.remove()
        assert set(seen) == {False} and model.training is training
