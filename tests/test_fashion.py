"""The fashion preset and dataset-aware augmentation, end to end on synthetic data."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from stages import params as params_mod
from stages.presets import apply, load_presets, resolve
from tests.conftest import PROJECT_ROOT
from tests.test_pipeline import digest

BASE = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
PRESETS = load_presets(PROJECT_ROOT / "presets.yaml")


def test_every_preset_validates():
    """Each preset applied to the committed params.yaml passes validation."""
    for name in PRESETS:
        params_mod.parse(apply(BASE, resolve(name, PRESETS)))


def test_fashion_preset_command():
    """`python -m stages.presets fashion` passes and sets Fashion-MNIST with flips, shifts and erasing."""
    result = subprocess.run([sys.executable, "-m", "stages.presets", "fashion"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    options = result.stdout.split()
    assert "-Sfetch.dataset=fashion-mnist" in options
    params = params_mod.parse(apply(BASE, resolve("fashion", PRESETS)))
    assert params.dataset.flippable and params.augment.flip > 0 and params.augment.erase > 0
    assert params.augment.pad > 0 and not params.augment.allow_flip


def test_fashion_max_is_the_fashion_recipe_for_20_epochs_on_views_drawn_on_the_fly():
    """What docs/fashion-mnist.md says of it: the same network, augmentation and test-time views;
    only the epochs and where the views come from differ (20 stored views: 862 MB of output)."""
    fashion, longer = (params_mod.parse(apply(BASE, resolve(name, PRESETS))) for name in ("fashion", "fashion-max"))
    assert longer.train.epochs == 20 and longer.augment.on_the_fly and longer.augment.copies == 0
    assert dataclasses.replace(longer.train, epochs=fashion.train.epochs) == fashion.train
    assert dataclasses.replace(longer.augment, on_the_fly=False, copies=fashion.augment.copies) == fashion.augment
    assert dataclasses.replace(longer, train=fashion.train, augment=fashion.augment) == fashion


@pytest.mark.integration  # a real `dvc repro` of a project copy (about 30 s)
def test_flip_on_unflippable_data_fails_first_then_runs_when_allowed(project):
    """The fashion preset's augmentation on the synthetic digits-like dataset (flippable: false):
    refused by the params stage before any output changes; with augment.allow_flip it runs through,
    re-running augment and what follows it."""
    augment_keys = {key.split(".", 1)[1]: value for key, value in resolve("fashion", PRESETS).items()
                    if key.startswith("augment.")}
    outputs = ["data/augmented/train.pt", "models/model.pt", "metrics/eval.json"]
    before = {name: digest(project.path(name)) for name in outputs}
    project.set_params({"augment": augment_keys})
    result = project.dvc("repro", check=False)
    assert result.returncode != 0
    assert "params.yaml: augment.flip:" in result.stderr + result.stdout
    assert {name: digest(project.path(name)) for name in outputs} == before
    project.set_params({"augment": {"allow_flip": True}})
    assert {"augment", "train", "evaluate"} <= project.repro()
    assert digest(project.path("data/augmented/train.pt")) != before["data/augmented/train.pt"]
