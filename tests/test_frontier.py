"""benchmarks.frontier --quick: the whole benchmark on tiny synthetic data, so the script cannot rot.

Not a timing test: the numbers it prints are not checked, only that every part ran and reported.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import sys

import pytest
import torch
# The reference recipe reads MNIST through torchvision: the test extra carries it (pyproject), so
# this test runs wherever the tests do, never skipped.
import torchvision  # noqa: F401

from benchmarks import frontier
from benchmarks.reference import place_for_torchvision
from stages import params as params_mod
from stages import preprocess
from stages.common import PipelineError
from stages.presets import load_presets
from tests.synthetic import write_mirror, write_prepared


def test_quick_run_interleaves_reference_and_presets_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plot = tmp_path / "frontier.png"
    frontier.main(["--quick", "--presets", "default,fast", "--seeds", "0,1", "--reference-epochs", "2",
                   "--plot", str(plot)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("CPU: ") and "torch threads" in lines[0] and "torch " in lines[0]
    assert lines[1].startswith("params: params.yaml ")  # as committed, or how it differs (test_bench_scripts)
    progress = [line.split(":")[0] for line in lines[2:8]]
    assert progress == ["reference epoch 1", "default seed 0", "fast seed 0",
                        "reference epoch 2", "default seed 1", "fast seed 1"]
    rows = [line for line in lines if line.startswith("| default ") or line.startswith("| fast ")]
    assert [row.split("|")[1].strip() for row in rows] == ["default", "fast"]
    assert all(row.split("|")[2].strip() == "0,1" for row in rows)
    assert all(row.split("|")[5].strip().endswith("%") for row in rows)  # mean val accuracy
    ratios = [row.split("|")[7].strip() for row in rows]  # reference epochs, 3 significant digits
    assert all(float(ratio) > 0 and len(ratio.lstrip("0.").replace(".", "")) <= 3 for ratio in ratios)
    assert "reference epoch (median of 2)" in out
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_set_applies_a_param_to_every_preset_after_its_own(tmp_path, monkeypatch):
    """--set measures a lever across the presets: each run's params carry it, validated first."""
    seen = []
    monkeypatch.setattr(frontier, "run_preset", lambda name, seed, params, *rest: seen.append(params) or
                        frontier.PresetRun(name, seed, 0.5, 0.5, 1.0, 1.0))
    frontier.main(["--quick", "--presets", "default,fast", "--seeds", "0", "--reference-epochs", "1",
                   "--set", "train.lookahead=0.5", "--set", "train.epochs=2", "--plot", str(tmp_path / "f.png")])
    assert [(p.train.lookahead, p.train.epochs) for p in seen] == [(0.5, 2), (0.5, 2)]
    assert seen[1].train.channels == load_presets()["fast"]["train.channels"]  # fast's own params kept
    with pytest.raises(PipelineError, match="train.lookahead"):
        frontier.main(["--quick", "--set", "train.lookahead=2", "--plot", str(tmp_path / "g.png")])
    with pytest.raises(SystemExit):  # every "seed" would be the same run
        frontier.main(["--quick", "--set", "train.seed=3", "--plot", str(tmp_path / "h.png")])


def test_set_refuses_preprocess_params_the_prepared_splits_would_not_follow(tmp_path, capsys):
    """--set preprocess.val_size was honoured only where data/prepared was missing: the same
    command gave other splits on another machine."""
    with pytest.raises(SystemExit):
        frontier.main(["--quick", "--set", "preprocess.val_size=1000", "--plot", str(tmp_path / "f.png")])
    assert "--set preprocess.val_size: the runs use the prepared splits as they are" in capsys.readouterr().err


def test_unknown_preset_is_refused_before_anything_runs(tmp_path, capsys):
    """A usage error, as argparse reports one: status 2, the option named."""
    with pytest.raises(SystemExit) as info:
        frontier.main(["--quick", "--presets", "default,nope", "--plot", str(tmp_path / "f.png")])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "error: --presets: unknown preset 'nope'; presets: " in err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--plot", "{tmp}/afile/f.png"], "argument --plot: {tmp}/afile/f.png: cannot write (Not a directory: {tmp}/afile)"),
    (["--plot", "{tmp}"], "argument --plot: {tmp}: is a folder; name a file"),
    (["--seeds", "0,0"], "--seeds: a seed given twice would count one run twice in the means"),
    (["--seeds", ""], "--seeds: no seed given"),
    (["--seeds", "0,,1"], "argument --seeds: '0,,1': an empty item between commas"),
    (["--seeds", "4294967295-4294967296"], "--seeds: 4294967296 is over the largest seed, 4294967295 (2**32 - 1)"),
    (["--device", "cuda"], "argument --device: 'cuda' was requested but no CUDA GPU is available"),
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from auto, cpu, cuda)"),
    (["--set", "train.device=cpu"], "--set train.device: every run trains where --device says"),
    (["--raw", "{tmp}"], "--quick writes its own tiny data: it takes no --raw or --data"),
    (["--seeds", "3-1"], "argument --seeds: '3-1': a range runs from the lower number to the higher"),
], ids=["plot under a file", "plot a folder", "seed twice", "no seed", "empty seed", "seed too large", "cuda without a GPU",
        "unknown device", "device by --set", "quick with --raw", "range backwards"])
def test_an_output_or_seed_that_cannot_work_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, args,
                                                                              message):
    """Not a traceback after the whole run: a full one takes an hour. The flag named, not train.device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    (tmp_path / "afile").write_text("x")
    args = [arg.format(tmp=tmp_path) for arg in args]
    with pytest.raises(SystemExit) as info:
        frontier.main(["--quick", "--plot", str(tmp_path / "f.png"), *args])
    assert info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_a_preset_of_another_dataset_is_refused_before_anything_runs(tmp_path, capsys):
    # `fashion` has no reference recipe here, and would be trained on MNIST's splits.
    with pytest.raises(PipelineError, match=r"^fashion: fetch.dataset is fashion-mnist; the frontier measures MNIST presets"):
        frontier.main(["--quick", "--presets", "default,fashion", "--plot", str(tmp_path / "f.png")])
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "f.png").exists()


def test_prepared_splits_of_another_dataset_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    # After a `fashion` repro data/prepared holds garments: an MNIST preset must not be timed on them.
    # (data/raw is checked first, against MNIST's real checksums: taken as MNIST's here.)
    monkeypatch.setattr(frontier, "check_raw", lambda raw_dir, dataset: None)
    write_prepared(tmp_path, ["T-shirt/top", "Trouser", *map(str, range(8))])
    with pytest.raises(PipelineError, match="holds another dataset than MNIST"):
        frontier.main(["--presets", "fast", "--seeds", "0", "--data", str(tmp_path), "--raw", str(tmp_path),
                       "--plot", str(tmp_path / "f.png")])
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "f.png").exists()


def test_torchvision_gets_the_files_uncompressed_from_data_raw_or_a_mirror(tmp_path):
    """data/raw holds the IDX files plain (the fetch stage), a mirror gzipped; torchvision's MNIST
    wants them plain in root/MNIST/raw/."""
    mirror = tmp_path / "mirror"
    names = [file["name"] for file in write_mirror(mirror, n_train=60, n_test=20)["files"].values()]
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in names:
        (raw / name).write_bytes(gzip.decompress((mirror / f"{name}.gz").read_bytes()))
    for source in (raw, mirror):
        place_for_torchvision(source, tmp_path / f"root-{source.name}")
        placed = tmp_path / f"root-{source.name}" / "MNIST" / "raw"
        assert sorted(p.name for p in placed.iterdir()) == sorted(names)
        assert all((placed / name).read_bytes() == (raw / name).read_bytes() for name in names)


def test_torchvision_gets_no_more_of_a_file_than_mnist_has(tmp_path):
    """A --raw folder holding a wrong, larger file (a sparse 64 MiB train-images file; MNIST's is
    47,040,016 bytes) is refused one byte past MNIST's size, not copied whole."""
    mirror = tmp_path / "mirror"
    write_mirror(mirror, n_train=60, n_test=20)
    (mirror / "train-images-idx3-ubyte.gz").unlink()
    with (mirror / "train-images-idx3-ubyte").open("wb") as huge:
        huge.truncate(64 << 20)
    with pytest.raises(PipelineError, match=r"train-images-idx3-ubyte: content larger than 47,040,016 bytes"):
        place_for_torchvision(mirror, tmp_path / "root")


def refused_before_any_run(tmp_path, capsys, match: str, data: str | None) -> None:
    """`fast` on --data tmp_path/data (None: no --data) and --raw tmp_path/mirror raises PipelineError
    matching `match`, having printed nothing and drawn no figure."""
    with pytest.raises(PipelineError, match=match):
        frontier.main(["--presets", "fast", "--seeds", "0", *(["--data", str(tmp_path / data)] if data else []),
                       "--raw", str(tmp_path / "mirror"), "--plot", str(tmp_path / "f.png")])
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "f.png").exists()


def test_a_raw_folder_without_the_files_is_named_before_the_reference_trains(tmp_path, capsys):
    """--raw pointing elsewhere, the prepared splits in place (the reference recipe reads the IDX
    files through torchvision all the same): one line naming the folder and what it lacks, no
    traceback, nothing timed and no figure."""
    write_prepared(tmp_path / "prepared", [str(digit) for digit in range(10)])
    write_mirror(tmp_path / "mirror", n_train=60, n_test=20)
    (tmp_path / "mirror" / "train-labels-idx1-ubyte.gz").unlink()
    refused_before_any_run(tmp_path, capsys, re.escape(
        f"{tmp_path / 'mirror'}: no train-labels-idx1-ubyte (nor .gz); point --raw at the directory"), "prepared")


def test_a_raw_folder_of_other_files_under_mnists_names_is_refused_before_the_reference_trains(tmp_path, capsys):
    """--raw holding other files under MNIST's names (Fashion-MNIST's after a `fashion` repro; here
    synthetic ones) while the prepared splits are MNIST's: the reference recipe would train on them
    and set the clock, so the checksums are checked first."""
    write_prepared(tmp_path / "prepared", [str(digit) for digit in range(10)])
    write_mirror(tmp_path / "mirror", n_train=60, n_test=20)
    refused_before_any_run(tmp_path, capsys, r"mirror/train-images-idx3-ubyte\.gz: SHA-256 .* The benchmark's "
                                             r"dataset is mnist: run `dvc repro fetch` with fetch\.dataset: mnist",
                           "prepared")


def test_raw_files_are_checked_before_missing_splits_are_built_from_them(tmp_path, capsys, monkeypatch):
    """No prepared splits: the frontier would build them from --raw, so --raw is checked first, and
    a file another dataset of the table lists is named as that dataset's."""
    monkeypatch.setattr(frontier, "prepare", lambda *args: pytest.fail("splits were built from unchecked files"))
    monkeypatch.setattr(frontier, "DATA_DIR", tmp_path / "none")  # no --data, and no data/prepared
    entry = write_mirror(tmp_path / "mirror", n_train=60, n_test=20)
    garment = entry["files"]["train_images"]["sha256"]
    monkeypatch.setattr(preprocess, "known_files",
                        lambda table: {garment: "fashion-mnist's train-images-idx3-ubyte"})
    refused_before_any_run(tmp_path, capsys, r"train-images-idx3-ubyte\.gz: SHA-256 .*: it is fashion-mnist's "
                                             r"train-images-idx3-ubyte\. The benchmark's dataset is mnist", None)


@pytest.mark.parametrize("layout", ["no folder", "a file", "two of three"])
def test_a_data_folder_without_the_splits_is_refused_not_ignored(tmp_path, capsys, layout):
    """--data named and wrong was silently replaced by splits prepared from --raw (benchmarks.speed
    refused it): a mistake on the command line, refused as argparse refuses one, naming what lacks."""
    data = tmp_path / "data"
    if layout == "a file":
        data.write_text("x")
    elif layout == "two of three":
        write_prepared(data, [str(digit) for digit in range(10)])
        (data / "val.pt").unlink()
    with pytest.raises(SystemExit) as info:
        frontier.main(["--presets", "fast", "--seeds", "0", "--data", str(data), "--plot", str(tmp_path / "f.png")])
    missing = "val.pt" if layout == "two of three" else "train.pt, val.pt, test.pt"
    assert info.value.code == 2
    assert f"--data {data}: no {missing} there" in capsys.readouterr().err


def test_reference_alone_refuses_zero_epochs_and_files_that_are_not_mnists(tmp_path, capsys):
    from benchmarks import reference
    with pytest.raises(SystemExit) as exit_info:
        reference.main(["--epochs", "0"])
    assert exit_info.value.code == 2 and "argument --epochs: '0': not a whole number >= 1" in capsys.readouterr().err
    write_mirror(tmp_path / "mirror", n_train=60, n_test=20)  # MNIST's names, not its bytes
    with pytest.raises(PipelineError, match=r"train-images-idx3-ubyte\.gz: SHA-256 .* The benchmark's dataset is mnist"):
        reference.main(["--raw", str(tmp_path / "mirror")])
    assert capsys.readouterr().out == ""


def test_reference_epochs_do_not_depend_on_random_numbers_drawn_between_them(tmp_path):
    """The frontier runs presets (which reseed and draw from torch's global generator) between the
    reference recipe's epochs; its dropout masks, hence its losses, must not change with them, and
    the caller's random state must not change with the recipe."""

    from benchmarks.reference import torchvision_mnist, train_reference
    from tests.synthetic import write_mirror

    write_mirror(tmp_path / "raw", n_train=192, n_test=64)
    train_set, test_set = torchvision_mnist(tmp_path / "raw", tmp_path / "torchvision")
    device = torch.device("cpu")

    def losses(between) -> list[float]:
        return [result.train_loss for result in _interleaved(train_reference(train_set, test_set, 3, 0, device), between)]

    def _interleaved(epochs, between):
        for result in epochs:
            yield result
            between()

    def reseed_and_draw() -> None:
        torch.manual_seed(123)
        torch.rand(1000)

    alone = losses(lambda: None)
    assert losses(reseed_and_draw) == alone
    assert len(set(alone)) == 3  # three different epochs, not a constant

    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as fit() leaves it
    try:
        next(train_reference(train_set, test_set, 1, 0, device))
        assert torch.equal(torch.rand(5), expected)
        assert torch.are_deterministic_algorithms_enabled()  # restored after the recipe's defaults
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim and mallopt are glibc's, on Linux")
def test_release_freed_memory_hands_the_heap_back_between_runs():
    """With the train stage's allocator setting, freed blocks stay resident; release_freed_memory()
    (called before each preset run, so its peak is its own) gives them back."""

    from stages.runtime import release_freed_memory, retain_freed_memory

    assert retain_freed_memory()
    blocks = [torch.ones(1 << 20) for _ in range(100)]  # 100 x 4 MiB, under the 32 MiB mmap threshold: heap
    del blocks
    before = frontier.PeakMemory.current()
    assert release_freed_memory() is True
    assert before - frontier.PeakMemory.current() >= 200 << 20


def test_default_is_params_yaml_as_committed_with_the_seeds():
    """'default' goes through presets.yaml's `cnn`, which must stay empty for this to hold."""
    committed = params_mod.load()
    assert frontier.preset_params("default", 7, {}) == dataclasses.replace(
        committed, train=dataclasses.replace(committed.train, seed=7),
        augment=dataclasses.replace(committed.augment, seed=7))


def test_table_gives_means_minimum_and_the_ratio_to_three_significant_digits():
    """0.0829 and 0.0792 must not both print as 0.08 next to a 0.08 target."""
    runs = [frontier.PresetRun("fast", 0, 0.9907, 0.9896, 5.0, 1200.0),
            frontier.PresetRun("fast", 1, 0.9925, 0.9904, 5.46, 1300.4)]
    header, rule, row = frontier.table(runs, reference_epoch_s=63.1).splitlines()
    assert row == "| fast | 0,1 | 99.16% | 99.07% | 99.00% | 5.2 | 0.0829 | 1300 |"
