"""The Makefile's own shell logic (make queue's checks and thread share), run against a stand-in
`dvc` that records how it was called; tests/test_sharing.py runs the targets with the real DVC."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

# A stand-in for .venv/bin/dvc: appends its arguments and OMP_NUM_THREADS to ../calls, and answers
# `dvc queue status` with the contents of ../status, `dvc exp list --name-only` with ../exps;
# `dvc exp run` replaces ../status with ../status-after where there is one, and exits with the
# status in ../exp-run-exit (0 without one).
FAKE_DVC = """#!/bin/sh
here="$(dirname "$0")/.."
echo "$* OMP=${OMP_NUM_THREADS-unset}" >> "$here/calls"
if [ "$*" = "queue status" ]; then cat "$here/status"; fi
if [ "$*" = "exp list --name-only" ]; then cat "$here/exps" 2>/dev/null; fi
if [ "$1 $2" = "exp run" ]; then
  if [ -f "$here/status-after" ]; then cp "$here/status-after" "$here/status"; fi
  exit "$(cat "$here/exp-run-exit" 2>/dev/null || echo 0)"
fi
"""


@pytest.fixture
def venv(tmp_path):
    """A venv directory holding only the stand-in dvc, and marked as installed."""
    (tmp_path / "venv/bin").mkdir(parents=True)
    (tmp_path / "venv/bin/dvc").write_text(FAKE_DVC)
    (tmp_path / "venv/bin/dvc").chmod(0o755)
    (tmp_path / "venv/.installed").touch()
    (tmp_path / "venv/status").write_text("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n")
    return tmp_path / "venv"


def make(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env
    return subprocess.run(["make", "--no-print-directory", "-f", str(PROJECT_ROOT / "Makefile"),
                           "-o", f"{venv}/.installed", f"VENV={venv}", *args],
                          cwd=venv.parent, env=environ, capture_output=True, text=True)


def calls(venv: Path) -> list[str]:
    return (venv / "calls").read_text().splitlines() if (venv / "calls").exists() else []


def runs(venv: Path) -> list[str]:
    """The `dvc exp run` calls among calls(venv) (make queue also reads `dvc queue status`)."""
    return [call for call in calls(venv) if call.startswith("exp run")]


@pytest.mark.parametrize("jobs", ["0", "02", "-1", "two", "1.5", ""])
def test_queue_refuses_jobs_that_is_no_positive_whole_number(venv, jobs):
    refused = make(venv, "queue", f"JOBS={jobs}")
    assert refused.returncode != 0
    assert f"make queue: JOBS must be a positive whole number, not '{jobs}'" in refused.stderr
    assert calls(venv) == [], "DVC was not called"


def test_queue_gives_each_worker_its_share_of_the_cores(venv):
    cores = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True,
                               env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}).stdout)
    started = make(venv, "queue", "JOBS=2")
    share = max(1, cores // 2)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"make queue: 2 workers on {cores} cores, {share} thread(s) each" in started.stdout
    assert runs(venv) == [f"exp run --run-all -j 2 OMP={share}"]


def test_queue_keeps_a_thread_count_that_is_set_and_one_worker_takes_every_core(venv):
    assert make(venv, "queue", "JOBS=2", OMP_NUM_THREADS="3").returncode == 0
    assert make(venv, "queue").returncode == 0
    assert runs(venv) == ["exp run --run-all -j 2 OMP=3", "exp run --run-all -j 1 OMP=unset"]


def test_queue_fails_when_a_run_it_started_failed(venv):
    """`dvc exp run --run-all` exits 0 though every queued run failed: `make queue && ...` went on.
    A run that failed in an earlier `make queue` is not this one's failure."""
    header = "Task     Name    Created    Status\n"
    (venv / "status").write_text(header + "bde8a8e  old     07:38 PM   Failed\n\nWorker status: 0 active, 0 idle\n")
    (venv / "status-after").write_text(header + "bde8a8e  old     07:38 PM   Failed\n"
                                       "751da70  fast-1  07:40 PM   Success\n5d65867  badlr   07:41 PM   Failed\n"
                                       "\nWorker status: 0 active, 0 idle\n")
    failed = make(venv, "queue")
    assert failed.returncode != 0
    assert "make queue: failed while it ran: badlr ('dvc queue logs NAME' says why;" in failed.stderr, failed.stderr
    (venv / "status-after").unlink()  # the next run: the same failures as before it, nothing new
    assert make(venv, "queue").returncode == 0
    (venv / "exp-run-exit").write_text("3")  # DVC's own failure status is kept
    assert make(venv, "queue").returncode != 0


@pytest.mark.parametrize("workers, said", [("0 active, 0 idle", False), ("1 active, 0 idle", True),
                                           ("0 active, 2 idle", True), ("10 active, 0 idle", True)])
def test_queue_says_when_workers_are_already_running(venv, workers, said):
    (venv / "status").write_text(f"Task  Name  Created  Status\n\nWorker status: {workers}\n")
    started = make(venv, "queue", "JOBS=2")
    assert started.returncode == 0
    assert ("queue workers are already running" in started.stderr) == said, started.stderr
    assert runs(venv)[-1].startswith("exp run --run-all -j 2"), "the runs start either way"


# A stand-in for .venv/bin/python (as `python -m stages.presets`): records its arguments one a line
# in ../presets-args, then prints ../options (or exits 1 when there is none).
FAKE_PRESETS = """#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/../presets-args"
cat "$(dirname "$0")/../options" 2>/dev/null || { echo "presets: error: refused" >&2; exit 1; }
"""
# ... and a dvc that records its arguments one a line, to see each word as the shell split it.
WORDS_DVC = """#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/../dvc-args"
"""


@pytest.mark.parametrize("exp_args, words", [
    ("", []),
    ("-f", ["-f"]),
    ("--queue -S 'train.seed=range(0,3)'", ["--queue", "-S", "train.seed=range(0,3)"]),
    ('-S "train.channels=[8, 16, 32]"', ["-S", "train.channels=[8, 16, 32]"]),  # a " of its own, a space
])
def test_exp_passes_exp_args_word_for_word_to_the_presets_check_and_to_dvc(venv, exp_args, words):
    """EXP_ARGS goes to `python -m stages.presets --from-commit NAME --` (for the keys its -S set) and
    to `dvc exp run`, each word as a shell would read it; the preset's options come first."""
    for name, script in (("python", FAKE_PRESETS), ("dvc", WORDS_DVC)):
        (venv / "bin" / name).write_text(script)
        (venv / "bin" / name).chmod(0o755)
    (venv / "options").write_text("-Strain.epochs=1 '-Strain.channels=[16, 32, 48]'\n")
    ran = make(venv, "exp", "PRESET=fast", f"EXP_ARGS={exp_args}")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (venv / "presets-args").read_text().splitlines() == ["-m", "stages.presets", "--from-commit", "fast", "--",
                                                                *words]
    assert (venv / "dvc-args").read_text().splitlines() == ["exp", "run", "-n", "fast", "-Strain.epochs=1",
                                                            "-Strain.channels=[16, 32, 48]", *words]


def test_exp_refuses_a_replace_that_is_not_1(venv):
    """REPLACE=0 or REPLACE=no must not remove the experiment, as any non-empty value once did."""
    for value in ("0", "no"):
        refused = make(venv, "exp", "PRESET=fast", f"REPLACE={value}")
        assert refused.returncode == 2 and f"REPLACE must be 1" in refused.stderr, refused.stderr
    assert calls(venv) == []


@pytest.mark.parametrize("replace", ["REPLACE=1", "REPLACE="])
def test_exp_replace_renames_the_new_run_over_the_old_one(venv, replace):
    """DVC refuses to overwrite an experiment; `dvc exp run -f` would also force every stage (the
    download included), so REPLACE=1 runs under a second name and renames that over the old one
    (a second name an interrupted run left behind removed first), and has presets refuse --queue."""
    (venv / "bin" / "python").write_text(FAKE_PRESETS)
    (venv / "bin" / "python").chmod(0o755)
    (venv / "options").write_text("-Strain.epochs=1\n")
    ran = make(venv, "exp", "PRESET=mlp-512+aug", replace)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    presets_args = (venv / "presets-args").read_text().splitlines()
    if replace == "REPLACE=1":
        assert presets_args == ["-m", "stages.presets", "--from-commit", "--replace", "mlp-512+aug", "--"]
        assert calls(venv) == ["exp list --name-only OMP=unset",
                               "exp run -n mlp-512-aug-replacing -Strain.epochs=1 OMP=unset",
                               "exp rename -f mlp-512-aug-replacing mlp-512-aug OMP=unset"]
    else:
        assert presets_args == ["-m", "stages.presets", "--from-commit", "mlp-512+aug", "--"]
        assert calls(venv) == ["exp list --name-only OMP=unset", "exp run -n mlp-512-aug -Strain.epochs=1 OMP=unset"]


def test_exp_tells_presets_when_the_name_is_taken(venv):
    """DVC's refusal of a taken name advises `dvc exp run -f`, which re-runs every stage, the
    download included: make exp tells stages.presets (--taken), which names REPLACE=1 instead
    (tests/test_presets.py); an experiment of another name is no reason."""
    (venv / "bin" / "python").write_text(FAKE_PRESETS)
    (venv / "bin" / "python").chmod(0o755)
    (venv / "options").write_text("-Strain.epochs=1\n")
    (venv / "exps").write_text("mlp-512-aug-old\nmlp-512-aug\n")
    assert make(venv, "exp", "PRESET=mlp-512+aug").returncode == 0
    assert (venv / "presets-args").read_text().splitlines() == ["-m", "stages.presets", "--from-commit", "--taken",
                                                                "mlp-512+aug", "--"]
    (venv / "exps").write_text("mlp-512-aug-old\n")
    assert make(venv, "exp", "PRESET=mlp-512+aug").returncode == 0
    assert "--taken" not in (venv / "presets-args").read_text().splitlines()



def test_exp_replace_keeps_the_old_experiment_when_the_run_fails(venv):
    """The old experiment was once removed before the run: a run that failed then lost it."""
    (venv / "bin" / "python").write_text(FAKE_PRESETS)
    (venv / "bin" / "python").chmod(0o755)
    (venv / "options").write_text("-Strain.epochs=1\n")
    (venv / "exp-run-exit").write_text("1")
    failed = make(venv, "exp", "PRESET=fast", "REPLACE=1")
    assert failed.returncode != 0
    assert calls(venv) == ["exp list --name-only OMP=unset",
                           "exp run -n fast-replacing -Strain.epochs=1 OMP=unset"], "nothing renamed"


def test_exp_replace_removes_a_second_name_left_on_this_commit_only(venv):
    """A fast-replacing that an interrupted REPLACE=1 left on this commit blocks the run (DVC:
    "conflicts with existing experiment"); one on another commit is a run of its own, which
    `dvc exp list` (this commit's) does not show: kept."""
    (venv / "bin" / "python").write_text(FAKE_PRESETS)
    (venv / "bin" / "python").chmod(0o755)
    (venv / "options").write_text("-Strain.epochs=1\n")
    (venv / "exps").write_text("fast\nfast-replacing-old\nfast-replacing\n")
    assert make(venv, "exp", "PRESET=fast", "REPLACE=1").returncode == 0
    assert calls(venv)[:2] == ["exp list --name-only OMP=unset", "exp remove fast-replacing OMP=unset"]


@pytest.mark.parametrize("mirror, seen", [
    ("mirror", "{cwd}/mirror"),  # a directory that exists
    ("../shared/data/mnst", "{parent}/shared/data/mnst"),  # one that does not (a typo): absolute too
    ("https://example.org/mnist/", "https://example.org/mnist/"),
    ("/data/my mnist", "/data/my mnist"),  # absolute with a space: abspath would split it in two
], ids=["existing", "missing", "url", "absolute-with-space"])
def test_a_local_mnist_mirror_reaches_dvc_as_an_absolute_path(venv, mirror, seen):
    """`dvc exp run --temp` and queued runs move the stages' working directory; and a missing
    directory's error should name the path fetch looked for, not warn about a relative one."""
    (venv / "bin" / "dvc").write_text('#!/bin/sh\necho "$MNIST_MIRROR" > "$(dirname "$0")/../mirror-seen"\n')
    (venv.parent / "mirror").mkdir()
    ran = make(venv, "repro", f"MNIST_MIRROR={mirror}")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (venv / "mirror-seen").read_text().strip() == seen.format(cwd=venv.parent, parent=venv.parent.parent)


def test_exp_stops_before_dvc_when_the_presets_check_refuses(venv):
    (venv / "bin" / "python").write_text(FAKE_PRESETS)
    (venv / "bin" / "python").chmod(0o755)
    refused = make(venv, "exp", "PRESET=fashion", "EXP_ARGS=-f")
    assert refused.returncode != 0 and "presets: error: refused" in refused.stderr
    assert calls(venv) == ["exp list --name-only OMP=unset"], "no run: DVC was only asked for the names"


def test_help_lists_every_target_with_its_note(venv):
    phony = next(line for line in (PROJECT_ROOT / "Makefile").read_text().splitlines()
                 if line.startswith(".PHONY:")).split()[1:]
    listed = make(venv, "help")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1]: line.split(None, 2)[2] for line in listed.stdout.splitlines()}
    assert sorted(rows) == sorted(phony), "every phony target has a `## ` note, and only they are listed"
    assert rows["repro"].startswith("set up if needed, then run the DVC pipeline")
    assert calls(venv) == [], "help runs nothing"


def test_setup_refuses_a_python_older_than_the_pins_need(tmp_path):
    """A Python 3.10 would create the venv and then fail in pip with 'no matching distribution';
    set-up stops first, saying which Python it found and how to name another."""
    old_python = tmp_path / "python3.10"
    old_python.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Python 3.10.12"; exit 0; fi\nexit 1\n')
    old_python.chmod(0o755)
    result = subprocess.run(["make", "--no-print-directory", f"VENV={tmp_path / 'venv'}", f"PYTHON={old_python}", "setup"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"Python 3.11 or newer is needed (constraints.txt's pins), and {old_python} is Python 3.10.12" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_predict_hands_files_to_the_shell_as_docs_predict_says(venv):
    """A pattern expands; a name with spaces and parentheses keeps its own quotes (docs/predict.md)."""
    (venv / "bin/python").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$(dirname "$0")/../calls"\n')
    (venv / "bin/python").chmod(0o755)
    for name in ("a.png", "b.png"):
        (venv.parent / name).touch()
    for files in ("'my scan (2).png' *.png", '"my scan (2).png" *.png'):  # quotes of either kind inside
        result = make(venv, "predict", f"FILES={files}")
        assert result.returncode == 0, result.stderr
        assert calls(venv) == ["-m", "stages.predict", "my scan (2).png", "a.png", "b.png"]
    missing = make(venv, "predict")
    assert missing.returncode != 0 and not missing.stdout
    assert 'usage: make predict FILES="a.png b.jpg"' in missing.stderr
