"""Where the cold decode step loses time against the raw disk: a timeline of every read, step and cache drop.

Runs on the standard benchmark store (``tensorstream bench`` builds it): the raw cold read of the block files
(buffered and ``O_DIRECT``, 1-2 threads) and then a cold decode (page cache dropped before every step, as in
``bench``) for each backend given, with every backend read call timestamped (thread, start, end, bytes), every
decode step's start, and the time spent dropping the page cache. Prints, per backend:

* GB/s of the step (streamed bytes / median step time) against the best raw read;
* the disk-busy fraction (union of read intervals over the decode window) and the mean number of reads in flight;
* where the idle time falls: the gaps with no read in flight, by what the model thread was doing (dropping the
  page cache, or waiting for a free slot) and their total;
* the read-call sizes.

Usage::

    PYTHONPATH=src python benchmarks/cold_profile.py --workdir /tmp/bench14 --backend posix --backend mmap
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

import tensorstream
from tensorstream.backends.posix import drop_page_cache, raw_read_gb_per_s
from tensorstream.bench import build_standard_model
from tensorstream.reshard import reshard
from tensorstream.store import Store


def profile(source: Path, storage: Path, backend: str, budget: float, tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    config = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=budget, backend=backend,
                                 direct_io=False if backend in ("posix", "auto") else None)  # fmt: skip
    model: Any = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=config)
    engine = model._tensorstream_engine
    if engine.mapped:  # as for a store larger than RAM; the kernel would not drop pages that stay mapped
        engine.backend.keep_mapped = False
    files = [engine.store.file(entry) for entry in engine.store.entries()]
    reads: list[tuple[str, float, float, int]] = []
    lock = threading.Lock()
    name = "populate" if engine.mapped else "read_into"
    real = getattr(engine.backend, name)

    def timed(handle: Any, offset: int, out: Any) -> int:
        start = time.perf_counter()
        n = real(handle, offset, out)
        with lock:
            reads.append((threading.current_thread().name, start, time.perf_counter(), n))
        return n

    setattr(engine.backend, name, timed)
    steps: list[float] = []
    drops: list[tuple[float, float]] = []

    def before_step(*_: Any) -> None:
        steps.append(time.perf_counter())
        busy = {engine.store.file(engine.blocks[b].entry) for b, load in engine.pipeline.items()
                if not load.done.is_set()}  # fmt: skip
        start = time.perf_counter()
        drop_page_cache([path for path in files if path not in busy])
        drops.append((start, time.perf_counter()))

    ids = torch.randint(3, 30000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        engine.stats.reset()
        drop_page_cache(files)
        reads.clear()
        handle = model.register_forward_pre_hook(before_step)
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        end = time.perf_counter()
        handle.remove()
    begin = steps[1]  # the first decode step (steps[0] is the prefill)
    window = [(s, e, n) for _, s, e, n in reads if e > begin]
    step_times = [b - a for a, b in zip(steps[1:], [*steps[2:], end], strict=False)]
    # union of read intervals, and in-flight depth, over [begin, end]
    events = sorted([(max(s, begin), 1) for s, _, _ in window] + [(e, -1) for _, e, _ in window])
    busy = depth_area = 0.0
    depth, last = 0, begin
    gaps: list[tuple[float, float]] = []
    for t, delta in events:
        if depth > 0:
            busy += t - last
            depth_area += depth * (t - last)
        elif t > last:
            gaps.append((last, t))
        depth += delta
        last = t
    if last < end:
        gaps.append((last, end))
    total = end - begin
    in_drop = sum(max(0.0, min(g1, d1) - max(g0, d0)) for g0, g1 in gaps for d0, d1 in drops)
    idle = sum(g1 - g0 for g0, g1 in gaps)
    streamed = engine.plan.storage_bytes
    median = statistics.median(step_times)
    result = {
        "backend": engine.backend.name, "mapped": engine.mapped, "slots": engine.plan.num_slots,
        "request_bytes": engine.request, "io_threads": engine.executor._max_workers,
        "median_step_s": median, "step_gb_per_s": streamed / median / 1e9,
        "disk_busy_fraction": busy / total, "mean_reads_in_flight": depth_area / total,
        "idle_s": idle, "idle_while_dropping_cache_s": in_drop, "drop_cache_s": sum(e - s for s, e in drops),
        "wait_s": engine.stats.wait_seconds, "window_s": total,
        "read_sizes": sorted({n for _, _, n in window}),
        "largest_gaps_ms": sorted(round((g1 - g0) * 1e3, 1) for g0, g1 in gaps)[-8:],
    }  # fmt: skip
    engine.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tensorstream-bench"))
    parser.add_argument("--backend", action="append")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    source = build_standard_model(args.workdir / "standard-llama-2gb")
    storage = args.workdir / "stores"
    store = Store.open(reshard(source, storage, progress=False))
    files = [store.file(entry) for entry in store.blocks]
    report: dict[str, Any] = {"raw": {}}
    for direct in (False, True):
        for threads in (1, 2):
            key = f"{'O_DIRECT' if direct else 'buffered'}, {threads} threads"
            report["raw"][key] = raw_read_gb_per_s(files, direct=direct, threads=threads)
    budget = 0.25 * store.total_bytes / 1e9
    for backend in args.backend or ["posix"]:
        report[backend] = profile(source, storage, backend, budget, args.tokens)
    best = max(report["raw"].values())
    report["raw"]["best"] = best
    for key, value in report.items():
        if key != "raw":
            value["step_over_raw"] = value["step_gb_per_s"] / best
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
