"""Every command that README.md and the pages in docs/ show is run by a test, and every link
between them leads somewhere.

`documented_commands` reads the commands out of the pages' code blocks: the `$ ` lines of any
block (with backslash continuations), and every line of a `sh` block. Each one must be a key of
RUN_BY (the test that runs it) or of NOT_RUN (why no test can: real MNIST, a GPU, a second
machine). The walkthroughs that are cheap on the synthetic project run here exactly as written,
block by block (`run_block`), and the output a page shows for a command is checked where the
synthetic project gives the same output. `broken_links` checks every relative link's file and
#anchor, without network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from stages.runtime import numerics
from tests.conftest import PROJECT_ROOT, DvcProject, run_bounded
from tests.test_dvc_workflows import RERUNS, rerun_table
from tests.test_sharing import SEED_MEAN

PAGES = ("README.md", *sorted(path.relative_to(PROJECT_ROOT).as_posix() for path in (PROJECT_ROOT / "docs").glob("*.md")))
THIS = "tests/test_docs.py"
EXPERIMENTS = "tests/test_dvc_workflows.py::test_experiments_run_queue_show_apply"
LOCAL_REMOTE = "tests/test_dvc_workflows.py::test_local_remote_push_then_clone_pull"
SSH_REMOTE = "tests/test_dvc_workflows.py::test_ssh_remote_push_then_clone_pull"
S3_REMOTE = "tests/test_sharing.py::test_s3_remote_push_pull_and_run_cache"
VERIFY = "tests/test_sharing.py::test_corrupt_remote_object_is_refused_with_verify_only"  # local, SSH and S3
RUN_CACHE = "tests/test_dvc_workflows.py::test_run_cache_restores_a_run_made_elsewhere"
SHARED_EXPERIMENT = "tests/test_sharing.py::test_experiment_shared_through_git_host"
SWEEP = "tests/test_sharing.py::test_preset_grid_sweep_through_make"
PREDICT = "tests/test_predict_formats.py"

# Command as shown (comments stripped) -> the test that runs it.
RUN_BY = {
    # README.md
    "make repro": f"{THIS}::test_first_run_as_written",
    "make exp PRESET=fast": f"{THIS}::test_first_run_as_written",
    "make exp PRESET=fast REPLACE=1": f"{THIS}::test_first_run_as_written",
    "git checkout HEAD -- params.yaml dvc.lock metrics/eval.json": f"{THIS}::test_first_run_as_written",
    "make test": ".ci/run",
    "make test PYTEST_ARGS=\"-m 'not integration'\"": f"{THIS}::test_unit_test_command_leaves_out_integration_tests",
    "dvc repro": "tests/test_pipeline.py::test_invalid_params_fail_before_outputs_are_touched",
    'make predict FILES="digit.png"': f"{THIS}::test_make_predict_as_written",
    # docs/workflows.md, section 1
    "git checkout -b slow-lr": f"{THIS}::test_branch_walkthrough_as_written",
    "sed -i 's/^  lr: .*/  lr: 0.001/; s/^  epochs: .*/  epochs: 1/' params.yaml": f"{THIS}::test_branch_walkthrough_as_written",
    "git add -A && git commit -m 'train: lr 0.001, 1 epoch'": f"{THIS}::test_branch_walkthrough_as_written",
    "dvc params diff main slow-lr": f"{THIS}::test_branch_walkthrough_as_written",
    "dvc metrics diff main slow-lr": f"{THIS}::test_branch_walkthrough_as_written",
    "dvc metrics diff main slow-lr --md": f"{THIS}::test_branch_walkthrough_as_written",
    "dvc metrics diff main slow-lr --json | python -m json.tool": f"{THIS}::test_branch_walkthrough_as_written",
    "dvc plots diff main slow-lr -o plots-diff": f"{THIS}::test_branch_walkthrough_as_written",
    "ls plots-diff/static": f"{THIS}::test_branch_walkthrough_as_written",
    # section 2
    "sed -i 's/^  misclassified: .*/  misclassified: 5/' params.yaml": f"{THIS}::test_undo_recipe_as_written",
    "git checkout HEAD -- . && dvc checkout": f"{THIS}::test_undo_recipe_as_written",
    "dvc status": f"{THIS}::test_undo_recipe_as_written",
    # section 3 (a queued sweep takes minutes: run there, through the same commands)
    "dvc exp run -S train.lr=0.003": EXPERIMENTS,
    "dvc exp run --queue -S train.lr=0.01": EXPERIMENTS,
    "dvc exp run --queue -S train.lr=0.02": EXPERIMENTS,
    "OMP_NUM_THREADS=1 dvc queue start -j 2": EXPERIMENTS,
    "dvc queue status": EXPERIMENTS,
    "dvc exp show --csv > experiments.csv": EXPERIMENTS,
    "dvc exp show --json": EXPERIMENTS,
    "dvc exp apply unmet-pons": EXPERIMENTS,
    "git add -A && git commit -m 'train: lr 0.01 (best of the sweep)'": EXPERIMENTS,
    # section 4
    "sed -i 's/^  lr: .*/  lr: -1/' params.yaml": f"{THIS}::test_rejected_params_as_written",
    # docs/sharing.md: remotes (the tests use their own temporary paths, ports and bucket names)
    "dvc remote add -d storage /tmp/demo/storage": LOCAL_REMOTE,
    "dvc remote modify storage verify true": "tests/test_sharing.py::test_make_pull_refuses_a_remote_without_verify",
    "git add .dvc/config && git commit -m 'dvc remote: storage'": LOCAL_REMOTE,
    "dvc push": LOCAL_REMOTE,
    "git clone /tmp/demo/mnist /tmp/demo/clone && cd /tmp/demo/clone": LOCAL_REMOTE,
    "dvc pull": LOCAL_REMOTE,
    "dvc remote add -d ssh ssh://root@127.0.0.1:32899/tmp/demo/sshd/remote": SSH_REMOTE,
    "dvc remote modify ssh verify true": VERIFY,
    "dvc remote modify --local ssh keyfile /tmp/demo/sshd/id_ed25519": SSH_REMOTE,
    "cat .dvc/config": SSH_REMOTE,  # the test reads both files: the URL in one, the key in the other
    "cat .dvc/config.local": SSH_REMOTE,
    "git check-ignore -v .dvc/config.local": SSH_REMOTE,
    "git add .dvc/config && git commit -m 'dvc remote: ssh'": SSH_REMOTE,
    "dvc remote modify --local ssh keyfile ~/.ssh/id_ed25519": SSH_REMOTE,
    "dvc remote add -d s3store s3://team-dvc/mnist": S3_REMOTE,
    "dvc remote modify s3store endpointurl http://127.0.0.1:39587": S3_REMOTE,
    "dvc remote modify s3store verify true": VERIFY,
    "git add .dvc/config && git commit -qm 'dvc remote: s3store'": S3_REMOTE,
    "export AWS_ACCESS_KEY_ID=testing-access-key": S3_REMOTE,
    "export AWS_SECRET_ACCESS_KEY=testing-secret-key": S3_REMOTE,
    "cd /tmp/demo/mnist": S3_REMOTE,
    "git clone -q /tmp/demo/mnist /tmp/demo/clone-s3 && cd /tmp/demo/clone-s3": S3_REMOTE,
    "unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY": S3_REMOTE,
    "dvc remote modify --local s3store access_key_id testing-access-key": S3_REMOTE,
    "dvc remote modify --local s3store secret_access_key testing-secret-key": S3_REMOTE,
    "git status --short": S3_REMOTE,
    "git checkout lr && dvc pull": "tests/test_sharing.py::test_push_shares_other_branches_only_with_all_branches",
    # run-cache, experiments, sweeps
    "sed -i 's/^  lr: .*/  lr: 0.04/' params.yaml": RUN_CACHE,
    "dvc push --run-cache": RUN_CACHE,
    "dvc pull --run-cache": RUN_CACHE,
    "dvc repro --pull": RUN_CACHE,
    "dvc exp run -n lr-0.04 -S train.lr=0.04": SHARED_EXPERIMENT,
    "dvc exp push origin lr-0.04": SHARED_EXPERIMENT,
    "dvc exp pull origin lr-0.04": SHARED_EXPERIMENT,
    # (the test reads the same rows through `dvc exp show --json`)
    "dvc exp show --md --drop '.*' --keep 'Experiment|^accuracy$|train.lr'": SHARED_EXPERIMENT,
    "dvc exp apply lr-0.04": SHARED_EXPERIMENT,
    "git add -A && git commit -m 'train: lr 0.04'": SHARED_EXPERIMENT,
    # (the test queues a grid through `make exp`, which runs `dvc exp run --queue -S ...`, and
    # `make queue`, which runs `dvc exp run --run-all -j`)
    "dvc exp run --queue -S 'train.lr=0.1,0.2' -S 'train.seed=range(0,3)'": SWEEP,
    "dvc exp run --run-all -j 2": SWEEP,
    "make exp PRESET=fast EXP_ARGS=\"--queue -S 'train.seed=range(0,3)'\"": SWEEP,
    "make queue JOBS=2": SWEEP,
    "dvc exp show --md --drop '.*' --keep 'Experiment|train.seed|^accuracy$|^loss$'": SWEEP,
    SEED_MEAN: SWEEP,
    "make pull": "tests/test_sharing.py::test_make_pull_refuses_a_remote_without_verify",
    # gc: after the branch walkthrough, on its two branches
    "git checkout slow-lr && dvc checkout": f"{THIS}::test_branch_walkthrough_as_written",
    "dvc gc -w -f": f"{THIS}::test_branch_walkthrough_as_written",
    "git checkout -- . && dvc checkout": "tests/test_dvc_workflows.py::test_gc_after_experiments_keeps_the_commit_with_"
                                         "the_wide_scope_and_not_with_w",
    "dvc exp remove seed-3": "tests/test_dvc_workflows.py::test_gc_after_experiments_keeps_the_commit_with_"
                                         "the_wide_scope_and_not_with_w",
    "dvc gc -a -T --all-experiments -f": "tests/test_dvc_workflows.py::test_gc_after_experiments_keeps_the_commit_with_"
                                         "the_wide_scope_and_not_with_w",
    "rm models/model.pt data/prepared/*.pt && dvc checkout": f"{THIS}::test_branch_walkthrough_as_written",
    "git checkout main && dvc checkout": f"{THIS}::test_branch_walkthrough_as_written",
    "dvc gc --all-branches --all-tags --cloud -r storage -f": f"{THIS}::test_branch_walkthrough_as_written",
    # docs/tracking.md
    "dvc exp show --drop '.*' --keep 'Experiment|^accuracy$|^val_|^train.(model|lr|epochs)$'":
        "tests/test_tracking.py::test_validation_metrics_in_exp_show_and_the_one_screen_view",
    "dvc exp show --only-changed --drop 'per_class|step'": f"{THIS}::test_tracking_views_as_written",
    "dvc metrics show": f"{THIS}::test_tracking_views_as_written",
    "dvc params diff HEAD": f"{THIS}::test_tracking_views_as_written",
    "dvc plots show -o plots-html": f"{THIS}::test_tracking_views_as_written",
    "ls plots-html/static": f"{THIS}::test_tracking_views_as_written",
    "dvc artifacts get /tmp/trk2/repo mnist-classifier -o /tmp/trk2/model.pt":
        "tests/test_tracking.py::test_artifacts_get_returns_the_model_byte_identical",
    "python -m stages.predict --model /tmp/trk2/model.pt digit.png":
        f"{PREDICT}::test_runs_without_params_yaml_from_any_directory",
    # docs/predict.md (its transcripts use a model trained on real MNIST; the tests run the same
    # commands on the same kinds of files with the synthetic project's model)
    "python -m stages.predict digit.png scan.jpg": f"{THIS}::test_make_predict_as_written",
    "mnist-predict digit.png --model path/to/model.pt": f"{THIS}::test_make_predict_as_written",
    'make predict FILES="digit.png scan.jpg data/raw/t10k-images-idx3-ubyte"': f"{THIS}::test_make_predict_as_written",
    "python -m stages.predict --help": f"{THIS}::test_make_predict_as_written",
    "python -m stages.predict --model fast.pt digit.png photo.jpg sticker.png scan16.png anim.gif blank.png":
        f"{PREDICT}::test_the_command_prints_one_line_per_file_in_order",
    "python -m stages.predict --model fast.pt --json anim.gif blank.png empty.png":
        f"{PREDICT}::test_json_has_one_object_per_file_with_the_same_keys",
    "python -m stages.predict --model fast.pt empty.png bomb.png huge.png truncated.png notes.txt IMG_0042.HEIC photos "
    "loop missing.png": f"{PREDICT}::test_each_bad_file_gets_its_own_one_line_reason",
    # docs/gpu.md (a dry run: the module itself needs a CUDA GPU)
    'make gpu-check GPU_CHECK_ARGS="--out /tmp/gpu-check --mirror /path/to/mnist"':
        f"{THIS}::test_make_gpu_check_runs_the_module_with_its_args",
}

# Command as shown -> why no test runs it.
NOT_RUN = {
    "MNIST_MIRROR=../shared/data/mnist make exp PRESET=fast":
        "needs the real MNIST files; the test runs `make exp PRESET=fast` with MNIST_MIRROR set to a "
        "synthetic mirror, and CI fetches real MNIST from that directory",
    'make bench BENCH_ARGS="--repeats 5"': "a timing benchmark on real MNIST, minutes long",
    "torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint host0:29500 "
    "-m stages.train data/augmented/train.pt data/prepared/val.pt models/model.pt metrics/train":
        "needs two machines with 8 GPUs each; tests/test_distributed.py runs the stage under torchrun on one",
    "MNIST_MIRROR=/path/to/mnist .venv/bin/python -m benchmarks.gpu_check --out /tmp/gpu-check":
        "needs a CUDA GPU and real MNIST; tests/test_gpu_check.py runs the same module without a GPU "
        "(the one-line refusal) and with --device cpu --quick on the synthetic project",
    "dvc repro 2>&1 | cat":
        "progress lines come every 10 s, longer than the synthetic run trains; tests/test_tracking.py::"
        "test_progress_prints_plain_lines_every_interval_when_not_a_terminal checks the lines train prints "
        "when its output is not a terminal",
    "apt-get install dataset-fashion-mnist": "installs a system package as root, from Debian's servers",
    "make exp PRESET=fashion":
        "trains on real Fashion-MNIST (twice the default run's work); tests/test_fashion.py validates the "
        "preset and runs its augment params through DVC on a synthetic dataset",
    "make exp PRESET=fashion-max":
        "trains on real Fashion-MNIST for about 15 minutes; tests/test_fashion.py checks that it is "
        "`fashion` with only its epochs and on-the-fly views changed, and tests/test_presets.py validates it",
    "MNIST_MIRROR=/usr/share/datasets/fashion-mnist make exp PRESET=fashion":
        "as `make exp PRESET=fashion`, with the Debian package's files as the mirror",
    "python -m benchmarks.presets fashion --set train.seed=1 --set augment.seed=1":
        "a benchmark on real Fashion-MNIST, tens of minutes on a 2-core CPU",
    "dvc pull -v 2>&1 | grep corrupt":
        "a line of DVC's debug log, worded by DVC; tests/test_sharing.py::"
        "test_corrupt_remote_object_is_refused_with_verify_only checks that the same pull fails and names the files",
}


# ---------------------------------------------------------------------------------------------
# Reading commands out of the pages

FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
COMMENT = re.compile(r"\s+#(\s.*)?$")


def code_blocks(page: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a page, indented blocks included."""
    text = (PROJECT_ROOT / page).read_text()
    return [(match.group(2), textwrap.dedent(match.group(3))) for match in FENCE.finditer(text)]


def _joined(lines: list[str]) -> list[str]:
    """Lines with trailing-backslash continuations joined."""
    joined, pending = [], ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
        else:
            joined.append(pending + line.strip())
            pending = ""
    return joined


def block_commands(language: str, text: str) -> list[tuple[str, list[str]]]:
    """(command, lines of output shown after it) for each command of a block."""
    lines = text.splitlines()
    if any(line.startswith("$ ") for line in lines):
        commands: list[tuple[str, list[str]]] = []
        continued = False  # the last `$ ` line ended in a backslash: this line is more of it
        for line in lines:
            if line.startswith("$ ") or continued:
                text = COMMENT.sub("", line[2:] if line.startswith("$ ") and not continued else line).strip()
                if continued:
                    command, output = commands.pop()
                    commands.append((command[:-1].rstrip() + " " + text, output))
                else:
                    commands.append((text, []))
                continued = text.endswith("\\")
            elif commands:
                commands[-1][1].append(line)
        return commands
    if language in ("sh", "bash"):
        code = [COMMENT.sub("", line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return [(command, []) for command in _joined(code)]
    return []


def documented_commands() -> dict[str, list[str]]:
    """Command -> the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for language, text in code_blocks(page):
            for command, _ in block_commands(language, text):
                found.setdefault(command, []).append(page)
    return found


def find_block(page: str, first: str) -> list[tuple[str, list[str]]]:
    """The commands of the block on `page` whose first command is `first`."""
    for language, text in code_blocks(page):
        commands = block_commands(language, text)
        if commands and commands[0][0] == first:
            return commands
    raise AssertionError(f"{page} has no code block starting with `{first}`")


def test_every_documented_command_is_run_by_a_test_or_says_why_not():
    shown = documented_commands()
    unaccounted = sorted(set(shown) - set(RUN_BY) - set(NOT_RUN))
    assert not unaccounted, f"commands no test runs (add them to RUN_BY or NOT_RUN): {unaccounted}"
    stale = sorted((set(RUN_BY) | set(NOT_RUN)) - set(shown))
    assert not stale, f"listed here but shown on no page: {stale}"
    for command, test in RUN_BY.items():
        if test == ".ci/run":
            assert command in (PROJECT_ROOT / ".ci/run").read_text(), command
            continue
        path, name = test.split("::")
        assert re.search(rf"^def {name}\(", (PROJECT_ROOT / path).read_text(), re.MULTILINE), test


def test_command_extraction_reads_prompts_continuations_and_comments():
    console = "$ dvc repro   # note\nRunning stage 'params':\n$ ls\n"
    assert block_commands("console", console) == [("dvc repro", ["Running stage 'params':"]), ("ls", [])]
    continued = "$ dvc exp show --csv | awk -F, \\\n    '{print $1}'   # first column\nExperiment\n"
    assert block_commands("console", continued) == [("dvc exp show --csv | awk -F, '{print $1}'", ["Experiment"])]
    sh = "# a comment\nmake repro   # set up and run\ntorchrun --a 1 \\\n    -m x y\n"
    assert block_commands("sh", sh) == [("make repro", []), ("torchrun --a 1 -m x y", [])]
    assert block_commands("", "plain text, no prompt\n") == []


# ---------------------------------------------------------------------------------------------
# Links between the pages

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(page: str) -> str:
    """A page without its code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", (PROJECT_ROOT / page).read_text()))


def heading_anchors(page: str) -> set[str]:
    """The anchors GitHub gives a page's headings: the text without markup, lower-cased, every
    character but letters, digits, spaces, `-` and `_` dropped, spaces as `-`; a repeated
    heading gets `-1`, `-2`, ..."""
    text = FENCE.sub("", (PROJECT_ROOT / page).read_text())
    anchors: set[str] = set()
    for match in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.MULTILINE):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        unique, n = slug, 0
        while unique in anchors:
            n += 1
            unique = f"{slug}-{n}"
        anchors.add(unique)
    return anchors


def broken_links(page: str) -> list[str]:
    """The relative links of `page` whose file, or whose #anchor in it, does not exist."""
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...: not checked (no network)
            continue
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(Path(page).parent / path) if path else page
        if not (PROJECT_ROOT / linked).exists():
            broken.append(f"{page}: {target} (no file {linked})")
        elif anchor and linked.endswith(".md") and anchor not in heading_anchors(linked):
            broken.append(f"{page}: {target} (no heading #{anchor} in {linked})")
    return broken


def test_every_relative_link_reaches_a_file_and_heading():
    assert not [link for page in PAGES for link in broken_links(page)]


def test_anchors_follow_github_and_broken_links_are_found(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "p.md"
    page.parent.mkdir()
    page.write_text("# Title\n## 4. Which `stages` re-run?\n## Notes\n## Notes\n```\n## not a heading\n[x](#nope)\n```\n"
                    "[a](#4-which-stages-re-run) [b](#notes-1) [c](p.md#title) [d](../README.md) [e](https://x.y/z)\n"
                    "[f](#missing) [g](q.md) `[h](#in-code)`\n")
    monkeypatch.setattr(sys.modules[__name__], "PROJECT_ROOT", tmp_path)
    assert heading_anchors("docs/p.md") == {"title", "4-which-stages-re-run", "notes", "notes-1"}
    assert broken_links("docs/p.md") == ["docs/p.md: ../README.md (no file README.md)",
                                         "docs/p.md: #missing (no heading #missing in docs/p.md)",
                                         "docs/p.md: q.md (no file docs/q.md)"]


# ---------------------------------------------------------------------------------------------
# Running blocks as written on the synthetic project

def run_block(project: DvcProject, commands: list[tuple[str, list[str]]],
              may_fail: frozenset[str] = frozenset()) -> dict[str, subprocess.CompletedProcess]:
    """Runs each command in bash, in order; every one must succeed unless named in `may_fail`."""
    results = {}
    for command, _ in commands:
        result = run_bounded(["bash", "-c", command], cwd=project.root, env=project.env)
        assert (result.returncode != 0) == (command in may_fail), (
            f"`{command}` exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        results[command] = result
    return results


def assert_shows_real_output(commands, results, checked: set[str]) -> None:
    """Every output line a page shows for a command in `checked` is in what the command printed
    (a `...` line stands for lines the page leaves out)."""
    for command, shown in commands:
        if command in checked:
            printed = {line.rstrip() for line in (results[command].stdout + results[command].stderr).splitlines()}
            missing = [line for line in shown if line.strip() not in ("", "...") and line.rstrip() not in printed]
            assert not missing, f"`{command}` did not print {missing}:\n{results[command].stdout}"


def output_digests(project: DvcProject) -> dict[str, bytes]:
    return {str(path.relative_to(project.root)): path.read_bytes()
            for folder in ("data", "models", "metrics", "plots")
            for path in sorted(project.path(folder).rglob("*")) if path.is_file()}


def with_make(project: DvcProject) -> DvcProject:
    """Adds what `make` needs to the project copy: the Makefile, presets and an installed .venv.

    The copy's `.venv` links to everything in this interpreter's environment (pyvenv.cfg, bin,
    lib, ...) but has its own `.installed`, newer than pyproject.toml and constraints.txt, so make
    never installs anything into the environment the tests run in."""
    for name in ("Makefile", "presets.yaml", "pyproject.toml", "constraints.txt"):
        shutil.copy2(PROJECT_ROOT / name, project.path(name))
        os.utime(project.path(name), (1e9, 1e9))
    venv = project.path(".venv")
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (venv / ".installed").touch()
    project.commit("make")
    return project


@pytest.mark.integration
def test_first_run_as_written(project):
    p = with_make(project)
    before = output_digests(p)
    committed_params = p.path("params.yaml").read_text()
    (fast_run,) = find_block("README.md", "make exp PRESET=fast")
    run_block(p, [fast_run])
    fast = yaml.safe_load((PROJECT_ROOT / "presets.yaml").read_text())["fast"]
    params = p.params()
    assert all(params[section][key] == value
               for name, value in fast.items() for section, key in [name.split(".")]), params
    assert "fast" in p.dvc("exp", "list", "--name-only").stdout.split()

    run_block(p, find_block("README.md", "git checkout HEAD -- params.yaml dvc.lock metrics/eval.json"))
    assert p.path("params.yaml").read_text() == committed_params
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    # Training is deterministic: the committed params give back the committed outputs.
    assert output_digests(p) == before

    # The preset again under its name: the old experiment replaced, its unchanged stages not run
    # again (`dvc exp run -f` would download the data again).
    again = run_block(p, find_block("README.md", "make exp PRESET=fast REPLACE=1"))["make exp PRESET=fast REPLACE=1"]
    assert "Running stage 'fetch'" not in again.stdout + again.stderr, again.stdout
    assert p.dvc("exp", "list", "--name-only").stdout.split() == ["fast"]


@pytest.mark.integration
def test_make_predict_as_written(project):
    p = with_make(project)
    image = Image.new("L", (120, 160), 235)
    ImageDraw.Draw(image).text((15, 5), "3", fill=20, font=ImageFont.load_default(size=120))
    image.save(p.path("digit.png"))
    (command,) = find_block("README.md", 'make predict FILES="digit.png"')
    result = run_block(p, [command])[command[0]]
    assert "digit.png" in result.stdout, result.stdout

    # docs/predict.md's ways to call it; the console script is given the project's model.
    image.convert("RGB").save(p.path("scan.jpg"))
    commands = [(command.replace("path/to/model.pt", "models/model.pt"), shown)
                for command, shown in find_block("docs/predict.md", "python -m stages.predict digit.png scan.jpg")]
    printed = [result.stdout for result in run_block(p, commands).values()]
    two, console, make, usage = printed
    assert [line.split(": ")[0] for line in two.splitlines()] == ["digit.png", "scan.jpg"], two
    assert console.startswith("digit.png: "), console
    test_images = len(torch.load(p.path("data/prepared/test.pt"), weights_only=True)["labels"])
    # make echoes no command: its stdout is the results alone, as predict's own.
    assert [line.split(": ")[0] for line in make.splitlines()] == [
        "digit.png", "scan.jpg", *(f"data/raw/t10k-images-idx3-ubyte[{i}]" for i in range(test_images))], make
    assert usage.startswith("usage: python -m stages.predict "), usage


def test_make_gpu_check_runs_the_module_with_its_args():
    _, (command, _) = find_block("docs/gpu.md", "MNIST_MIRROR=/path/to/mnist .venv/bin/python -m benchmarks.gpu_check "
                                               "--out /tmp/gpu-check")
    assert command.startswith("make gpu-check ")
    # make -n prints the recipe without running it (the check itself needs a CUDA GPU).
    dry = subprocess.run(["bash", "-c", command.replace("make ", "make -n ", 1)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True)
    assert dry.stdout.splitlines()[-1].endswith(
        "/python -m benchmarks.gpu_check --out /tmp/gpu-check --mirror /path/to/mnist"), dry.stdout


@pytest.mark.integration
def test_tracking_views_as_written(project):
    p = project
    changed = find_block("docs/tracking.md", "dvc exp show --only-changed --drop 'per_class|step'")
    table = run_block(p, changed)[changed[0][0]].stdout
    assert "Experiment" in table and "per_class" not in table, table

    (metrics,) = find_block("docs/tracking.md", "dvc metrics show")
    header = run_block(p, [metrics])["dvc metrics show"].stdout.splitlines()[0].split()
    shown = [name for name in metrics[1][0].split() if name != "..."]
    assert shown == [name for name in header if name in shown], f"columns {shown}, printed {header}"
    assert [line.split()[0] for line in metrics[1][1:]] == ["metrics/eval.json", "metrics/train/metrics.json"]

    # The page shows the first run that wrote metrics/train/params.yaml against a commit without it;
    # here the committed run has it, so the workspace's copy plays another machine's run.
    (params_diff,) = find_block("docs/tracking.md", "dvc params diff HEAD")
    recorded = yaml.safe_load(p.path("metrics/train/params.yaml").read_text())
    p.path("metrics/train/params.yaml").write_text(yaml.safe_dump(
        {**recorded, "precision": "bf16" if recorded["precision"] == "fp32" else "fp32", "threads": 64}))
    printed = run_block(p, [params_diff])["dvc params diff HEAD"].stdout.splitlines()
    assert printed[0].split() == params_diff[1][0].split() == ["Path", "Param", "HEAD", "workspace"]
    assert [line.split()[:2] for line in printed[1:]] == [
        ["metrics/train/params.yaml", "precision"], ["metrics/train/params.yaml", "threads"]], printed
    # The page shows a CPU run's keys, whatever this machine trains on.
    assert {line.split()[1] for line in params_diff[1][1:]} == set(numerics(torch.device("cpu"), "fp32"))

    plots = find_block("docs/tracking.md", "dvc plots show -o plots-html")
    results = run_block(p, plots)
    assert p.path("plots-html/index.html").is_file()
    # ls prints columns on a terminal, one name a line into a pipe: compare the names.
    assert results["ls plots-html/static"].stdout.split() == " ".join(plots[1][1]).split()


def test_unit_test_command_leaves_out_integration_tests():
    (command, _), = find_block("README.md", "make test PYTEST_ARGS=\"-m 'not integration'\"")
    # make -n prints the recipe without running it: the marker expression reaches pytest intact.
    dry = subprocess.run(["bash", "-c", command.replace("make ", "make -n ", 1)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True)
    assert re.search(r"-m pytest -n auto (--[a-z-]+ [a-z0-9]+ )*-m 'not integration'$", dry.stdout, re.M), dry.stdout
    # The expression selects the unit tests and leaves out the ones that run DVC.
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not integration", "-p", "no:cacheprovider",
         "tests/test_dvc_workflows.py", "tests/test_params.py"],
        cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert ids and all(line.startswith("tests/test_params.py::") for line in ids), collected.stdout


@pytest.mark.integration
def test_branch_walkthrough_as_written(project):
    p = project
    commands = find_block("docs/workflows.md", "git checkout -b slow-lr")
    results = run_block(p, commands)
    assert_shows_real_output(commands, results, {"dvc params diff main slow-lr"})
    metrics = json.loads(results["dvc metrics diff main slow-lr --json | python -m json.tool"].stdout)
    assert "accuracy" in metrics["metrics/eval.json"]
    assert p.path("plots-diff/index.html").is_file()
    assert set(results["ls plots-diff/static"].stdout.split()) == {
        f"{rev}_plots_{name}.png" for rev in ("main", "slow-lr")
        for name in ("confusion_matrix", "loss_curves", "misclassified")}

    # docs/sharing.md's `dvc gc` walkthrough, on these two branches, with main pushed to a remote.
    p.run("git", "checkout", "-q", "main")
    p.dvc("checkout")
    p.dvc("remote", "add", "-d", "storage", str(p.root.parent / "storage"))
    p.dvc("remote", "modify", "storage", "verify", "true")
    p.commit("dvc remote: storage")
    p.dvc("push")
    workspace = find_block("docs/sharing.md", "git checkout slow-lr && dvc checkout")
    results = run_block(p, workspace)
    assert_shows_real_output(workspace, results, {cmd for cmd, _ in workspace})
    gone = find_block("docs/sharing.md", "git checkout main && dvc checkout")
    results = run_block(p, gone, may_fail=frozenset({"git checkout main && dvc checkout"}))
    assert_shows_real_output(gone, results, {cmd for cmd, _ in gone})
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    cloud = find_block("docs/sharing.md", "dvc gc --all-branches --all-tags --cloud -r storage -f")
    assert_shows_real_output(cloud, run_block(p, cloud), {cmd for cmd, _ in cloud})


@pytest.mark.integration
@pytest.mark.parametrize("autostage", ["as shipped", "on"])
def test_undo_recipe_as_written(project, autostage):
    p = project
    # The recipe must work with the project's own .dvc/config and with DVC's autostage on.
    config = (PROJECT_ROOT / ".dvc/config").read_text()
    if autostage == "on":
        config += "[core]\n    autostage = true\n"
    p.path(".dvc/config").write_text(config)
    p.run("git", "commit", "-q", "--allow-empty", "-m", "config", ".dvc/config")
    before = output_digests(p)
    commands = find_block("docs/workflows.md", "sed -i 's/^  misclassified: .*/  misclassified: 5/' params.yaml")
    if autostage == "on":
        # Why the page says HEAD: with autostage, the index holds the new dvc.lock, so a plain
        # `git checkout -- .` leaves it, and DVC sees the params as changed.
        run_block(p, commands[:2])
        assert p.run("git", "diff", "--cached", "--name-only").stdout.split() == ["dvc.lock"]
        p.run("bash", "-c", "git checkout -- . && dvc checkout")
        assert "params.yaml" in p.dvc("status").stdout
    results = run_block(p, commands)
    assert_shows_real_output(commands, results, {"dvc status"})
    assert p.run("git", "status", "--porcelain").stdout == ""
    assert output_digests(p) == before


@pytest.mark.integration
def test_rejected_params_as_written(project):
    p = project
    marker = p.path("data/params-valid.txt").read_bytes()
    commands = find_block("docs/workflows.md", "sed -i 's/^  lr: .*/  lr: -1/' params.yaml")
    results = run_block(p, commands, may_fail=frozenset({"dvc repro"}))
    assert_shows_real_output(commands, results, {"dvc repro", "dvc status"})
    # Only what really changed: the params file, and the one stage whose section it touches.
    stale = {line[:-1] for line in results["dvc status"].stdout.splitlines() if line and not line[0].isspace()}
    assert stale == {"params", "train"}, results["dvc status"].stdout
    assert p.path("data/params-valid.txt").read_bytes() == marker
    assert p.run("git", "status", "--porcelain").stdout.split() == ["M", "params.yaml"]


def test_tracking_counts_the_params_dvc_exp_show_lists():
    """docs/tracking.md says how many param columns plain `dvc exp show` adds (one per leaf of
    params.yaml, a list being one); a new key must update it."""
    def leaves(node) -> int:
        return sum(leaves(value) for value in node.values()) if isinstance(node, dict) else 1

    count = leaves(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()))
    page = (PROJECT_ROOT / "docs/tracking.md").read_text()
    stated = re.search(r"a column for every param \((\d+) in `params.yaml`", page)
    assert stated is not None, "docs/tracking.md no longer states the count"
    assert int(stated.group(1)) == count, (f"docs/tracking.md says {stated.group(1)} params (\"a column for every "
                                           f"param\"), params.yaml has {count}: update the page")


# The re-run table's checks: the table is test_dvc_workflows' (integration tests that run each row),
# these need no DVC and run with the unit tests, so a stale page fails the quick run too.
def test_rerun_table_covers_every_file_of_stages():
    """A new module in stages/ needs a row: either a stage lists it in dvc.yaml or the row says why none does.
    Hidden files are no module (an editor's .train.py.swp), nor is __pycache__ (a folder)."""
    files = {f"stages/{path.name}" for path in (PROJECT_ROOT / "stages").iterdir()
             if path.is_file() and not path.name.startswith(".")}
    assert "stages/train.py" in files and files - set(RERUNS) == set()


def test_workflows_page_rerun_table_is_current():
    text = (PROJECT_ROOT / "docs" / "workflows.md").read_text()
    assert rerun_table() in text, "docs/workflows.md's re-run table is stale: paste `python -m tests.test_dvc_workflows`"
