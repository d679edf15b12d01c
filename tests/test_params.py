"""stages.params: the real params.yaml parses, and every bad value is refused naming its key."""

from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
import sys
from typing import get_args, get_type_hints

import pytest
import yaml

from stages.common import PipelineError
from stages.datasets import load_table
from stages.model_config import ARCHITECTURES, ModelConfig
from stages import params as params_mod
from stages.params import VALID_MARKER, Params, ParamsError, TrainParams, load, parse
from tests.conftest import PROJECT_ROOT

PARAMS_TEXT = (PROJECT_ROOT / "params.yaml").read_text()
BASE = yaml.safe_load(PARAMS_TEXT)
TRAIN_SPLIT = 60000 - BASE["preprocess"]["val_size"]


def with_change(section: str, key: str, value) -> dict:
    """A deep copy of the real params with params[section][key] = value."""
    raw = copy.deepcopy(BASE)
    raw[section][key] = value
    return raw


def without(section: str, key: str) -> dict:
    """A deep copy of the real params with params[section][key] removed."""
    raw = copy.deepcopy(BASE)
    del raw[section][key]
    return raw


def test_real_params_parse():
    """The committed params.yaml is valid and comes back typed (ints given for floats become floats)."""
    params = parse(copy.deepcopy(BASE))
    assert isinstance(params, Params)
    assert params.train.model == BASE["train"]["model"]
    assert params.train.lr == BASE["train"]["lr"] and isinstance(params.train.lr, float)
    assert isinstance(params.fetch.timeout_s, float)  # written as the integer 30
    assert params.train.hidden == BASE["train"]["hidden"]
    assert params.dataset.name == BASE["fetch"]["dataset"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_train_section_builds_the_model_config(architecture):
    """Every architecture the model code knows is a valid train.model, and the train section
    gives the ModelConfig of its network for the train split's image size, classes and statistics."""
    raw = with_change("train", "model", architecture)
    raw["train"]["stem"] = "stride"  # not ModelConfig's defaults, so that they must come from the params
    raw["train"]["crop"] = 3  # cnn only: the other models take the whole image
    train = parse(raw).train
    assert train.model_config(28, 10, mean=0.13, std=0.31) == ModelConfig(
        architecture=architecture, hidden=tuple(BASE["train"]["hidden"]), dropout=BASE["train"]["dropout"],
        channels=tuple(BASE["train"]["channels"]), convs_per_block=BASE["train"]["convs_per_block"],
        pool=BASE["train"]["pool"], image_size=28, num_classes=10, mean=0.13, std=0.31, stem="stride",
        crop=3 if architecture == "cnn" else 0)


def test_load_reads_a_file(tmp_path):
    """load() reads and validates a params file given by path."""
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    assert load(path) == parse(copy.deepcopy(BASE))


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_sgd_only_keys_do_not_bind_other_optimizers(optimizer):
    """momentum and nesterov are SGD's (params.yaml says so): Adam with momentum 0 and the committed
    nesterov: true is valid, not refused for nesterov's sake."""
    raw = with_change("train", "momentum", 0.0)
    raw["train"].update(optimizer=optimizer, nesterov=True)
    assert parse(raw).train.optimizer == optimizer


@pytest.mark.parametrize("value", [1, TRAIN_SPLIT])
def test_batch_size_bounds_are_inclusive(value):
    """batch_size 1 and exactly the train split size (60000 - val_size) are accepted."""
    assert parse(with_change("train", "batch_size", value)).train.batch_size == value


def _bad_cases():
    """(id, raw params, key that must be named, words that must appear in the message)."""
    c = with_change
    yield "unknown key", c("train", "lrr", 0.1), "train.lrr", ["unknown key", "takes", "epochs", "batch_size"]
    unknown_section = copy.deepcopy(BASE)
    unknown_section["trian"] = {}
    yield "unknown section", unknown_section, "trian", ["unknown section", "train", "fetch"]
    yield "missing key", without("train", "lr"), "train.lr", ["missing"]
    missing_section = copy.deepcopy(BASE)
    del missing_section["evaluate"]
    yield "missing section", missing_section, "evaluate", ["missing"]
    yield "section not a mapping", {**copy.deepcopy(BASE), "plot": None}, "plot", ["mapping", "got null"]
    yield "string for int", c("train", "epochs", "ten"), "train.epochs", ["integer", "'ten'"]
    yield "float as YAML string", c("train", "lr", "1e-3"), "train.lr", ["the string '1e-3'", "plain number, without quotes: 0.001 or 1e-3"]
    yield "nan as YAML string", c("train", "lr", "nan"), "train.lr", ["finite number, got the string 'nan'"]
    yield "bool for int", c("train", "epochs", True), "train.epochs", ["integer"]
    yield "bool for float", c("train", "lr", True), "train.lr", ["number", "got true"]  # as YAML spells it
    yield "null for int", c("train", "epochs", None), "train.epochs", ["integer", "got null"]
    yield "infinite float in a list", c("train", "hidden", [100, float("inf")]), "train.hidden[1]", ["got .inf"]
    yield "string for bool", c("train", "nesterov", "yes"), "train.nesterov", ["true or false"]
    sgd_without_momentum = c("train", "momentum", 0.0)
    sgd_without_momentum["train"].update(optimizer="sgd", nesterov=True)
    yield "nesterov without momentum", sgd_without_momentum, "train.nesterov", ["needs momentum > 0"]
    yield "lr zero", c("train", "lr", 0), "train.lr", ["> 0"]
    yield "lr negative", c("train", "lr", -0.1), "train.lr", ["> 0"]
    # Values an optimizer or the allocator would fail on inside train, with a traceback.
    yield "lr beyond float32", c("train", "lr", 1.0e+300), "train.lr", ["at most 10"]
    yield "weight_decay huge", c("train", "weight_decay", 1.0e+300), "train.weight_decay", ["between 0 and 1"]
    yield "hidden size huge", c("train", "hidden", [10**15]), "train.hidden", ["up to 16,384"]
    yield "too many hidden layers", c("train", "hidden", [100] * 17), "train.hidden", ["at most 16"]
    yield "channels huge", c("train", "channels", [10**8, 8, 16]), "train.channels", ["up to 1,024"]
    yield "epochs zero", c("train", "epochs", 0), "train.epochs", ["between 1 and"]
    yield "batch_size zero", c("train", "batch_size", 0), "train.batch_size", ["between 1 and", str(TRAIN_SPLIT)]
    yield ("batch_size over train split", c("train", "batch_size", TRAIN_SPLIT + 1), "train.batch_size",
           ["between 1 and", str(TRAIN_SPLIT)])
    yield "val_size zero", c("preprocess", "val_size", 0), "preprocess.val_size", ["between"]
    yield "val_size negative", c("preprocess", "val_size", -5), "preprocess.val_size", ["between"]
    yield "val_size whole set", c("preprocess", "val_size", 60000), "preprocess.val_size", ["between", "60000"]
    # Each bound, on both sides where it has two (a mutation audit found these unpinned: a value past
    # one failed only inside its stage, after DVC had deleted the outputs).
    for section, key, bad, words in [
        ("preprocess", "val_size", 9, ["between 10 and 59990"]), ("preprocess", "val_size", 59991, ["between 10 and 59990"]),
        ("fetch", "timeout_s", 0, ["> 0 and at most 3600"]), ("fetch", "timeout_s", 3601, ["> 0 and at most 3600"]),
        ("train", "processes", 0, ["between 1 and 64"]), ("train", "processes", 65, ["between 1 and 64"]),
        ("train", "convs_per_block", 0, ["between 1 and 4"]), ("train", "convs_per_block", 5, ["between 1 and 4"]),
        ("train", "momentum", 1.0, ["[0, 1)"]), ("train", "momentum", -0.1, ["[0, 1)"]),
        ("train", "warmup", 1.0, ["[0, 1)"]), ("train", "warmup", -0.1, ["[0, 1)"]),
        ("train", "label_smoothing", 1.0, ["[0, 1)"]), ("train", "label_smoothing", -0.1, ["[0, 1)"]),
        ("train", "channels", [16, 32], ["train.channels"]), ("train", "channels", [16, 32, 64, 128], ["train.channels"]),
        ("train", "channels", [16, 0, 64], ["train.channels"]), ("train", "channels", [16, 2048, 64], ["train.channels"]),
        ("train", "epochs", 0, ["between 1 and 1000"]), ("train", "epochs", 1001, ["between 1 and 1000"]),
        ("evaluate", "batch_size", 0, [">= 1, got 0"]),
        ("plot", "misclassified", -1, ["between 0 and 400"]), ("plot", "misclassified", 401, ["between 0 and 400"]),
        ("augment", "copies", 51, ["between 0 and 50"]), ("augment", "rotation_deg", 181, ["between 0 and 180"]),
        ("augment", "translate", 0.6, ["between 0 and 0.5"]),
    ]:
        yield f"{key} {bad}", c(section, key, bad), f"{section}.{key}", words
    few = c("train", "processes", 4)
    few["train"]["batch_size"] = 2
    yield "batch under processes", few, "train.batch_size", ["at least train.processes (4)", "got 2"]
    other = copy.deepcopy(BASE)
    other["fetch"]["mirrors"] = {"fashion-mnist": other["fetch"]["mirrors"]["fashion-mnist"]}
    yield "no mirrors for the dataset", other, "fetch.mirrors.mnist", ["missing: list the base URLs"]
    for key, bad in [("model", "resnet"), ("optimizer", "lbfgs"), ("device", "tpu"),
                     ("schedule", "step"), ("precision", "fp16"), ("pool", "before"), ("stem", "strided"),
                     ("weight_decay_on", "biases")]:
        allowed = [repr(v) for v in get_args(get_type_hints(TrainParams)[key])]
        yield f"unknown {key}", c("train", key, bad), f"train.{key}", ["one of", repr(bad), *allowed]
    mlp_no_hidden = c("train", "model", "mlp")
    mlp_no_hidden["train"]["hidden"] = []
    yield "mlp without hidden", mlp_no_hidden, "train.hidden", ["at least one"]
    yield "hidden size zero", c("train", "hidden", [100, 0]), "train.hidden", ["positive"]
    yield "hidden size not int", c("train", "hidden", [100, "x"]), "train.hidden[1]", ["integer"]
    yield "dropout negative", c("train", "dropout", -0.1), "train.dropout", ["[0, 1)"]
    yield "ema negative", c("train", "ema", -0.1), "train.ema", ["0 (off)", "[0.5, 1)"]
    yield "ema one", c("train", "ema", 1.0), "train.ema", ["0 (off)", "[0.5, 1)"]
    yield "ema too fast", c("train", "ema", 0.3), "train.ema", ["0 (off)", "[0.5, 1)"]
    yield "lookahead negative", c("train", "lookahead", -0.1), "train.lookahead", ["0 (off)", "(0, 1)"]
    yield "lookahead one", c("train", "lookahead", 1.0), "train.lookahead", ["0 (off)", "(0, 1)"]
    yield "fresh_views not bool", c("train", "fresh_views", "yes"), "train.fresh_views", ["true or false"]
    yield "dropout one", c("train", "dropout", 1.0), "train.dropout", ["[0, 1)"]
    yield "rotation negative", c("augment", "rotation_deg", -1.0), "augment.rotation_deg", ["between 0 and 180"]
    yield "translate negative", c("augment", "translate", -0.1), "augment.translate", ["between 0 and 0.5"]
    yield "scale_min negative", c("augment", "scale_min", -0.5), "augment.scale_min", ["(0, 4]"]
    yield "copies negative", c("augment", "copies", -1), "augment.copies", ["between 0 and 50"]
    yield "on_the_fly with stored copies", c("augment", "on_the_fly", True), "augment.copies", ["must be 0", "on_the_fly"]
    yield "on_the_fly not bool", c("augment", "on_the_fly", "yes"), "augment.on_the_fly", ["true or false"]
    scale_inverted = c("augment", "scale_min", 1.2)
    scale_inverted["augment"]["scale_max"] = 1.1
    yield "scale_max below scale_min", scale_inverted, "augment.scale_max", ["between scale_min"]
    yield "elastic alpha negative", c("augment", "elastic_alpha", -1.0), "augment.elastic_alpha", ["0 (off) and 100"]
    yield "elastic alpha huge", c("augment", "elastic_alpha", 500), "augment.elastic_alpha", ["0 (off) and 100"]
    yield "elastic sigma zero", c("augment", "elastic_sigma", 0.0), "augment.elastic_sigma", ["between 0.5 and 14 pixels"]
    yield "elastic sigma over half", c("augment", "elastic_sigma", 15), "augment.elastic_sigma", ["between 0.5 and 14"]
    yield "pad negative", c("augment", "pad", -1), "augment.pad", ["between 0 and 14 pixels"]
    yield "pad over half the side", c("augment", "pad", 15), "augment.pad", ["between 0 and 14 pixels"]
    yield "pad not int", c("augment", "pad", 2.5), "augment.pad", ["integer"]
    yield "flip negative", c("augment", "flip", -0.1), "augment.flip", ["probability in [0, 1]"]
    yield "flip over one", c("augment", "flip", 1.5), "augment.flip", ["probability in [0, 1]"]
    yield ("flip on digits", c("augment", "flip", 0.5), "augment.flip",
           ["mnist", "flippable: false", "augment.allow_flip"])
    yield "allow_flip not bool", c("augment", "allow_flip", "yes"), "augment.allow_flip", ["true or false"]
    yield ("tta_flip on digits", c("train", "tta_flip", True), "train.tta_flip",
           ["mnist", "flippable: false", "augment.allow_flip"])
    yield "tta_flip not bool", c("train", "tta_flip", 1), "train.tta_flip", ["true or false"]
    yield "tta_shift negative", c("train", "tta_shift", -1), "train.tta_shift", ["0 (off), 1 or 2 pixels"]
    yield "tta_shift over two", c("train", "tta_shift", 3), "train.tta_shift", ["0 (off), 1 or 2 pixels"]
    yield "networks zero", c("train", "networks", 0), "train.networks", ["between 1 and 16, got 0"]
    yield "networks over 16", c("train", "networks", 17), "train.networks", ["between 1 and 16, got 17"]
    yield "networks not int", c("train", "networks", 2.5), "train.networks", ["integer"]
    yield "network_batches unknown", c("train", "network_batches", "mixed"), "train.network_batches", ["shared", "own"]
    yield ("crop negative", c("train", "crop", -1), "train.crop",
           ["'auto' (the dataset's, datasets.yaml) or between 0 and 10 pixels", "8x8 of the 28x28"])
    yield "crop leaving under 8x8", c("train", "crop", 11), "train.crop", ["between 0 and 10 pixels"]
    yield ("crop leaving the pooled last block 1x1", c("train", "crop", 7), "train.crop",
           ["7 leaves the CNN's last block 1x1 pixels with train.pool: early", "a crop of at most 6 or train.pool: end"])
    stride_1x1 = c("train", "crop", 7)
    stride_1x1["train"]["stem"] = "stride"  # 14 pixels -> 7 -> 3 -> 1
    yield ("crop leaving the strided net's last block 1x1", stride_1x1, "train.crop",
           ["7 leaves the CNN's last block 1x1 pixels", "a crop of at most 6 or train.pool: end"])
    no_scheme = c("fetch", "timeout_s", 30)
    no_scheme["fetch"]["mirrors"]["mnist"] = ["https://example.org/mnist/", "storage.googleapis.com/cvdf-datasets/mnist/"]
    yield ("mirror without a scheme", no_scheme, "fetch.mirrors.mnist[1]",
           ["a base URL (https://...) or an absolute directory", "'storage.googleapis.com/cvdf-datasets/mnist/'"])
    credentials = c("fetch", "timeout_s", 30)
    credentials["fetch"]["mirrors"]["mnist"] = ["https://alice:S3cret@example.org/mnist/"]
    yield ("mirror with a password", credentials, "fetch.mirrors.mnist[0]",
           ["https://***@example.org/mnist/: a user name or password in a mirror's URL is not supported"])
    yield "crop not int", c("train", "crop", 1.5), "train.crop", ["an integer or 'auto'", "1.5"]
    yield "crop another word", c("train", "crop", "max"), "train.crop", ["an integer or 'auto'", "'max'"]
    yield "crop a bool", c("train", "crop", True), "train.crop", ["an integer or 'auto'"]
    yield "erase over one", c("augment", "erase", 1.01), "augment.erase", ["probability in [0, 1]"]
    yield "erase negative", c("augment", "erase", -0.5), "augment.erase", ["probability in [0, 1]"]
    yield "erase area zero", c("augment", "erase_area_min", 0.0), "augment.erase_area_min", ["(0, 1]"]
    yield ("erase area over one", c("augment", "erase_area_max", 1.5), "augment.erase_area_max",
           ["between erase_area_min"])
    erase_inverted = c("augment", "erase_area_min", 0.3)
    erase_inverted["augment"]["erase_area_max"] = 0.2
    yield "erase_area_max below min", erase_inverted, "augment.erase_area_max", ["between erase_area_min (0.3)"]
    no_mirrors = copy.deepcopy(BASE)
    no_mirrors["fetch"]["mirrors"]["mnist"] = []
    yield "no mirrors", no_mirrors, "fetch.mirrors.mnist", ["at least one"]
    mirrors_string = copy.deepcopy(BASE)
    mirrors_string["fetch"]["mirrors"]["mnist"] = "https://example.com/mnist/"
    yield "mirrors not a list", mirrors_string, "fetch.mirrors.mnist", ["must be a list"]
    yield ("unknown dataset", c("fetch", "dataset", "no-such-dataset"), "fetch.dataset",
           ["one of", "'mnist'", "'fashion-mnist'", "'no-such-dataset'"])


BAD_CASES = list(_bad_cases())


@pytest.mark.parametrize(("section", "key", "value"), [
    ("preprocess", "val_size", 10), ("preprocess", "val_size", 59990), ("fetch", "timeout_s", 3600),
    ("train", "processes", 64), ("train", "convs_per_block", 4), ("train", "momentum", 0.0), ("train", "warmup", 0.0),
    ("train", "label_smoothing", 0.0), ("train", "channels", [1, 1024, 1]), ("train", "epochs", 1000),
    ("plot", "misclassified", 400), ("plot", "misclassified", 0), ("augment", "copies", 50),
    ("augment", "rotation_deg", 180), ("augment", "translate", 0.5),
])
def test_each_bound_itself_is_accepted(section, key, value):
    raw = with_change(section, key, value)
    if key == "processes":  # each process takes a share of every batch
        raw["train"]["batch_size"] = max(raw["train"]["batch_size"], 64)
    if key == "val_size" and value > 30000:  # a train split of 10 images
        raw["train"]["batch_size"] = 10
    if key == "momentum":  # Nesterov needs momentum
        raw["train"]["nesterov"] = False
    assert getattr(getattr(parse(raw), section), key) == value


@pytest.mark.parametrize(("raw", "key", "words"), [case[1:] for case in BAD_CASES],
                         ids=[case[0] for case in BAD_CASES])
def test_bad_value_is_refused_naming_the_key(raw, key, words):
    """Each bad value raises ParamsError whose message names the key and says what is allowed."""
    with pytest.raises(ParamsError) as info:
        parse(raw)
    message = str(info.value)
    assert info.value.key == key
    assert f"params.yaml: {key}:" in message
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


def lookahead_run(epochs: int, batch_size: int, copies: int = 0, fresh_views: bool = True, on_the_fly: bool = False,
                  processes: int = 1) -> dict:
    raw = copy.deepcopy(BASE)
    raw["augment"].update(copies=copies, on_the_fly=on_the_fly)
    raw["train"].update(lookahead=0.77, epochs=epochs, batch_size=batch_size, fresh_views=fresh_views,
                        drop_last=False, processes=processes)
    return raw


@pytest.mark.parametrize("raw, steps", [
    (lookahead_run(epochs=1, batch_size=16000), 4),  # 55,000 images: 3 batches and a partial one
    (lookahead_run(epochs=1, batch_size=13749, processes=5), 4),  # the last 4 images: fewer than 5 processes
])
def test_lookahead_refuses_a_run_too_short_for_one_sync(raw, steps):
    """Before any stage runs: inside train, the last model would already be deleted."""
    with pytest.raises(ParamsError, match=rf"^params.yaml: train.lookahead: syncs every 5 steps, and this run has {steps} "):
        parse(raw)


@pytest.mark.parametrize("raw", [
    lookahead_run(epochs=2, batch_size=16000),  # 8 steps
    lookahead_run(epochs=1, batch_size=16000, copies=4),  # originals + one view: 110,000 images, 7 steps
    lookahead_run(epochs=1, batch_size=16000, on_the_fly=True),  # the same, drawn on the fly
    lookahead_run(epochs=1, batch_size=55000, copies=4, fresh_views=False),  # every view: 5 steps
    lookahead_run(epochs=1, batch_size=13749, processes=4),  # 4 processes share the last 4 images
], ids=["two-epochs", "fresh-views", "on-the-fly", "all-views", "processes"])
def test_lookahead_accepts_a_run_of_five_steps_or_more(raw):
    assert parse(raw).train.lookahead == 0.77


def test_new_augmentations_are_off_by_default():
    """The committed params (MNIST) neither shift by pixels, flip nor erase: the default result stays."""
    augment = parse(copy.deepcopy(BASE)).augment
    assert (augment.pad, augment.flip, augment.erase, augment.allow_flip) == (0, 0.0, 0.0, False)
    assert augment.elastic_alpha == 0.0


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_augmentation_bounds_are_inclusive(dataset):
    """Probabilities 0 and 1, a shift of half the side and an erased square of the whole image are
    accepted; flipping is accepted on a flippable dataset as it is."""
    for flip, erase, pad, area in [(0.0, 0.0, 0, 1.0), (1.0, 1.0, 14, 1.0)]:
        raw = with_change("fetch", "dataset", dataset)
        raw["augment"].update(flip=flip, erase=erase, pad=pad, erase_area_min=area, erase_area_max=area,
                              allow_flip=dataset == "mnist")
        augment = parse(raw).augment
        assert (augment.flip, augment.erase, augment.pad) == (flip, erase, pad)


@pytest.mark.parametrize(("crop", "pool", "stem"), [(6, "early", "pool"), (7, "end", "pool"), (10, "end", "stride")])
def test_crops_whose_batchnorm_sees_more_than_one_pixel_are_accepted(crop, pool, stem):
    """Only pool: early with a 1x1 last block is refused: pooled at its end, the last block's
    BatchNorm still sees 2x2 pixels; a crop of 6 leaves 2x2 after the pool."""
    raw = with_change("train", "crop", crop)
    raw["train"].update(pool=pool, stem=stem)
    assert parse(raw).train.crop == crop


def test_crop_auto_is_the_datasets_crop():
    """train.crop: auto (as committed) is the dataset's `crop` from datasets.yaml, resolved by parse:
    MNIST's centred digits are cropped by 2 pixels a side, Fashion-MNIST's garments not at all, so
    switching the dataset with the default params does not cut garments. A number is taken as given
    on any dataset, and the model config gets the resolved crop."""
    assert BASE["train"]["crop"] == "auto"
    mnist = parse(copy.deepcopy(BASE))
    assert mnist.train.crop == mnist.dataset.crop == 2
    fashion = parse(with_change("fetch", "dataset", "fashion-mnist"))
    assert fashion.train.crop == fashion.dataset.crop == 0
    assert fashion.train.model_config(28, 10, mean=0.29, std=0.35).crop == 0
    explicit = with_change("fetch", "dataset", "fashion-mnist")
    explicit["train"]["crop"] = 3
    assert parse(explicit).train.crop == 3
    # An mlp resolves it too, and takes the whole image as ever (crop is cnn only).
    assert parse(with_change("train", "model", "mlp")).train.model_config(28, 10, mean=0.13, std=0.31).crop == 0


def test_crop_auto_comes_from_the_dataset_table(tmp_path, monkeypatch):
    """Whatever crop a dataset's entry gives is what auto resolves to (not a number kept elsewhere)."""
    entry = yaml.safe_load((PROJECT_ROOT / "stages" / "datasets.yaml").read_text())["mnist"]
    table = tmp_path / "datasets.yaml"
    table.write_text(yaml.safe_dump({"digits": {**entry, "crop": 1}}))
    monkeypatch.setattr(params_mod, "load_table", lambda: load_table(table))
    raw = with_change("fetch", "dataset", "digits")
    raw["fetch"]["mirrors"] = {"digits": ["http://127.0.0.1:9/"]}
    assert parse(raw).train.crop == 1


@pytest.mark.parametrize("crop, problem", [(11, "got 11"), ("2", "got '2'"), (True, "got True")])
def test_dataset_crop_is_validated(tmp_path, crop, problem):
    """A datasets.yaml entry's crop must be a whole number of pixels the CNN can take."""
    entry = yaml.safe_load((PROJECT_ROOT / "stages" / "datasets.yaml").read_text())["mnist"]
    table = tmp_path / "datasets.yaml"
    table.write_text(yaml.safe_dump({"digits": {**entry, "crop": crop}}))
    with pytest.raises(PipelineError, match=f"datasets.yaml: digits.crop: expected a whole number of pixels in 0-10, {problem}"):
        load_table(table)
    del entry["crop"]
    table.write_text(yaml.safe_dump({"digits": entry}))
    with pytest.raises(PipelineError, match="expected keys .*'crop'"):
        load_table(table)


@pytest.mark.parametrize(("change", "problem"), [
    ({"classes": [str(d) for d in range(9)] + ["8"]}, "digits.classes: names must differ"),
    ({"classes": ["Pull.over"] + [str(d) for d in range(1, 10)]}, "digits.classes: 'Pull.over': a name holds no '.'"),
    ({"classes": ["0\n1"] + [str(d) for d in range(1, 10)]}, r"digits.classes: '0\\n1': a name holds no '\.' nor control"),
    ({"classes": ["x" * 101] + [str(d) for d in range(1, 10)]}, "at most 100 characters"),
    ({"classes": ["only"]}, "digits.classes: expected a list of at least two names"),
    ({"files": "/tmp/labels"}, r"digits.files.test_labels.name: '/tmp/labels' is not a plain file name"),
    ({"files": "../t10k-labels-idx1-ubyte"}, r"digits.files.test_labels.name: '\.\./t10k-labels-idx1-ubyte' is not"),
    ({"files": ".hidden"}, r"'\.hidden' is not a plain file name"),
])
def test_dataset_class_and_file_names_are_validated(tmp_path, change, problem):
    """Class names key eval.json (DVC joins keys with dots) and end predict's lines; file names are
    joined to data/raw and to a mirror's directory, so a path in one would write outside data/raw."""
    entry = yaml.safe_load((PROJECT_ROOT / "stages" / "datasets.yaml").read_text())["mnist"]
    if "files" in change:
        entry["files"]["test_labels"]["name"] = change["files"]
    else:
        entry.update(change)
    table = tmp_path / "datasets.yaml"
    table.write_text(yaml.safe_dump({"digits": entry}))
    with pytest.raises(PipelineError, match=problem):
        load_table(table)


@pytest.mark.parametrize("name", ["k.mnist", "K-MNIST", "k mnist", "-k", "", "2024", 2024, "null", "inf"])
def test_a_dataset_name_can_be_a_dvc_param_key(tmp_path, name):
    """The name is fetch.dataset's value and a key of fetch.mirrors: `dvc exp run -S
    fetch.mirrors.k.mnist=[...]` splits at the dot, and `k.mnist` passed the table's check; `-S
    fetch.dataset=2024` (or null, inf) is read as no text."""
    entry = yaml.safe_load((PROJECT_ROOT / "stages" / "datasets.yaml").read_text())["mnist"]
    table = tmp_path / "datasets.yaml"
    table.write_text(yaml.safe_dump({name: entry, "k-mnist_2": entry}))
    with pytest.raises(PipelineError, match=rf"^datasets\.yaml: {re.escape(repr(name))}: a dataset's name is lowercase "):
        load_table(table)
    table.write_text(yaml.safe_dump({"k-mnist_2": entry}))
    assert list(load_table(table)) == ["k-mnist_2"]


@pytest.mark.parametrize("classes", [["0", "1", "0"], ["a", "b.c"], ["a", ""], ["a", "b\rc"]])
def test_dataset_class_names_can_key_the_metrics(tmp_path, classes):
    """eval.json's per_class is keyed by class name: two alike would merge, and DVC joins metric
    names with dots (per_class.a.b.accuracy would read as nested); a line break would split a row of
    metrics/confusion.csv."""
    entry = yaml.safe_load((PROJECT_ROOT / "stages" / "datasets.yaml").read_text())["mnist"]
    table = tmp_path / "datasets.yaml"
    table.write_text(yaml.safe_dump({"digits": {**entry, "classes": classes}}))
    with pytest.raises(PipelineError, match=r"datasets.yaml: digits.classes: "):
        load_table(table)


@pytest.mark.parametrize("framing, problem", [
    ({"box": 20}, "expected {box, centre}"),
    ({"box": 0, "centre": "mass"}, "box: expected whole pixels in 1-28, got 0"),
    ({"box": 20, "centre": "top"}, "centre: expected one of mass, box, got 'top'"),
])
def test_dataset_framing_is_validated(tmp_path, framing, problem):
    """A datasets.yaml entry's framing (how predict frames a picture for its models) is checked."""
    entry = yaml.safe_load((PROJECT_ROOT / "stages" / "datasets.yaml").read_text())["mnist"]
    table = tmp_path / "datasets.yaml"
    table.write_text(yaml.safe_dump({"digits": {**entry, "framing": framing}}))
    with pytest.raises(PipelineError) as raised:
        load_table(table)
    assert str(raised.value).startswith(f"datasets.yaml: digits.framing: {problem}")


def test_an_unreadable_dataset_table_is_one_error(tmp_path):
    with pytest.raises(PipelineError, match=r"datasets.yaml: cannot read the dataset table \(No such file"):
        load_table(tmp_path / "datasets.yaml")
    (tmp_path / "datasets.yaml").write_text("mnist: [unclosed\n")
    with pytest.raises(PipelineError, match="datasets.yaml: not valid YAML: "):
        load_table(tmp_path / "datasets.yaml")


def test_flip_on_digits_needs_allow_flip():
    """datasets.yaml marks MNIST unflippable and Fashion-MNIST flippable; flipping digits is refused
    unless augment.allow_flip says so."""
    assert not parse(copy.deepcopy(BASE)).dataset.flippable
    fashion = with_change("fetch", "dataset", "fashion-mnist")
    fashion["augment"]["flip"] = 0.5
    assert parse(fashion).dataset.flippable and parse(fashion).augment.flip == 0.5
    digits = with_change("augment", "flip", 0.5)
    with pytest.raises(ParamsError):
        parse(digits)
    digits["augment"]["allow_flip"] = True
    assert parse(digits).augment.flip == 0.5


def test_test_time_flip_follows_the_flip_rule_and_reaches_the_model_config():
    """train.tta_flip is accepted on a flippable dataset, or on digits with augment.allow_flip, and
    lands in the ModelConfig the model file stores, with tta_shift."""
    fashion = with_change("fetch", "dataset", "fashion-mnist")
    fashion["train"].update(tta_flip=True, tta_shift=1)
    config = parse(fashion).train.model_config(28, 10, mean=0.29, std=0.35)
    assert (config.tta_flip, config.tta_shift) == (True, 1)
    digits = with_change("train", "tta_flip", True)
    digits["augment"]["allow_flip"] = True
    assert parse(digits).train.tta_flip


@pytest.mark.parametrize(("section", "key"), [("train", "lr"), ("train", "weight_decay"), ("fetch", "timeout_s")])
def test_infinite_number_is_refused(section, key):
    """YAML `.inf` passes every `> 0` check, but no rate, decay or time-out can be infinite."""
    with pytest.raises(ParamsError) as info:
        parse(with_change(section, key, float("inf")))
    assert info.value.key == f"{section}.{key}"


@pytest.mark.parametrize("written", ["1e-05", "1E-5", "5.0e-5", "2.5e-1", "1e0"])
def test_a_number_with_an_exponent_is_read_as_dvc_reads_it(tmp_path, written):
    """YAML 1.1 (PyYAML) reads 1e-05 as a string; DVC reads params.yaml as YAML 1.2, a number, and
    writes 1e-05 there itself for `dvc exp run -S train.weight_decay=0.00001`: the stages agree."""
    from dvc.utils.serialize import modify_yaml, parse_yaml as dvc_parse_yaml

    path = tmp_path / "params.yaml"
    path.write_text(re.sub(r"^  weight_decay: .*$", f"  weight_decay: {written}", PARAMS_TEXT, count=1, flags=re.M))
    assert path.read_text() != PARAMS_TEXT
    expected = dvc_parse_yaml(path.read_text(), str(path))["train"]["weight_decay"]
    assert isinstance(expected, float) and load(path).train.weight_decay == expected
    with modify_yaml(path) as raw:  # what `dvc exp run -S` does
        raw["train"]["lr"] = 0.00001
    assert "  lr: 1e-05\n" in path.read_text()
    assert load(path).train.lr == 0.00001


@pytest.mark.parametrize(("section", "key"), [("preprocess", "seed"), ("augment", "seed"), ("train", "seed")])
def test_seeds_beyond_32_bits_are_refused(section, key):
    """numpy and scikit-learn take seeds below 2**32 only: a larger one (a timestamp in ms) would
    fail inside its stage after DVC had deleted the stage's outputs."""
    assert getattr(getattr(parse(with_change(section, key, 2**32 - 1)), section), key) == 2**32 - 1
    with pytest.raises(ParamsError, match=r"between 0 and 4294967295") as info:
        parse(with_change(section, key, 2**32))
    assert info.value.key == f"{section}.{key}"


def test_an_hour_long_timeout_is_the_limit():
    """A socket cannot wait 1e10 s (OverflowError mid-download); nothing useful waits over an hour."""
    assert parse(with_change("fetch", "timeout_s", 3600)).fetch.timeout_s == 3600.0
    with pytest.raises(ParamsError, match="at most 3600 seconds") as info:
        parse(with_change("fetch", "timeout_s", 3601))
    assert info.value.key == "fetch.timeout_s"


def test_an_integer_too_large_for_a_float_is_refused_by_name():
    """`lr: 1000...0` (400 digits) is a YAML integer that float() cannot hold: a ParamsError, not
    an OverflowError from the finiteness check."""
    with pytest.raises(ParamsError, match="too large for a float") as info:
        parse(with_change("train", "lr", 10**400))
    assert info.value.key == "train.lr"


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    """PyYAML would keep the second `lr` silently; DVC's parser, which the stages read params
    with, refuses the file, naming the key and where it repeats."""
    text = PARAMS_TEXT.replace("  lr: ", "  lr: 0.05\n  lr: ", 1)
    line = text.splitlines().index("  lr: 0.05") + 2  # 1-based, the second one
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=rf'params\.yaml: not valid YAML: found duplicate key "lr" .* \(line {line}, '):
        load(path)


@pytest.mark.parametrize("content", ["", "- a list\n", "train: [unclosed\n"], ids=["empty", "list", "bad yaml"])
def test_unusable_file_is_a_pipeline_error(tmp_path, content):
    """An empty file, a non-mapping or broken YAML is a one-line PipelineError, not a crash."""
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(PipelineError):
        load(path)


def run_stage(marker, params_path) -> subprocess.CompletedProcess:
    """`python -m stages.params MARKER --params PATH`, as the params stage runs it."""
    return subprocess.run([sys.executable, "-m", "stages.params", str(marker), "--params", str(params_path)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


def test_command_refuses_bad_params_in_one_line(tmp_path):
    """The params stage exits non-zero with one stderr line naming the key, and writes no marker."""
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_change("train", "lr", 0)))
    marker = tmp_path / "out" / "params-valid.txt"
    result = run_stage(marker, bad)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "train.lr" in lines[0]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not marker.parent.exists() or not any(marker.parent.iterdir())


def test_a_params_file_of_another_name_is_named_in_its_errors(tmp_path, monkeypatch):
    """`--params other.yaml`: its errors name other.yaml (they said params.yaml, a file the user had
    not touched); params.yaml itself keeps its name, however the path is written."""
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(with_change("train", "epochs", "zero")))
    with pytest.raises(ParamsError, match=rf"^{re.escape(str(other))}: train\.epochs: ") as raised:
        load(other)
    assert raised.value.key == "train.epochs"
    # The stage's checks of the machine, after the file's own checks, name it too
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    other.write_text(yaml.safe_dump(with_change("train", "device", "cuda")))
    with pytest.raises(ParamsError, match=rf"^{re.escape(str(other))}: train\.device: 'cuda' was requested"):
        params_mod.main([str(tmp_path / "valid.txt"), "--params", str(other)])
    assert not (tmp_path / "valid.txt").exists()
    other.write_text(yaml.safe_dump(with_change("train", "epochs", "zero")))
    (tmp_path / "params.yaml").write_text(other.read_text())
    monkeypatch.chdir(tmp_path)
    for name in ("params.yaml", "./params.yaml"):
        with pytest.raises(ParamsError, match=r"^params\.yaml: train\.epochs: "):
            load(name)


def test_command_writes_marker_for_valid_params(tmp_path):
    """With valid params the stage exits 0 and writes its constant marker."""
    good = tmp_path / "params.yaml"
    good.write_text(PARAMS_TEXT)
    marker = tmp_path / "params-valid.txt"
    result = run_stage(marker, good)
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == VALID_MARKER


def test_mirrors_of_an_unknown_dataset_are_refused():
    """fetch.mirrors is keyed by dataset: a misspelt key would otherwise be ignored for ever."""
    raw = copy.deepcopy(BASE)
    raw["fetch"]["mirrors"]["fashion_mnist"] = ["https://example.org/"]
    with pytest.raises(ParamsError) as raised:
        parse(raw)
    assert raised.value.key == "fetch.mirrors.fashion_mnist"
    # Every entry named (a table with a third dataset names it too)
    assert f"not a dataset of stages/datasets.yaml {tuple(load_table())}" in str(raised.value)


@pytest.mark.parametrize("device, processes, gpus, problem", [
    ("cuda", 1, 0, "train.device"),  # no GPU at all
    ("auto", 2, 1, "train.processes"),  # two processes, one GPU: NCCL would refuse mid-run
    ("cuda", 3, 2, "train.processes"),
    ("auto", 2, 2, None),
    ("auto", 2, 0, None),  # no GPU: auto trains on the CPU, where gloo runs any number of processes
    ("cpu", 4, 1, None),
])
def test_the_machine_has_the_gpus_params_ask_for(device, processes, gpus, problem, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    train = dataclasses.replace(parse(with_change("train", "device", device)).train, processes=processes)
    if problem is None:
        params_mod.check_gpus(train)
    else:
        with pytest.raises(ParamsError) as raised:
            params_mod.check_gpus(train)
        assert raised.value.key == problem


@pytest.mark.parametrize("device, processes, checked", [
    ("cuda", 1, True), ("auto", 2, True), ("auto", 1, False), ("cpu", 4, False)])
def test_params_stage_checks_the_gpus_when_params_ask_for_them(device, processes, checked, tmp_path, monkeypatch):
    """The params stage asks torch about GPUs only where params.yaml needs them (torch costs 1.5-2 s
    to import): `cuda`, or `auto` with several processes, which would share GPUs."""
    raw = with_change("train", "device", device)
    raw["train"]["processes"] = processes
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    calls = []
    monkeypatch.setattr(params_mod, "check_gpus", calls.append)
    params_mod.main([str(tmp_path / "params-valid.txt"), "--params", str(path)])
    assert [(train.device, train.processes) for train in calls] == ([(device, processes)] if checked else [])
    assert (tmp_path / "params-valid.txt").read_text() == VALID_MARKER


def test_params_stage_checks_the_compiler_that_train_compile_needs(tmp_path, monkeypatch):
    """train.compile: true without a C++ compiler that runs: the params stage stops with train's own
    line, before DVC deletes the last model to run train, and writes no marker."""
    from torch._inductor import config as inductor_config

    raw = with_change("train", "compile", True)
    raw["train"]["device"] = "cpu"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    marker = tmp_path / "params-valid.txt"
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++")}), pytest.raises(
            PipelineError, match=r"^train\.compile: torch\.compile on the CPU needs a C\+\+ compiler, and no-such-c\+\+"):
        params_mod.main([str(marker), "--params", str(path)])
    assert not marker.exists()
    checked = []  # where a compiler runs: the check passes, and the marker is written
    monkeypatch.setattr(params_mod, "check_compile", checked.append)
    params_mod.main([str(marker), "--params", str(path)])
    assert [device.type for device in checked] == ["cpu"] and marker.read_text() == VALID_MARKER


def test_a_params_file_in_another_encoding_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("train:\n  lr: 0.1  # \u00e9tape\n".encode("latin-1"))
    with pytest.raises(PipelineError) as info:
        params_mod.load_raw(path)
    assert str(info.value) == f"{path}: the params file is not UTF-8 text (byte 20: invalid continuation byte)"


@pytest.mark.parametrize("problem, reason", [("missing", "No such file or directory"), ("directory", "Is a directory")])
def test_a_params_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch, problem, reason):
    """Any reason the file cannot be read is a PipelineError naming it; a relative path (the default
    params.yaml) also says where the stages run, since it is taken from the working directory."""
    if problem == "directory":
        (tmp_path / "params.yaml").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as info:
        params_mod.load_raw()
    assert str(info.value) == (f"params.yaml: cannot read the params file ({reason}; the stages run from the "
                               "repository root)")
    with pytest.raises(PipelineError, match=rf"^{tmp_path}/params.yaml: cannot read the params file \({reason}\)$"):
        params_mod.load_raw(tmp_path / "params.yaml")


def test_every_comment_of_params_yaml_survives_dvc_exp_run_set(tmp_path):
    """`dvc exp run -S` rewrites params.yaml (DVC's apply_overrides, here called directly) and
    drops a comment that follows a list; `dvc exp apply` + commit then lost it for good (the
    fetch stage's download rate). Every comment of the committed file stays."""
    from dvc.utils.hydra import apply_overrides

    def comments(text: str) -> list[str]:
        return [line.split("#", 1)[1].strip() for line in text.splitlines() if "#" in line]

    path = tmp_path / "params.yaml"
    path.write_text((PROJECT_ROOT / "params.yaml").read_text())
    apply_overrides(path, ["train.lr=0.3", "augment.copies=2"])
    assert comments(path.read_text()) == comments((PROJECT_ROOT / "params.yaml").read_text())
    assert load(path).train.lr == 0.3


@pytest.mark.parametrize("where", ["section", "value", "mapping"])
def test_a_yaml_alias_bomb_gets_a_short_message(tmp_path, where):
    """Six levels of YAML aliases make a list of 10**6 items (ten: 10**10) while loading costs
    nothing, since the items are shared. The messages are built before their checks; they were the
    whole document (a hang at ten levels), and are bounded now."""
    text = (PROJECT_ROOT / "params.yaml").read_text()
    if where == "section":
        lines = ["b0: &b0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"b{n}: &b{n} [{', '.join([f'*b{n - 1}'] * 10)}]" for n in range(1, 6)]
        text = "\n".join(lines) + "\n" + text
    else:  # the bomb as train.lr, its anchors inline
        bomb = "&b0 [x, x, x, x, x, x, x, x, x, x]"
        for n in range(1, 6):
            bomb = f"&b{n} [{bomb}, {', '.join([f'*b{n - 1}'] * 9)}]"
        assert "\n  lr: 0.2" in text
        text = text.replace("\n  lr: 0.2", f"\n  lr: {bomb if where == 'value' else '{a: ' + bomb + '}'}", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load(path)
    assert len(str(info.value)) < 1000
    assert info.value.key == ("b0" if where == "section" else "train.lr")
