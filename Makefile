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

# The main job: sizing of the review's 270B/40B model class and a streamed completion (`demo`),
# then the bundled model evaluated like the review did (its three workflows and HumanEval) with a
# review-style report. Results resume from runs/main/<weights hash>/ if interrupted. Local cost is
# priced at $$0.10/hour (about a 2-vCPU cloud VM; set your own with moecoder eval run --usd-per-hour).
MAIN := runs/main/$(shell sha256sum src/moecoder/assets/default-model/model.safetensors 2>/dev/null | cut -c1-12)
MC := $(VENV)/bin/moecoder

run: setup system-deps
	$(MC) demo
	$(MC) eval run --suite workflows --backend local --usd-per-hour 0.10 --allow-exec --out $(MAIN)/workflows
	$(MC) eval run --suite humaneval --backend local --template completion@1 --usd-per-hour 0.10 --allow-exec --out $(MAIN)/humaneval
	$(MC) eval compare $(MAIN)/workflows $(MAIN)/humaneval --review --html $(MAIN)/report.html
	@echo "HTML report: $(MAIN)/report.html"

# System packages some tests need (PostgreSQL for the pipeline workflow, bubblewrap for the sandbox).
system-deps:
	bash scripts/ci-system-deps.sh

test: setup system-deps
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
