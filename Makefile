# Two commands from a fresh clone: `make run` and `make test`. Both are idempotent: the venv,
# the dependencies and the extension are only rebuilt when their inputs change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')

.PHONY: run test build bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $@

build: $(BUILD_STAMP)

run: build
	$(PY) -m sparsekern experiment --config quick --out runs/quick

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/bench_linear.py
	$(PY) benchmarks/bench_conv.py
	$(PY) benchmarks/bench_adv_train.py

clean:
	rm -rf build sparsekern/*.so $(VENV)
