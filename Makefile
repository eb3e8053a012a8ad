# tensorstream: `make demo` runs the main job, `make test` runs the tests. Each installs what it needs
# into .venv (the CPU build of PyTorch first, then the package with its dev extras).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo quality style clean help

help:
	@echo "make demo     build a ~480 MB random Llama and stream it with a quarter of its size as budget"
	@echo "make test     run the test suite (CPU)"
	@echo "make quality  ruff check, ruff format --check, mypy"
	@echo "make style    ruff format and autofix"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) examples/demo.py

quality: $(STAMP)
	$(PY) -m ruff check src tests examples
	$(PY) -m ruff format --check src tests examples
	$(PY) -m mypy

style: $(STAMP)
	$(PY) -m ruff format src tests examples
	$(PY) -m ruff check --fix src tests examples

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
