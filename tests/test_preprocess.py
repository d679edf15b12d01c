"""stages.preprocess: the stratified train/val split, the train split's pixel statistics, and the
files' counts against the dataset table."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
import torch

from stages import preprocess
from stages.common import PipelineError
from stages.preprocess import check_counts, pixel_stats, read_files, stratified_split
from tests.synthetic import synthetic_dataset, use_synthetic_dataset, write_mirror

# Unequal classes, so that "shares kept" means something: class k has 20 + 10 k images.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 20 + 10 * np.arange(10)))
VAL_SIZE = 123  # 18.9%: shares are fractional, so rounding matters


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    return stratified_split(LABELS, VAL_SIZE, seed=0)


def test_sizes(split):
    """val holds exactly val_size indices, train the rest."""
    train, val = split
    assert len(val) == VAL_SIZE
    assert len(train) == len(LABELS) - VAL_SIZE


def test_disjoint_covering_sorted(split):
    """Every index lands in exactly one side; each side is sorted (the documented contract)."""
    train, val = split
    assert not set(train) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(LABELS)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)


def test_class_shares_kept(split):
    """Each class's val count is its share of val_size, within one image."""
    _, val = split
    counts = np.bincount(LABELS, minlength=10)
    val_counts = np.bincount(LABELS[val], minlength=10)
    expected = counts * VAL_SIZE / len(LABELS)
    assert np.all(np.abs(val_counts - expected) <= 1), (val_counts, expected)
    assert np.all(val_counts >= 1)


def test_deterministic_per_seed(split):
    """The same seed gives the same split; another seed another one."""
    train, val = split
    again_train, again_val = stratified_split(LABELS, VAL_SIZE, seed=0)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    _, other_val = stratified_split(LABELS, VAL_SIZE, seed=1)
    assert not np.array_equal(val, other_val)


def test_pixel_stats_match_numpy():
    """Mean and std of all pixels, in [0, 1] units."""
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(50, 28, 28), dtype=np.uint8))
    pixels = images.numpy().astype(np.float64) / 255
    mean, std = pixel_stats(images)
    assert mean == pytest.approx(pixels.mean(), rel=1e-12)
    # Sample or population std: they differ by 1e-5 relative on 39,200 pixels; either is right.
    assert std == pytest.approx(pixels.std(), rel=1e-4)
    assert isinstance(mean, float) and isinstance(std, float)


def test_pixel_stats_no_uint8_overflow():
    """All-white images have mean exactly 1 and std 0 (no wrap-around when summing uint8)."""
    mean, std = pixel_stats(torch.full((10, 28, 28), 255, dtype=torch.uint8))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_pixel_stats_are_exact_whatever_the_pixel_order():
    """Exact sums: any order of the pixels (a float reduction's order depends on the CPU's vector
    width and thread count) gives the same bits, equal to the correctly rounded float64 values."""
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(300, 28, 28), dtype=np.uint8))
    shuffled = images.reshape(-1)[torch.randperm(images.numel(), generator=torch.Generator().manual_seed(0))]
    assert pixel_stats(images) == pixel_stats(shuffled.reshape(images.shape))
    pixels = images.numpy().astype(np.float64) / 255
    mean, std = pixel_stats(images)
    assert mean == pytest.approx(pixels.mean(), rel=1e-14)
    assert std == pytest.approx(pixels.std(ddof=1), rel=1e-12)


@pytest.mark.parametrize("key", ["train_count", "test_count"])
def test_counts_other_than_the_tables_are_refused(tmp_path, key):
    """The stage refuses files that hold another count than the table's, naming the table's key."""
    entry = write_mirror(tmp_path / "raw", n_train=300, n_test=100)
    files = read_files(tmp_path / "raw", synthetic_dataset(tmp_path, entry))
    check_counts(files, synthetic_dataset(tmp_path, entry))  # as the table says: accepted
    with pytest.raises(PipelineError, match=rf"datasets.yaml: synthetic\.{key} is 301, but its files hold "
                                            rf"{entry[key]:,} images: correct the table entry"):
        check_counts(files, synthetic_dataset(tmp_path, {**entry, key: 301}))


def test_class_names_other_than_the_labels_are_named_with_the_table(tmp_path, capsys):
    """An entry being written with too many class names trained an output no image has (per_class
    null) without a word: said (not refused: EMNIST's letters leave label 0 unused on purpose); too
    few failed with "label 9 is outside 0..8", which named no table key."""
    entry = write_mirror(tmp_path / "raw", n_train=300, n_test=100)
    files = read_files(tmp_path / "raw", synthetic_dataset(tmp_path, entry))
    check_counts(files, synthetic_dataset(tmp_path, entry))
    assert capsys.readouterr().err == ""
    eleven = {**entry, "classes": [*entry["classes"], "extra"]}
    check_counts(files, synthetic_dataset(tmp_path, eleven))
    assert capsys.readouterr().err == ("preprocess: warning: no train image has the label of extra (10), which "
                                       "datasets.yaml's synthetic.classes lists: the model's output for it is never "
                                       "trained\n")
    nine = {**entry, "classes": entry["classes"][:9]}
    with pytest.raises(PipelineError, match=r"label 9 is outside 0\.\.8: datasets\.yaml's synthetic\.classes lists 9 "
                                            r"names, one per label$"):
        read_files(tmp_path / "raw", synthetic_dataset(tmp_path, nine))


def test_a_missing_file_is_named_with_what_writes_it(tmp_path):
    """Run by hand on a folder without the fetch stage's files: one line naming the file, no traceback."""
    entry = write_mirror(tmp_path / "raw", n_train=300, n_test=100)
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(PipelineError, match=re.escape(
            f"{tmp_path / 'raw'}: no t10k-labels-idx1-ubyte (nor .gz); synthetic's four IDX files must be "
            "there (the fetch stage writes them to data/raw: `dvc repro fetch`)")):
        read_files(tmp_path / "raw", synthetic_dataset(tmp_path, entry))


def test_a_file_larger_than_the_table_allows_is_refused_unread(tmp_path):
    """A folder that is not data/raw (a benchmark's --raw) may hold a wrong, huge file: it is read
    no further than the table's size for it allows (gzip's allowance and one byte past), and refused,
    not read whole. Here a
    sparse 256 MiB file in place of the test labels (108 bytes by the table)."""
    entry = write_mirror(tmp_path / "raw", n_train=300, n_test=100)
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with (tmp_path / "raw" / "t10k-labels-idx1-ubyte").open("wb") as huge:
        huge.write(b"\x00\x00\x08\x01")
        huge.truncate(256 << 20)
    with pytest.raises(PipelineError, match=r"t10k-labels-idx1-ubyte: content larger than 108 bytes \(refused\): "
                                           r"its IDX header gives the dimensions 0$"):
        read_files(tmp_path / "raw", synthetic_dataset(tmp_path, entry))


def test_main_checks_the_counts_before_splitting(tmp_path, monkeypatch):
    """params.py checks val_size against the table's train_count before any file is read; with a
    table that overstates it, val_size may exceed the images there are, and the stage must say
    what is wrong rather than fail inside the split (scikit-learn's ValueError, a traceback)."""
    entry = write_mirror(tmp_path / "raw", n_train=300, n_test=100)
    use_synthetic_dataset(monkeypatch, tmp_path, {**entry, "train_count": 60000}, {})  # val_size 5,000 > 300
    with pytest.raises(PipelineError, match=r"synthetic\.train_count is 60,000, but its files hold 300 images"):
        preprocess.main([str(tmp_path / "raw"), str(tmp_path / "prepared")])
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("damage", ["pixel", "label"])
def test_main_refuses_raw_files_the_table_does_not_pin(tmp_path, monkeypatch, damage):
    """data/raw placed by DVC from a damaged cache (`dvc checkout` checks no content) is still a
    valid IDX file: one changed pixel would be split and trained on, one label past the classes
    blamed on the table. The stage checks each file's digest first and names the file."""
    entry = write_mirror(tmp_path / "raw", n_train=300, n_test=100)
    use_synthetic_dataset(monkeypatch, tmp_path, entry, {"preprocess": {"val_size": 50}})
    name = {"pixel": "t10k-images-idx3-ubyte", "label": "train-labels-idx1-ubyte"}[damage]
    content = bytearray(gzip.decompress((tmp_path / "raw" / f"{name}.gz").read_bytes()))
    content[-1] = 200  # a pixel of the last image, or a label no class has
    (tmp_path / "raw" / f"{name}.gz").unlink()
    (tmp_path / "raw" / name).write_bytes(content)  # plain, as fetch writes data/raw
    with pytest.raises(PipelineError, match=rf"raw/{name}: SHA-256 of the uncompressed content is [0-9a-f]{{64}}, "
                                            r"stages/datasets\.yaml expects [0-9a-f]{64}; the file is damaged or "
                                            r"not synthetic's: `dvc repro -f fetch` fetches and verifies it again$"):
        preprocess.main([str(tmp_path / "raw"), str(tmp_path / "prepared")])
    assert not (tmp_path / "prepared").exists()


def test_main_refuses_a_raw_file_it_cannot_read_whole_with_the_fetch_advice(tmp_path, monkeypatch):
    """A .gz cut short in data/raw fails before its digest can be taken: the same refusal, naming the
    file and the way out, before anything is written."""
    entry = write_mirror(tmp_path / "raw", n_train=300, n_test=100)
    use_synthetic_dataset(monkeypatch, tmp_path, entry, {"preprocess": {"val_size": 50}})
    packed = tmp_path / "raw" / "train-labels-idx1-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:-12])
    with pytest.raises(PipelineError, match=r"raw/train-labels-idx1-ubyte\.gz: damaged gzip data \(.*\); the file is "
                                            r"damaged or not synthetic's: `dvc repro -f fetch` fetches and verifies"):
        preprocess.main([str(tmp_path / "raw"), str(tmp_path / "prepared")])
    assert not (tmp_path / "prepared").exists()


def test_main_writes_its_three_splits_together_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails part-way (a full disk) leaves the last run's three files as they were and
    no temporaries: never a new train split beside an old test split."""
    entry = write_mirror(tmp_path / "raw", n_train=300, n_test=100)
    use_synthetic_dataset(monkeypatch, tmp_path, entry, {"preprocess": {"val_size": 50}})
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    old = {name: f"last run's {name}".encode() for name in ("train.pt", "val.pt", "test.pt")}
    for name, content in old.items():
        (prepared / name).write_bytes(content)

    real_write_bytes, written = type(prepared).write_bytes, []

    def disk_full_at_the_third_file(path, data):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(path.name)
        return real_write_bytes(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(type(prepared), "write_bytes", disk_full_at_the_third_file)
        with pytest.raises(PipelineError, match=r"prepared/test.pt: cannot write \(No space left on device\)$"):
            preprocess.main([str(tmp_path / "raw"), str(prepared)])
    assert len(written) == 2, "two splits were written in full before the disk filled"
    assert {path.name: path.read_bytes() for path in prepared.iterdir()} == old

    preprocess.main([str(tmp_path / "raw"), str(prepared)])
    assert sorted(path.name for path in prepared.iterdir()) == ["test.pt", "train.pt", "val.pt"]
    assert [len(torch.load(prepared / f"{name}.pt")["labels"]) for name in ("train", "val", "test")] == [250, 50, 100]


def test_the_pixel_statistics_are_the_train_splits_alone():
    """The model normalises with the train split's mean and std: val's pixels must not leak in
    (here val's images are all white, so any share of them would move both)."""
    from types import SimpleNamespace
    labels = np.repeat(np.arange(10, dtype=np.uint8), 6)
    images = np.zeros((60, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 200
    cfg = SimpleNamespace(val_size=20, seed=0)
    _, val_idx = stratified_split(labels, cfg.val_size, cfg.seed)
    images[val_idx] = 255
    dataset = SimpleNamespace(classes=tuple(str(k) for k in range(10)))
    splits = preprocess.split_files({"train": (images, labels), "test": (images[:10], labels[:10])}, dataset, cfg)
    assert (splits["train"]["mean"], splits["train"]["std"]) == pixel_stats(splits["train"]["images"])
    assert splits["train"]["mean"] == pytest.approx(64 * 200 / 255 / 784)
