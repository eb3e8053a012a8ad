"""A fine-grained FP8 checkpoint streamed as its own bytes (store kind ``fp8``) against its dequantized bf16 copy.

Builds a Llama-shaped FP8 checkpoint in the published layout (``weight`` float8_e4m3fn + ``weight_scale_inv`` per
128x128 block, ``quantization_config={"quant_method": "fp8", ...}``) and a plain checkpoint of the bf16 weights
transformers dequantizes it to (what a store held before pre-quantized checkpoints streamed compact), then times
greedy decoding with every block streamed, cold (the store's pages dropped before each step) and warm, and checks
that both give the resident model's tokens.

Usage::

    python benchmarks/prequantized.py --out benchmarks/results/prequantized-fp8-cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tensorstream
from tensorstream.backends.posix import drop_page_cache
from tensorstream.store import Store

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from helpers.prequantized import FP8_CONFIG, fp8_convert, write_quantized


def measure(model: Any, files: list[Path], tokens: int, cold: bool) -> tuple[float, torch.Tensor]:
    times: list[float] = []

    def pre(*_: Any) -> None:
        if cold:
            drop_page_cache(files)
        times.append(time.perf_counter())

    handle = model.register_forward_pre_hook(pre)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    handle.remove()
    steps = [b - a for a, b in itertools.pairwise(times[1:])]  # times[0]: the prefill
    return sorted(steps)[len(steps) // 2], out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        vocab_size=4096,
    )
    results: dict[str, Any] = {"hidden": args.hidden, "layers": args.layers, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fp8 = write_quantized(root / "fp8", LlamaForCausalLM(config), fp8_convert, FP8_CONFIG)
        resident = AutoModelForCausalLM.from_pretrained(fp8)
        with torch.no_grad():
            expected = resident.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=args.tokens, do_sample=False)
        resident.save_pretrained(root / "bf16")  # the dequantized weights as a plain checkpoint
        del resident
        for name in ("fp8", "bf16"):
            storage = root / f"store-{name}"
            store = Store.open(tensorstream.reshard(root / name, storage, progress=False))
            files = [store.file(e) for e in store.blocks]
            block = max(e.memory_size or e.data_size for e in store.blocks)
            budget = (store.non_block.data_size + 3 * block) / 1e9 + 0.001
            ts = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=budget, prefetch=2)
            model = AutoModelForCausalLM.from_pretrained(
                root / name, device_map="tensorstream", tensorstream_config=ts
            )
            row: dict[str, Any] = {"kind": store.kind or "plain", "block_bytes": store.blocks[0].data_size}
            for mode in ("cold", "warm"):
                seconds, out = measure(model, files, args.tokens, cold=mode == "cold")
                row[f"{mode}_s_per_token"] = seconds
                row[f"{mode}_equal_to_resident"] = bool(torch.equal(out, expected))
            row["checkpoint_block_bytes"] = (
                sum(p.stat().st_size for p in (root / name).glob("*.safetensors")) / args.layers
            )
            results[name] = row
            print(name, row, flush=True)
            del model
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
