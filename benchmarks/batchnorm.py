"""BatchNorm's time on the CPU by channel count, channels-last against NCHW (`fast`'s widths).

    python -m benchmarks.batchnorm [--channels 8,12,16,24,32,48,64] [--sizes 14,7,3] [--batch 128]
                                   [--dtype bf16|fp32] [--iterations 100] [--repeats 5]

The train stage runs CNNs channels-last on the CPU (oneDNN's convolutions are faster so), and
their BatchNorm then runs channels-last too. PyTorch's channels-last BatchNorm kernels are
vectorised across channels, so a channel count that fills no whole vector leaves the work to a
slower path: on a 2-core Sapphire Rapids Xeon (AVX-512), bf16, batch 128 at 14x14, the backward
took 2.2 ms at 8 channels against 0.32 ms in NCHW, and 0.62 ms at 16 channels. That is why the
`fast` preset's widths are multiples of 16 (presets.yaml). This prints, per channel count and
image side, the forward and the backward (a forward and backward, less the forward) in
microseconds, the fastest of --repeats loops of --iterations calls, for both layouts.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.presets import comma_ints, positive_int
from stages.common import run_main
from stages.runtime import cpu_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_batchnorm(shape: tuple[int, int, int, int], dtype: torch.dtype, channels_last: bool,
                   iterations: int, repeats: int) -> tuple[float, float]:
    """(forward µs, backward µs) of training-mode batch_norm on a [N, C, H, W] input, the fastest loop."""
    generator = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=layout)
    images.requires_grad_(True)
    channels = shape[1]
    weight, bias = torch.ones(channels, requires_grad=True), torch.zeros(channels, requires_grad=True)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    grad = torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=layout)

    def forward() -> torch.Tensor:
        return F.batch_norm(images, running_mean, running_var, weight, bias, training=True)

    def forward_backward() -> None:
        # The gradients are returned, not accumulated into .grad: in training they flow on to the
        # layer below, and an accumulation would add a pass over the input that training never makes.
        torch.autograd.grad(forward(), (images, weight, bias), grad)

    forward_backward()  # warm-up: first-call allocations and dispatch
    best_forward = best_both = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            forward()
        middle = time.perf_counter()
        for _ in range(iterations):
            forward_backward()
        end = time.perf_counter()
        best_forward = min(best_forward, (middle - start) / iterations)
        best_both = min(best_both, (end - middle) / iterations)
    return 1e6 * best_forward, 1e6 * max(best_both - best_forward, 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batchnorm", description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=comma_ints, default=[8, 12, 16, 24, 32, 48, 64],
                        help="BatchNorm widths to time, comma-separated")
    parser.add_argument("--sizes", type=comma_ints, default=[14, 7, 3],
                        help="image sides (where the fast CNN's three BatchNorms run, pooling early)")
    parser.add_argument("--batch", type=positive_int, default=128, help="images per forward and backward pass")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--iterations", type=positive_int, default=100, help="passes per timing")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timings per layout; the fastest is kept")
    args = parser.parse_args(argv)
    for name in ("channels", "sizes"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            parser.error(f"--{name}: one or more positive integers, comma-separated")
    print(f"CPU: {cpu_model()} (torch ISA {torch.backends.cpu.get_cpu_capability()}); torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}; {args.dtype}, batch {args.batch}")
    print("| side | channels | NCHW forward µs | NCHW backward µs | channels-last forward µs | channels-last backward µs |")
    print("|---:|---:|---:|---:|---:|---:|")
    for side in args.sizes:
        for channels in args.channels:
            shape = (args.batch, channels, side, side)
            nchw = time_batchnorm(shape, DTYPES[args.dtype], False, args.iterations, args.repeats)
            last = time_batchnorm(shape, DTYPES[args.dtype], True, args.iterations, args.repeats)
            print(f"| {side} | {channels} | {nchw[0]:.0f} | {nchw[1]:.0f} | {last[0]:.0f} | {last[1]:.0f} |",
                  flush=True)


if __name__ == "__main__":
    run_main("benchmarks.batchnorm", main)
