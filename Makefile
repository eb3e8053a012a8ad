# tensorstream: `make demo` runs the main job, `make test` runs the tests. Each installs what it needs
# into .venv (the CPU build of PyTorch first, then the package with its dev extras).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install test demo bench quality style docs clean help

help:
	@echo "make demo     build a ~480 MB random Llama and stream it with a quarter of its size as budget"
	@echo "make test     run the test suite (CPU)"
	@echo "make bench    tensorstream bench --compare accelerate on the standard ~1.9 GB model (minutes)"
	@echo "make quality  ruff check, ruff format --check, mypy"
	@echo "make style    ruff format and autofix"
	@echo "make docs     build the documentation site into site/ (mkdocs build --strict)"

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

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m tensorstream.cli bench --compare accelerate --out benchmarks/results/bench.json \
		--plot benchmarks/results/bench.png

quality: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks
	$(PY) -m mypy

style: $(STAMP)
	$(PY) -m ruff format src tests examples benchmarks
	$(PY) -m ruff check --fix src tests examples benchmarks

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache site
