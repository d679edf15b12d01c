"""How fast this project trains, measured on this machine in one process (`make bench`).

    python -m benchmarks.speed [--device auto|cpu|cuda] [--skip-torchvision] [--skip-fast] [--repeats N]

1. One epoch of the tutorials' MLP 784-100-100-10 (Adam 0.01, batch 64, the mlp-100-100 preset) fed
   by the tutorials' input pipeline, torchvision's MNIST dataset + ToTensor + a DataLoader, and by
   this project's train_epoch on in-memory uint8 tensors. Both epochs cover the same 60,000 images
   of the official training set (the raw files in data/raw), so the times compare directly; each
   side's fastest of --repeats epochs counts.
2. Time-to-accuracy of the `fast` preset: train seconds (fit() on the prepared train and val
   splits) and its accuracy on the test split.
3. The peak resident memory of this process.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.presets import (DATA_DIR, augmented, load_splits, preset_params, synchronize, test_accuracy,
                                timed_fit)
from stages.common import describe_device, load_tensors, resolve_device, run_main, seed_everything
from stages.datasets import load_table
from stages.idx import read_pair
from stages.models import build_model, model_config
from stages.params import TrainParams
from stages.train import make_optimizer, train_epoch

RAW_DIR = Path("data/raw")  # the fetch stage's output: the four IDX .gz files
TUTORIAL_PRESET = "mlp-100-100"  # tutorials 000 and 003: MLP 784-100-100-10, Adam 0.01, batch 64
FAST_PRESET = "fast"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_machine(device: torch.device) -> None:
    print(f"CPU: {cpu_model()}; torch threads {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"device: {describe_device(device)}")


def official_train(raw_dir: Path, data_dir: Path) -> dict:
    """The 60,000 images of MNIST's official training set as uint8 tensors, laid out as
    data/prepared/train.pt (images, labels, classes, mean, std); the normalisation statistics are
    the prepared train split's, as the pipeline's models use."""
    mnist = load_table()["mnist"]
    images, labels = read_pair(raw_dir / mnist.files["train_images"].gz_name,
                               raw_dir / mnist.files["train_labels"].gz_name, mnist.image_size, len(mnist.classes))
    prepared = load_tensors(data_dir / "train.pt", required=("mean", "std"))
    return {"images": torch.from_numpy(images.copy()),  # a copy: parsed IDX arrays are read-only views
            "labels": torch.from_numpy(labels.astype("int64")),
            "classes": list(mnist.classes), "mean": prepared["mean"], "std": prepared["std"]}


def fresh_model(cfg: TrainParams, data: dict, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A newly initialised model and optimizer of `cfg` for `data`, seeded as fit() seeds them."""
    seed_everything(cfg.seed, cfg.deterministic)
    config = model_config(cfg, data["images"].shape[-1], len(data["classes"]), data["mean"], data["std"])
    model = build_model(config).to(device)
    return model, make_optimizer(model, cfg)


def tutorial_dataset(raw_dir: Path):
    """torchvision's MNIST training set, read from the IDX files in `raw_dir`.

    It reads root/MNIST/raw/ with the four *uncompressed* IDX files (it checks for those names; with
    download=False it raises rather than fetches when one is missing, and the .gz files alone would
    not do). It loads everything into memory, so the temporary root can go once it is built."""
    from torchvision import datasets, transforms  # only this measurement needs torchvision

    with tempfile.TemporaryDirectory(prefix="mnist-torchvision-") as root:
        target = Path(root, "MNIST", "raw")
        target.mkdir(parents=True)
        for gz_file in raw_dir.glob("*.gz"):
            with gzip.open(gz_file) as src, open(target / gz_file.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return datasets.MNIST(root, train=True, transform=transforms.ToTensor(), download=False)


def tutorial_epoch(cfg: TrainParams, data: dict, dataset, device: torch.device) -> tuple[float, float]:
    """(seconds, mean train loss) of one epoch written as the tutorials write it."""
    model, optimizer = fresh_model(cfg, data, device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True)
    synchronize(device)
    start = time.perf_counter()
    model.train()
    total_loss = 0.0
    for images, labels in loader:
        # ToTensor gives [B, 1, H, W] in [0, 1]; the model takes [B, H, W] pixels in [0, 255].
        images, labels = images.to(device).squeeze(1).mul_(255), labels.to(device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)  # the tutorials' running loss: a sync per step
    synchronize(device)
    return time.perf_counter() - start, total_loss / len(dataset)


def project_epoch(cfg: TrainParams, data: dict, device: torch.device) -> tuple[float, float]:
    """(seconds, mean train loss) of one epoch of this project's train_epoch on the same images."""
    model, optimizer = fresh_model(cfg, data, device)
    images, labels = data["images"].to(device), data["labels"].to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    synchronize(device)
    start = time.perf_counter()
    loss = train_epoch(model, model, optimizer, None, images, labels, cfg, generator, contextlib.nullcontext())
    synchronize(device)
    return time.perf_counter() - start, loss


def fastest(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return min(runs, key=lambda run: run[0])


def compare_input_pipelines(raw_dir: Path, data_dir: Path, device: torch.device, skip_torchvision: bool,
                            repeats: int) -> None:
    # Same model, optimizer, seed and torch settings on both sides: only the input pipeline differs.
    # Each side's fastest of `repeats` epochs (each from a fresh model) counts: that leaves out the
    # one-off costs of a device's first use (oneDNN kernel generation, CUDA context and cuBLAS
    # handles) and is the least disturbed by other processes.
    cfg = preset_params(TUTORIAL_PRESET).train
    data = official_train(raw_dir, data_dir)
    print(f"\n1. One epoch of MLP 784-{'-'.join(map(str, cfg.hidden))}-10, {cfg.optimizer} {cfg.lr:g}, "
          f"batch {cfg.batch_size}, on the {len(data['labels']):,} official training images "
          f"(fastest of {repeats})")
    ours, our_loss = fastest([project_epoch(cfg, data, device) for _ in range(repeats)])
    if skip_torchvision:
        print(f"   this project's train_epoch (in-memory uint8):   {ours:6.2f} s  (train loss {our_loss:.4f})")
        return
    dataset = tutorial_dataset(raw_dir)
    theirs, their_loss = fastest([tutorial_epoch(cfg, data, dataset, device) for _ in range(repeats)])
    print(f"   tutorials: torchvision MNIST + DataLoader:       {theirs:6.2f} s  (train loss {their_loss:.4f})")
    print(f"   this project's train_epoch (in-memory uint8):   {ours:6.2f} s  (train loss {our_loss:.4f})")
    print(f"   speed-up: {theirs / ours:.1f}x")


def time_to_accuracy(data_dir: Path, device: torch.device) -> None:
    params = preset_params(FAST_PRESET)
    train, val, test = load_splits(data_dir)
    cfg = params.train
    print(f"\n2. Preset {FAST_PRESET!r}: {cfg.model} {cfg.channels}, {cfg.epochs} epoch(s), batch {cfg.batch_size}, "
          f"{params.augment.copies} augmented copies")
    model, seconds = timed_fit(cfg, augmented(train, params.augment), val, device)
    accuracy = test_accuracy(model, test, len(train["classes"]), params.evaluate.batch_size)
    print(f"   trained in {seconds:.1f} s; test accuracy {100 * accuracy:.2f}% on {len(test['labels']):,} images")


def print_peak_memory() -> None:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"\n3. Peak resident memory of this process: {peak_kib / 1024:.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (auto: the GPU when there is one)")
    parser.add_argument("--skip-torchvision", action="store_true",
                        help="time only this project's epoch, not the tutorials' DataLoader one")
    parser.add_argument("--skip-fast", action="store_true", help=f"skip the {FAST_PRESET!r} preset's run")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per input pipeline; the fastest counts")
    parser.add_argument("--raw", type=Path, default=RAW_DIR, help="directory of the MNIST IDX .gz files")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="directory of train.pt, val.pt, test.pt")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = resolve_device(args.device)
    print_machine(device)
    compare_input_pipelines(args.raw, args.data, device, args.skip_torchvision, args.repeats)
    if not args.skip_fast:
        time_to_accuracy(args.data, device)
    print_peak_memory()


if __name__ == "__main__":
    run_main("benchmarks.speed", main)
