"""benchmarks.screen: candidates scored on val over rotating splits, test only into a sealed file."""

from __future__ import annotations

import pytest
import torch

from benchmarks import screen
from stages.common import PipelineError
from stages.datasets import load_table
from tests.synthetic import write_mirror


def test_quick_screen_takes_turns_and_scores_each_seed_on_its_own_split(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen = []  # (candidate's lr, train.seed, the val split's images) for each fit()
    real_fit = screen.fit

    def recording_fit(cfg, train, val, device):
        seen.append((cfg.lr, cfg.seed, val["images"].clone()))
        return real_fit(cfg, train, val, device)

    monkeypatch.setattr(screen, "fit", recording_fit)
    sealed = tmp_path / "sealed.txt"
    screen.main(["--quick", "--preset", "fast", "--candidates", "{a: {}, b: {train.lr: 0.05}}",
                 "--seeds", "3,7", "--sealed-test", str(sealed)])
    out = capsys.readouterr().out
    progress = [line.split(":")[0] for line in out.splitlines() if ": val " in line]
    assert progress == ["a seed 3", "b seed 3", "b seed 7", "a seed 7"]  # the order turns each seed
    assert [(lr, seed) for lr, seed, _ in seen] == [(0.3, 3), (0.05, 3), (0.05, 7), (0.3, 7)]
    # Within a seed both candidates see the same val images; the next seed, other ones.
    assert torch.equal(seen[0][2], seen[1][2]) and torch.equal(seen[2][2], seen[3][2])
    assert not torch.equal(seen[0][2], seen[2][2])
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| a ")
            or line.startswith("| b ")}
    assert set(rows) == {"a", "b"}
    assert rows["a"][5].strip() == "2 of 2" and rows["a"][7].strip() == "1.000"
    assert "%" in rows["b"][3] and float(rows["b"][7]) > 0
    # Test accuracy only in the sealed file, one line per run; nothing of it on the screen.
    assert [line.split(":")[0] for line in sealed.read_text().splitlines()] == [
        "a seed 3", "b seed 3", "b seed 7", "a seed 7"]
    assert not any("test" in line and "%" in line for line in out.splitlines())


def test_without_a_sealed_file_test_is_never_scored(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def no_test(*args, **kwargs):
        raise AssertionError("test accuracy computed without --sealed-test")

    monkeypatch.setattr(screen, "test_accuracy", no_test)
    screen.main(["--quick", "--preset", "fast", "--candidates", "{only: {}}", "--seeds", "0"])
    assert "| only |" in capsys.readouterr().out


def test_every_candidate_is_validated_before_anything_runs(monkeypatch):
    monkeypatch.setattr(screen, "prepare", lambda *args: pytest.fail("a split was prepared"))
    with pytest.raises(PipelineError, match="train.lr"):
        screen.main(["--quick", "--candidates", "{a: {}, b: {train.lr: -1}}", "--seeds", "0"])
    with pytest.raises(PipelineError, match="fetch.dataset and preprocess.val_size"):
        screen.main(["--quick", "--candidates", "{a: {}, b: {fetch.dataset: fashion-mnist}}", "--seeds", "0"])
    with pytest.raises(SystemExit):  # not a mapping of names to overrides
        screen.main(["--candidates", "[1, 2]"])
    with pytest.raises(SystemExit):
        screen.main(["--candidates", "{a: 3}"])
    with pytest.raises(SystemExit):  # a repeated seed would score the same split twice
        screen.main(["--candidates", "{a: {}}", "--seeds", "1,1"])


def test_raw_files_of_another_dataset_are_refused(tmp_path):
    """MNIST's and Fashion-MNIST's files share names: the checksums tell them apart."""
    write_mirror(tmp_path, n_train=60, n_test=20)
    with pytest.raises(PipelineError, match="dataset is mnist.*--raw"):
        screen.check_raw(tmp_path, load_table()["mnist"])


def test_summary_compares_each_candidate_with_the_first():
    runs = [screen.Run("base", 0, 0.990, 2.0, 0.1), screen.Run("new", 0, 0.992, 3.0, 0.1),
            screen.Run("new", 1, 0.985, 3.0, 0.1), screen.Run("base", 1, 0.988, 2.0, 0.1)]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in screen.summary(runs).splitlines()[2:]}
    assert rows["base"] == ["99.00 / 98.80", "98.900%", "98.80%", "2 of 2", "2.00", "1.000"]
    assert rows["new"] == ["99.20 / 98.50", "98.850%", "98.50%", "1 of 2", "3.00", "1.500"]
