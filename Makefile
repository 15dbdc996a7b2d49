# lmforge: the commands people type. Python 3.11; nothing needs to be installed beforehand.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test test-unit test-integration bench lint docs clean

install: $(STAMP)  ## create or update .venv with lmforge and its dev extras

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

quickstart: install  ## data -> tune -> register -> serve one completion, on jobs/quickstart.yaml
	$(BIN)/lmforge run jobs/quickstart.yaml

test: install  ## unit (seconds, no Ray) then integration (real Ray, MLflow, HTTP), less the `long` chains
	$(BIN)/python -m pytest --durations=15 -m "not long" tests/unit tests/integration

# Integration tests that chain several stages for minutes each (marker `long`): CI runs them
# as a step of their own, so `make test` stays within its 20-minute budget.
.PHONY: test-long
test-long: install  ## the `long` integration chains (S3 storage, a LoRA fine-tune served, a 2-node cluster's jobs and DDP, searches with forks, halving, on an MLflow server)
	$(BIN)/python -m pytest --durations=0 -m long tests/integration

.PHONY: test-fast
test-fast: install  ## unit tests plus one end-to-end job (submit: data -> train -> register -> serve), < 3 min
	$(BIN)/python -m pytest -m "not integration or e2e_fast" tests/unit tests/integration

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-integration: install
	$(BIN)/python -m pytest tests/integration

# The chaos suite (tests/chaos): faults under load, each scenario asserting nothing is lost.
# Not part of `make test`; CI runs it as its own step. LMFORGE_CHAOS_SCALE=6 stretches the
# CI-sized scenarios to the full ones; the report's rows go to LMFORGE_CHAOS_REPORT.
LMFORGE_CHAOS_REPORT ?= runs/chaos-report.md
.PHONY: test-chaos
test-chaos: install  ## fault injection under load (tests/chaos), a row per scenario in $(LMFORGE_CHAOS_REPORT)
	LMFORGE_CHAOS_REPORT=$(LMFORGE_CHAOS_REPORT) $(BIN)/python -m pytest --durations=0 tests/chaos

.PHONY: test-multihost
test-multihost: install  ## hosts that share nothing (Linux namespaces, root; not in `make test`)
	$(BIN)/python -m pytest --durations=0 tests/multihost

bench: install  ## training throughput against a bare PyTorch loop (the others: see bench/README.md)
	$(BIN)/python bench/train.py

docs: install  ## regenerate the spec reference tables in docs/reference.md from config.py
	$(BIN)/python -c "from pathlib import Path; from lmforge.config import with_spec_reference as w; p = Path('docs/reference.md'); p.write_text(w(p.read_text()))"

lint: install
	$(BIN)/ruff check platform tests bench

clean:
	rm -rf runs .pytest_cache
