# tensorstream: `make demo` runs the main job, `make test` runs the tests. Each installs what it needs
# into .venv (the CPU build of PyTorch first, then the package with its dev extras).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
BENCH_STAMP := $(VENV)/.bench-installed
# `make mindeps`: the declared minimum versions (pyproject.toml's ">=" floors, pinned) in a second venv.
MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python
SMOKE ?= tests/test_streaming.py::test_logits_and_generation_bit_identical \
	tests/test_reshard.py::test_round_trip_every_tensor_equal tests/test_cli.py::test_reshard_inspect_verify \
	tests/test_package.py tests/test_first_minutes.py::test_pull_offline_is_exit_3_with_the_right_diagnosis \
	tests/test_quantization.py::test_streamed_equals_its_detached_reference \
	tests/test_quantization.py::test_a_quantized_weight_is_what_torchao_makes_of_it \
	-k "not (qwen2 or gpt2)"
# `make mindeps-diffusers`: the core floors with the diffusers extra's (diffusers 0.42.1 raises huggingface_hub's
# floor to 1.32), in a venv of its own, and the diffusers tests on them.
MIN_DIFFUSERS_VENV ?= .venv-min-diffusers
MIN_DIFFUSERS_PY := $(MIN_DIFFUSERS_VENV)/bin/python
DIFFUSERS_SMOKE ?= tests/test_diffusers.py tests/test_package.py \
	tests/test_hub.py::test_offline_preshard_repo_of_a_diffusers_model_streams_in_place \
	tests/test_hub.py::test_push_a_diffusers_model_and_stream_it_from_the_hub \
	tests/test_hub.py::test_preshard_pipeline_repo_streams_its_store_components
# `make gptq`: GPTQ and AWQ checkpoints stream through gptqmodel, which needs torch >= 2.14.1 (this project's floor is
# 2.13): a venv of its own with that torch (the CUDA build; it runs on a CPU), gptqmodel and optimum (transformers'
# GPTQ load needs both), then the package; the GPTQ/AWQ tests and the core smoke subset run on it. gptqmodel 7.7.0 is an sdist
# whose setup.py builds no extension (its kernels are compiled at run time, only where a kernel that needs one is
# selected), so nothing CUDA is built at install.
GPTQ_VENV ?= .venv-gptq
GPTQ_PY := $(GPTQ_VENV)/bin/python
GPTQ_TORCH_SPEC ?= torch==2.14.1
GPTQ_SPEC ?= gptqmodel==7.7.0 optimum==2.3.0
GPTQ_SMOKE ?= tests/test_gptq.py \
	tests/test_prequantized.py::test_without_gptqmodel_a_gptq_checkpoint_is_refused_not_streamed_wrong \
	tests/test_streaming.py::test_logits_and_generation_bit_identical \
	tests/test_reshard.py::test_round_trip_every_tensor_equal tests/test_cli.py::test_reshard_inspect_verify \
	tests/test_package.py tests/test_quantization.py::test_streamed_equals_its_detached_reference \
	-k "not (qwen2 or gpt2)"

.PHONY: install test test-slow mindeps mindeps-diffusers gptq demo bench quality style docs clean help

help:
	@echo "make demo     build a ~480 MB random Llama and stream it with a quarter of its size as budget"
	@echo "make test     run the test suite (CPU; the slow sweeps are left out)"
	@echo "make test-slow  the slow sweeps make test leaves out (pytest -m slow; CI runs both)"
	@echo "make mindeps  install the declared minimum versions in $(MIN_VENV) and run a smoke subset"
	@echo "make mindeps-diffusers  the same with the diffusers extra's floors, in $(MIN_DIFFUSERS_VENV)"
	@echo "make gptq     gptqmodel (torch 2.14.1) in $(GPTQ_VENV): the GPTQ streaming tests and the smoke subset"
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

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# torch's floor (2.13) is installed as the CPU wheel of TORCH_SPEC: the same release without a CUDA download.
mindeps:
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install --quiet --upgrade pip
	$(MIN_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(MIN_PY) -m pip install --quiet \
		$$($(PYTHON) scripts/min_requirements.py --skip torch --extra quantize --extra compression) \
		"pytest>=8" "hypothesis>=6.100" "psutil>=5.9"
	$(MIN_PY) -m pip install --quiet --no-deps -e .
	$(MIN_PY) -m pip check
	$(MIN_PY) -m pip list 2>/dev/null | grep -iE "^(torch|transformers|accelerate|safetensors|huggingface.hub|tqdm|torchao|zstandard) "
	$(MIN_PY) -m pytest -q -p no:cacheprovider $(SMOKE)

# The extra's floors raise core ones where diffusers needs it (scripts/min_requirements.py pins each package once, at
# its highest floor); the diffusers tests run on them.
mindeps-diffusers:
	$(PYTHON) -m venv $(MIN_DIFFUSERS_VENV)
	$(MIN_DIFFUSERS_PY) -m pip install --quiet --upgrade pip
	$(MIN_DIFFUSERS_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(MIN_DIFFUSERS_PY) -m pip install --quiet \
		$$($(PYTHON) scripts/min_requirements.py --skip torch --extra diffusers) \
		"pytest>=8" "hypothesis>=6.100" "psutil>=5.9"
	$(MIN_DIFFUSERS_PY) -m pip install --quiet --no-deps -e .
	$(MIN_DIFFUSERS_PY) -m pip check
	$(MIN_DIFFUSERS_PY) -m pip list 2>/dev/null | grep -iE "^(torch|transformers|accelerate|safetensors|huggingface.hub|tqdm|diffusers) "
	$(MIN_DIFFUSERS_PY) -m pytest -q -p no:cacheprovider $(DIFFUSERS_SMOKE)

gptq:
	$(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_PY) -m pip install --quiet --upgrade pip
	$(GPTQ_PY) -m pip install --quiet "$(GPTQ_TORCH_SPEC)"
	$(GPTQ_PY) -m pip install --quiet $(GPTQ_SPEC)
	$(GPTQ_PY) -m pip install --quiet -e ".[dev]"
	$(GPTQ_PY) -m pip check
	$(GPTQ_PY) -m pip list 2>/dev/null | grep -iE "^(torch|transformers|gptqmodel|optimum|accelerate) "
	$(GPTQ_PY) -m pytest -q -p no:cacheprovider $(GPTQ_SMOKE)

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
	rm -rf $(VENV) $(MIN_VENV) $(MIN_DIFFUSERS_VENV) $(GPTQ_VENV) .demo .pytest_cache .mypy_cache .ruff_cache site
