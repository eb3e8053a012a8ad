"""Warm page cache, batch 1: resident vs tensorstream (each backend) vs accelerate, interleaved in fresh processes.

On a machine shared with other work, load drifts over minutes; measuring A, A, A, B, B, B... lets that drift
masquerade as a difference. This runs the configurations round-robin (A B C D A B C D ...), each in a fresh
process that loads the model, runs one untimed 2-token ``generate`` (fills the page cache, warms up), then times
one ``generate`` of ``--tokens`` new tokens; it reports per configuration the median decode seconds per token
over the rounds, the CPU seconds per token (user + system: what the configuration costs, less sensitive to other
processes than the wall time), and the peak anonymous and file-backed RSS.

Usage::

    PYTHONPATH=src python benchmarks/warm_interleaved.py --workdir /tmp/bench14 --rounds 3 \\
        --config resident --config mmap --config posix --config accelerate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def child(kind: str, workdir: Path, tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    import tensorstream
    from tensorstream.bench import _MemorySampler, _StepTimer, build_standard_model
    from tensorstream.store import Store

    source = build_standard_model(workdir / "standard-llama-2gb")
    storage = workdir / "stores"
    store = Store.open(tensorstream.reshard(source, storage, progress=False))
    budget = 0.25 * store.total_bytes
    sampler = _MemorySampler()
    model: Any
    with tempfile.TemporaryDirectory(dir=workdir) as offload:
        if kind == "resident":
            model = AutoModelForCausalLM.from_pretrained(source)
        elif kind == "accelerate":
            model = AutoModelForCausalLM.from_pretrained(
                source, device_map="auto", max_memory={"cpu": int(budget)}, offload_folder=offload
            )
        else:
            config = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=budget / 1e9, backend=kind)
            model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=config)
        ids = torch.randint(3, 30000, (1, 16), generator=torch.Generator().manual_seed(1))
        args = {"do_sample": False, "pad_token_id": 0}
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **args)
            timer = _StepTimer()
            before = os.times()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, streamer=timer, **args)
            after = os.times()
        steps = timer.decode_steps()
        memory = sampler.close()
    cpu = (after.user - before.user) + (after.system - before.system)
    return {
        "config": kind, "s_per_token": statistics.median(steps), "cpu_s_per_token": cpu / tokens,
        "system_s_per_token": (after.system - before.system) / tokens, **memory,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tensorstream-bench"))
    parser.add_argument("--config", action="append", help="resident, accelerate, or a tensorstream backend")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.tokens)))
        return 0
    configs = args.config or ["resident", "mmap", "posix", "accelerate"]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for kind in configs:
            start = time.perf_counter()
            command = [sys.executable, __file__, "--child", kind, "--workdir", str(args.workdir)]
            out = subprocess.run([*command, "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {kind}: {runs[kind][-1]} ({time.perf_counter() - start:.0f} s)", flush=True)
    summary = {}
    for kind, rows in runs.items():
        summary[kind] = {
            key: statistics.median(r[key] for r in rows)
            for key in ("s_per_token", "cpu_s_per_token", "system_s_per_token", "peak_anon_rss_above_baseline",
                        "peak_file_rss")
        }  # fmt: skip
        summary[kind]["tokens_per_s"] = 1 / summary[kind]["s_per_token"]
    base = summary.get("resident")
    print(f"\n{'config':<12}{'s/token':>9}{'tokens/s':>10}{'CPU s/tok':>11}{'sys s/tok':>11}{'anon GB':>9}"
          f"{'file GB':>9}{'/resident':>11}")  # fmt: skip
    for kind, row in summary.items():
        ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        print(f"{kind:<12}{row['s_per_token']:>9.3f}{row['tokens_per_s']:>10.2f}{row['cpu_s_per_token']:>11.3f}"
              f"{row['system_s_per_token']:>11.3f}{row['peak_anon_rss_above_baseline'] / 1e9:>9.2f}"
              f"{row['peak_file_rss'] / 1e9:>9.2f}{ratio:>11}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
