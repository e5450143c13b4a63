# Quick start on a fresh machine (README "Two commands"): `make run` (build; the demo at quick
# size: a teacher distilled into students through CE, dense, top-12 and sampled targets,
# measured; then the benchmark harness at quick sizes: tables on the terminal, JSON, markdown
# and plots under bench/out) and `make test` (ruff and the whole suite). Both create .venv and
# install $(TORCH) into it first, so that no other requirement pulls a CUDA build of torch
# onto a CPU-only machine; TORCH=... picks another build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip
SOURCES := $(shell find csrc python -type f -not -path '*/__pycache__/*') pyproject.toml CMakeLists.txt

.PHONY: run test lint bench aot clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(PIP) install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	$(PIP) install -q ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/distill-ops demo --quick --no-progress --out bench/out/demo
	$(BIN)/distill-ops bench --quick --no-progress --out bench/out

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python -m pytest bench -q --benchmark-only

aot: $(VENV)/.installed
	$(BIN)/python -m distill_ops.backends.triton.aot --cc 80 --cc 90

clean:
	rm -rf $(VENV) build dist .pytest_cache .benchmarks
