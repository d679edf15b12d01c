"""The reference clock of benchmarks.frontier: the MNIST recipe of pytorch/examples, as most users run it.

Written for this project from the recipe's description (not copied): a network of two 3x3 convs
(32 and 64 channels) with ReLU, a 2x2 max-pool, dropout 0.25, a 128-unit hidden layer, dropout 0.5
and 10 log-softmax outputs; torchvision's MNIST dataset with ToTensor + Normalize(0.1307, 0.3081)
behind a DataLoader(batch_size=64, shuffle=True); Adadelta with lr 1.0 and StepLR(step 1, gamma 0.7);
negative log-likelihood loss. One epoch of it is the unit every time target of the speed frontier
is measured in.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.presets import check_raw, device_option, positive_int
from stages.common import PipelineError, run_main
from stages.datasets import load_table
from stages.idx import read_bytes
from stages.runtime import retain_freed_memory

BATCH_SIZE = 64
TEST_BATCH_SIZE = 1000
LR = 1.0
GAMMA = 0.7
MEAN, STD = 0.1307, 0.3081  # the recipe's normalisation constants: MNIST's pixel mean and std


class ReferenceNet(nn.Module):
    """[B, 1, 28, 28] normalised images -> [B, 10] log-probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(),  # 28 -> 26
            nn.Conv2d(32, 64, 3), nn.ReLU(),  # 26 -> 24
            nn.MaxPool2d(2), nn.Dropout(0.25),  # 24 -> 12
            nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(self.features(x)), dim=1)


def place_for_torchvision(raw_dir: Path, root: Path) -> None:
    """Writes MNIST's four IDX files from `raw_dir` (data/raw's plain files, or a mirror's .gz)
    where torchvision's MNIST reads them: uncompressed, in root/MNIST/raw/. With download=False it
    raises rather than fetches when one is missing, and .gz files alone would not do."""
    mnist = load_table()["mnist"]
    missing = mnist.missing_from(raw_dir)
    if missing:  # read_bytes's FileNotFoundError traceback otherwise
        raise PipelineError(f"{raw_dir}: {missing}; point --raw at the directory of MNIST's four IDX files "
                            "(the fetch stage writes them to data/raw)")
    target = root / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for file in mnist.files.values():
        (target / file.name).write_bytes(read_bytes(file.path_in(raw_dir), file.size))  # bounded by MNIST's size


def torchvision_mnist(raw_dir: Path, root: Path) -> tuple:
    """(train, test) torchvision MNIST datasets with the recipe's transform, read from the four
    IDX files in `raw_dir` (place_for_torchvision); the datasets load everything into memory, so
    `root` may go once they are built."""
    try:  # only the benchmarks need torchvision: the bench extra, not a pipeline dependency
        from torchvision import datasets, transforms
    except ModuleNotFoundError:
        raise PipelineError("torchvision is not installed: `make frontier` installs it (the bench extra)") from None
    place_for_torchvision(raw_dir, root)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    return (datasets.MNIST(str(root), train=True, transform=transform, download=False),
            datasets.MNIST(str(root), train=False, transform=transform, download=False))


@dataclass
class EpochResult:
    epoch: int
    train_seconds: float  # this epoch's training loop alone (no test pass), host-synchronised
    train_loss: float  # mean negative log-likelihood over this epoch's batches
    test_accuracy: float  # in [0, 1], after this epoch


class _IsolatedState:
    """The recipe's own stream of torch's global random numbers (its model init and dropout masks),
    run with torch's default (non-deterministic) algorithms.

    A caller interleaves other work between the epochs (benchmarks.frontier runs presets whose fit()
    reseeds and draws from the global generator), so each epoch runs inside fork_rng with this
    stream's state set, and saves it back at the end: the recipe's results depend on its seed alone,
    and the caller's random state is left as it was."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self._devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self._devices):
            torch.manual_seed(seed)
            self._save()

    def _save(self) -> None:
        self._cpu = torch.get_rng_state()
        self._cuda = [torch.cuda.get_rng_state(d) for d in self._devices]

    @contextmanager
    def active(self) -> Iterator[None]:
        # fit() also switches deterministic algorithms on, process-wide; the recipe runs as users
        # run it, with the defaults (this changes kernels on CUDA, not on the CPU).
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        with torch.random.fork_rng(devices=self._devices):
            torch.set_rng_state(self._cpu)
            for device, state in zip(self._devices, self._cuda):
                torch.cuda.set_rng_state(state, device)
            torch.use_deterministic_algorithms(False)
            try:
                yield
                self._save()
            finally:
                torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _test_accuracy(model: nn.Module, loader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        predictions = model(images.to(device)).argmax(1).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    return correct / total


def train_reference(train_set, test_set, epochs: int, seed: int, device: torch.device) -> Iterator[EpochResult]:
    """Runs the recipe for `epochs` epochs, yielding each epoch's time and test accuracy as it ends
    (so that a caller can interleave other work between epochs, which does not change them)."""
    randomness = _IsolatedState(seed, device)
    with randomness.active():
        model = ReferenceNet().to(device)
    loader_generator = torch.Generator().manual_seed(seed)  # the shuffle order
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True,
                                               generator=loader_generator)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=TEST_BATCH_SIZE)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    for epoch in range(1, epochs + 1):
        with randomness.active():
            _synchronize(device)
            start = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
            for images, labels in train_loader:
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad()
                loss = F.nll_loss(model(images), labels)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
            schedule.step()
            _synchronize(device)
            seconds = time.perf_counter() - start
            # Inside too: iterating a DataLoader draws its base seed from the global generator.
            accuracy = _test_accuracy(model, test_loader, device)
        yield EpochResult(epoch, seconds, loss_sum.item() / len(train_loader), accuracy)


def main(argv: list[str] | None = None) -> None:
    """python -m benchmarks.reference [--epochs N] [--raw DIR] [--device D]: the recipe alone, timed
    as the frontier times it (its seed 0, the train stage's allocator setting, MNIST's checksums
    checked first), one line per epoch."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference",
                                     description="The pytorch/examples MNIST recipe alone (the frontier's clock).")
    parser.add_argument("--epochs", type=positive_int, default=1, help="epochs to train (default 1)")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"),
                        help="directory of MNIST's four IDX files, plain or .gz (default data/raw)")
    parser.add_argument("--device", type=device_option, default="cpu", metavar="{auto,cpu,cuda}",
                        help="where it trains (default: cpu, as the frontier's)")
    args = parser.parse_args(argv)
    check_raw(args.raw, load_table()["mnist"])  # after a `fashion` repro, data/raw holds garments
    retain_freed_memory()
    with tempfile.TemporaryDirectory(prefix="mnist-reference-") as root:
        train_set, test_set = torchvision_mnist(args.raw, Path(root))
    for result in train_reference(train_set, test_set, args.epochs, seed=0, device=args.device):
        print(f"epoch {result.epoch}: {result.train_seconds:.1f} s, train loss {result.train_loss:.4f}, "
              f"test accuracy {100 * result.test_accuracy:.2f}%", flush=True)


if __name__ == "__main__":
    run_main("benchmarks.reference", main)
