"""The GPU benchmark of scripts/gpu_check.sh: both backends and accelerate on the standard model, on cuda:0.

Builds the standard benchmark model (a random Llama, ~1.9 GB bf16, 16 blocks) in a scratch folder, then runs
`tensorstream.bench.run_bench` once per backend (``posix``: pinned staging + copy stream; ``kvikio``: cuFile into
the device slot) with a budget of 25% of the model, cold and warm, batch 1 and 8, and accelerate's disk offload
once for comparison. Writes ``gpu_bench.json`` and prints the tables.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tensorstream-gpu-bench"))
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
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
