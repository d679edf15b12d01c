"""presets.yaml: every preset, applied to the committed params.yaml, is a valid set of params."""

from __future__ import annotations

import re

import pytest
import yaml

from benchmarks import presets as bench
from stages.common import PipelineError
from stages.params import parse
from stages.presets import apply, check, load_presets, resolve
from tests.conftest import PROJECT_ROOT
from tests.synthetic import write_prepared

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


def test_a_preset_that_breaks_a_rule_is_named_with_the_key(tmp_path):
    """An invalid value from a preset is reported against the preset and the key, not as an
    error in params.yaml; a bad value of the file itself says so."""
    params_path = tmp_path / "params.yaml"
    params_path.write_text((PROJECT_ROOT / "params.yaml").read_text())
    with pytest.raises(PipelineError, match=r"^preset 'fast\+x' \(presets\.yaml\) on .*params\.yaml: "
                                            r"train\.lr \(overridden\): must be > 0, got -1\.0$"):
        check("fast+x", {**PRESETS["fast"], "train.lr": -1.0}, params_path)
    with pytest.raises(PipelineError, match=r"train\.channels\[0\] \(overridden\): must be an integer"):
        check("x", {"train.channels": ["x", 64, 128]}, params_path)  # an item of a list the preset sets
    params_path.write_text((PROJECT_ROOT / "params.yaml").read_text().replace("  epochs: ", "  epochs: 0 #", 1))
    with pytest.raises(PipelineError, match=r"train\.epochs \(as in .*params\.yaml\): must be between 1 and 1000"):
        check("cnn-max+mlp-best", {"train.lr": 0.1}, params_path)


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


MNIST_CLASSES = [str(d) for d in range(10)]


def test_preset_benchmark_refuses_a_named_preset_of_another_dataset_before_training(tmp_path, capsys):
    """`fashion` on MNIST's prepared splits would print a row of digit accuracy under its name."""
    write_prepared(tmp_path, MNIST_CLASSES)
    with pytest.raises(PipelineError, match=r"^fashion: fetch.dataset is not the dataset prepared in"):
        bench.main(["fast", "fashion", "--data", str(tmp_path)])
    assert capsys.readouterr().out == ""  # refused before any row, header included


def test_preset_benchmark_default_list_skips_the_other_dataset_and_runs_the_rest(tmp_path, capsys, monkeypatch):
    write_prepared(tmp_path, MNIST_CLASSES)
    monkeypatch.setattr(bench, "default_specs", lambda presets: ["fast", "fashion", "cnn"])
    ran = []
    monkeypatch.setattr(bench, "run_preset",
                        lambda params, splits: ran.append(params.fetch.dataset) or (0.5, 1.0))  # (accuracy, s)
    bench.main(["--data", str(tmp_path)])
    out, err = capsys.readouterr()
    assert ran == ["mnist", "mnist"]
    assert [line.split(" |")[0] for line in out.splitlines()[2:]] == ["| fast", "| cnn"], out
    assert "skipping fashion: another dataset" in err, err

    # Every entry of the list on another dataset (here by an override): refused, nothing run.
    ran.clear()
    with pytest.raises(PipelineError, match="every preset of the default list: fetch.dataset is not the dataset prepared"):
        bench.main(["--data", str(tmp_path), "--set", "fetch.dataset=fashion-mnist"])
    assert ran == []


def test_preset_benchmark_trains_and_scores_each_preset_for_real(tmp_path, capsys):
    """No stand-in: each preset trains on the splits (augmented as its params say) and its test
    accuracy and time make a row, on stdout and in --out."""
    write_prepared(tmp_path, MNIST_CLASSES, n=200)
    table = tmp_path / "table.md"
    bench.main(["fast", "mlp-100-100+aug", "--data", str(tmp_path), "--set", "train.epochs=1", "--out", str(table)])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (.+) \| (\d+\.\d\d)% \| (\d+\.\d) \|$", out, flags=re.MULTILINE)
    assert [label for label, _, _ in rows] == ["fast train.epochs=1", "mlp-100-100+aug train.epochs=1"], out
    assert all(0 <= float(accuracy) <= 100 and float(seconds) >= 0 for _, accuracy, seconds in rows)
    assert table.read_text() == out
