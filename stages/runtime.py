"""Train's runtime: its place in a torchrun launch, its device and precision, how it computes
(the CPU or GPU, recorded with its metrics), seeding, and the allocator setting.

Of the stages only train uses these (predict, which is no stage, and the benchmarks pick their
device with it too), so they live apart from stages.common, which every stage imports: a change
here re-runs training, not the download of MNIST.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.common import NO_CUDA_GPU, PipelineError


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun launch; the defaults describe a single-process run."""

    rank: int = 0  # global, 0..world-1
    world: int = 1
    local_rank: int = 0  # on this machine: which GPU to use

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_from_env() -> Rank:
    # torchrun sets these for every process it starts.
    if "WORLD_SIZE" not in os.environ:
        return Rank()
    return Rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` picks the GPU when one is available; `cuda` without a GPU is an error, not a CPU run."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PipelineError(f"train.device: {NO_CUDA_GPU}")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cpuinfo_field(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first value of `name` in /proc/cpuinfo ('model name', 'vendor_id', ...); '' where there is
    none (not Linux, or no such field)."""
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    return ""


def _cpu_supports(check: str) -> bool:
    # torch.cpu's private feature checks, present in torch 2.x; a torch without one answers False.
    function = getattr(torch.cpu, check, None)
    return bool(function()) if function is not None else False


def cpu_has_amx() -> bool:
    """Whether this process can use AMX tiles, on which oneDNN multiplies bf16 matrices (Sapphire
    Rapids and later): the CPU has them and the kernel grants their state (Linux >= 5.16 on request,
    which _init_amx makes, as oneDNN does; refused, oneDNN falls back to its AVX-512 bf16 kernels)."""
    return _cpu_supports("_is_amx_tile_supported") and _cpu_supports("_init_amx")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512_BF16 dot products or AMX tiles); without
    them oneDNN emulates bf16 with conversions. Whether they make training faster: cpu_bf16_choice."""
    return _cpu_supports("_is_avx512_bf16_supported") or cpu_has_amx()


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 autocast trains faster than fp32 on this CPU (why: cpu_bf16_choice)."""
    return cpu_bf16_choice()[0]


def cpu_bf16_choice() -> tuple[bool, str]:
    """Whether bf16 autocast trains faster than fp32 on this CPU, as measured for this project's
    presets, and why, for the train stage's log: yes with AMX tiles (a Sapphire Rapids Xeon) and on
    an AMD CPU with AVX512_BF16 (a Zen 4 EPYC: the default CNN 1.3-1.9x); no on an Intel CPU with
    AVX512_BF16 but no AMX (a Xeon whose virtual machine hides AMX: every preset's training step took
    1.4-1.6x as long in bf16 as in fp32, the convolutions' backward twice as long; docs/speed.md).
    Other Intel CPUs with AVX512_BF16 and no AMX (Cooper Lake) are unmeasured and get fp32, the safe
    answer."""
    if cpu_has_amx():
        return True, "this CPU has AMX"
    if not _cpu_supports("_is_avx512_bf16_supported"):
        return False, "no bf16 instructions on this CPU"
    if cpu_is_amd():
        return True, "an AMD CPU with AVX512_BF16"
    return False, ("bf16 instructions without AMX on a CPU not made by AMD; bf16 measured 1.4-1.6x "
                   "slower than fp32 on such a Xeon")


def cpu_is_amd() -> bool:
    # /proc/cpuinfo on Linux; elsewhere platform.processor() names the vendor on Windows
    # ("AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD").
    return "AuthenticAMD" in (cpuinfo_field("vendor_id") or platform.processor())


def resolve_precision(requested: str, device: torch.device) -> str:
    """train.precision as it runs on `device`: 'fp32' or 'bf16'. 'auto' is bf16 where it was measured
    to train faster (a CPU where cpu_bf16_is_faster) and fp32 elsewhere, a GPU included.
    The one place that decides: the train stage logs the outcome, the benchmarks use it."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        # Measured on one H200 (docs/gpu.md; one run each, same machine): bf16 autocast trained the
        # default in 13.8 s against fp32's 13.6 (two identical runs differed by 0.5 s) and `fast` in
        # 2.8 against 2.3 s. No gain, so no bf16 by default; cnn-max and other GPUs are unmeasured.
        # The GPU seems to wait on kernel launches here, not arithmetic.
        return "fp32"
    return "bf16" if device.type == "cpu" and cpu_bf16_is_faster() else "fp32"


def describe_precision(requested: str, device: torch.device) -> str:
    """'bf16' or 'fp32' as resolve_precision decides, and for 'auto' why, for the train stage's log."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "fp32 (auto: on a GPU bf16 measured no faster, on an H200 for the default and fast; docs/gpu.md)"
    faster, why = cpu_bf16_choice()  # what resolve_precision decided by, and why
    return f"{'bf16' if faster else 'fp32'} (auto: {why})"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' * (threads != 1)})"


def cpu_model() -> str:
    """The CPU's marketing name ('AMD EPYC 9R14'; on some virtual machines only 'Intel(R) Xeon(R) Processor')."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def numerics(device: torch.device, precision: str) -> dict[str, str | int | bool]:
    """How a run computes, besides its params and data (docs/reproducibility.md): the device and
    the resolved precision ('fp32' or 'bf16'); on a CPU its name, torch's vector ISA, whether oneDNN
    has AMX, and the thread count (oneDNN and MKL pick kernels by the first three and split work by
    the last); on a GPU its name, the CUDA version and cuDNN's (which picks the conv kernels); the
    torch version. train records it with the
    metrics (metrics/train/params.yaml), so `dvc params diff` shows where two runs of the same
    params computed differently, and a checkpoint resumes only where it was written the same way."""
    common = {"precision": precision, "torch": str(torch.__version__)}  # str: TorchVersion is a subclass
    if device.type == "cuda":
        # A ROCm build drives AMD GPUs as "cuda" devices, with a HIP version instead of a CUDA one.
        toolkit = torch.version.cuda or f"hip {torch.version.hip}"
        # cuDNN's version as an int (91002 = 9.10.2); a ROCm build reports MIOpen's there, named so;
        # "none" where torch has neither (plain YAML values).
        library = torch.backends.cudnn.version()
        cudnn = "none" if library is None else f"miopen {library}" if torch.version.hip else library
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), "cuda": toolkit, "cudnn": cudnn,
                **common}
    return {"device": device.type, "cpu": cpu_model(), "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "amx": cpu_has_amx(), "threads": torch.get_num_threads(), **common}


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seeds Python, NumPy and torch (CPU and every GPU), and optionally forbids nondeterministic kernels.

    On CPU every kernel this project uses is deterministic for a fixed thread count. On CUDA, cuDNN
    autotuning and atomics-based kernels (e.g. some conv backward passes) are not: `deterministic`
    turns those off at some speed cost, and cuBLAS needs its workspace fixed before its first call
    (CUBLAS_WORKSPACE_CONFIG is read when torch creates its cuBLAS handle, at the first matmul).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways: the flag is process-wide, and a fit after a deterministic one must not inherit it.
    torch.use_deterministic_algorithms(deterministic)
    # Under use_deterministic_algorithms torch also fills every new tensor with NaN, a debugging aid
    # against reads of uninitialised memory, not something determinism needs; it cost about a quarter
    # of a small CNN's CPU step here. Results are the same either way.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels by timing: run-dependent


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit; a larger value is refused.
_MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the top of the heap kept for reuse; well above a training step's working set
# (about 100 MB for the default CNN at batch 128).
_TRIM_THRESHOLD_BYTES = 512 << 20


def _glibc_function(name: str):
    """The C library's function `name` through ctypes, or None off Linux or where libc lacks it
    (musl has no mallopt or malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), name, None)


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed blocks for the next training step; True if glibc took it.

    Every step allocates and frees the same activation and gradient tensors, a few MB each. By
    default glibc serves such blocks with mmap, or trims them off the top of the heap once freed,
    so the next step faults the same pages back in from the kernel, zeroed. On this project's
    2-core CPU a 6 MB max-pool gradient took 2.5 ms to fill for that reason, and keeping the
    memory made CNN steps 15-25 % faster. Results are unchanged; resident memory no longer shrinks
    below its peak (release_freed_memory hands it back). A no-op returning False where the C
    library is not glibc.
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 for a value it refuses. Both are process-wide settings.
    return (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
            and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1)


def release_freed_memory() -> bool:
    """Hands the heap's free blocks back to the kernel (glibc's malloc_trim); True if it released any.

    With retain_freed_memory's setting a process that trains several models (the benchmarks) only
    grows: by the end of an earlier four-preset frontier run 5.7-7 GB against the train stage's
    1.6 GB alone, every earlier run's garbage included (the augment stage's per-chunk views, 1.3 GB
    for a preset that stored 30 views). A no-op returning False where the C library is not glibc."""
    malloc_trim = _glibc_function("malloc_trim")
    return bool(malloc_trim(0)) if malloc_trim is not None else False
