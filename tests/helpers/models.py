"""Helpers shared by the tests: fully resident reference outputs and store sizes."""

from __future__ import annotations

from pathlib import Path

import torch

import tensorstream
from tensorstream.store import Store


def store_sizes(storage: Path) -> tuple[int, list[int]]:
    """(non-block bytes, block bytes) of the only store under ``storage``.

    Module units (large modules outside the repeated stacks, which the planner keeps resident first) count as
    non-block here, so that budgets sized from these figures stream the repeated blocks.
    """
    (path,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    store = Store.open(path)
    units = set(store.manifest.get("units", []))
    extra = sum(b.data_size for b in store.blocks if b.name in units)
    # a block of a quantized or compressed store takes its expanded, compact and scratch bytes in memory
    sizes = [b.memory_size or b.data_size for b in store.blocks if b.name not in units]
    return store.non_block.data_size + extra, sizes


def budgets(storage: Path, prefetch: int = 2) -> dict[str, float]:
    """Budgets (GB) that stream every block, keep some resident, and hold everything, at this prefetch depth.

    A block whose experts are routed (docs/moe.md) takes only its part before the experts in a slot (the CPU's
    mapped mode, what ``backend="auto"`` picks), so "stream_all" is sized from those parts.
    """
    from tensorstream.experts import routed_layouts

    non_block, blocks = store_sizes(storage)
    (path,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    store = Store.open(path)
    routed = routed_layouts(store)
    units = set(store.manifest.get("units", []))
    loads = [
        routed[b.name].prefix_bytes if b.name in routed else b.memory_size or b.data_size
        for b in store.blocks
        if b.name not in units
    ]
    slot = -(-max(loads) // 4096) * 4096
    slots = prefetch + 1
    return {
        "stream_all": (non_block + slots * slot) / 1e9,
        "some_resident": (non_block + blocks[0] + slots * slot) / 1e9,
        "all_resident": (non_block + sum(blocks)) / 1e9,
    }


def streaming(source: Path, storage: Path, **config: object) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tensorstream.Config(device="cpu", storage_path=storage, **config)  # type: ignore[arg-type]
    return AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg)
