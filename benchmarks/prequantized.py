"""`tensorstream bench` rows for a pre-quantized checkpoint: the standard model published in fine-grained FP8.

Writes the standard benchmark model (a random Llama of ~1.9 GB in bf16, 16 blocks; `build_standard_model`) once
more in the published fine-grained FP8 layout (every block linear as ``weight`` float8_e4m3fn + ``weight_scale_inv``
per 128x128 block, ``quantization_config={"quant_method": "fp8", ...}``, as DeepSeek-V3 and the Qwen3 FP8 releases
are), then measures both with `tensorstream.bench.run_bench` (what ``tensorstream bench MODEL`` runs) in one run, at
the same budget (a fraction of the bf16 model's bytes, the same gigabytes for the FP8 one: its blocks take their
bf16 size in memory once dequantized): bytes read per decode step, cold and warm seconds per token, and the FP8
rows against the bf16 standard model's. The FP8 store holds the checkpoint's own float8 weights and scales and
dequantizes each block as transformers does (docs/quantization.md, "Pre-quantized checkpoints"); its tokens are
checked against transformers' resident load of the FP8 checkpoint by the bench itself (``same_as_resident``). A
third row streams the FP8 checkpoint with ``Config(dequantize="once")``: a store of the bf16 weights transformers
dequantizes it to, nothing dequantized per pass.

Usage::

    python benchmarks/prequantized.py --workdir /tmp/bench --out benchmarks/results/prequantized-fp8-cpu.json

The same rows for any FP8 checkpoint: ``tensorstream bench path/to/fp8-checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tensorstream import Config
from tensorstream.bench import build_standard_model, format_table, rounded, run_bench

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from helpers.prequantized import FP8_CONFIG, fp8_convert  # the published layout, as the tests write it


def fp8_checkpoint(bf16: Path, folder: Path) -> Path:
    """``bf16`` (a safetensors checkpoint) rewritten in fine-grained FP8 into ``folder``, once, shard by shard."""
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for shard in sorted(bf16.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                tensors.update(fp8_convert(name, f.get_tensor(name)))
        save_file(tensors, tmp / shard.name, metadata={"format": "pt"})
    for extra in bf16.glob("*.json"):
        data = json.loads(extra.read_text())
        if extra.name == "config.json":
            data["quantization_config"] = FP8_CONFIG
        (tmp / extra.name).write_text(json.dumps(data, indent=1))
    tmp.replace(folder)
    return folder


def summary(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (checkpoint, cache): bytes read per step and seconds per token, the FP8 one against bf16."""
    lines = []
    for cache in ("cold", "warm"):
        base = next(r for r in rows["bf16"]["results"] if r["system"] == "tensorstream" and r["cache"] == cache)
        for name, result in rows.items():
            row = next(r for r in result["results"] if r["system"] == "tensorstream" and r["cache"] == cache)
            lines.append({
                "checkpoint": name, "cache": cache, "bytes_per_step": row["bytes_per_step"],
                "bytes_vs_bf16": row["bytes_per_step"] / base["bytes_per_step"], "s_per_token": row["s_per_token"],
                "tokens_per_s_vs_bf16": base["s_per_token"] / row["s_per_token"],
                "same_tokens_as_resident": row.get("same_as_resident"),
            })  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the checkpoints and stores are kept")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget-fraction", type=float, default=0.25, help="of the bf16 model's bytes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bf16 = build_standard_model(args.workdir / "standard-llama-2gb")
    fp8 = fp8_checkpoint(bf16, args.workdir / "standard-llama-2gb-fp8")
    rows: dict[str, dict[str, Any]] = {}
    budget_gb = None  # the bf16 run's, for both
    runs = (("bf16", bf16, "per_block"), ("fp8", fp8, "per_block"), ("fp8-dequantize-once", fp8, "once"))
    for name, source, dequantize in runs:
        rows[name] = run_bench(
            source,
            config=Config.from_env(dequantize=dequantize),
            workdir=args.workdir,
            budget_fraction=args.budget_fraction,
            budget_gb=budget_gb,
            batches=(1,),
            tokens=args.tokens,
            runs=args.runs,
            progress=lambda line: print(f"  {line}", flush=True),
        )
        print(f"== {name}\n{format_table(rows[name])}", flush=True)
        budget_gb = budget_gb or rows[name]["budget"]["bytes"] / 1e9
    lines = summary(rows)
    for line in lines:
        print({key: rounded(value) for key, value in line.items()}, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"summary": lines, "runs": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
