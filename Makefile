# Two entry points, each safe on a fresh clone of a fresh machine:
#   make repro   set up .venv if needed, then run the DVC pipeline
#   make test    set up .venv if needed, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the declared dependencies change.
INSTALLED := $(VENV)/.installed
# Every target sees the venv first on PATH, as if activated: DVC's experiment-queue workers start
# `dvc` by name, and stages in a queued run's temporary copy find `python3` there.
export PATH := $(abspath $(BIN)):$(PATH)
# A relative MNIST_MIRROR directory made absolute: `dvc exp run --temp` and queued experiments run
# the stages under .dvc/tmp/exps, where a relative path would point elsewhere; one that does not
# exist too, so that fetch's error names the directory it looked for (a typo), not the relative
# path. URLs pass unchanged. `override`: also when given on make's command line (make repro MNIST_MIRROR=...).
# Left as given: a URL, an absolute path, and a path with a space (make's abspath would split it).
ifneq ($(MNIST_MIRROR),)
ifeq ($(findstring ://,$(MNIST_MIRROR))$(filter /%,$(MNIST_MIRROR))$(word 2,$(MNIST_MIRROR)),)
override export MNIST_MIRROR := $(abspath $(MNIST_MIRROR))
endif
endif

.PHONY: help repro test setup bench frontier exp queue pull predict clean-venv gpu-check screen

# `make` alone sets up; `make help` lists the targets, each with the `## ` note on its line.
.DEFAULT_GOAL := setup
help:  ## this list
	@awk -F ':.*## ' '/^[a-z-]+:.*## / { printf "  make %-12s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

setup: $(INSTALLED)  ## set up .venv (pinned packages; once, a few minutes)

$(INSTALLED): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo \
	  "Python 3.11 or newer is needed (constraints.txt's pins), and $(PYTHON) is $$($(PYTHON) --version 2>&1): name another, e.g. make PYTHON=python3.12" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned packages into $(VENV) (torch among them: a few minutes and about 6 GB, once)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

repro: $(INSTALLED)  ## set up if needed, then run the DVC pipeline (dvc repro)
	$(BIN)/dvc repro

# The tests run in one pytest-xdist worker per CPU this process may run on (its affinity; at most
# 4, tests/conftest.py), a test file's tests in one worker: its module fixtures are built once.
# They mostly wait on `dvc` commands of one thread each: on a 2-core Zen 4 EPYC the suite took
# 7.3 minutes in two workers against 12.8 in one (2026-12-05).
# PYTEST_JOBS=0 runs them in this process (a debugger, -x on the first failure in order).
# --max-worker-restart 0: a worker that crashes (a test stuck in compiled code, see pyproject.toml)
# ends the run, failed; with restarts its test file, the stuck test included, would be queued again
# and could hang again, up to eight times, past CI's limit.
PYTEST_JOBS ?= auto
test: $(INSTALLED)  ## set up if needed, then run the tests (PYTEST_ARGS="...", PYTEST_JOBS=N workers, 0: one process)
	DVC_NO_ANALYTICS=1 $(BIN)/python -m pytest -n $(PYTEST_JOBS) --dist loadfile --max-worker-restart 0 $(PYTEST_ARGS)

# The bench extra (torchvision, for the tutorials' input pipeline) on top of the usual install.
$(INSTALLED)-bench: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $@

# Options go in BENCH_ARGS: make bench BENCH_ARGS="--repeats 5"
bench: $(INSTALLED)-bench  ## input-pipeline speed, time to 99 %, peak memory (BENCH_ARGS="...")
	$(BIN)/python -m benchmarks.speed $(BENCH_ARGS)

# The speed frontier (benchmarks/frontier.py): default, fast, cnn-max and mlp-best against the
# pytorch/examples recipe.
# Options go in FRONTIER_ARGS: make frontier FRONTIER_ARGS="--presets default,fast --seeds 0"
frontier: $(INSTALLED)-bench  ## the speed frontier against the pytorch/examples recipe (FRONTIER_ARGS="...")
	$(BIN)/python -m benchmarks.frontier $(FRONTIER_ARGS)

# A validation screen over rotating splits (benchmarks/screen.py): candidates compared on val.
# make screen SCREEN_ARGS="--candidates '{now: {}, crop3: {train.crop: 3}}' --preset fast --seeds 0,1,2"
screen: $(INSTALLED)-bench  ## compare candidate params on val over rotating splits (SCREEN_ARGS="...")
	$(BIN)/python -m benchmarks.screen $(SCREEN_ARGS)

clean-venv:  ## remove .venv
	rm -rf $(VENV)

# On a CUDA machine: check and measure the GPU path in one go (docs/gpu.md). Options in
# GPU_CHECK_ARGS, e.g. make gpu-check GPU_CHECK_ARGS="--out /tmp/gpu --mirror ../shared/data/mnist"
gpu-check: $(INSTALLED)  ## on a CUDA machine: check and time the GPU path (GPU_CHECK_ARGS="...")
	$(BIN)/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# Classify image files with the trained model: make predict FILES="a.png b.jpg". FILES reaches the
# shell as written: patterns expand, and a name with spaces or ( ) needs its own quotes inside.
# The command is not echoed: stdout holds the results alone (make predict FILES=... > results.txt).
predict: $(INSTALLED)  ## classify image files with the trained model (FILES="a.png b.jpg")
	@$(if $(strip $(FILES)),:,echo 'usage: make predict FILES="a.png b.jpg" (or: $(BIN)/python -m stages.predict --help)' >&2; exit 2)
	@$(BIN)/python -m stages.predict $(FILES)

# Run a preset of presets.yaml as a DVC experiment: make exp PRESET=mlp-512+aug
# The experiment is named after the preset, and DVC refuses to overwrite an experiment: REPLACE=1
# runs it as PRESET-replacing and, once that run succeeds, renames it over the old one (`dvc exp
# rename -f`; a failed run leaves the old one). Stages whose inputs did not change come from the
# run-cache; DVC's own hint, `dvc exp run -f`, also forces every stage to run again, the download
# included. A queued run ends after make does, so REPLACE=1 refuses --queue, and a -n in EXP_ARGS,
# which would name the run (stages.presets reads EXP_ARGS with DVC's parser); a PRESET-replacing
# that an interrupted one left on this commit is removed first (one on another commit is another
# run: kept). Without REPLACE, a run whose name is taken (and that EXP_ARGS does not force, queue or
# name) is refused before it starts, naming REPLACE=1 (stages.presets --taken).
# More `dvc exp run` options go in EXP_ARGS; a grid must be queued, and DVC then names the runs
# PRESET-1, PRESET-2, ...:
# make exp PRESET=fast EXP_ARGS="--queue -S 'train.seed=range(0,3)'"
# EXP_ARGS reaches the shell as a variable, so that eval parses its quotes (make would paste it
# into eval's double-quoted string, where a " of its own would end that string).
exp: export EXP_ARGS := $(EXP_ARGS)
# The experiment's name: the preset's, a + made - (DVC's experiment names take no +).
exp: EXP_NAME = $(subst +,-,$(PRESET))
exp: $(INSTALLED)  ## run a preset of presets.yaml as a DVC experiment (PRESET=name, REPLACE=1, EXP_ARGS="...")
	@test -n "$(PRESET)" || { echo "usage: make exp PRESET=name [REPLACE=1] [EXP_ARGS=...] (see presets.yaml; REPLACE=1 runs it again under its name)" >&2; exit 2; }
	@case '$(REPLACE)' in ''|1) ;; *) echo "make exp: REPLACE must be 1 (replace the experiment of that name) or empty, not '$(REPLACE)'" >&2; exit 2;; esac
	options=$$(eval "$(BIN)/python -m stages.presets --from-commit $(if $(REPLACE),--replace,$$($(BIN)/dvc exp list --name-only 2>/dev/null | grep -qxF '$(EXP_NAME)' && echo --taken)) '$(PRESET)' -- $$EXP_ARGS") && \
	$(if $(REPLACE),{ ! $(BIN)/dvc exp list --name-only 2>/dev/null | grep -qxF '$(EXP_NAME)-replacing' || \
	  $(BIN)/dvc exp remove '$(EXP_NAME)-replacing'; } && \
	eval "$(BIN)/dvc exp run -n '$(EXP_NAME)-replacing' $$options $$EXP_ARGS" && \
	$(BIN)/dvc exp rename -f '$(EXP_NAME)-replacing' '$(EXP_NAME)',eval "$(BIN)/dvc exp run -n '$(EXP_NAME)' $$options $$EXP_ARGS")

# Run every queued experiment on JOBS parallel workers and wait for them: make queue JOBS=2.
# With JOBS > 1 each worker's stages get an equal share of the cores (OMP_NUM_THREADS: cores / JOBS,
# at least 1), unless OMP_NUM_THREADS is set: two trainings that each took both cores of a 2-core
# Xeon ran 3-21x slower than alone; on one thread each, as fast as one thread alone (docs/workflows.md).
# Workers left running by an earlier `dvc queue start` take queued runs too, in the environment they
# started with: said, not stopped (they may be running someone's experiment). `dvc exp run --run-all`
# exits 0 though runs failed: tasks that `dvc queue status` shows Failed after it and not before
# fail make queue (one such worker's failure counts too: it happened while make queue ran).
JOBS ?= 1
queue: $(INSTALLED)  ## run the queued experiments on JOBS workers
	@case '$(JOBS)' in ''|*[!0-9]*|0*) echo "make queue: JOBS must be a positive whole number, not '$(JOBS)'" >&2; exit 2;; esac
	@if $(BIN)/dvc queue status 2>/dev/null | grep -Eq '^Worker status: ([1-9]|0 active, [1-9])'; then \
	  echo "make queue: queue workers are already running (dvc queue status); they take queued runs too, with the threads they started with: 'dvc queue stop' first to give every run its share" >&2; \
	fi
	@if [ -z "$$OMP_NUM_THREADS" ] && [ $(JOBS) -gt 1 ]; then \
	  cores=$$(nproc); share=$$(( cores / $(JOBS) )); export OMP_NUM_THREADS=$$(( share > 0 ? share : 1 )); \
	  echo "make queue: $(JOBS) workers on $$cores cores, $$OMP_NUM_THREADS thread(s) each (OMP_NUM_THREADS)"; \
	fi; \
	failed_before=" $$($(BIN)/dvc queue status 2>/dev/null | awk '$$NF == "Failed" {print $$1}' | tr '\n' ' ')"; \
	echo "$(BIN)/dvc exp run --run-all -j $(JOBS)"; $(BIN)/dvc exp run --run-all -j $(JOBS); status=$$?; \
	failed=$$($(BIN)/dvc queue status 2>/dev/null | awk -v before="$$failed_before" \
	  '$$NF == "Failed" && index(before, " " $$1 " ") == 0 {printf " %s", $$2}'); \
	if [ -n "$$failed" ]; then \
	  echo "make queue: failed while it ran:$$failed ('dvc queue logs NAME' says why; 'dvc queue remove --failed' clears them)" >&2; exit 1; \
	fi; exit $$status

# dvc pull, but only from remotes that re-hash what they download (`verify = true`): without it
# DVC places a remote object whose bytes changed in the workspace unnoticed (docs/sharing.md).
# stages/remotes.py checks the remotes `dvc pull $(PULL_ARGS)` would use, reading DVC's config and
# options as DVC does (every level, dotted names, each kind's default). With no remote configured
# at all it says how to add one (or to build with make repro). Then it pulls as two commands,
# dvc fetch and dvc checkout (printed as they run): in one dvc pull, a directory's manifest that
# verify found damaged was still checked out from the copy the download had read.
pull: $(INSTALLED)  ## dvc pull, from remotes that verify what they download (PULL_ARGS="...")
	@$(BIN)/python -m stages.remotes --pull $(PULL_ARGS)
