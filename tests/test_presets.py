"""presets.yaml: every preset, applied to the committed params.yaml, is a valid set of params."""

from __future__ import annotations

import pytest
import torch
import yaml

from benchmarks import presets as bench
from stages.common import PipelineError, save_tensors
from stages.params import parse
from stages.presets import apply, load_presets, resolve
from tests.conftest import PROJECT_ROOT

PRESETS = load_presets(PROJECT_ROOT / "presets.yaml")
RAW = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_against_params_yaml(name):
    params = parse(apply(RAW, resolve(name, PRESETS)))
    for dotted, value in PRESETS[name].items():
        section, key = dotted.split(".", 1)
        assert getattr(getattr(params, section), key) == value, dotted


def test_unknown_key_in_a_preset_is_refused():
    with pytest.raises(PipelineError, match="'train.nope' is not a key of params.yaml"):
        apply(RAW, {"train.nope": 1})


TUTORIAL_PRESETS = list(PRESETS)[:list(PRESETS).index("aug")]  # presets.yaml lists them before `aug`


@pytest.mark.parametrize("name", TUTORIAL_PRESETS)
def test_tutorial_presets_train_as_the_tutorials_do_whatever_the_defaults_add(name):
    """A tutorial preset reproduces a published recipe, so none of this project's training tricks
    may reach it through params.yaml's defaults: no weight averaging, no lookahead, no test-time
    augmentation, no augmentation, fp32."""
    train = parse(apply(RAW, resolve(name, PRESETS))).train
    assert (train.ema, train.lookahead, train.tta_shift, train.tta_flip, train.precision) == (0.0, 0.0, 0, False, "fp32")
    augment = parse(apply(RAW, resolve(name, PRESETS))).augment
    assert (augment.copies, augment.on_the_fly) == (0, False)


def _prepared_mnist(directory):
    """Three tiny prepared splits with MNIST's class names, as the preprocess stage writes them."""
    classes = [str(d) for d in range(10)]
    images, labels = torch.zeros(20, 28, 28, dtype=torch.uint8), torch.arange(20) % 10
    save_tensors(directory / "train.pt", {"images": images, "labels": labels, "classes": classes,
                                          "mean": 0.1, "std": 0.3})
    for split in ("val", "test"):
        save_tensors(directory / f"{split}.pt", {"images": images, "labels": labels, "classes": classes})


def test_preset_benchmark_refuses_a_preset_of_another_dataset_before_training(tmp_path, capsys):
    """`fashion` on MNIST's prepared splits would print a row of digit accuracy under its name."""
    _prepared_mnist(tmp_path)
    with pytest.raises(PipelineError, match=r"^fashion: fetch.dataset is not the dataset prepared in"):
        bench.main(["fast", "fashion", "--data", str(tmp_path)])
    assert capsys.readouterr().out == ""  # refused before any row, header included
    params = [bench.preset_params(spec) for spec in ("fast", "fashion", "cnn")]
    assert bench.on_other_data(["fast", "fashion", "cnn"], params, [str(d) for d in range(10)]) == ["fashion"]
