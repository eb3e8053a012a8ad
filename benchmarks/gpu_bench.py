"""The GPU benchmark of scripts/gpu_check.sh: both backends and accelerate on the standard model, on cuda:0.

Builds the standard benchmark model (a random Llama, ~1.9 GB bf16, 16 blocks) in a scratch folder, then runs
`tensorstream.bench.run_bench` once per backend (``posix``: pinned staging + copy stream; ``kvikio``: cuFile into
the device slot) with a budget of 25% of the model, cold and warm, batch 1 and 8, and accelerate's disk offload
once for comparison. Writes ``gpu_bench.json`` and prints the tables.

With ``--kv-cache`` it measures transformers' offloaded KV cache (keys and values in host RAM, each layer's brought
to the GPU for its layer) on the streamed model instead, and writes ``gpu_kv_cache.json``:

1. ``run_bench`` with ``kv_caches=("dynamic", "offloaded")``, warm, batch 1 and 16: tokens/s of both caches side
   by side in one run, each streamed row's tokens checked against the resident model's with the same cache;
2. the case the offloaded cache is for, a batch whose cache would not fit: batch 16 with a 2000-token prompt
   (KV cache 4.2 GB in bf16 at 131 KB per token and sequence) on a GPU capped, with
   ``torch.cuda.set_per_process_memory_fraction``, at what the streamed model holds plus ``--kv-headroom-gb``
   (3 GB): the offloaded cache must complete with the resident model's tokens (computed before the cap), and
   the dynamic cache is expected to run out of memory (reported, not asserted: the headroom is an estimate).

Written without a GPU at hand; it has not run yet.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

import tensorstream
from tensorstream.bench import build_standard_model, format_table, run_bench
from tensorstream.plan import kv_cache_bytes


def kv_cache_that_would_not_fit(
    source: Path, workdir: Path, budget_gb: float, batch: int, prompt: int, new: int, headroom_gb: float
) -> dict[str, object]:
    """The offloaded cache under a device memory cap that the dynamic cache exceeds; tokens checked vs resident."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 31999, (batch, prompt), generator=generator).to("cuda:0")
    settings = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    resident = AutoModelForCausalLM.from_pretrained(source).to("cuda:0")
    with torch.inference_mode():
        expected = resident.generate(ids, **settings).cpu()
    kv = kv_cache_bytes(resident.config, batch_size=batch, sequence_length=prompt + new, dtype=resident.dtype)
    del resident
    torch.cuda.empty_cache()
    config = tensorstream.Config(
        device="cuda:0", storage_path=workdir / "stores", backend="posix", budget_gb=budget_gb
    )
    model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=config)
    with torch.inference_mode():  # whatever the engine allocates on first use is then counted in `held`
        model.generate(ids[:1, :16], **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(0)
    total = torch.cuda.get_device_properties(0).total_memory
    cap = held + int(headroom_gb * 1e9)
    report: dict[str, object] = {
        "batch": batch, "prompt_tokens": prompt, "new_tokens": new, "kv_cache_bytes": kv,
        "model_holds_bytes": held, "cap_bytes": cap,
    }  # fmt: skip
    print(f"KV cache {kv / 1e9:.2f} GB; streamed model holds {held / 1e9:.2f} GB; cap {cap / 1e9:.2f} GB", flush=True)
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    try:
        # offloaded first: an out-of-memory error in the middle of a forward is the last thing this model sees
        for kv_cache in ("offloaded", "dynamic"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(0)
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    out = model.generate(ids, cache_implementation=kv_cache, **settings).cpu()
                torch.cuda.synchronize()
            except torch.OutOfMemoryError as err:
                report[kv_cache] = {"completed": False, "error": str(err).splitlines()[0]}
            else:
                report[kv_cache] = {
                    "completed": True, "seconds": time.perf_counter() - start,
                    "peak_allocated_bytes": torch.cuda.max_memory_allocated(0),
                    "same_as_resident": bool(torch.equal(out, expected)),
                }  # fmt: skip
            print(f"{kv_cache} cache under the cap: {report[kv_cache]}", flush=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        del model
        torch.cuda.empty_cache()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tensorstream-gpu-bench"))
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kv-cache", action="store_true", help="measure the offloaded KV cache instead (see above)")
    parser.add_argument("--kv-headroom-gb", type=float, default=3.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    source = build_standard_model(args.workdir / "standard-llama-2gb")
    print(f"model built in {time.perf_counter() - start:.1f} s", flush=True)
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(0)}
    if args.kv_cache:
        config = tensorstream.Config(device="cuda:0", storage_path=args.workdir / "stores", backend="posix")
        result = run_bench(
            source, workdir=args.workdir, config=config, batches=(1, 16), tokens=args.tokens, runs=args.runs,
            caches=("warm",), kv_caches=("dynamic", "offloaded"),
        )  # fmt: skip
        print(f"\n=== KV cache: dynamic vs offloaded\n{format_table(result)}\n", flush=True)
        report["bench"] = result
        report["would_not_fit"] = kv_cache_that_would_not_fit(
            source,
            args.workdir,
            result["budget"]["bytes"] / 1e9,
            batch=16,
            prompt=2000,
            new=4,
            headroom_gb=args.kv_headroom_gb,
        )
        (args.out / "gpu_kv_cache.json").write_text(json.dumps(report, indent=1))
        print(f"total {time.perf_counter() - start:.1f} s; wrote {args.out / 'gpu_kv_cache.json'}")
        return 0
    for backend in ("posix", "kvikio"):
        config = tensorstream.Config(device="cuda:0", storage_path=args.workdir / "stores", backend=backend)
        try:
            result = run_bench(
                source, workdir=args.workdir, config=config, batches=(1, 8), tokens=args.tokens, runs=args.runs,
                compare=("accelerate",) if backend == "posix" else (), max_threads=8,
            )  # fmt: skip
        except tensorstream.BackendUnavailableError as err:
            print(f"backend {backend}: unavailable ({err})", flush=True)
            report[backend] = {"error": str(err)}
            continue
        print(f"\n=== backend {backend}\n{format_table(result)}\n", flush=True)
        report[backend] = result
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    print(f"total {time.perf_counter() - start:.1f} s; wrote {args.out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
