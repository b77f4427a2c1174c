# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

# test-gpu: the GPU tests (pytest -m cuda). PYTHON=python3 make test-gpu uses that python as it
# is (a GPU machine's own CUDA torch; no venv, no installs; pytest is the only other need).
# A test module that cannot be imported there (a missing extra) is reported, and the cuda
# tests still run.
PYTHON ?= $(PY)

.PHONY: setup demo attention-demo test test-gpu test-compat lock bench clean

# The test environment is exact: every package but torch (TORCH) at its version in LOCK, a pip constraints
# file that `make lock` refreshes (newest versions, rewritten only when the whole suite passes on them).
LOCK := requirements/test.lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

lock:
	python3 scripts/lock.py --torch "$(TORCH)"

# The main job: sequence-parallel training on the line-retrieval task, 4 local ranks, ~5 min.
# A run owns its folder: run again, `make demo` resumes it (a finished run just re-evaluates).
DEMO_OUT   ?= runs/demo
DEMO_FLAGS ?= --world 4 --model small --seq-len 128 --batch 16 --steps 1000 --warmup 50 --lr 1e-3 \
	--fmt registers --id-pool 9 --loss-on recall --eval-decoys 4 --eval-lengths 64 128 --eval-per-cell 32

demo: setup
	$(VENV)/bin/ringwise train $(DEMO_FLAGS) --out $(DEMO_OUT) $(if $(wildcard $(DEMO_OUT)/checkpoints),--resume)

attention-demo: setup
	$(VENV)/bin/ringwise demo

# The linters first (seconds), then the suite: ruff (lint and format, pyproject's rules) and mypy
# (strict on ringwise/attention, checked bodies elsewhere).
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -q

# The transformers-facing tests on the newest transformers and the oldest pyproject allows, one venv each
# under .compat/, and a table of each family's verdict per version (.compat/verdicts.md). Extra pytest
# arguments: make test-compat COMPAT_PYTEST='-k "gpt2 or falcon"'.
COMPAT_PYTEST ?=
test-compat:
	python3 scripts/compat.py --torch "$(TORCH)" -- $(COMPAT_PYTEST)

test-gpu: $(if $(filter $(PY),$(PYTHON)),setup)
	PYTHONPATH=.$(if $(PYTHONPATH),:$(PYTHONPATH)) $(PYTHON) -m pytest -m cuda -q --continue-on-collection-errors --durations=15

bench: setup
	$(VENV)/bin/ringwise bench all --out benchmarks/results

clean:
	rm -rf $(VENV) results runs .pytest_cache
