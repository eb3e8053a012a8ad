"""Mixture-of-experts streaming, cold, on a model larger than the page cache: routed experts vs whole blocks vs
accelerate's disk offload at the same budget, with the same tokens (docs/moe.md).

    python benchmarks/moe_bench.py make /data/moe-25g          # a random Qwen3-MoE-like checkpoint (~25 GB, bf16)
    python benchmarks/moe_bench.py run /data/moe-25g --out benchmarks/results/moe-cpu.json

``make`` writes a checkpoint of transformers' runtime layout (fused ``[E, ...]`` experts; 128 experts, top-8, hidden
2048, expert width 768 as Qwen3-30B-A3B; 20 layers) shard by shard, never more than one layer in memory. ``run``
measures each method in a fresh process: the page cache of the checkpoint's and the store's files is dropped
(``posix_fadvise(DONTNEED)``, files unmapped) before ``generate``; a prompt of ``--prompt`` tokens then
``--tokens`` greedy decode tokens; per decode token: seconds and bytes read from storage (``/proc/self/io``
``read_bytes``), against the bytes the token needs (the non-expert weights of the streamed blocks plus k/E of
their experts). ``routed-warm`` generates the same tokens once before measuring (their experts are then in the page
cache): the compute bound of this machine, what the resident model's arithmetic costs.

A checkpoint in the runtime layout is one transformers loads without converting, so accelerate's disk offload binds
views of its memory-mapped files: on a CPU it too touches only the routed experts' pages. Published checkpoints
keep per-expert tensors, which transformers fuses at load; accelerate then writes the fused tensors to its offload
folder at every load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LAYERS = 20
CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def make(folder: Path, layers: int) -> None:
    """Write the random checkpoint (safetensors shards + index), one layer at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG, num_hidden_layers=layers)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = f"layer-{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(key, []).append(name)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    total = 0
    for i, (_, names) in enumerate(sorted(groups.items())):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        if (folder / file).exists():
            weight_map.update(dict.fromkeys(names, file))
            continue
        tensors = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / f".{file}.tmp"), metadata={"format": "pt"})
        os.replace(folder / f".{file}.tmp", folder / file)
        weight_map.update(dict.fromkeys(names, file))
        print(f"{file}: {sum(t.numel() * 2 for t in tensors.values()) / 1e9:.2f} GB", flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def drop_cache(paths: list[Path]) -> None:
    """Drop the page cache of every file under ``paths`` (they must not be mapped by any process)."""
    for root in paths:
        for file in [root] if root.is_file() else root.rglob("*"):
            if file.is_file() and not file.is_symlink():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One method in this process: load, drop caches, generate; timings and bytes per decode token."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    import tensorstream
    from tensorstream.bench import active_step_bytes

    torch.manual_seed(0)
    folder = Path(args.folder)
    store_root = Path(args.storage)
    kwargs: dict[str, Any] = {}
    method = args.method.removesuffix("-warm")
    if method in ("routed", "whole"):
        config = tensorstream.Config(
            storage_path=store_root,
            budget_gb=args.budget_gb,
            device="cpu",
            backend=args.backend,
            routed_experts=method == "routed",
        )
        kwargs = {"device_map": "tensorstream", "tensorstream_config": config}
    else:  # accelerate's disk offload at the same budget
        offload = store_root / "accelerate-offload"
        kwargs = {
            "device_map": "auto",
            "max_memory": {"cpu": int(args.budget_gb * 1e9)},
            "offload_folder": str(offload),
        }
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
    load_seconds = time.perf_counter() - started
    ids = torch.randint(3, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    if args.method.endswith("-warm"):  # the same generation once before: its experts are in the page cache
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
    else:
        drop_cache([folder, store_root])
    stamps: list[tuple[float, int]] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            stamps.append((time.perf_counter(), read_bytes()))
            return scores

    start = (time.perf_counter(), read_bytes())
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=args.tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([Clock()]),
            pad_token_id=0,
        )
    points = [start, *stamps]
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(points)]
    result: dict[str, Any] = {
        "method": args.method,
        "backend": args.backend,
        "budget_gb": args.budget_gb,
        "load_seconds": load_seconds,
        "prefill_seconds": steps[0][0],
        "prefill_bytes": steps[0][1],
        "decode_seconds": [s for s, _ in steps[1:]],
        "decode_bytes": [b for _, b in steps[1:]],
        "tokens": out[0, args.prompt :].tolist(),
    }
    if method != "accelerate":
        stats = tensorstream.stats(model)
        plan = model._tensorstream_engine.plan
        result["stats"] = stats.as_dict()
        result["plan"] = plan.describe()
        result["active_bytes"] = active_step_bytes(model)
    return result


def run(args: argparse.Namespace) -> None:
    results = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "measure", args.folder, "--storage", args.storage]
        command += ["--method", method, "--budget-gb", str(args.budget_gb), "--backend", args.backend]
        command += [
            "--prompt",
            str(args.prompt),
            "--tokens",
            str(args.tokens if method == "routed" else args.slow_tokens),
        ]
        print("$", " ".join(command), flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        result = json.loads(lines[-1])
        results.append(result)
        decode = result["decode_seconds"]
        print(
            f"{method}: prefill {result['prefill_seconds']:.1f} s, decode {sum(decode) / len(decode):.2f} s/token, "
            f"{sum(result['decode_bytes']) / len(decode) / 1e9:.3f} GB/token read",
            flush=True,
        )
    summary = summarize(results)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")
    if args.docs:
        write_docs(Path(args.docs), results, summary, args)


def write_docs(path: Path, results: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace) -> None:
    """Rewrite the table between the ``moe-bench`` markers of ``path`` from this run's figures."""
    names = {
        "routed": "tensorstream, routed experts",
        "routed-warm": "tensorstream, routed experts, warm (same tokens again: the compute bound)",
        "routed, verify=off": 'tensorstream, routed experts, `verify="off"`',
        "whole": "tensorstream, whole blocks (`routed_experts=False`)",
        "accelerate": "accelerate disk offload",
    }
    lines = [
        "<!-- moe-bench:begin -->",
        f"Budget {args.budget_gb:g} GB, prompt {args.prompt} tokens, backend {args.backend}; decode figures are means "
        "over the decode tokens measured.",
        "",
        "| method | decode s/token | GB read from storage per decode token | GB the token needs (active) | prefill s "
        "| decode tokens |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        row = summary[r["method"]]
        active = f"{row['active_gb_per_token']:.2f}" if "active_gb_per_token" in row else "-"
        lines.append(
            f"| {names.get(r['method'], r['method'])} | {row['s_per_token']:.2f} | {row['gb_read_per_token']:.3f} "
            f"| {active} | {r['prefill_seconds']:.1f} | {len(r['decode_seconds'])} |"
        )
    ratios = [f"{k.replace('_', ' ')}: {v:.2f}" for k, v in summary.items() if k.startswith("routed_speedup")]
    lines += ["", "; ".join(ratios) + f"; same tokens: {summary.get('same_tokens')}.", "<!-- moe-bench:end -->"]
    text = path.read_text()
    head, rest = text.split("<!-- moe-bench:begin -->", 1)
    path.write_text(head + "\n".join(lines) + rest.split("<!-- moe-bench:end -->", 1)[1])


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["method"]: r for r in results}
    out: dict[str, Any] = {}
    for method, r in by.items():
        decode = r["decode_seconds"]
        out[method] = {
            "s_per_token": sum(decode) / len(decode),
            "gb_read_per_token": sum(r["decode_bytes"]) / len(decode) / 1e9,
        }
        if "active_bytes" in r:
            out[method]["active_gb_per_token"] = r["active_bytes"] / 1e9
    if "routed" in out:
        for other in ("whole", "accelerate", "routed-warm"):
            if other in out:
                out[f"routed_speedup_vs_{other}"] = out[other]["s_per_token"] / out["routed"]["s_per_token"]
        n = min(len(r["tokens"]) for r in results)
        out["same_tokens"] = all(r["tokens"][:n] == by["routed"]["tokens"][:n] for r in results)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("folder")
    p.add_argument("--layers", type=int, default=LAYERS)
    for name in ("run", "measure"):
        p = sub.add_parser(name)
        p.add_argument("folder")
        p.add_argument("--storage", default=str(Path(__file__).resolve().parent.parent / ".bench" / "moe-store"))
        p.add_argument("--budget-gb", type=float, default=4.0)
        p.add_argument("--backend", default="auto")
        p.add_argument("--prompt", type=int, default=8)
        p.add_argument("--tokens", type=int, default=8)
        p.add_argument("--slow-tokens", type=int, default=3, help="decode tokens for whole blocks and accelerate")
        p.add_argument("--methods", default="routed,routed-warm,whole,accelerate")
        p.add_argument("--method", default="routed")
        p.add_argument("--out")
        p.add_argument("--docs", help="rewrite the table between the moe-bench markers of this file (docs/moe.md)")
    args = parser.parse_args()
    if args.command == "make":
        make(Path(args.folder), args.layers)
    elif args.command == "run":
        run(args)
    else:
        print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
