"""Every command that README.md and the docs pages below show is run by a test.

`documented_commands` reads the commands out of the pages' code blocks: the `$ ` lines of any
block, and every line of a `sh` block. Each one must be a key of RUN_BY (the test that runs it) or
of NOT_RUN (why no test can: real MNIST, a second machine). The walkthroughs that are cheap on the
synthetic project run here exactly as written, block by block (`run_block`), and the output a page
shows for a command is checked where the synthetic project gives the same output.
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
import yaml
from PIL import Image, ImageDraw, ImageFont

from tests.conftest import PROJECT_ROOT, DvcProject

PAGES = ("README.md", "docs/workflows.md", "docs/speed.md", "docs/reproducibility.md")
THIS = "tests/test_docs.py"
EXPERIMENTS = "tests/test_dvc_workflows.py::test_experiments_run_queue_show_apply"

# Command as shown (comments stripped) -> the test that runs it.
RUN_BY = {
    # README.md
    "make repro": f"{THIS}::test_first_run_as_written",
    "make exp PRESET=fast": f"{THIS}::test_first_run_as_written",
    "git checkout HEAD -- .": f"{THIS}::test_first_run_as_written",
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
    "dvc queue start -j 2": EXPERIMENTS,
    "dvc queue status": EXPERIMENTS,
    "dvc exp show --csv > experiments.csv": EXPERIMENTS,
    "dvc exp show --json": EXPERIMENTS,
    "dvc exp apply unmet-pons": EXPERIMENTS,
    "git add -A && git commit -m 'train: lr 0.01 (best of the sweep)'": EXPERIMENTS,
    # section 4
    "sed -i 's/^  lr: .*/  lr: -1/' params.yaml": f"{THIS}::test_rejected_params_as_written",
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
        for line in lines:
            if line.startswith("$ "):
                commands.append((COMMENT.sub("", line[2:]).strip(), []))
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
    sh = "# a comment\nmake repro   # set up and run\ntorchrun --a 1 \\\n    -m x y\n"
    assert block_commands("sh", sh) == [("make repro", []), ("torchrun --a 1 -m x y", [])]
    assert block_commands("", "plain text, no prompt\n") == []


# ---------------------------------------------------------------------------------------------
# Running blocks as written on the synthetic project

def run_block(project: DvcProject, commands: list[tuple[str, list[str]]],
              may_fail: frozenset[str] = frozenset()) -> dict[str, subprocess.CompletedProcess]:
    """Runs each command in bash, in order; every one must succeed unless named in `may_fail`."""
    results = {}
    for command, _ in commands:
        result = subprocess.run(["bash", "-c", command], cwd=project.root, env=project.env,
                                capture_output=True, text=True)
        assert (result.returncode != 0) == (command in may_fail), (
            f"`{command}` exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        results[command] = result
    return results


def assert_shows_real_output(commands, results, checked: set[str]) -> None:
    """Every output line a page shows for a command in `checked` is in what the command printed."""
    for command, shown in commands:
        if command in checked:
            printed = {line.rstrip() for line in (results[command].stdout + results[command].stderr).splitlines()}
            missing = [line for line in shown if line.strip() and line.rstrip() not in printed]
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

    run_block(p, find_block("README.md", "git checkout HEAD -- ."))
    assert p.path("params.yaml").read_text() == committed_params
    assert "Data and pipelines are up to date" in p.dvc("status").stdout
    # Training is deterministic: the committed params give back the committed outputs.
    assert output_digests(p) == before


@pytest.mark.integration
def test_make_predict_as_written(project):
    p = with_make(project)
    image = Image.new("L", (120, 160), 235)
    ImageDraw.Draw(image).text((15, 5), "3", fill=20, font=ImageFont.load_default(size=120))
    image.save(p.path("digit.png"))
    (command,) = find_block("README.md", 'make predict FILES="digit.png"')
    result = run_block(p, [command])[command[0]]
    assert "digit.png" in result.stdout, result.stdout


def test_unit_test_command_leaves_out_integration_tests():
    (command, _), = find_block("README.md", "make test PYTEST_ARGS=\"-m 'not integration'\"")
    # make -n prints the recipe without running it: the marker expression reaches pytest intact.
    dry = subprocess.run(["bash", "-c", command.replace("make ", "make -n ", 1)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True)
    assert "-m pytest -m 'not integration'" in dry.stdout, dry.stdout
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
