"""benchmarks.screen: candidates scored on val over rotating splits, test only into a sealed file."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import screen
from stages.common import PipelineError
from stages.datasets import load_table
from tests.synthetic import write_mirror


def test_quick_screen_takes_turns_and_scores_each_seed_on_its_own_split(tmp_path, capsys, monkeypatch):
    seen = []  # (candidate's lr, train.seed, the val split's images) for each fit()
    augment_seeds = []
    real_fit, real_augment = screen.timed_fit, screen.augmented_split

    def recording_fit(cfg, train, val, device):
        seen.append((cfg.lr, cfg.seed, val["images"].clone()))
        return real_fit(cfg, train, val, device)

    def recording_augment(data, cfg):
        augment_seeds.append(cfg.seed)
        return real_augment(data, cfg)

    monkeypatch.setattr(screen, "timed_fit", recording_fit)
    monkeypatch.setattr(screen, "augmented_split", recording_augment)
    sealed = tmp_path / "sealed.txt"
    screen.main(["--quick", "--preset", "fast", "--candidates", "{a: {}, b: {train.lr: 0.05}}",
                 "--seeds", "3,7", "--sealed-test", str(sealed)])
    out = capsys.readouterr().out
    progress = [line.split(":")[0] for line in out.splitlines() if ": val " in line]
    assert progress == ["a seed 3", "b seed 3", "b seed 7", "a seed 7"]  # the order turns each seed
    assert [(lr, seed) for lr, seed, _ in seen] == [(0.3, 3), (0.05, 3), (0.05, 7), (0.3, 7)]
    assert augment_seeds == [3, 3, 7, 7]
    # Within a seed both candidates see the same val images; the next seed, other ones.
    assert torch.equal(seen[0][2], seen[1][2]) and torch.equal(seen[2][2], seen[3][2])
    assert not torch.equal(seen[0][2], seen[2][2])
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| a ")
            or line.startswith("| b ")}
    assert set(rows) == {"a", "b"}
    assert rows["a"][5].strip() == "2 of 2" and rows["a"][7].strip() == "1.000"
    assert "%" in rows["b"][3] and float(rows["b"][7]) > 0
    # Test accuracy only in the sealed file: a header naming the screen, one line per run; nothing
    # of it on the screen.
    header, *lines = sealed.read_text().splitlines()
    assert header.startswith("# benchmarks.screen ") and "preset fast, seeds 3,7" in header and "train.lr" in header
    assert [line.split(":")[0] for line in lines] == ["a seed 3", "b seed 3", "b seed 7", "a seed 7"]
    assert all(line.endswith("%") for line in lines)
    assert not any("test" in line and "%" in line for line in out.splitlines())


def test_without_a_sealed_file_test_is_never_scored(tmp_path, capsys, monkeypatch):
    def no_test(*args, **kwargs):
        raise AssertionError("test accuracy computed without --sealed-test")

    monkeypatch.setattr(screen, "test_accuracy", no_test)
    screen.main(["--quick", "--preset", "fast", "--candidates", "{only: {}}", "--seeds", "0"])
    assert "| only |" in capsys.readouterr().out


def test_every_candidate_is_validated_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(screen, "prepare", lambda *args: pytest.fail("a split was prepared"))
    with pytest.raises(PipelineError, match="candidate 'b', seed 0: .*train.lr"):
        screen.main(["--quick", "--candidates", "{a: {}, b: {train.lr: -1}}", "--seeds", "0"])
    with pytest.raises(SystemExit):  # every seed checked when the command line is read
        screen.main(["--quick", "--candidates", "{a: {}}", "--seeds", "0,4294967296"])
    assert "--seeds: 4294967296 is over the largest seed, 4294967295" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the option named, not each candidate at each seed
        screen.main(["--quick", "--candidates", "{a: {}}", "--preset", "nosuch"])
    assert "error: --preset: unknown preset 'nosuch'; presets: " in capsys.readouterr().err
    with pytest.raises(PipelineError, match="share fetch.dataset"):
        screen.main(["--quick", "--candidates", "{a: {}, b: {fetch.dataset: fashion-mnist}}", "--seeds", "0"])
    with pytest.raises(PipelineError, match="share train.device"):
        screen.main(["--quick", "--candidates", "{a: {}, b: {train.device: cpu}}", "--seeds", "0"])
    sealed = tmp_path / "sealed.txt"
    with pytest.raises(PipelineError, match="no train-images-idx3-ubyte"):  # a screen that cannot run claims
        screen.main(["--candidates", "{a: {}}", "--raw", str(tmp_path / "none"), "--sealed-test", str(sealed)])
    assert not sealed.exists()  # no header there
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):  # a sealed file that cannot be written: one line, before training
        screen.main(["--quick", "--candidates", "{a: {}}", "--sealed-test", str(tmp_path / "afile" / "such.txt")])
    for bad in (["--candidates", "[1, 2]"],  # not a mapping of names to overrides
                ["--candidates", "{a: 3}"],
                ["--candidates", "{a: {train.seed: 4}}"],  # seeds come from --seeds
                ["--candidates", "{a: {}}", "--seeds", "1,1"],  # the same split scored twice
                ["--candidates", "{a: {}}", "--seeds", "0,-1"],  # no seed is negative
                ["--candidates", "{a: {}}", "--raw", str(tmp_path)]):  # --quick writes its own data
        with pytest.raises(SystemExit):
            screen.main(["--quick", *bad])


def test_raw_files_of_another_dataset_are_refused_before_any_split(tmp_path, monkeypatch):
    """MNIST's and Fashion-MNIST's files share names: the checksums tell them apart."""
    monkeypatch.setattr(screen, "prepare", lambda *args: pytest.fail("a split was prepared"))
    write_mirror(tmp_path / "other", n_train=60, n_test=20)  # the right names, not MNIST's bytes
    with pytest.raises(PipelineError, match="dataset is mnist.*--raw"):
        screen.main(["--candidates", "{a: {}}", "--seeds", "0", "--raw", str(tmp_path / "other")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=re.escape(
            "no train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
            "(nor .gz); point --raw at")):
        screen.check_raw(tmp_path / "empty", load_table()["mnist"])


def test_default_names_params_yaml_as_the_frontier_does():
    """--preset default (as the frontier says it) is presets.yaml's cnn: params.yaml unchanged."""
    candidates = {"now": {}, "crop3": {"train.crop": 3}}
    by_default = screen.screen_params("default", candidates, [0, 1], {})
    assert by_default == screen.screen_params("cnn", candidates, [0, 1], {})
    assert by_default[("crop3", 1)].train.crop == 3 and by_default[("now", 1)].train.seed == 1


def test_summary_compares_each_candidate_with_the_first():
    runs = [screen.Run("base", 0, 0.990, 2.0, 0.1), screen.Run("new", 0, 0.992, 3.0, 0.1),
            screen.Run("new", 1, 0.985, 3.0, 0.1), screen.Run("base", 1, 0.988, 2.0, 0.1)]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in screen.summary(runs).splitlines()[2:]}
    assert rows["base"] == ["99.00 / 98.80", "98.900%", "98.80%", "2 of 2", "2.00", "1.000"]
    assert rows["new"] == ["99.20 / 98.50", "98.850%", "98.50%", "1 of 2", "3.00", "1.500"]
