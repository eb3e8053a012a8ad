"""Measure peak RSS of resharding or streaming a ~280 MB model, in a fresh process. Prints one JSON line.

Usage: python rss_probe.py reshard|stream WORKDIR [BUDGET_FRACTION]
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=8192,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    import torch

    import tensorstream
    from tensorstream.store import Store

    source = work / "model"
    build(source)
    gc.collect()
    storage = work / "stores"
    figures: dict[str, float] = {}
    if mode == "reshard":
        reset_peak()
        baseline = rss_now()
        path = tensorstream.reshard(source, storage, progress=False)
    else:
        path = tensorstream.reshard(source, storage, progress=False)
        from transformers import AutoModelForCausalLM

        store = Store.open(path)
        fraction = float(sys.argv[3]) if len(sys.argv) > 3 else 0.25
        budget = fraction * store.total_bytes
        gc.collect()
        reset_peak()
        baseline = rss_now()
        cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=budget / 1e9)
        model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg)
        with torch.inference_mode():
            model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, do_sample=False)
        figures["budget_bytes"] = budget
        figures["streamed_blocks"] = tensorstream.stats(model).streamed_blocks
    figures["peak_rss"] = peak_rss()
    figures["baseline_rss"] = baseline
    store = Store.open(path)
    figures["model_bytes"] = store.total_bytes
    figures["largest_block_bytes"] = max(b.data_size for b in store.blocks)
    figures["non_block_bytes"] = store.non_block.data_size
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
