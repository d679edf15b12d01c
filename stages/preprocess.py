"""Stage preprocess: parse the IDX files, split train/val, write tensor files to data/prepared/.

The official training set is split into train and val, stratified by class so each class keeps its
share; the official test set is kept untouched. Images stay uint8 [N, H, W] (4x smaller than float;
the model's first layer normalises each batch); labels are int64 [N]. train.pt also carries the pixel mean and
std of the train split alone, in [0, 1] units, so nothing about val or test leaks into training.
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from stages import params as params_mod
from stages.common import PipelineError, log, run_main, tensor_bytes, write_files_atomic
from stages.datasets import FILE_ROLES, TABLE_PATH, Dataset, digest_problem, known_files, load_table
from stages.idx import LabelOutOfRangeError, read_bytes, read_pair
from stages.params import PreprocessParams

STAGE = "preprocess"


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, val), each sorted, with val_size indices in val and class shares kept."""
    indices = np.arange(len(labels))
    train_idx, val_idx = train_test_split(indices, test_size=val_size, stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) std of all pixels of uint8 images, in [0, 1] units.

    Computed from exact integer sums, so every CPU gets the same bits: a float reduction's
    summation order depends on the vector width and thread count, and an AVX2 and an AVX-512
    machine once wrote train.pt files that differed only in the last bit of the std, hence in
    their DVC hash. A histogram of the 256 grey levels is all it takes, and needs no copy of the
    images.
    """
    counts = torch.bincount(images.reshape(-1), minlength=256).tolist()
    n = sum(counts)
    total = sum(level * count for level, count in enumerate(counts))
    squares = sum(level * level * count for level, count in enumerate(counts))
    # Fractions keep everything exact until the two final roundings to float.
    mean = Fraction(total, n)
    variance = (squares - total * mean) / (n - 1)
    return float(mean / 255), math.sqrt(variance) / 255


def _tensors(images: np.ndarray, labels: np.ndarray) -> dict:
    # np.array copies: parsed IDX arrays are read-only views of the file's bytes.
    return {"images": torch.from_numpy(np.array(images)),
            "labels": torch.from_numpy(labels.astype(np.int64))}


def read_split(raw_dir: Path, dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels uint8 [N]) of the official `split` ("train" or "test") in
    `raw_dir`'s IDX files, plain or .gz, checked (format, size, image size, label range)."""
    roles = (f"{split}_images", f"{split}_labels")
    # All four checked, not this split's two: a caller that reads the train split first (a
    # benchmark's timed epochs) would otherwise name the test files only after its work.
    missing = dataset.missing_from(raw_dir)
    if missing:  # a traceback's FileNotFoundError otherwise
        raise PipelineError(f"{raw_dir}: {missing}; {dataset.name}'s four IDX files must be there (the fetch "
                            "stage writes them to data/raw: `dvc repro fetch`)")
    images, labels = (dataset.files[role] for role in roles)
    # Bounded by the sizes the table's counts give (idx.stored_limit's file for each): data/raw was
    # verified by fetch, but a benchmark's --raw may point anywhere, and a wrong file there must not
    # fill the memory.
    try:
        return read_pair(images.path_in(raw_dir), labels.path_in(raw_dir), dataset.image_size, len(dataset.classes),
                         max_sizes=(images.size, labels.size))
    except LabelOutOfRangeError as exc:  # the table's fault as likely as the file's (an entry being written)
        raise PipelineError(f"{exc}: {TABLE_PATH.name}'s {dataset.name}.classes lists {len(dataset.classes)} "
                            "names, one per label") from None


def raw_files_problem(raw_dir: Path, dataset: Dataset) -> str | None:
    """Which of `raw_dir`'s four files is not `dataset`'s as the table pins it, and why ("<path>:
    SHA-256 of the uncompressed content is ..."), or None; a missing one is read_split's to name.
    Fetch verified data/raw, but DVC may have placed it since from a damaged cache (`dvc checkout`
    checks no content): the stage checks again before it reads a label (a damaged one would be
    blamed on the table), 0.1 s for MNIST's four files; the benchmarks check their --raw so too."""
    known = known_files(load_table())  # to say "it is fashion-mnist's ..." of a garment under MNIST's name
    for role in FILE_ROLES:
        file = dataset.files[role]
        path = file.path_in(raw_dir)
        if not path.is_file():
            continue
        try:
            content = read_bytes(path, file.size)  # bounded by its size, as read_split reads it
        except PipelineError as exc:  # damaged gzip, too large, unreadable: it names the file
            return str(exc)
        problem = digest_problem(file, content, known)
        if problem:
            return f"{path}: {problem}"
    return None


def read_files(raw_dir: Path, dataset: Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "test"}: read_split of each."""
    return {split: read_split(raw_dir, dataset, split) for split in ("train", "test")}


def check_counts(files: dict[str, tuple[np.ndarray, np.ndarray]], dataset: Dataset) -> None:
    """Raises unless the files hold as many images as the dataset table says (and says so of a class
    it names that no train image has): params.py checked preprocess.val_size and the batch sizes
    against its train_count, before the files were read (the digests pin MNIST's and
    Fashion-MNIST's; this is for an entry someone adds)."""
    for split in ("train", "test"):
        expected, found = getattr(dataset, f"{split}_count"), len(files[split][1])
        if found != expected:
            raise PipelineError(f"{TABLE_PATH.name}: {dataset.name}.{split}_count is {expected:,}, but its files "
                                f"hold {found:,} images: correct the table entry")
    # A class no train image has: a model output never trained, a per_class accuracy of null. Said,
    # not refused: a dataset may leave a label unused on purpose (EMNIST's letters start at 1).
    unseen = sorted(set(range(len(dataset.classes))) - set(np.unique(files["train"][1]).tolist()))
    if unseen:
        names = ", ".join(f"{dataset.classes[k]} ({k})" for k in unseen)
        log(STAGE, f"warning: no train image has the label of {names}, which {TABLE_PATH.name}'s "
                   f"{dataset.name}.classes lists: the model's output for it is never trained")


def split_files(files: dict[str, tuple[np.ndarray, np.ndarray]], dataset: Dataset,
                cfg: PreprocessParams) -> dict[str, dict]:
    """The prepared splits {"train", "val", "test"} as this stage writes them (train also carries
    the pixel mean and std)."""
    classes = list(dataset.classes)
    (images, labels), (test_images, test_labels) = files["train"], files["test"]
    train_idx, val_idx = stratified_split(labels, cfg.val_size, cfg.seed)
    train = _tensors(images[train_idx], labels[train_idx])
    mean, std = pixel_stats(train["images"])
    return {"train": {**train, "classes": classes, "mean": mean, "std": std},
            "val": {**_tensors(images[val_idx], labels[val_idx]), "classes": classes},
            "test": {**_tensors(test_images, test_labels), "classes": classes}}


def prepare(raw_dir: Path, dataset: Dataset, cfg: PreprocessParams) -> dict[str, dict]:
    """The prepared splits of the IDX files in `raw_dir`, as this stage writes them; the
    benchmarks' way in (their --quick data is smaller than the table's counts, so no check_counts)."""
    return split_files(read_files(raw_dir, dataset), dataset, cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages/run {STAGE}", description=__doc__.splitlines()[0])
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    params = params_mod.load()
    problem = raw_files_problem(args.raw_dir, params.dataset)
    if problem:
        raise PipelineError(f"{problem}; the file is damaged or not {params.dataset.name}'s: `dvc repro -f fetch` "
                            "fetches and verifies it again")
    files = read_files(args.raw_dir, params.dataset)
    check_counts(files, params.dataset)  # before the split, which fails on fewer images than val_size
    splits = split_files(files, params.dataset, params.preprocess)
    train = splits["train"]
    log(STAGE, f"train {len(train['labels']):,}, val {len(splits['val']['labels']):,}, "
               f"test {len(splits['test']['labels']):,} images; "
               f"train pixel mean {train['mean']:.4f}, std {train['std']:.4f}")
    write_files_atomic({args.out_dir / f"{name}.pt": tensor_bytes(split) for name, split in splits.items()})


if __name__ == "__main__":
    run_main(STAGE, main)
