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
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: repro test setup bench frontier exp predict clean-venv

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

repro: $(INSTALLED)
	$(BIN)/dvc repro

test: $(INSTALLED)
	DVC_NO_ANALYTICS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The bench extra (torchvision, for the tutorials' input pipeline) on top of the usual install.
$(INSTALLED)-bench: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $@

# Options go in BENCH_ARGS: make bench BENCH_ARGS="--repeats 5"
bench: $(INSTALLED)-bench
	$(BIN)/python -m benchmarks.speed $(BENCH_ARGS)

# The speed frontier (benchmarks/frontier.py): every preset against the pytorch/examples recipe.
# Options go in FRONTIER_ARGS: make frontier FRONTIER_ARGS="--presets default,fast --seeds 0"
frontier: $(INSTALLED)-bench
	$(BIN)/python -m benchmarks.frontier $(FRONTIER_ARGS)

clean-venv:
	rm -rf $(VENV)

# Classify image files with the trained model: make predict FILES="a.png b.jpg"
predict: $(INSTALLED)
	$(BIN)/python -m stages.predict $(FILES)

# Run a preset of presets.yaml as a DVC experiment: make exp PRESET=mlp-512+aug
exp: $(INSTALLED)
	@test -n "$(PRESET)" || { echo "usage: make exp PRESET=name (see presets.yaml)"; exit 2; }
	options=$$($(BIN)/python -m stages.presets '$(PRESET)') && \
	eval "$(BIN)/dvc exp run -n '$(subst +,-,$(PRESET))' $$options"
