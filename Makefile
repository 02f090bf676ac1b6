# Two entry points: `make run` (the main job) and `make test`. Both create .venv and install
# what is missing. torch is pinned first when absent, so no multi-GB CUDA build is pulled by accident.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/moecoder demo

# System packages some tests need (PostgreSQL for the pipeline workflow, bubblewrap for the sandbox).
system-deps:
	bash scripts/ci-system-deps.sh

test: setup system-deps
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
