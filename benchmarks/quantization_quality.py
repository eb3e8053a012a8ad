"""Quality of the store kinds against the original weights, and their size: the tables of docs/quantization.md.

For each test model (random, built from a config: no weights can be downloaded here; see the caveat in the docs),
saved in bf16, and each store kind, this reshards the model, streams it on the CPU with a budget that streams every
block, and reports against the original model:

* bytes of the blocks' files relative to the plain store (what a step reads when every block streams);
* the relative error ``||W' - W|| / ||W||`` of every quantized weight (median and worst);
* the logits' largest absolute difference and relative error, and how often the greedy next token agrees, over a
  batch of random prompts;
* that the streamed model equals ``tensorstream.detach`` of itself (``torch.equal``), and, for ``lossless``, the
  original model.

Usage::

    python benchmarks/quantization_quality.py --out benchmarks/results/quantization-quality.json \\
        --docs docs/quantization.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tensorstream
from tensorstream.store import Store

MODELS = {
    "llama (d=512, 4 layers)": (
        "llama",
        {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "vocab_size": 2048},
    ),
    "qwen2 (d=384, 4 layers)": (
        "qwen2",
        {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 6,
         "num_key_value_heads": 2, "vocab_size": 2048},
    ),
    "mixtral (d=256, 8 experts)": (
        "mixtral",
        {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 2048},
    ),
    "gpt2 (d=384, 4 layers)": ("gpt2", {"n_embd": 384, "n_layer": 4, "n_head": 6, "vocab_size": 2048}),
}  # fmt: skip
KINDS = {"int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}, "lossless": {"compression": "lossless"}}
MARK_BEGIN = "<!-- quantization-quality: begin -->"
MARK_END = "<!-- quantization-quality: end -->"


def measure(label: str, model_type: str, overrides: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    config = AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(0)
    folder = work / model_type
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    weights = original.state_dict()
    ids = torch.randint(3, config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = original(ids).logits.float()
    plain = Store.open(tensorstream.reshard(folder, work / "stores", progress=False))
    plain_bytes = sum(entry.data_size for entry in plain.blocks)
    rows = []
    for kind, settings in KINDS.items():
        store = Store.open(tensorstream.reshard(folder, work / "stores", progress=False, **settings))
        budget = (store.non_block.data_size + 3 * max(e.memory_size for e in store.blocks)) / 1e9
        cfg = tensorstream.Config(device="cpu", storage_path=work / "stores", budget_gb=budget, prefetch=1, **settings)
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="tensorstream", tensorstream_config=cfg)
        assert model._tensorstream_engine.plan.streamed, "every block should stream"
        with torch.inference_mode():
            logits = model(ids).logits
        detached = tensorstream.detach(model)
        with torch.inference_mode():
            same_as_detached = torch.equal(detached(ids).logits, logits)
        quantized = json_tensors(store)
        errors = [
            (
                (detached.state_dict()[name].float() - weights[name].float()).norm() / weights[name].float().norm()
            ).item()
            for name in quantized
        ]
        difference = (logits.float() - reference).abs()
        rows.append({
            "model": label, "kind": kind,
            "block_bytes_over_plain": sum(e.data_size for e in store.blocks) / plain_bytes,
            "encoded_tensors": len(quantized),
            "weight_rel_error_median": statistics.median(errors) if errors else 0.0,
            "weight_rel_error_max": max(errors) if errors else 0.0,
            "logits_max_abs_diff": difference.max().item(),
            "logits_rel_error": (difference.norm() / reference.norm()).item(),
            "next_token_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "same_as_detached": same_as_detached,
            "same_as_original": torch.equal(logits.float(), reference),
        })  # fmt: skip
        print(json.dumps(rows[-1]))
    return rows


def json_tensors(store: Store) -> list[str]:
    """The logical names of the encoded tensors of every block."""
    names = []
    for entry in store.blocks:
        meta = store.header(entry).metadata.get("encoding")
        if meta:
            names += list(json.loads(meta)["tensors"])
    return names


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | kind | block bytes / plain | weight rel. error (median / worst) | logits max abs diff | "
        "logits rel. error | next-token agreement | = detach | = original |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | `{r['kind']}` | {r['block_bytes_over_plain']:.3f} | "
            f"{r['weight_rel_error_median']:.2e} / {r['weight_rel_error_max']:.2e} | {r['logits_max_abs_diff']:.3g} | "
            f"{r['logits_rel_error']:.2e} | {r['next_token_agreement']:.1%} | "
            f"{'yes' if r['same_as_detached'] else 'NO'} | {'yes' if r['same_as_original'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--docs", help="replace the generated table in this Markdown file")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (model_type, overrides) in MODELS.items():
            rows += measure(label, model_type, overrides, Path(tmp) / model_type)
    table = markdown(rows)
    print(table)
    if args.out:
        meta = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
        Path(args.out).write_text(json.dumps({"versions": meta, "rows": rows}, indent=1))
    if args.docs:
        path = Path(args.docs)
        text = path.read_text()
        start, end = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
        path.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    main()
