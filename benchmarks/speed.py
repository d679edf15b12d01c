"""How fast this project trains, measured on this machine in one process (`make bench`).

    python -m benchmarks.speed [--device auto|cpu|cuda] [--skip-torchvision] [--skip-fast] [--repeats N]

1. One epoch of the tutorials' MLP 784-100-100-10 (Adam 0.01, batch 64, the mlp-100-100 preset)
   (a) as the tutorials train it: torchvision's MNIST dataset + ToTensor + a DataLoader, and
   torch.optim.Adam with its defaults; (b) by this project's train_epoch on in-memory uint8 tensors
   with the train stage's optimizer; and (c) the floor under any input pipeline: (b)'s model and
   optimizer stepped on one batch that is already in place. Same model, initial weights, seed and
   torch settings throughout; every epoch covers the 60,000 images of the official training set
   (the raw files in data/raw), so the times compare directly; each one's fastest of --repeats
   epochs counts.
2. Time-to-accuracy of the `fast` preset: train seconds (fit() on the prepared train and val
   splits) and its accuracy on the test split.
3. The peak resident memory of this process.

Everything runs with the train stage's allocator setting (runtime.retain_freed_memory), applied
before the first measurement, so that it favours neither side of the comparison.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.presets import (DATA_DIR, RAW_DIR, augmented, check_prepared_is_mnist, check_raw, device_option,
                                lifetime_peak_rss, load_splits, positive_int, preset_params, synchronize,
                                test_accuracy, timed_fit)
from benchmarks.reference import place_for_torchvision
from stages.common import PipelineError, load_tensors, run_main
from stages.datasets import Dataset, load_table
from stages.models import build_network
from stages.params import TrainParams, steps_per_epoch
from stages.preprocess import read_split
from stages.runtime import cpu_model, describe_device, retain_freed_memory, seed_everything
from stages.train import Batches, TrainingState, make_loss, make_optimizer, train_epoch

TUTORIAL_PRESET = "mlp-100-100"  # tutorials 000 and 003: MLP 784-100-100-10, Adam 0.01, batch 64
FAST_PRESET = "fast"


def print_machine(device: torch.device, allocator_tuned: bool) -> None:
    # The vector instruction set decides which oneDNN/MKL kernels run, so both the speed and the
    # exact numerics: "AMD EPYC" alone names CPUs from AVX2-only to AVX-512 with bf16.
    print(f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}); torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}; "
          f"malloc keeps freed memory: {'yes' if allocator_tuned else 'no (not glibc)'}")
    print(f"device: {describe_device(device)}")


def official_train(raw_dir: Path, mnist: Dataset, prepared: dict) -> dict:
    """The 60,000 images of MNIST's official training set as uint8 tensors, laid out as
    data/prepared/train.pt (images, labels, classes, mean, std); the normalisation statistics are
    the `prepared` train split's, as the pipeline's models use."""
    images, labels = read_split(raw_dir, mnist, "train")
    return {"images": torch.from_numpy(images.copy()),  # a copy: parsed IDX arrays are read-only views
            "labels": torch.from_numpy(labels.astype("int64")),
            "classes": list(mnist.classes), "mean": prepared["mean"], "std": prepared["std"]}


def fresh_model(cfg: TrainParams, data: dict, device: torch.device) -> torch.nn.Module:
    """A newly initialised network of `cfg` for `data`, seeded as fit() seeds it: one network
    whatever train.networks says (the loops compared step a network, as the tutorials do)."""
    seed_everything(cfg.seed, cfg.deterministic)
    config = cfg.model_config(data["images"].shape[-1], len(data["classes"]), data["mean"], data["std"])
    return build_network(config).to(device)


def tutorial_dataset(raw_dir: Path):
    """torchvision's MNIST training set, read from the IDX files in `raw_dir`
    (place_for_torchvision). It loads everything into memory, so the temporary root can go once it
    is built."""
    try:  # only this measurement needs torchvision: the bench extra, not a pipeline dependency
        from torchvision import datasets, transforms
    except ModuleNotFoundError:
        raise PipelineError("torchvision is not installed: `make bench` installs it (the bench extra), "
                            "or pass --skip-torchvision") from None

    with tempfile.TemporaryDirectory(prefix="mnist-torchvision-") as root:
        place_for_torchvision(raw_dir, Path(root))
        return datasets.MNIST(root, train=True, transform=transforms.ToTensor(), download=False)


def tutorial_epoch(cfg: TrainParams, data: dict, dataset, device: torch.device) -> tuple[float, float]:
    """(seconds, mean train loss) of one epoch written as the tutorials write it."""
    model = fresh_model(cfg, data, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # tutorials 000 and 003, verbatim
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
    model = fresh_model(cfg, data, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    state = TrainingState(model, make_optimizer(model, cfg), None, [generator])
    batches = Batches(data["images"].to(device), data["labels"].to(device), cfg.batch_size, cfg.drop_last, generator)
    loss_of = make_loss(model, cfg, device)
    synchronize(device)
    start = time.perf_counter()
    loss = train_epoch(state, batches, loss_of)
    synchronize(device)
    return time.perf_counter() - start, loss


def model_only_epoch(cfg: TrainParams, data: dict, device: torch.device) -> tuple[float, float]:
    """(seconds, last loss) of as many steps as an epoch has, each on the same first batch, which
    sits on `device` from the start: the model's and optimizer's work alone, which no input
    pipeline can remove. An epoch cannot take less, so tutorial / this is the largest speed-up that
    any input pipeline could show."""
    model = fresh_model(cfg, data, device)
    optimizer = make_optimizer(model, cfg)
    images, labels = data["images"][:cfg.batch_size].to(device), data["labels"][:cfg.batch_size].to(device)
    model.train()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps_per_epoch(len(data["labels"]), cfg.batch_size, cfg.drop_last)):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - start, loss.item()


def fastest(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return min(runs, key=lambda run: run[0])


def compare_input_pipelines(data: dict, raw_dir: Path, device: torch.device, skip_torchvision: bool,
                            repeats: int) -> None:
    # Same model, initial weights, seed and torch settings everywhere. Each one's fastest of
    # `repeats` epochs (each from a fresh model) counts: that leaves out the one-off costs of a
    # device's first use (oneDNN kernel generation, CUDA context and cuBLAS handles) and is the
    # least disturbed by other processes.
    cfg = preset_params(TUTORIAL_PRESET).train
    print(f"\n1. One epoch of MLP 784-{'-'.join(map(str, cfg.hidden))}-10, {cfg.optimizer} {cfg.lr:g}, "
          f"batch {cfg.batch_size}, on the {len(data['labels']):,} official training images "
          f"(fastest of {repeats})")
    ours, our_loss = fastest([project_epoch(cfg, data, device) for _ in range(repeats)])
    floor, _ = fastest([model_only_epoch(cfg, data, device) for _ in range(repeats)])
    if not skip_torchvision:
        dataset = tutorial_dataset(raw_dir)
        theirs, their_loss = fastest([tutorial_epoch(cfg, data, dataset, device) for _ in range(repeats)])
        print(f"   (a) tutorials: torchvision MNIST + ToTensor + DataLoader, Adam defaults:  {theirs:6.2f} s"
              f"  (train loss {their_loss:.4f})")
    print(f"   (b) this project: train_epoch on in-memory uint8, the stage's optimizer:   {ours:6.2f} s"
          f"  (train loss {our_loss:.4f})")
    print(f"   (c) (b)'s model and optimizer alone, on one batch already in place:       {floor:6.2f} s")
    if not skip_torchvision:
        print(f"   speed-up (a)/(b): {theirs / ours:.1f}x; no input pipeline can exceed (a)/(c) = "
              f"{theirs / floor:.1f}x with this model and optimizer on this device")


def time_to_accuracy(train: dict, val: dict, test: dict, device: torch.device) -> None:
    params = preset_params(FAST_PRESET)
    cfg = params.train
    print(f"\n2. Preset {FAST_PRESET!r}: {cfg.model} {cfg.channels}, {cfg.epochs} epoch(s), batch {cfg.batch_size}, "
          f"{params.augment.copies} augmented copies")
    model, _, seconds = timed_fit(cfg, augmented(train, params.augment), val, device)
    accuracy = test_accuracy(model, test, train["classes"], params.evaluate.batch_size)
    print(f"   trained in {seconds:.1f} s; test accuracy {100 * accuracy:.2f}% on {len(test['labels']):,} images")


def print_peak_memory() -> None:
    print(f"\n3. Peak resident memory of this process: {lifetime_peak_rss() / 2**20:.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_option, default="auto", metavar="{auto,cpu,cuda}",
                        help="where to train (auto: the GPU when there is one)")
    parser.add_argument("--skip-torchvision", action="store_true",
                        help="time only this project's epoch, not the tutorials' DataLoader one")
    parser.add_argument("--skip-fast", action="store_true", help=f"skip the {FAST_PRESET!r} preset's run")
    parser.add_argument("--repeats", type=positive_int, default=3, help="epochs timed per input pipeline; the fastest counts")
    parser.add_argument("--raw", type=Path, default=RAW_DIR,
                        help="directory of MNIST's four IDX files, plain or .gz, checksums checked")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="directory of train.pt, val.pt, test.pt")
    args = parser.parse_args(argv)
    device = args.device
    # Part 1's images, checked against MNIST's checksums before anything is timed: after a `fashion`
    # repro data/raw holds garments under MNIST's file names.
    mnist = load_table()["mnist"]
    check_raw(args.raw, mnist)
    # Part 2's splits, read once and checked before part 1's timed epochs (minutes); part 1 takes
    # the train split's mean and std. MNIST's: after a `fashion` repro data/prepared holds garments too.
    if args.skip_fast:
        train, heldout = load_tensors(args.data / "train.pt", required=("classes", "mean", "std")), None
    else:
        train, *heldout = load_splits(args.data)  # heldout: val, test
    check_prepared_is_mnist(args.data, train, mnist)
    # Process-wide, and set before anything is timed: the tutorials' loop gets it as much as ours.
    allocator_tuned = retain_freed_memory()
    print_machine(device, allocator_tuned)
    compare_input_pipelines(official_train(args.raw, mnist, train), args.raw, device, args.skip_torchvision,
                            args.repeats)
    if heldout is not None:
        time_to_accuracy(train, *heldout, device)
    print_peak_memory()


if __name__ == "__main__":
    run_main("benchmarks.speed", main)
