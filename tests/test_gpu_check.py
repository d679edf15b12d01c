"""benchmarks/gpu_check.py, the one-command GPU check (docs/gpu.md), on a machine without a GPU.

Without CUDA it must stop at once with one line. Its own logic (project copies, two repros and their
comparison, the torchrun launches, a preset variant, the summary) runs on the CPU with
`--device cpu --quick` on the synthetic project, so that it cannot rot between GPU runs.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

import benchmarks.gpu_check as gpu_check_module
from tests.conftest import PROJECT_ROOT, SMALL_PARAMS, deep_update
from tests.synthetic import write_mirror


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m benchmarks.gpu_check ARGS`: its output and exit status. In this process, through
    the command's own entry (a new process spent 5 s importing torch for each check of an argument);
    in a new one where `env` changes the environment (CUDA_VISIBLE_DEVICES is read once per process)."""
    if env is not None:
        return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, env={**os.environ, **env})
    out, err = io.StringIO(), io.StringIO()
    # From the project's folder, as the subprocess runs (relative paths: --out README.md is a file there)
    with contextlib.chdir(PROJECT_ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            gpu_check_module.command(list(args))
            status = 0
        except SystemExit as exc:
            status = exc.code
    if isinstance(status, str):  # sys.exit("message"): Python prints it and exits 1
        err.write(status + "\n")
        status = 1
    return subprocess.CompletedProcess(args, status or 0, out.getvalue(), err.getvalue())


def test_without_a_cuda_gpu_it_stops_before_doing_anything(tmp_path):
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, so this holds on GPU machines too.
    result = gpu_check("--out", str(tmp_path / "out"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a "
        "machine with one, or check the script itself with --device cpu --quick --source DIR, DIR a "
        "small project (as tests/test_gpu_check.py makes): on this checkout each run is a full dvc repro"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--budget-s", "0"], "error: --budget-s must be > 0 seconds, got 0"),
    (["--out", "README.md"], "is a file; give an empty or new --out folder"),
], ids=["no time", "out is a file"])
def test_arguments_that_cannot_work_are_one_line(tmp_path, args, message):
    write_mirror(tmp_path / "mirror")
    result = gpu_check("--device", "cpu", "--mirror", str(tmp_path / "mirror"), *args)
    assert result.returncode != 0 and result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_checkouts_data_raw_is_a_mirror_too(tmp_path):
    """The fetch stage stores the files uncompressed: another checkout's data/raw serves as --mirror."""
    write_mirror(tmp_path / "mirror")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for gz in (tmp_path / "mirror").glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    assert gpu_check_module.find_mirror(str(raw)) == raw.resolve()
    (raw / "t10k-labels-idx1-ubyte").unlink()
    lacks = f"the MNIST mirror {raw.resolve()} has no t10k-labels-idx1-ubyte (nor .gz)"
    with pytest.raises(SystemExit, match=re.escape(lacks)):
        gpu_check_module.find_mirror(str(raw))


def test_a_mirror_lacking_a_file_is_named_before_anything_runs(tmp_path):
    write_mirror(tmp_path / "mirror")
    (tmp_path / "mirror" / "t10k-labels-idx1-ubyte.gz").unlink()
    result = gpu_check("--device", "cpu", "--mirror", str(tmp_path / "mirror"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert result.stderr.strip() == (f"gpu_check: the MNIST mirror {tmp_path / 'mirror'} has no "
                                     "t10k-labels-idx1-ubyte (nor .gz)")
    assert not (tmp_path / "out").exists()


def test_steps_that_no_longer_fit_the_budget_are_reported_as_skipped(tmp_path):
    write_mirror(tmp_path / "mirror")
    out = tmp_path / "out"
    # 1 s: less than any step needs to start (MIN_STEP_S)
    result = gpu_check("--device", "cpu", "--mirror", str(tmp_path / "mirror"), "--out", str(out), "--budget-s", "1")
    assert result.returncode == 1, result.stderr  # run1 did not run, so nothing was checked
    assert result.stdout.rstrip().endswith(f"gpu_check: failed: run1 (logs under {out})")
    steps = {s["name"]: s for s in json.loads((out / "results.json").read_text())["steps"]}
    assert steps["env"]["status"] == "ok"
    assert [(s["name"], s["status"], s["detail"]) for s in steps.values() if s["name"] != "env"] == [
        ("run1", "skipped", "out of time"), ("run2", "skipped", "out of time"), ("compare", "skipped", "out of time"),
        ("ddp, tests, stages, variants, frontier", "skipped", "they need run1's copy and data")]
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "results.json", "summary.md"]
    assert "| run1 | skipped | 0.0 | out of time |" in result.stdout


@pytest.mark.parametrize(("option", "error"), [
    (["--steps", "run1,tests,frontiers"],
     "--steps: unknown frontiers; the steps are run1, run2, ddp, tests, stages, variants, frontier"),
    (["--variants", "fast-fp32,cnn-fp16"], "--variants: unknown cnn-fp16; the variants are fast-fp32, "
     "fast-bf16, default-bf16, default-fp32-compile, default-bf16-compile, cnn-max-fp32, cnn-max-bf16, fast-fp32-compile, "
     "fast-bf16-compile, cnn-max-fp32-compile, cnn-max-bf16-compile"),
    (["--steps", "run1,"],
     "--steps: unknown (empty); the steps are run1, run2, ddp, tests, stages, variants, frontier"),
    (["--steps", "run1,ddp", "--tests", "torchrun"], "--tests is given but --steps leaves out tests"),
    (["--steps", "run1,tests", "--variants", "fast-fp32"], "--variants is given but --steps leaves out variants")])
def test_unknown_steps_and_variants_are_named_before_anything_runs(tmp_path, option, error):
    write_mirror(tmp_path / "mirror")
    result = gpu_check("--device", "cpu", "--mirror", str(tmp_path / "mirror"), "--out", str(tmp_path / "out"), *option)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"python -m benchmarks.gpu_check: error: {error}"
    assert not (tmp_path / "out").exists()


def test_steps_left_out_are_reported_as_not_asked_for(tmp_path):
    write_mirror(tmp_path / "mirror")
    out = tmp_path / "out"
    result = gpu_check("--device", "cpu", "--mirror", str(tmp_path / "mirror"), "--out", str(out),
                       "--budget-s", "1", "--steps", "variants")
    assert result.returncode == 1, result.stderr
    steps = [(s["name"], s["detail"]) for s in json.loads((out / "results.json").read_text())["steps"]]
    # run1 still runs (here: is out of time), since the variants use its copy
    assert steps[1:4] == [("run1", "out of time"), ("run2", "not in --steps"), ("compare", "not in --steps")]


def test_only_the_steps_and_variants_asked_for_run(tmp_path, monkeypatch):
    """Check.run_all with every step's work stubbed: what --steps, --variants and --tests select."""
    calls = []

    def repro(name, source, work, out, env, device, timeout_s):
        calls.append(name)
        # run2 times out: the comparison then has nothing to compare
        return {"name": name, "status": "ok" if name == "run1" else "timeout", "repro_s": 1.0, "train_s": 0.5,
                "accuracy": 0.99, "device": device}

    def variant(project, out, env, device, variant, timeout_s):
        calls.append(gpu_check_module.variant_name(variant))
        return {"name": gpu_check_module.variant_name(variant), "status": "ok", "repro_s": 1.0, "train_s": 0.5}

    monkeypatch.setattr(gpu_check_module, "environment_report", lambda device: "stub")
    monkeypatch.setattr(gpu_check_module, "run_repro", repro)
    monkeypatch.setattr(gpu_check_module, "run_variant", variant)
    monkeypatch.setattr(gpu_check_module, "run_tests", lambda out, env, selection, timeout_s: calls.append(
        f"tests -k {selection}") or gpu_check_module.Step("tests", "ok"))
    for name in ("run_stage_times", "run_ddp", "run_frontier"):
        monkeypatch.setattr(gpu_check_module, name, lambda *args, name=name: pytest.fail(f"{name} ran"))

    def run_all(*argv):
        calls.clear()
        check = gpu_check_module.Check(gpu_check_module.parse_args(["--device", "cuda", *argv]), tmp_path, tmp_path,
                                       {})
        check.run_all()
        return {s.name: s.detail for s in check.steps}

    steps = run_all("--steps", "variants,tests", "--variants", "fast-bf16,cnn-max-fp32", "--tests", "torchrun")
    assert list(steps) == ["env", "run1", "run2", "compare", "ddp", "tests", "stages", "variant fast-bf16",
                           "variant cnn-max-fp32", "frontier"]  # reported in the order they run
    assert calls == ["run1", "tests -k torchrun", "fast-bf16", "cnn-max-fp32"]
    assert {name: steps[name] for name in ("run2", "compare", "ddp", "stages", "frontier")} == dict.fromkeys(
        ("run2", "compare", "ddp", "stages", "frontier"), "not in --steps")
    assert run_all("--steps", "run2") == {"env": "see env.txt", "run1": steps["run1"], "run2": steps["run1"].replace(
        "run1/", "run2/"), "compare": "needs both repro runs to succeed", **dict.fromkeys(
        ("ddp", "tests", "stages", "variants", "frontier"), "not in --steps")}
    assert calls == ["run1", "run2"]
    # a failed run1 names only the later steps asked for
    monkeypatch.setattr(gpu_check_module, "run_repro", lambda *args: {"name": "run1", "status": "FAILED"})
    assert list(run_all("--steps", "tests,frontier").items())[-1] == (
        "tests, frontier", "they need run1's copy and data")


@pytest.mark.parametrize(("commands", "status_json", "expected"), [
    ({"first": "true", "second": "true"}, {}, ("ok", "dvc status: outputs unchanged")),
    ({"first": "true", "second": "true"}, {"second": [{"changed outs": {"out": "modified"}}]},
     ("FAILED", "dvc status: second wrote other bytes, see stages/status.log")),
    ({"first": "true", "second": "exit 3"}, None, ("FAILED", "second: FAILED, see stages/second.log")),
    ({"first": "true"}, "not json", ("FAILED", "dvc status did not answer, see stages/status.log"))])
def test_stage_times_report_a_failing_stage_and_changed_outputs(tmp_path, monkeypatch, commands, status_json,
                                                                 expected):
    project, out = tmp_path / "copy", tmp_path / "out"
    (out / "run1").mkdir(parents=True)
    project.mkdir()
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {n: {"cmd": c} for n, c in commands.items()}}))
    for name, text in (("params.yaml", "run1's params\n"), ("dvc.lock", "run1's lock\n")):
        (out / "run1" / name).write_text(text)
        (project / name).write_text("changed by the ddp step\n")
    answer = status_json if isinstance(status_json, str) else json.dumps(status_json)
    monkeypatch.setattr(gpu_check_module, "dvc", lambda *args: [sys.executable, "-c", f"print({answer!r})"])
    step = gpu_check_module.run_stage_times(project, out, {**os.environ}, repro_s=9.0, timeout_s=60)
    assert (step.status, step.detail.split("; ")[-1]) == expected
    # run1's params and lock were put back before the stages ran
    assert (project / "params.yaml").read_text() == "run1's params\n"
    assert (project / "dvc.lock").read_text() == "run1's lock\n"
    if status_json is not None:
        assert re.fullmatch(r"first [0-9.]+(, second [0-9.]+)? s", step.detail.split("; ")[0])
        assert step.detail.split("; ")[1].endswith("in all, against 9.0 s for the faster dvc repro")


def test_the_frontier_and_ddp_probe_keep_the_pythonpath_they_were_given(tmp_path, monkeypatch):
    """A GPU machine's DVC and DVCLive may come from a folder on PYTHONPATH (docs/gpu.md), and the
    frontier imports DVCLive: the checkout goes in front of that folder, not in its place; so for
    the DDP probe (benchmarks/, under torchrun). The frontier trains the presets and seeds asked for."""
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    seen = []

    def run_logged(args, cwd, env, log_path, timeout_s):
        modules = [args[i + 1] for i, arg in enumerate(args) if arg == "-m"]  # torchrun's, then its script's
        seen.append((modules[-1], env.get("PYTHONPATH")))
        if "benchmarks.frontier" in args:
            seen.append((args[args.index("--presets") + 1], args[args.index("--seeds") + 1]))
        return gpu_check_module.Command(0, 0.1, "")

    monkeypatch.setattr(gpu_check_module, "run_logged", run_logged)
    gpu_check_module.run_frontier(tmp_path, tmp_path, {"PYTHONPATH": "/tmp/site"}, "cuda", quick=False,
                                  presets=["default", "fast"], seeds=[0], timeout_s=9)
    gpu_check_module.run_frontier(tmp_path, tmp_path, {}, "cuda", quick=False, presets=["cnn-max"], seeds=[1, 2],
                                  timeout_s=9)
    assert seen == [("benchmarks.frontier", f"{PROJECT_ROOT}{os.pathsep}/tmp/site"), ("default,fast", "0"),
                    ("benchmarks.frontier", str(PROJECT_ROOT)), ("cnn-max", "1,2")]
    seen.clear()
    gpu_check_module.run_ddp(tmp_path, tmp_path, {"PYTHONPATH": "/tmp/site"}, "cpu", timeout_s=9)
    # dvc repro augment and the train stage under torchrun run in the copy as it is; the probe
    # imports benchmarks/ from the checkout
    assert [entry for entry in seen if entry[0] == "benchmarks.gpu_check_ddp"] == [
        ("benchmarks.gpu_check_ddp", f"{PROJECT_ROOT}{os.pathsep}/tmp/site")]
    assert len(seen) == 3


@pytest.mark.parametrize(("argv", "error"), [
    (["--frontier-presets", "default,fats"], "--frontier-presets: unknown preset 'fats'; presets: softmax, "),
    (["--frontier-presets", "fast,fashion"], "--frontier-presets: fashion: fetch.dataset is fashion-mnist; the "
                                             "frontier measures MNIST presets against the MNIST reference recipe"),
    (["--frontier-presets", " , "], "--frontier-presets: no preset given"),
    (["--frontier-presets", ""], "--frontier-presets: no preset given"),
    (["--frontier-presets", "fast", "--steps", "run1,variants"], "--frontier-presets is given but --steps leaves "
                                                                  "out frontier"),
    (["--frontier-seeds", "0,1", "--steps", "run1"], "--frontier-seeds is given but --steps leaves out frontier"),
    (["--frontier-seeds", "0,x"], "argument --frontier-seeds: 'x': not a whole number >= 0"),
    (["--frontier-seeds", "0,1,0"], "--frontier-seeds: a seed given twice would count one run twice in the means"),
    (["--frontier-seeds", ""], "--frontier-seeds: no seed given"),
    (["--frontier-seeds", " , "], "--frontier-seeds: no seed given"),
    (["--frontier-seeds", "0,4294967296"], "--frontier-seeds: 4294967296 is over the largest seed, 4294967295")])
def test_frontier_presets_and_seeds_are_checked_before_anything_runs(argv, error, capsys):
    """What the frontier would refuse after run1 (minutes of GPU time) is refused at once."""
    with pytest.raises(SystemExit):
        gpu_check_module.parse_args(["--device", "cpu", *argv])
    assert f"error: {error}" in capsys.readouterr().err
    assert gpu_check_module.parse_args(["--device", "cpu"]).frontier_presets == ["default", "fast"]
    assert gpu_check_module.parse_args(["--device", "cpu"]).frontier_seeds == [0]
    assert gpu_check_module.parse_args(["--device", "cpu", "--frontier-seeds", "0-2"]).frontier_seeds == [0, 1, 2]
    assert gpu_check_module.parse_args(["--frontier-presets", "cnn-max, fast+aug"]).frontier_presets == [
        "cnn-max", "fast+aug"]


def test_frontier_presets_are_read_from_the_source_project_whose_datasets_may_differ(tmp_path, capsys):
    """--source DIR (the tests' small projects): its presets.yaml and params.yaml, whose dataset and
    mirrors this checkout's datasets.yaml need not know, are what the frontier will run in the copy."""
    (tmp_path / "presets.yaml").write_text("quick-fast:\n  train.epochs: 1\n")
    params = deep_update(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()), SMALL_PARAMS)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    source = ["--device", "cpu", "--source", str(tmp_path)]
    # --quick: the frontier's own tiny MNIST, told the dataset is MNIST's
    assert gpu_check_module.parse_args([*source, "--quick", "--frontier-presets", "default,quick-fast"])
    for presets, error in (("quick-fast", "quick-fast: fetch.dataset is synthetic; the frontier measures MNIST"),
                           ("fast", "unknown preset 'fast'; presets: quick-fast (default: params.yaml as it is)")):
        with pytest.raises(SystemExit):
            gpu_check_module.parse_args([*source, "--frontier-presets", presets])
        assert f"error: --frontier-presets: {error}" in capsys.readouterr().err


def test_the_frontier_step_trains_the_presets_asked_for_with_time_for_each(tmp_path, monkeypatch):
    """Check.run_all hands --frontier-presets and --frontier-seeds to the frontier step, whose cap
    grows by FRONTIER_EXTRA_S for each run (preset x seed) beyond the default two."""
    calls = []
    monkeypatch.setattr(gpu_check_module, "environment_report", lambda device: "stub")
    monkeypatch.setattr(gpu_check_module, "run_repro", lambda *args: {"name": "run1", "status": "ok"})
    monkeypatch.setattr(gpu_check_module, "run_frontier",
                        lambda project, out, env, device, quick, presets, seeds, timeout:
                        calls.append((presets, seeds, timeout)) or gpu_check_module.Step("frontier", "ok"))
    for presets, seeds in (("default,fast", "0"), ("cnn-max,default,fast,mlp-best", "0"), ("default,fast", "0-2")):
        check = gpu_check_module.Check(gpu_check_module.parse_args(
            ["--device", "cuda", "--budget-s", "3600", "--steps", "frontier", "--frontier-presets", presets,
             "--frontier-seeds", seeds]), tmp_path, tmp_path, {})
        check.run_all()
    cap, extra = gpu_check_module.CAPS["frontier"], gpu_check_module.FRONTIER_EXTRA_S
    assert calls == [(["default", "fast"], [0], cap), (["cnn-max", "default", "fast", "mlp-best"], [0], cap + 2 * extra),
                     (["default", "fast"], [0, 1, 2], cap + 4 * extra)]


@pytest.mark.integration
def test_quick_cpu_run_goes_through_every_step(built_project, tmp_path):
    out = tmp_path / "out"
    result = gpu_check("--device", "cpu", "--quick", "--source", str(built_project.root),
                       "--mirror", built_project.env["MNIST_MIRROR"], "--out", str(out),
                       env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in results["steps"]}
    assert {name: s["status"] for name, s in steps.items()} == {
        "env": "ok", "run1": "ok", "run2": "ok", "compare": "ok", "ddp": "ok", "tests": "skipped", "stages": "ok",
        "variant fast-fp32": "ok", "frontier": "ok"}
    assert steps["tests"]["detail"] == "they need --device cuda"
    # On a CPU the same params give the same weights: the comparison must say so.
    assert steps["compare"]["detail"].startswith("weights bit-identical; eval.json equal")
    run1, run2 = results["repros"]
    assert run1["model_sha256"] == run2["model_sha256"]
    assert run1["device"].startswith("cpu") and run1["train_s"] > 0 and run1["accuracy"] >= 0.9
    # every stage of dvc.yaml timed alone, in order, and the copy still up to date after it
    assert re.fullmatch(r"params [0-9.]+, fetch [0-9.]+, preprocess [0-9.]+, augment [0-9.]+, train [0-9.]+, "
                        r"evaluate [0-9.]+, plot [0-9.]+ s; [0-9.]+ s in all, against [0-9.]+ s for the faster dvc "
                        r"repro; dvc status: outputs unchanged", steps["stages"]["detail"]), steps["stages"]["detail"]
    assert "train: trained in" in (out / "stages" / "train.log").read_text()
    assert "DDP probe over gloo: ok" in steps["ddp"]["detail"]
    assert "ddp probe ok: backend gloo" in (out / "ddp" / "probe.log").read_text()
    (variant,) = results["variants"]
    assert variant["overrides"]["train.epochs"] == 1, "the fast preset was applied"
    # fast on the test project's 540 train images is 3 optimizer steps (one epoch at batch 192), on
    # the central 22x22 (its crop), where the synthetic blocks near the border are cut: it learns
    # (0.77-0.88 over seeds, against 0.1 by chance), but not to run1's 0.9.
    assert variant["train_s"] > 0 and variant["accuracy"] >= 0.6
    # The frontier runs in run1's copy, which must hold everything it reads (presets.yaml included).
    frontier_log = (out / "frontier.log").read_text()
    assert "| default | 0 |" in frontier_log and "| fast | 0 |" in frontier_log, frontier_log
    for name in ("env.txt", "summary.md", "run1/repro.log", "run1/model.pt", "run2/eval.json",
                 "variants/fast-fp32.log", "ddp/torchrun-train.log", "frontier.png"):
        assert (out / name).is_file(), name
    assert not (out / "work").exists(), "the project copies are temporary"
    assert result.stdout.rstrip().endswith((out / "summary.md").read_text().rstrip())


def test_an_interrupted_step_is_killed_not_left_running(tmp_path):
    """A step runs in its own session (its process group killed on timeout), where Ctrl-C at the
    terminal does not reach it: interrupted while waiting for it, gpu_check must kill it too, not
    leave `dvc repro` running as an orphan in a work folder it is about to remove."""
    pid_file = tmp_path / "pid"

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(KeyboardInterrupt):
            gpu_check_module.run_logged(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], tmp_path,
                                        dict(os.environ), tmp_path / "step.log", timeout_s=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
