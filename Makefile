# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/ringwise demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/ringwise bench all --out benchmarks/results

clean:
	rm -rf $(VENV) results runs .pytest_cache
