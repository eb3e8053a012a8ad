#!/usr/bin/env bash
# The whole GPU check in one run (a few minutes), as ../shared/gpu/README.md describes:
#   1. the tests marked cuda/kvikio, with TENSORSTREAM_REQUIRE_GPU=1 so a skip is a failure (this includes a run
#      under TORCH_CUDA_SANITIZER=1 and bit-exact logits/generations for the POSIX and KvikIO backends);
#   2. benchmarks/gpu_bench.py: raw O_DIRECT read GB/s of the .ts files, streaming GB/s and tokens/s for both
#      backends, accelerate's disk offload at the same budget, the fraction of time the forward waited for I/O;
#   3. benchmarks/h2d_paths.py: page cache -> GPU both ways on the same store (pread into pinned staging by 1-8
#      threads vs DMA from cudaHostRegister'ed read-only mappings), GB/s and a correctness check of each;
#   4. benchmarks/gpu_bench.py --kv-cache: transformers' offloaded KV cache (in host RAM) while the weights stream,
#      tokens/s beside the default cache at batch 1 and 16 with the tokens checked against the resident model's,
#      and a batch-16 2000-token decode under a GPU memory cap that its dynamic cache exceeds;
#   5. benchmarks/quantized_matmul.py --device cuda: the int8/int4 kernels on the device against the bf16 matmul
#      (an int8 store binds torchao's int8 tensors on CUDA too; an int4 store is CPU-only and refused there with a
#      ConfigError, which step 1 checks). The store-kind tests of
#      step 1 (test_gpu.py::test_store_kinds_on_the_gpu_equal_their_detached_reference) need torchao and
#      zstandard, which --prepare carries. Step 1 also runs test_gpu.py::test_moe_routed_experts_on_the_gpu_equal_resident:
#      a 64-expert MoE whose routed experts are gathered on the device (with and without the device-side expert
#      cache), bit-exact to the model resident on the GPU (docs/moe.md; written without a GPU, not run yet),
#      test_gpu.py::test_fp8_checkpoint_on_the_gpu_streams_bit_exact_with_the_printed_fix (a fine-grained FP8
#      checkpoint: refused where transformers keeps FP8 kernels, capability 8.9+, then streamed with the printed fix
#      FineGrainedFP8Config(dequantize=True), bit-exact to that resident load on the GPU) and
#      test_gpu.py::test_a_diffusers_model_streams_into_the_gpu_bit_exact (a tiny Flux transformer; diffusers is
#      carried by --prepare). Both written without a GPU (checked on the CPU with "cuda" replaced), not run yet.
# Writes $OUT/gpu_check.log, $OUT/gpu_bench.json, $OUT/h2d_paths.json and $OUT/gpu_kv_cache.json (OUT defaults
# to ./gpu-check-out) and $OUT/quantized-matmul-cuda.json. Steps 4 and 5 were added without a GPU at hand and
# have not run yet.
#
# Prepare once on a machine with network access to PyPI (the GPU machine has none):
#   scripts/gpu_check.sh --prepare      # copies the kvikio wheels and downloads pytest's wheels into .gpu-wheels/
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .gpu-wheels
  cp ../shared/gpu/wheels-cuda13/*.whl .gpu-wheels/ 2>/dev/null || echo "no kvikio wheels in ../shared/gpu/wheels-cuda13"
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d .gpu-wheels \
    pytest pluggy iniconfig packaging torchao zstandard diffusers
  grep -qx '/.gpu-wheels/' .git/info/exclude 2>/dev/null || echo '/.gpu-wheels/' >> .git/info/exclude
  ls .gpu-wheels
  exit 0
fi

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
status=0

echo "== machine"
nvidia-smi || status=1
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current \
  --format=csv || true

echo "== installing the carried wheels"
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl || status=1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests:${PYTHONPATH:-}
else
  echo "no .gpu-wheels/: run scripts/gpu_check.sh --prepare first"
  export PYTHONPATH=$PWD/src:$PWD/tests:${PYTHONPATH:-}
fi
python3 - <<'PY' || true
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
try:
    import kvikio, kvikio.cufile_driver
    print("kvikio", kvikio.__version__, "GDS available:", kvikio.cufile_driver.get("is_gds_available"))
except Exception as err:
    print("kvikio unavailable:", err)
PY

echo "== tests marked cuda or kvikio (skips are failures)"
TENSORSTREAM_REQUIRE_GPU=1 timeout 300 python3 -m pytest -q -p no:cacheprovider -m "cuda or kvikio" tests/ \
  -o addopts="--strict-markers -ra" || status=1

echo "== benchmark"
timeout 420 python3 benchmarks/gpu_bench.py --out "$OUT" || status=1

echo "== page cache -> GPU: pread + pinned staging vs registered mappings"
timeout 180 python3 benchmarks/h2d_paths.py --out "$OUT" || status=1

echo "== KV cache offloaded to host RAM while the weights stream"
timeout 180 python3 benchmarks/gpu_bench.py --kv-cache --out "$OUT" || status=1

echo "== store kinds: the int8/int4 kernels on the device vs the bf16 matmul"
timeout 120 python3 benchmarks/quantized_matmul.py --device cuda --out "$OUT/quantized-matmul-cuda.json" || status=1

echo "== done (status $status)"
exit $status
