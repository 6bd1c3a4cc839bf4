# Two commands from a fresh clone: `make run` and `make test`. Each creates .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-unit test-integration bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing aifactory and its pinned dependencies into $(VENV) (first run only, ~2 min)"
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/python -c "import aifactory, ray, torch" && touch $(STAMP)

run: $(STAMP)
	$(BIN)/factory run

test: $(STAMP)
	tests/tools/ensure_prometheus.sh
	tests/tools/ensure_chromium.sh
	$(BIN)/python -m pytest tests --ignore=tests/multinode
	$(BIN)/python -m pytest tests/multinode

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration

clean:
	rm -rf $(VENV) .pytest_cache
