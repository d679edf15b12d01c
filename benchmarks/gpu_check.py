"""Check and measure the CUDA path on a GPU machine in one command (issue 19); see docs/gpu.md.

    MNIST_MIRROR=/path/to/mnist python -m benchmarks.gpu_check [--out gpu-check-out]   # or: make gpu-check
    python -m benchmarks.gpu_check --device cpu --quick --source DIR --mirror DIR      # the script itself, on a CPU

Steps, in order of value; each has a timeout and all of them share --budget-s (8 minutes; all of
them would take an estimated 15-20 on an H200, so pick some with --steps, --variants,
--frontier-presets, --frontier-seeds and --tests):
  env       device, driver, torch, CUDA, cuDNN and NCCL versions
  run1      the full default `dvc repro` on real MNIST with train.device set, in a fresh copy of the project
  run2      the same again in a second copy; compare: are the weights bit-identical, the metrics equal?
  ddp       DistributedDataParallel on the GPUs present (NCCL): see run_ddp
  tests     the suite's CUDA tests (`pytest -m cuda tests/test_cuda.py`)
  stages    each stage's command alone in run1's copy, timed: where a repro's time goes besides training
  variants  presets fast, default, cnn-max x fp32/bf16 x with/without train.compile (VARIANTS):
            train seconds (the train stage's "trained in" line) and test accuracy
  frontier  benchmarks/frontier.py --device cuda for the default and `fast` (--frontier-presets),
            seed 0 (--frontier-seeds); its figure is frontier.png
A step that no longer fits in the budget is reported as skipped, as is one that --steps leaves out.
Everything is written under --out; the project copies live in a temporary folder (--keep-work keeps
them). It never uses the network: the copies fetch MNIST from the mirror folder only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
import yaml

from benchmarks.presets import comma_ints, comma_list, refuse_other_datasets, seeds_problem
from stages import params as params_mod
from stages.common import PipelineError, load_tensors, read_yaml, run_main
from stages.datasets import load_table
from stages.presets import DEFAULT, apply, load_presets, resolve

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What a pipeline run needs of a project; the rest (tests, benchmarks, docs) stays behind.
PROJECT_FILES = (".gitignore", ".dvcignore", "dvc.yaml", "params.yaml", "presets.yaml", "stages")
# Tried in order when neither --mirror nor $MNIST_MIRROR is given (relative to the checkout).
DEFAULT_MIRRORS = ("../shared/data/mnist", "shared/data/mnist")
# The only fetch URL a copy knows besides the mirror folder: port 9 on loopback refuses at once, so
# a mirror missing a file fails the run instead of downloading it.
DEAD_URL = "http://127.0.0.1:9/"
TRAINED_IN = re.compile(r"train: trained in ([0-9.]+) s")
DEVICE_LINE = re.compile(r"train: device: ([^;\n]*)")

# (preset, precision, compile), most informative first: the budget may end the list early. The
# default as committed (precision auto, no compile) is run1's run and is not repeated: auto is
# fp32 on a GPU (stages/runtime.py), so the default's bf16 counterpart is listed.
VARIANTS = (("fast", "fp32", False), ("fast", "bf16", False), (DEFAULT, "bf16", False),
            (DEFAULT, "fp32", True), (DEFAULT, "bf16", True), ("cnn-max", "fp32", False),
            ("cnn-max", "bf16", False), ("fast", "fp32", True), ("fast", "bf16", True),
            ("cnn-max", "fp32", True), ("cnn-max", "bf16", True))
QUICK_VARIANTS = (("fast", "fp32", False),)
# Every step after env, in order. run1 always runs when any of them does: the others use its copy.
STEPS = ("run1", "run2", "ddp", "tests", "stages", "variants", "frontier")
# Seconds each step may take at most. Measured on an H200 (docs/gpu.md): a default repro 54-74 s
# (training 14-17 s), ddp 55 s, the five CUDA tests about 50 s each, a variant 25-60 s.
CAPS = {"env": 60, "repro": 180, "stages": 180, "tests": 300, "ddp": 120, "variant": 150, "frontier": 150}
# These two (the default --frontier-presets) on one seed show the default's and `fast`'s ratio to
# the reference recipe's epoch on the GPU; all four presets over three seeds (cap 1,050 s) would not
# fit the default --budget-s (480 s) even alone. Each further run (preset x seed) raises the cap by
# FRONTIER_EXTRA_S (cnn-max, the slowest: 47 s on an H200).
FRONTIER_PRESETS = (DEFAULT, "fast")
FRONTIER_SEEDS = "0"
FRONTIER_EXTRA_S = 90
MIN_STEP_S = 20  # a step with less time than this left is skipped rather than started


def variant_name(variant: tuple) -> str:
    preset, precision, compile_model = variant
    return f"{preset}-{precision}" + ("-compile" if compile_model else "")


@dataclasses.dataclass
class Step:
    name: str
    status: str  # ok | FAILED | timeout | skipped
    seconds: float = 0.0
    detail: str = ""


@dataclasses.dataclass
class Command:
    returncode: int | None  # None: killed at its timeout
    seconds: float
    output: str


class Budget:
    """Seconds left of the whole check; hands each step a timeout that fits."""

    def __init__(self, total_s: float):
        self.end = time.monotonic() + total_s

    def timeout(self, cap_s: float) -> float | None:
        """A step's timeout, or None when too little time is left to start it."""
        left = self.end - time.monotonic()
        return min(cap_s, left) if left >= MIN_STEP_S else None


def run_logged(args: list[str], cwd: Path, env: dict, log_path: Path, timeout_s: float) -> Command:
    """Runs a command with stdout and stderr into log_path; on timeout kills its whole process group
    (dvc's stages included; torchrun's workers, in sessions of their own, stop with their stage
    when it runs under dvc: stages.common.stop_with_parent). So does an interruption of this script
    (SIGTERM; Ctrl-C at a terminal reaches only this script, the command being in its own session):
    the command would go on as an orphan in a work folder about to be removed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        log_file.write(f"$ {' '.join(args)}  (in {cwd})\n")
        log_file.flush()
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    return Command(returncode, time.perf_counter() - start, log_path.read_text())


def outcome(command: Command) -> str:
    if command.returncode is None:
        return "timeout"
    return "ok" if command.returncode == 0 else "FAILED"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_mirror(given: str | None) -> Path:
    """The MNIST folder to use; exits with one line if there is none or it lacks a file."""
    candidates = [given] if given else [os.environ["MNIST_MIRROR"]] if os.environ.get("MNIST_MIRROR") else [
        str(PROJECT_ROOT / d) for d in DEFAULT_MIRRORS]
    for candidate in candidates:
        folder = Path(candidate).resolve()
        if folder.is_dir():
            # .gz as mirrors serve them, or plain as the fetch stage stores them (another checkout's data/raw)
            missing = load_table()["mnist"].missing_from(folder)
            if missing:
                sys.exit(f"gpu_check: the MNIST mirror {folder} has {missing}")
            return folder
    sys.exit(f"gpu_check: no MNIST mirror folder ({' or '.join(candidates)}); set MNIST_MIRROR or --mirror "
             "to a folder holding the four files, .gz or plain (the check never downloads)")


def base_env(mirror: Path) -> dict:
    return {**os.environ,
            # The copies have no .venv: stages/run and `dvc` come from this interpreter's folder.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MNIST_MIRROR": str(mirror), "DVC_NO_ANALYTICS": "1"}


def with_checkout_on_path(env: dict) -> dict:
    """env for a command that imports benchmarks/ from a project copy's folder: the checkout first
    on PYTHONPATH, ahead of what was there (on a GPU machine, maybe the folder DVC and DVCLive were
    installed into: docs/gpu.md), not instead of it."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, (str(PROJECT_ROOT), env.get("PYTHONPATH"))))}


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


# ---------------------------------------------------------------------------------------------
# Steps


def environment_report(device: str) -> str:
    """Versions and devices, as text for env.txt and the console."""
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, CUDA (torch build) {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version()}, platform {platform.platform()}",
             f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"]
    if device == "cuda":
        lines.append(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, "
                     f"bf16 supported: {torch.cuda.is_bf16_supported()}")
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index}: {torch.cuda.get_device_name(index)}, compute capability "
                         f"{props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB")
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                "--format=csv"], capture_output=True, text=True, timeout=CAPS["env"])
        lines += ["nvidia-smi:", query.stdout.strip() or query.stderr.strip()]
    else:
        lines.append("nvidia-smi: not found")
    return "\n".join(lines)


def make_copy(source: Path, dest: Path, env: dict, log_path: Path, timeout_s: float) -> Command:
    """A fresh copy of the project's pipeline files in `dest`, as its own DVC repository (no git:
    `dvc repro` needs none) whose fetch knows no URL but the mirror folder."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    params = read_yaml(dest / "params.yaml", "the params file")  # as DVC and the stages read it (YAML 1.2)
    # Every dataset's, not only fetch.dataset's (which valid params list too): the quick frontier
    # step runs with fetch.dataset set to mnist.
    params["fetch"]["mirrors"] = {name: [DEAD_URL] for name in params["fetch"]["mirrors"]}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return run_logged(dvc("init", "--no-scm", "-q"), dest, env, log_path, timeout_s)


def set_params(project: Path, overrides: dict) -> None:
    """Applies `section.key` overrides (as presets.yaml writes them) to the project's params.yaml."""
    params = apply(read_yaml(project / "params.yaml", "the params file"), overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_repro(name: str, source: Path, work: Path, out: Path, env: dict, device: str, timeout_s: float) -> dict:
    """`dvc repro` from scratch in work/name with train.device set; keeps its log, params, lock,
    metrics and model under out/name. Returns what the summary and the comparison need."""
    project = work / name
    copied = make_copy(source, project, env, out / name / "init.log", timeout_s)
    if copied.returncode != 0:
        return {"name": name, "status": outcome(copied), "detail": f"dvc init failed, see {name}/init.log"}
    set_params(project, {"train.device": device})
    command = run_logged(dvc("repro"), project, env, out / name / "repro.log", timeout_s)
    result = {"name": name, "status": outcome(command), "repro_s": round(command.seconds, 1),
              "train_s": trained_seconds(command.output), "device": device_line(command.output)}
    if command.returncode == 0:
        for relative in ("params.yaml", "dvc.lock", "metrics/eval.json", "models/model.pt"):
            shutil.copy2(project / relative, out / name / Path(relative).name)
        shutil.copytree(project / "metrics/train", out / name / "train")  # the DVCLive files
        result["accuracy"] = json.loads((project / "metrics/eval.json").read_text())["accuracy"]
        result["model_sha256"] = sha256(project / "models/model.pt")
    return result


def trained_seconds(output: str) -> float | None:
    match = TRAINED_IN.search(output)
    return float(match.group(1)) if match else None


def device_line(output: str) -> str:
    match = DEVICE_LINE.search(output)
    return match.group(1).strip() if match else ""


def max_weight_difference(model_a: Path, model_b: Path) -> float:
    """Largest absolute difference between two model files' weights (0.0: bit-identical values)."""
    a = load_tensors(model_a, required=("state_dict",))["state_dict"]
    b = load_tensors(model_b, required=("state_dict",))["state_dict"]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def compare_runs(first: dict, second: dict, out: Path) -> Step:
    """Same params on the same device twice: are weights, training log and metrics identical?"""
    if first.get("status") != "ok" or second.get("status") != "ok":
        return Step("compare", "skipped", 0.0, "needs both repro runs to succeed")
    same_weights = first["model_sha256"] == second["model_sha256"]
    files = ("eval.json", "dvc.lock", *sorted(str(p.relative_to(out / first["name"]))
                                             for p in (out / first["name"] / "train").rglob("*") if p.is_file()))
    differing = [f for f in files if not (out / second["name"] / f).is_file()
                 or (out / first["name"] / f).read_bytes() != (out / second["name"] / f).read_bytes()]
    detail = (f"weights {'bit-identical' if same_weights else 'DIFFER'}; "
              f"eval.json {'equal' if 'eval.json' not in differing else 'DIFFERS'} "
              f"(accuracy {first['accuracy']:.4f} vs {second['accuracy']:.4f})")
    if not same_weights:
        difference = max_weight_difference(out / first["name"] / "model.pt", out / second["name"] / "model.pt")
        detail += f"; max |weight difference| {difference:.3g}"
    if differing:
        detail += f"; differing files: {', '.join(differing)}"
    return Step("compare", "ok" if same_weights and not differing else "FAILED", 0.0, detail)


def run_stage_times(project: Path, out: Path, env: dict, repro_s: float, timeout_s: float) -> Step:
    """Each stage's command from dvc.yaml run alone, in order, in run1's copy with run1's params and
    dvc.lock put back (ddp changed both), timed from start to exit (interpreter, imports and CUDA
    set-up included): where a repro's time goes besides training, and what DVC itself adds over
    `repro_s`. The stages write run1's bytes again, so `dvc status` must find the copy up to date."""
    reset_to_run1(project, out, ("params.yaml", "dvc.lock"))
    end = time.monotonic() + timeout_s
    seconds: dict[str, float] = {}
    for name, stage in read_yaml(project / "dvc.yaml", "the pipeline")["stages"].items():
        command = run_logged(["sh", "-c", stage["cmd"]], project, env, out / "stages" / f"{name}.log",
                             max(1.0, end - time.monotonic()))
        if command.returncode != 0:
            return Step("stages", outcome(command), sum(seconds.values()) + command.seconds,
                        f"{name}: {outcome(command)}, see stages/{name}.log")
        seconds[name] = command.seconds
    total = sum(seconds.values())
    detail = (", ".join(f"{name} {s:.1f}" for name, s in seconds.items()) + f" s; {total:.1f} s in all, "
              f"against {repro_s:.1f} s for the faster dvc repro; ")
    status = run_logged(dvc("status", "--json"), project, env, out / "stages" / "status.log",
                        max(1.0, end - time.monotonic()))
    seconds_in_all = total + status.seconds
    try:  # the log's last line: dvc's JSON object, {} when nothing changed (its first: the command)
        changed = json.loads(status.output.splitlines()[-1]) if status.returncode == 0 else None
    except (IndexError, ValueError):
        changed = None
    if changed is None:
        return Step("stages", "FAILED" if status.returncode is not None else "timeout", seconds_in_all,
                    detail + "dvc status did not answer, see stages/status.log")
    if changed:
        return Step("stages", "FAILED", seconds_in_all,
                    detail + f"dvc status: {', '.join(changed)} wrote other bytes, see stages/status.log")
    return Step("stages", "ok", seconds_in_all, detail + "dvc status: outputs unchanged")


def run_tests(out: Path, env: dict, selection: str | None, timeout_s: float) -> Step:
    junit = out / "tests" / "junit.xml"
    # `-o required_plugins=`: a GPU machine's Python may lack the test extra's pytest-timeout
    # (pyproject.toml requires it); this step has its own timeout.
    command = run_logged([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs",
                          "-p", "no:cacheprovider", "-o", "required_plugins=", f"--junitxml={junit}",
                          *(["-k", selection] if selection else [])],
                         PROJECT_ROOT, env, out / "tests" / "pytest.log", timeout_s)
    detail = "see tests/pytest.log"
    if command.returncode == 5:  # pytest: no test collected
        matching = f" -k {selection!r}" if selection else ""
        return Step("tests", "FAILED", command.seconds, f"no CUDA test matched{matching}; {detail}")
    if junit.is_file():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        detail = (f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
                  f"{counts['skipped']} skipped; {detail}")
    return Step("tests", outcome(command), command.seconds, detail)


def run_ddp(project: Path, out: Path, env: dict, device: str, timeout_s: float) -> Step:
    """DDP on the devices present. With several GPUs, the train stage itself runs one process per
    GPU (train.processes, NCCL). With one, torchrun gives the stage a world of one, which it trains
    without a process group; so the stage runs under torchrun (its launch path) and
    benchmarks/gpu_check_ddp puts the model in DDP over NCCL with that world size."""
    gpus = torch.cuda.device_count() if device == "cuda" else 1
    backend = "nccl" if device == "cuda" else "gloo"
    set_params(project, {**resolve("fast", load_presets(PROJECT_ROOT / "presets.yaml")),
                         "train.device": device, "train.precision": "fp32", "train.compile": False})
    start = time.perf_counter()
    if gpus > 1:
        set_params(project, {"train.processes": gpus})
        command = run_logged(dvc("repro", "evaluate"), project, env, out / "ddp" / "repro.log", timeout_s)
        shared = f"each shared by {gpus} processes" in command.output
        status = outcome(command) if shared or command.returncode != 0 else "FAILED"
        detail = f"train stage with train.processes={gpus} ({backend}): " + (
            f"trained in {trained_seconds(command.output)} s" if status == "ok" else "see ddp/repro.log")
        return Step("ddp", status, time.perf_counter() - start, detail)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    end = time.monotonic() + timeout_s  # the three commands share the step's timeout
    stage = run_logged(dvc("repro", "augment"), project, env, out / "ddp" / "augment.log", timeout_s)
    if stage.returncode == 0:
        stage = run_logged([*torchrun, "-m", "stages.train", "data/augmented/train.pt", "data/prepared/val.pt",
                            str(out / "ddp" / "model.pt"), str(out / "ddp" / "train")],
                           project, env, out / "ddp" / "torchrun-train.log", max(1.0, end - time.monotonic()))
    probe = run_logged([*torchrun, "-m", "benchmarks.gpu_check_ddp", "--backend", backend], project,
                       with_checkout_on_path(env), out / "ddp" / "probe.log",
                       max(1.0, end - time.monotonic()))
    status = next((outcome(c) for c in (stage, probe) if outcome(c) != "ok"), "ok")
    detail = (f"train stage under torchrun, 1 process: {outcome(stage)} "
              f"(trained in {trained_seconds(stage.output)} s, no process group at world size 1); "
              f"DDP probe over {backend}: {outcome(probe)}")
    return Step("ddp", status, time.perf_counter() - start, detail)


def reset_to_run1(project: Path, out: Path, names: tuple[str, ...] = ("params.yaml",)) -> None:
    """The copy's files `names` back to run1's, as kept under out/run1, undoing later steps' changes."""
    for name in names:
        (project / name).write_text((out / "run1" / name).read_text())


def run_variant(project: Path, out: Path, env: dict, device: str, variant: tuple, timeout_s: float) -> dict:
    preset, precision, compile_model = variant
    name = variant_name(variant)
    overrides = {**resolve(preset, load_presets(PROJECT_ROOT / "presets.yaml")), "train.device": device,
                 "train.precision": precision, "train.compile": compile_model}
    reset_to_run1(project, out)  # every variant starts from run1's params, so presets never stack
    set_params(project, overrides)
    command = run_logged(dvc("repro", "evaluate"), project, env, out / "variants" / f"{name}.log", timeout_s)
    result = {"name": name, "preset": preset, "precision": precision, "compile": compile_model,
              "status": outcome(command), "repro_s": round(command.seconds, 1),
              "train_s": trained_seconds(command.output), "overrides": overrides}
    if command.returncode == 0:
        result["accuracy"] = json.loads((project / "metrics/eval.json").read_text())["accuracy"]
    return result


def frontier_cap(presets: list[str], seeds: list[int]) -> float:
    """The frontier step's cap in seconds: CAPS' for the default two presets on one seed,
    FRONTIER_EXTRA_S more for each run (preset x seed) beyond those two."""
    return CAPS["frontier"] + FRONTIER_EXTRA_S * max(0, len(presets) * len(seeds) - len(FRONTIER_PRESETS))


def run_frontier(project: Path, out: Path, env: dict, device: str, quick: bool, presets: list[str],
                 seeds: list[int], timeout_s: float) -> Step:
    # In the copy, whose data/ the first repro prepared; benchmarks/ comes from the checkout. The
    # frontier reads the copy's params.yaml as its default: run1's, not the last variant's or ddp's.
    # quick: its own tiny synthetic MNIST, one epoch of each, so that this step is exercised too;
    # told the dataset is MNIST's, which the copy's params.yaml need not name (the tests' does not).
    reset_to_run1(project, out)
    args = ["--presets", ",".join(presets), "--seeds", ",".join(map(str, seeds)), "--plot", str(out / "frontier.png"),
            *(["--quick", "--set", "fetch.dataset=mnist"] if quick else [])]
    command = run_logged([sys.executable, "-m", "benchmarks.frontier", "--device", device, *args], project,
                         with_checkout_on_path(env), out / "frontier.log", timeout_s)
    return Step("frontier", outcome(command), command.seconds, "see frontier.log")


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def summary(steps: list[Step], repros: list[dict], variants: list[dict]) -> str:
    lines = ["| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |" for s in steps]
    lines += ["", "| run | status | train s | test accuracy | repro s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['status']} | {fmt(r.get('train_s'))} | {fmt(r.get('accuracy'), '.4f')} "
              f"| {fmt(r.get('repro_s'))} |" for r in [*repros, *variants]]
    return "\n".join(lines) + "\n"


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a "
                 "machine with one, or check the script itself with --device cpu --quick --source DIR, DIR a "
                 "small project (as tests/test_gpu_check.py makes): on this checkout each run is a full dvc repro")


def check_frontier_presets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What benchmarks.frontier would refuse by name or dataset, refused before run1 instead of
    after minutes of GPU time: a name (or `+` combination) unknown to the copied project's
    presets.yaml, a key unknown to its params.yaml, or a preset of another dataset than MNIST (the
    reference recipe's). The values are left to the frontier to validate: it runs in the copy, whose
    stages/ and datasets.yaml (another dataset, in the tests' small projects) may not be these."""
    if not args.frontier_presets:
        parser.error("--frontier-presets: no preset given")
    try:
        presets = load_presets(args.source / "presets.yaml")
        raw = params_mod.load_raw(args.source / "params.yaml")
        if not (isinstance(raw, dict) and isinstance(raw.get("fetch"), dict)):
            raise PipelineError(f"{args.source / 'params.yaml'}: no fetch section")
        # --quick runs the frontier on its tiny MNIST whatever the copy's params.yaml names
        quick = {"fetch.dataset": "mnist"} if args.quick else {}
        refuse_other_datasets({name: apply(raw, {**resolve(name, presets), **quick})["fetch"].get("dataset")
                               for name in args.frontier_presets})
    except PipelineError as exc:
        parser.error(f"--frontier-presets: {exc}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or PROJECT_ROOT / "gpu-check-out"),
                        help="output folder (default: $OUT, else gpu-check-out/ in the checkout)")
    parser.add_argument("--mirror", help="folder with the four MNIST files, .gz or plain (default: $MNIST_MIRROR, "
                                         f"else {' or '.join(DEFAULT_MIRRORS)})")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run the same steps on the CPU, to check this script (no CUDA tests)")
    quick = ", ".join(map(variant_name, QUICK_VARIANTS))
    parser.add_argument("--quick", action="store_true",
                        help=f"only the variant(s) {quick}; the frontier on its own tiny data")
    parser.add_argument("--source", type=Path, default=PROJECT_ROOT,
                        help="the project to copy (default: this checkout)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time for all steps together")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"the steps to run, comma-separated, from {','.join(STEPS)} (default: all); run1 "
                             "always runs, since the others use its copy: e.g. run1,variants on a second visit")
    parser.add_argument("--variants", help="the variants step's runs, comma-separated names such as "
                                           "fast-fp32,default-bf16-compile (default: all, most informative first)")
    parser.add_argument("--frontier-presets", metavar="NAMES",
                        help="the frontier step's presets, comma-separated: 'default' and presets.yaml names "
                             f"(default: {','.join(FRONTIER_PRESETS)}; each adds its training time on the GPU)")
    parser.add_argument("--frontier-seeds", metavar="SEEDS", type=comma_ints,
                        help=f"the frontier step's seeds, comma-separated, ranges such as 0-2 too (default: "
                             f"{FRONTIER_SEEDS}; each trains every preset once more)")
    parser.add_argument("--tests", metavar="EXPRESSION",
                        help="the tests step's pytest -k expression (default: all)")
    parser.add_argument("--keep-work", action="store_true", help="keep the project copies under OUT/work")
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0 seconds, got {args.budget_s:g}")
    steps = args.steps.split(",")
    if unknown := [name or "(empty)" for name in steps if name not in STEPS]:
        parser.error(f"--steps: unknown {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    args.steps = {"run1", *steps}
    known = {variant_name(v): v for v in (QUICK_VARIANTS if args.quick else VARIANTS)}
    names = args.variants.split(",") if args.variants is not None else list(known)
    if unknown := [name or "(empty)" for name in names if name not in known]:
        parser.error(f"--variants: unknown {', '.join(unknown)}; the variants are {', '.join(known)}")
    # Each option selects within its own step.
    for option, step in (("variants", "variants"), ("tests", "tests"), ("frontier_presets", "frontier"),
                         ("frontier_seeds", "frontier")):
        if getattr(args, option) is not None and step not in args.steps:
            parser.error(f"--{option.replace('_', '-')} is given but --steps leaves out {step}")
    args.variants = [known[name] for name in names]
    try:
        args.frontier_presets = comma_list(",".join(FRONTIER_PRESETS) if args.frontier_presets is None
                                           else args.frontier_presets)
    except argparse.ArgumentTypeError as exc:  # "fast,,default"
        parser.error(f"--frontier-presets: {exc}")
    if args.frontier_seeds is None:
        args.frontier_seeds = comma_ints(FRONTIER_SEEDS)
    if problem := seeds_problem(args.frontier_seeds):
        parser.error(f"--frontier-seeds: {problem}")
    if "frontier" in args.steps:
        check_frontier_presets(parser, args)
    return args


class Check:
    """The steps of one check, in order, and what they found."""

    def __init__(self, args: argparse.Namespace, out: Path, work: Path, env: dict):
        self.args, self.out, self.work, self.env = args, out, work, env
        self.budget = Budget(args.budget_s)
        self.steps: list[Step] = []
        self.repros: list[dict] = []
        self.variants: list[dict] = []

    def say(self, step: Step) -> None:
        self.steps.append(step)
        print(f"gpu_check: {step.name}: {step.status} ({step.seconds:.1f} s) {step.detail}", flush=True)

    def run_all(self) -> None:
        args, out, env = self.args, self.out, self.env
        report = environment_report(args.device)
        (out / "env.txt").write_text(report + "\n")
        print(report, flush=True)
        self.say(Step("env", "ok", 0.0, "see env.txt"))
        for name in ("run1", "run2"):
            if name not in args.steps:
                self.say(Step(name, "skipped", 0.0, "not in --steps"))
                continue
            timeout = self.budget.timeout(CAPS["repro"])
            if timeout is None:
                self.say(Step(name, "skipped", 0.0, "out of time"))
                continue
            r = run_repro(name, args.source, self.work, out, env, args.device, timeout)
            self.repros.append(r)
            self.say(Step(name, r["status"], r.get("repro_s", 0.0),
                          f"trained in {fmt(r.get('train_s'))} s on {r.get('device') or '?'}, test accuracy "
                          f"{fmt(r.get('accuracy'), '.4f')}; see {name}/repro.log"))
        self.say(compare_runs(*self.repros, out) if len(self.repros) == 2
                 else Step("compare", "skipped", 0.0, "out of time" if "run2" in args.steps else "not in --steps"))
        later = [name for name in STEPS[2:] if name in args.steps]
        if not self.repros or self.repros[0]["status"] != "ok":
            if later:
                self.say(Step(", ".join(later), "skipped", 0.0, "they need run1's copy and data"))
            return
        project = self.work / "run1"
        for name in STEPS[2:]:  # in order: each reported where it would have run
            if name not in args.steps:
                self.say(Step(name, "skipped", 0.0, "not in --steps"))
            elif name == "variants":
                self.run_variants(project)
            else:
                timeout = self.budget.timeout(frontier_cap(args.frontier_presets, args.frontier_seeds)
                                              if name == "frontier" else CAPS[name])
                if timeout is None:
                    self.say(Step(name, "skipped", 0.0, "out of time"))
                elif name == "stages":
                    fastest = min(r["repro_s"] for r in self.repros if r["status"] == "ok")
                    self.say(run_stage_times(project, out, env, fastest, timeout))
                elif name == "ddp":
                    self.say(run_ddp(project, out, env, args.device, timeout))
                elif name == "tests":
                    self.say(run_tests(out, env, args.tests, timeout) if args.device == "cuda"
                             else Step("tests", "skipped", 0.0, "they need --device cuda"))
                else:
                    self.say(run_frontier(project, out, env, args.device, args.quick, args.frontier_presets,
                                          args.frontier_seeds, timeout))

    def run_variants(self, project: Path) -> None:
        for variant in self.args.variants:
            timeout = self.budget.timeout(CAPS["variant"])
            if timeout is None:
                self.say(Step(f"variant {variant_name(variant)}", "skipped", 0.0, "out of time"))
                continue
            v = run_variant(project, self.out, self.env, self.args.device, variant, timeout)
            self.variants.append(v)
            self.say(Step(f"variant {v['name']}", v["status"], v["repro_s"],
                          f"trained in {fmt(v['train_s'])} s, test accuracy {fmt(v.get('accuracy'), '.4f')}"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_device(args.device)
    mirror = find_mirror(args.mirror)
    out = args.out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"gpu_check: {out} is {'not empty' if out.is_dir() else 'a file'}; give an empty or new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work" if args.keep_work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    check = Check(args, out, work, base_env(mirror))
    try:
        check.run_all()
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    table = summary(check.steps, check.repros, check.variants)
    (out / "summary.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"steps": [dataclasses.asdict(s) for s in check.steps],
                                                  "repros": check.repros, "variants": check.variants},
                                                 indent=2) + "\n")
    print("\n" + table, flush=True)
    # run1 always runs when anything does, and the rest need it: not run (out of time) is a failure.
    failed = [s.name for s in check.steps if s.status in ("FAILED", "timeout")
              or (s.name == "run1" and s.status == "skipped")]
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)} (logs under {out})", flush=True)
    return 1 if failed else 0


def command(argv: list[str] | None = None) -> None:
    """The command line's entry: main, its status the exit status; a PipelineError, Ctrl-C or SIGTERM
    one line, not a traceback from inside a step's wait (run_logged kills the step first)."""
    run_main("gpu_check", lambda: sys.exit(main(argv)),
             kept="the logs of the steps that ran stay under --out; run again with a new or empty --out")


if __name__ == "__main__":
    command()
