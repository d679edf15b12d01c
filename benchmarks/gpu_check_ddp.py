"""DistributedDataParallel probe, run under torchrun: one process per GPU (or CPU process with gloo).

    torchrun --standalone --nproc-per-node 1 -m benchmarks.gpu_check_ddp --backend nccl

The train stage starts a process group only when torchrun starts more than one process, so on a
machine with one GPU it never touches NCCL. This probe does, with whatever world size torchrun
gives it: it builds the model of params.yaml (read from the working directory), wraps it in DDP,
takes a few SGD steps on random images and checks that every process ends with the same weights.
Prints one line `ddp probe ok: ...` from rank 0, or raises.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stages import params as params_mod
from stages.models import build_network
from stages.runtime import rank_from_env

STEPS = 3
BATCH = 64  # images per process and step


def weights_checksum(model: torch.nn.Module) -> torch.Tensor:
    """A float64 sum over all parameters: equal on every rank iff DDP kept the replicas in step."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check_ddp", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    args = parser.parse_args(argv)
    rank = rank_from_env()
    if args.backend == "nccl":
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend)
    cfg = params_mod.load().train
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    # One network whatever train.networks says: the loss below takes a network's [N, C] logits.
    model = build_network(cfg.model_config(28, 10, 0.13, 0.31)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1 + rank.rank)  # different data per rank
    for _ in range(STEPS):
        images = torch.randint(0, 256, (BATCH, 28, 28), generator=generator, dtype=torch.uint8).to(device)
        labels = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
        loss = F.cross_entropy(ddp(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    checksum = weights_checksum(model)
    sums = [torch.zeros_like(checksum) for _ in range(rank.world)]
    dist.all_gather(sums, checksum)
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise SystemExit(f"ddp probe: replicas diverged, weight sums {[s.item() for s in sums]}")
    if rank.is_main:
        version = f" (NCCL {'.'.join(map(str, torch.cuda.nccl.version()))})" if args.backend == "nccl" else ""
        print(f"ddp probe ok: backend {args.backend}{version}, world size {rank.world}, "
              f"{cfg.model} on {device}, {STEPS} steps, replicas identical", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
