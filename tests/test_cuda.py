"""The CUDA path on the synthetic project, driven through `dvc repro` and the stage commands.

Every test needs a CUDA GPU and is skipped without one (`pytest -m cuda` selects them;
benchmarks/gpu_check.py runs them on a GPU machine).
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import PROJECT_ROOT

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]
DEVICE = "cuda"
# What an environment without a visible GPU looks like to a process.
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
# The synthetic classes are trivially separable: every precision must get there (see test_pipeline).
SYNTHETIC_ACCURACY = 0.9


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def accuracy(project) -> float:
    return json.loads(project.path("metrics/eval.json").read_text())["accuracy"]


def run_stage(project, args: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m ...` in the project's copy, with this checkout's stages importable."""
    env = {**project.env, "PYTHONPATH": str(PROJECT_ROOT), **(extra_env or {})}
    result = subprocess.run([sys.executable, *args], cwd=project.root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_deterministic_training_on_cuda_gives_bit_identical_weights_twice(built_project, project):
    # built_project trained with train.device: auto, deterministic: true (the defaults), so on the GPU
    assert f"train: device: {DEVICE} (" in built_project.last.stderr
    assert project.params()["train"]["deterministic"] is True
    assert project.repro("--force", "--single-item", "train") == {"train"}
    assert f"train: device: {DEVICE} (" in project.last.stderr
    project.repro()
    for name in ("models/model.pt", "metrics/eval.json"):
        assert digest(project.path(name)) == digest(built_project.path(name)), name


@pytest.mark.parametrize("precision, compile_model", [("bf16", False), ("fp32", True)])
def test_bf16_and_compile_train_to_the_synthetic_accuracy(project, precision, compile_model):
    project.set_params({"train": {"device": DEVICE, "precision": precision, "compile": compile_model}})
    assert "train" in project.repro()
    assert f"precision {precision}" in project.last.stderr
    assert accuracy(project) >= SYNTHETIC_ACCURACY


def test_cuda_trained_model_is_evaluated_and_predicts_on_a_machine_without_gpu(built_project, tmp_path):
    assert f"train: device: {DEVICE} (" in built_project.last.stderr
    metrics = tmp_path / "eval.json"
    run_stage(built_project, ["-m", "stages.evaluate", "models/model.pt", "data/prepared/test.pt", str(metrics),
                              str(tmp_path / "confusion.csv")], NO_GPU)
    # evaluate scores on the CPU: the same figures with and without a GPU in sight
    assert metrics.read_text() == built_project.path("metrics/eval.json").read_text()
    predicted = run_stage(built_project, ["-m", "stages.predict", "data/raw/t10k-images-idx3-ubyte", "--json"],
                          NO_GPU)
    with open(built_project.path("metrics/confusion.csv")) as f:
        evaluated = [row["predicted"] for row in csv.DictReader(f)]  # class names
    assert [r["label"] for r in json.loads(predicted.stdout)] == evaluated


def test_train_stage_and_ddp_with_nccl_under_torchrun(project, tmp_path):
    """One GPU gives torchrun one process, which the train stage runs without a process group; the
    probe puts the same model in DistributedDataParallel over NCCL with that world size."""
    project.set_params({"train": {"device": DEVICE}})
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torch.cuda.device_count()}"]
    trained = run_stage(project, [*torchrun, "-m", "stages.train", "data/augmented/train.pt", "data/prepared/val.pt",
                                  str(tmp_path / "model.pt"), str(tmp_path / "train")])
    assert trained.stderr.count("train: trained in") == 1
    assert json.loads((tmp_path / "train" / "metrics.json").read_text())["val_accuracy"] >= SYNTHETIC_ACCURACY
    probe = run_stage(project, [*torchrun, "-m", "benchmarks.gpu_check_ddp", "--backend", "nccl"])
    assert "ddp probe ok: backend nccl" in probe.stdout
