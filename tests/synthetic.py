"""Tiny synthetic MNIST-format datasets that the tests make themselves.

Class k is a bright 6x6 block at its own place on a 4x3 grid (jittered by up to a pixel) over
faint noise: trivially learnable, so a pipeline run on it shows real learning in seconds.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages import params as params_mod
from stages.common import save_tensors
from stages.datasets import Dataset, load_table
from stages.idx import write_idx
from stages.preprocess import pixel_stats

SIZE = 28
NUM_CLASSES = 10
NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def make_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, 28, 28] and labels [n], every class present (labels cycle 0..9, shuffled)."""
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, SIZE, SIZE), dtype=np.uint8)
    for i, k in enumerate(labels):
        row, col = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
        dr, dc = rng.integers(-1, 2, size=2)
        images[i, row + dr:row + dr + 6, col + dc:col + dc + 6] = 255
    return images, labels


def write_mirror(directory: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> dict:
    """Writes the four .gz files to `directory`; returns the matching datasets.yaml entry."""
    rng = np.random.default_rng(seed)
    train_images, train_labels = make_split(n_train, rng)
    test_images, test_labels = make_split(n_test, rng)
    arrays = {"train_images": train_images, "train_labels": train_labels,
              "test_images": test_images, "test_labels": test_labels}
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, array in arrays.items():
        content = write_idx(array)
        (directory / f"{NAMES[role]}.gz").write_bytes(gzip.compress(content))
        files[role] = {"name": NAMES[role], "sha256": hashlib.sha256(content).hexdigest()}
    return {"files": files, "train_count": n_train, "test_count": n_test, "image_size": SIZE,
            "classes": [str(k) for k in range(NUM_CLASSES)], "flippable": False,
            "crop": 2,  # as MNIST's: the test project runs the default's cropped network
            "framing": {"box": 20, "centre": "mass"}}  # MNIST's


def write_prepared(directory: Path, classes: list[str], n: int = 20, seed: int = 0) -> None:
    """train.pt, val.pt and test.pt in `directory` as the preprocess stage writes them, of n images
    each, for a dataset with these class names (the benchmarks tell datasets apart by them)."""
    images, labels = (torch.from_numpy(a.copy()) for a in make_split(n, np.random.default_rng(seed)))
    labels = labels.long() % len(classes)
    mean, std = pixel_stats(images)
    save_tensors(directory / "train.pt", {"images": images, "labels": labels, "classes": list(classes),
                                          "mean": mean, "std": std})
    for split in ("val", "test"):
        save_tensors(directory / f"{split}.pt", {"images": images, "labels": labels, "classes": list(classes)})


def synthetic_dataset(tmp_path: Path, entry: dict) -> Dataset:
    """`entry` (a datasets.yaml entry, as write_mirror returns) as the table reads it, named
    `synthetic`; its table file is tmp_path/datasets.yaml."""
    table_path = tmp_path / "datasets.yaml"
    table_path.write_text(yaml.safe_dump({"synthetic": entry}))
    return load_table(table_path)["synthetic"]


def use_synthetic_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, entry: dict,
                          changes: dict[str, dict]) -> params_mod.Params:
    """Makes stages.params.load() return the repository's params.yaml (as committed, unless an
    experiment left its params there: the test report says so) with fetch.dataset `synthetic`:
    `entry` joins the dataset table (synthetic_dataset), and `changes` ({section: {key: value}}) are
    applied; returns those params, for a stage's main() to run on."""
    table = {**load_table(), "synthetic": synthetic_dataset(tmp_path, entry)}
    monkeypatch.setattr(params_mod, "load_table", lambda: table)
    raw = yaml.safe_load((Path(params_mod.__file__).parents[1] / "params.yaml").read_text())
    raw["fetch"].update(dataset="synthetic", mirrors={"synthetic": ["http://127.0.0.1:9/"]})  # nothing listens
    for section, values in changes.items():
        raw[section].update(values)
    params = params_mod.parse(raw)
    monkeypatch.setattr(params_mod, "load", lambda *args, **kwargs: params)
    return params
