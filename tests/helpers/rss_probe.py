"""Measure peak RSS of resharding or streaming a model of a few hundred MB, in a fresh process. Prints one JSON line.

Usage: python rss_probe.py reshard|stream WORKDIR [BUDGET] [FAMILY] [BACKEND]

BUDGET is a fraction of the model's bytes (default 0.25) or ``min``: the smallest budget that streams every
block (non-block weights plus two slots, ``prefetch=1``). FAMILY picks the model:

* ``llama`` (default): ~280 MB fp32 Llama, 8 even blocks;
* ``llama-big-embed``: ~340 MB, of which a tied 80k x 768 embedding is 246 MB (large non-block weights);
* ``llama-1g``: ~1.5 GB fp32 Llama, 10 blocks of 113 MB (for the figures in docs/models.md, not the tests);
* ``qwen2-moe``: ~320 MB Qwen2-MoE whose odd layers are mixtures of 8 experts and even layers dense (uneven blocks).

BACKEND is the streaming backend (default ``auto``). ``peak_rss`` is the kernel's exact peak of the total RSS;
``peak_anon_rss`` and ``peak_file_rss`` are the peaks of the anonymous and file-backed parts sampled every
millisecond by a thread (the kernel keeps no peak of either): with ``backend="mmap"`` the streamed weights are
mapped page-cache pages, which count as file-backed.

The test may build the model beforehand with `prepare` (faster: its process has torch imported already); otherwise
it is built here and freed before the baseline is taken (its large buffers go back to the OS). The baseline is the
RSS after importing torch, transformers and tensorstream.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path
from typing import Any


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


class Sampler:
    """Samples RssAnon and RssFile every millisecond on a thread; keeps their peaks."""

    def __init__(self) -> None:
        import threading

        self.peak = {"RssAnon:": 0, "RssFile:": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.001):
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(None, 1)[0] if line.strip() else ""
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def close(self) -> dict[str, int]:
        self.stop.set()
        self.thread.join()
        return {"peak_anon_rss": self.peak["RssAnon:"], "peak_file_rss": self.peak["RssFile:"]}


def anon_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def model_config(family: str) -> Any:
    from transformers import LlamaConfig, Qwen2MoeConfig

    if family == "llama":
        return LlamaConfig(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=12,
            vocab_size=8192,
            tie_word_embeddings=False,
        )
    if family == "llama-big-embed":
        return LlamaConfig(
            hidden_size=768,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=12,
            num_key_value_heads=12,
            vocab_size=80_000,
            tie_word_embeddings=True,
        )
    if family == "llama-1g":  # for the figures in docs/models.md; too slow for the test suite
        return LlamaConfig(
            hidden_size=1536,
            intermediate_size=4096,
            num_hidden_layers=10,
            num_attention_heads=12,
            num_key_value_heads=12,
            vocab_size=32_000,
            tie_word_embeddings=False,
        )
    if family == "qwen2-moe":
        return Qwen2MoeConfig(
            hidden_size=512,
            intermediate_size=1024,
            moe_intermediate_size=1024,
            shared_expert_intermediate_size=1024,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=8192,
            tie_word_embeddings=False,
        )
    raise SystemExit(f"unknown family {family!r}")


def prepare(work: Path, family: str, reshard: bool) -> None:
    """Build and save the model into ``work/model`` (and reshard it into ``work/stores``), in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    import tensorstream

    source = work / "model"
    if not (source / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(model_config(family)).save_pretrained(source)
    if reshard:
        tensorstream.reshard(source, work / "stores", progress=False)


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    budget_arg = sys.argv[3] if len(sys.argv) > 3 else "0.25"
    family = sys.argv[4] if len(sys.argv) > 4 else "llama"
    backend = sys.argv[5] if len(sys.argv) > 5 else "auto"
    prepare(work, family, reshard=False)  # a no-op when the test built it already

    import torch
    from transformers import AutoModelForCausalLM

    import tensorstream
    from tensorstream.store import Store

    source = work / "model"
    storage = work / "stores"
    figures: dict[str, Any] = {"family": family}
    gc.collect()
    if mode == "reshard":
        reset_peak()
        baseline = rss_now()
        path = tensorstream.reshard(source, storage, progress=False)
    else:
        path = tensorstream.reshard(source, storage, progress=False)  # up to date: reads the manifest only
        store = Store.open(path)
        prefetch = 2
        if budget_arg == "min":  # a block with routed experts takes its part before them (docs/moe.md)
            from tensorstream.experts import routed_layouts

            prefetch = 1
            routed = routed_layouts(store)
            loads = [routed[b.name].prefix_bytes if b.name in routed else b.data_size for b in store.blocks]
            slot = -(-max(loads) // 4096) * 4096
            budget = store.non_block.data_size + 2 * slot
        else:
            budget = float(budget_arg) * store.total_bytes
        gc.collect()
        reset_peak()
        baseline = rss_now()
        figures["baseline_anon_rss"] = anon_rss()
        sampler = Sampler()
        cfg = tensorstream.Config(
            device="cpu", storage_path=storage, budget_gb=budget / 1e9, prefetch=prefetch, backend=backend
        )
        model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg)
        figures["after_load_rss"] = rss_now()
        with torch.inference_mode():
            model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, do_sample=False)
        figures.update(sampler.close())
        figures["budget_bytes"] = budget
        figures["streamed_blocks"] = tensorstream.stats(model).streamed_blocks
        figures["backend"] = tensorstream.stats(model).backend
    figures["peak_rss"] = peak_rss()
    figures["baseline_rss"] = baseline
    store = Store.open(path)
    figures["model_bytes"] = store.total_bytes
    figures["blocks"] = len(store.blocks)
    figures["largest_block_bytes"] = max(b.data_size for b in store.blocks)
    figures["non_block_bytes"] = store.non_block.data_size
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
