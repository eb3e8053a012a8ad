"""What the engine reports: `StreamStats` (bytes read, prefetch hits, time waited, ...) and `process_memory`.

`tensorstream.stats(model)` returns the engine's `StreamStats`; ``bench`` samples `process_memory` to report the
anonymous and file-backed parts of the resident memory separately (the budget bounds the anonymous part).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StreamStats", "process_memory"]


@dataclass
class StreamStats:
    """What the engine did since the model was loaded (or since `reset`).

    Attributes:
        bytes_read: bytes read from the store.
        blocks_loaded: block reads completed.
        prefetch_hits: blocks whose read had been started before the block was needed.
        sync_loads: blocks that were not in the prefetch pipeline and were read on demand (misses).
        wait_seconds: time forward calls spent waiting for reads.
        read_seconds: wall time during which at least one read was in progress.
        blocks_run: streamed block forwards.
        cache_loads: block loads served from the pinned host cache tier instead of storage.
        resident_blocks, streamed_blocks, num_slots, backend: the plan and backend in use.
        expert_bytes_read: bytes of routed experts read (mixture-of-experts models, docs/moe.md; not counted in
            ``bytes_read``). In the mapped mode this counts the ranges made present, page-cache hits included.
        experts_routed: experts the routers picked, summed over layers and forwards (each counted once per forward).
        expert_hits, expert_misses: routed experts served from the expert cache, and read from the store (slots).
        experts_predicted, experts_predicted_used: experts read ahead from the previous layer's guess, and how many
            of those the router then picked (`prediction_accuracy`).
        store_kind: ``"plain"``, ``"int8"``, ``"int4"``, ``"lossless"``, or ``"fp8"`` / ``"mxfp4"`` (a pre-quantized
            checkpoint's own bytes; docs/quantization.md); ``bytes_read`` counts the bytes of the store's files,
            compact for all but plain.
        quantization: for a store of a pre-quantized checkpoint, what it streams: the method, where it is
            dequantized, its bytes and why it is larger than the checkpoint if it is
            (`tensorstream.prequantized.describe_quantization`); empty for any other store.
        rss_anon_bytes, rss_file_bytes: this process's anonymous and file-backed resident memory now (properties,
            read from ``/proc/self/status``). The budget bounds the anonymous part. File-backed pages are the page
            cache's: with ``backend="mmap"`` on CPU the streamed weights are mapped views of them, which the
            kernel reclaims under memory pressure (see ``docs/performance.md``).
    """

    bytes_read: int = 0
    blocks_loaded: int = 0
    prefetch_hits: int = 0
    sync_loads: int = 0
    wait_seconds: float = 0.0
    read_seconds: float = 0.0
    blocks_run: int = 0
    cache_loads: int = 0
    expert_bytes_read: int = 0
    experts_routed: int = 0
    expert_hits: int = 0
    expert_misses: int = 0
    experts_predicted: int = 0
    experts_predicted_used: int = 0
    resident_blocks: int = 0
    streamed_blocks: int = 0
    num_slots: int = 0
    backend: str = ""
    store_kind: str = "plain"
    quantization: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def read_gb_per_s(self) -> float:
        """Read throughput while reads were in progress, in GB/s (10^9 bytes)."""
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0

    @property
    def bytes_per_pass(self) -> float:
        """Bytes read from the store (blocks and routed experts) per forward pass over the streamed blocks: per
        generated token at batch 1 without assisted decoding (0 before the first pass)."""
        passes = self.blocks_run / self.streamed_blocks if self.streamed_blocks else 0
        return (self.bytes_read + self.expert_bytes_read) / passes if passes else 0.0

    @property
    def prediction_accuracy(self) -> float:
        """Of the experts read ahead on a guess, the fraction the router then picked (0 when none were guessed)."""
        return self.experts_predicted_used / self.experts_predicted if self.experts_predicted else 0.0

    @property
    def rss_anon_bytes(self) -> int:
        """Anonymous resident memory of this process now (``RssAnon``); 0 where ``/proc`` is missing."""
        return process_memory()["anon"]

    @property
    def rss_file_bytes(self) -> int:
        """File-backed resident memory of this process now (``RssFile``: mapped files, the mapped store included)."""
        return process_memory()["file"]

    def reset(self) -> None:
        """Zero the counters (the plan fields stay)."""
        with self._lock:
            self.bytes_read = self.blocks_loaded = self.prefetch_hits = self.sync_loads = self.blocks_run = 0
            self.cache_loads = self.expert_bytes_read = self.experts_routed = self.expert_hits = 0
            self.expert_misses = self.experts_predicted = self.experts_predicted_used = 0
            self.wait_seconds = self.read_seconds = 0.0

    def as_dict(self) -> dict[str, Any]:
        fields = (
            "bytes_read",
            "blocks_loaded",
            "prefetch_hits",
            "sync_loads",
            "wait_seconds",
            "read_seconds",
            "blocks_run",
            "cache_loads",
            "expert_bytes_read",
            "experts_routed",
            "expert_hits",
            "expert_misses",
            "experts_predicted",
            "experts_predicted_used",
            "resident_blocks",
            "streamed_blocks",
            "num_slots",
            "backend",
            "store_kind",
            "quantization",
        )
        memory = process_memory()
        return {
            **{name: getattr(self, name) for name in fields},
            "read_gb_per_s": self.read_gb_per_s,
            "bytes_per_pass": self.bytes_per_pass,
            "prediction_accuracy": self.prediction_accuracy,
            "rss_anon_bytes": memory["anon"],
            "rss_file_bytes": memory["file"],
        }

    def __str__(self) -> str:
        experts = ""
        if self.experts_routed:
            experts = (
                f"; experts: {self.experts_routed} routed, {self.expert_bytes_read / 1e9:.3f} GB read, "
                f"{self.expert_hits} cache hits, {self.expert_misses} misses, "
                f"{self.prediction_accuracy:.0%} of {self.experts_predicted} guesses used"
            )
        return (
            f"StreamStats(read {self.bytes_read / 1e9:.3f} GB in {self.blocks_loaded} block loads at "
            f"{self.read_gb_per_s:.2f} GB/s, {self.prefetch_hits} prefetch hits, {self.sync_loads} sync loads, "
            f"waited {self.wait_seconds:.3f} s over {self.blocks_run} block forwards; {self.resident_blocks} "
            f"resident / {self.streamed_blocks} streamed blocks, {self.num_slots} slots, backend {self.backend}"
            f"{'' if self.store_kind == 'plain' else f', {self.store_kind} store'}{experts}; "
            f"{self.bytes_per_pass / 1e9:.3g} GB read per pass; "
            f"{f'{self.quantization}; ' if self.quantization else ''}"
            f"RSS {self.rss_anon_bytes / 1e9:.3f} GB anonymous + {self.rss_file_bytes / 1e9:.3f} GB file-backed)"
        )


def process_memory() -> dict[str, int]:
    """This process's resident memory by kind, in bytes: ``rss``, ``anon``, ``file``, ``shmem`` and ``peak``.

    Read from ``/proc/self/status`` (``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem``, ``VmHWM``); zeros where
    it does not exist. ``peak`` is the peak of the total (the kernel keeps no peak of the anonymous part alone).

    Example:
        ```python
        >>> memory = process_memory()
        >>> memory["rss"] == memory["anon"] + memory["file"] + memory["shmem"]
        True
        ```
    """
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem", "VmHWM:": "peak"}
    values = dict.fromkeys(keys.values(), 0)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(None, 1)[0] if line.strip() else ""
                if key in keys:
                    values[keys[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values
