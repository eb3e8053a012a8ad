"""Registry sweep: every architecture in transformers' auto mappings, streamed by tensorstream and by accelerate.

For each model type in the causal LM, masked LM, seq2seq LM and image classification auto mappings, a tiny random
model is built from its default config shrunk by one generic rule (`tiny_config`: small widths, four layers, a
small vocabulary; never a per-family list), saved with ``save_pretrained`` and run three ways on the CPU:

* fully resident (``from_pretrained(folder)``): the reference logits (run twice: a model whose own forward is not
  deterministic is reported as such);
* tensorstream (``device_map="tensorstream"``) with a budget of 85 % of the model's weight bytes;
* accelerate's disk offload (``device_map="auto"``, ``max_memory={"cpu": same budget}``, ``offload_folder``).

A column is "ok" when the logits are ``torch.equal`` to the reference. Results go to a JSON-lines file, one line per
model, written as they finish; ``--reuse`` takes the accelerate column (which tensorstream changes cannot affect)
from an earlier run. ``--docs`` writes ``docs/models.md``'s generated table from the results.

Each model runs in a worker process with a per-model timeout; a worker that crashes or hangs is replaced and the
model is reported with that reason.

Usage::

    nice python scripts/registry_sweep.py --out sweep.jsonl                 # everything (30-40 min on 2 cores)
    nice python scripts/registry_sweep.py --out s.jsonl --reuse sweep.jsonl  # tensorstream column again
    python scripts/registry_sweep.py --out s.jsonl --only llama xlnet       # a few model types
    python scripts/registry_sweep.py --results sweep.jsonl --docs docs/models.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MAPPINGS = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
}
BUDGET_FRACTION = 0.85
MAX_PARAMETERS = 20_000_000
VOCAB = 512
WIDTH = 32
LAYERS = 4
HEADS = 4

# generic shrinking rule: attribute name -> small value, applied wherever the default config has that attribute
WIDTHS = (
    "hidden_size",
    "d_model",
    "n_embd",
    "embed_dim",
    "dim",
    "word_embed_proj_dim",
    "d_embed",
    "emb_dim",
    "embedding_size",
    "input_embedding_size",
    "output_embedding_size",
)
FFN = (
    "intermediate_size",
    "ffn_dim",
    "d_ff",
    "n_inner",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "d_inner",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "expert_intermediate_size",
)
LAYER_COUNTS = (
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
)
HEAD_COUNTS = ("num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads", "num_heads")
SMALL = {
    "num_key_value_heads": 2,
    "head_dim": WIDTH // HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "image_size": 64,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "num_labels": 3,
}


def entries(tasks: Iterable[str]) -> list[tuple[str, str]]:
    """(task, model_type) for every model type of the given auto mappings."""
    from transformers.models.auto import modeling_auto

    out = []
    for task in tasks:
        mapping = getattr(modeling_auto, MAPPINGS[task][0])
        out.extend((task, model_type) for model_type in mapping)
    return out


def _shrink(config: Any, top: bool) -> dict[str, Any]:
    """Overrides that make ``config`` tiny (recursing into sub-configs), for ``AutoConfig.for_model``."""
    from transformers import PretrainedConfig

    values = config.to_dict() if top else vars(config)
    out: dict[str, Any] = {}
    for key, value in values.items():
        current = getattr(config, key, value)
        if isinstance(current, PretrainedConfig):
            out[key] = {**current.to_dict(), **_shrink(current, top=False)}
            continue
        if isinstance(current, bool) or not isinstance(current, int | list):
            continue
        if isinstance(current, int):
            if key in WIDTHS or key.endswith(("_embed_dim", "_embedding_dim", "_embedding_size")):
                out[key] = WIDTH
            elif key in FFN:
                out[key] = 2 * WIDTH
            elif key in LAYER_COUNTS:
                out[key] = min(current, LAYERS)
            elif key in HEAD_COUNTS:
                out[key] = min(current, HEADS)
            elif key in SMALL and current > SMALL[key]:
                out[key] = SMALL[key]
            elif key.endswith("_vocab_size") and current > VOCAB:
                out[key] = VOCAB
            elif key.endswith("_token_id") and current >= VOCAB:
                out[key] = VOCAB - 1 - (len(out) % 16)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in current) and current:
            if key in ("hidden_sizes", "embed_dims", "embed_dim", "dims", "embedding_sizes", "neck_hidden_sizes"):
                out[key] = [16 * 2**i for i in range(len(current))]
            elif key in ("depths", "depth", "num_layers_per_stage", "layers", "block_repeats"):
                out[key] = [min(v, 2) for v in current]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(values.get(key), int) and values[key] >= VOCAB:
            out[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
    return out


def tiny_config(model_type: str) -> Any:
    """The default config of ``model_type`` made tiny by the generic rule (see the module docstring)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    overrides = _shrink(default, top=True)
    for key in ("layer_types", "block_types", "layers_block_type"):  # keep per-layer lists as long as the stack
        if isinstance(getattr(default, key, None), list):
            overrides[key] = None
    try:
        return AutoConfig.for_model(model_type, **overrides)
    except Exception:  # a derived list the config validates: keep its default pattern, truncated
        for key in ("layer_types", "block_types", "layers_block_type"):
            if isinstance(getattr(default, key, None), list):
                layers = next((overrides[k] for k in LAYER_COUNTS if k in overrides), LAYERS)
                overrides[key] = getattr(default, key)[:layers]
        return AutoConfig.for_model(model_type, **overrides)


def make_inputs(task: str, config: Any) -> dict[str, Any]:
    import torch

    torch.manual_seed(1)
    if task == "image-classification":
        size = getattr(config, "image_size", 64)
        size = size[0] if isinstance(size, list | tuple) else size
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(1, channels, size, size)}
    vocab = getattr(config, "vocab_size", None) or VOCAB
    ids = torch.randint(3, min(vocab, 200), (1, 8))
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq-lm":
        out["decoder_input_ids"] = torch.randint(3, min(vocab, 200), (1, 4))
    return out


def logits(model: Any, batch: dict[str, Any]) -> Any:
    out = model(**batch)
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    return out[0]


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:300]


def run_one(task: str, model_type: str, columns: tuple[str, ...], work: Path) -> dict[str, Any]:
    """Build, save and run one model the three ways; a dict for the JSON-lines file."""
    import torch
    import transformers

    import tensorstream

    auto = getattr(transformers, MAPPINGS[task][1])
    result: dict[str, Any] = {"task": task, "model_type": model_type}
    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        model = auto.from_config(config)
        with torch.no_grad():  # running statistics away from their defaults, so a stale buffer shows
            for name, buffer in model.named_buffers():
                if name.rpartition(".")[2] in ("running_mean", "running_var") and buffer.is_floating_point():
                    buffer.uniform_(0.5, 1.5)
        result["class"] = type(model).__name__
        params = sum(p.numel() for p in model.parameters())
        if params > MAX_PARAMETERS:
            result["build"] = f"too large after the generic shrink: {params / 1e6:.1f}M parameters"
            return result
        model.save_pretrained(work / "model")
        del model
    except Exception as err:
        result["build"] = _first_line(err)
        return result
    try:
        reference = auto.from_pretrained(work / "model")
        batch = make_inputs(task, reference.config)
        expected = logits(reference, batch)
        again = logits(reference, batch)
        if not torch.equal(expected, again):
            result["build"] = "the resident model's own forward is not deterministic"
            return result
        size = weight_bytes(reference)
        del reference
    except Exception as err:
        result["build"] = "resident forward: " + _first_line(err)
        return result
    result["build"] = "ok"
    result["bytes"] = size
    budget = int(size * BUDGET_FRACTION)
    result["budget_bytes"] = budget
    if "tensorstream" in columns:
        try:
            cfg = tensorstream.Config(device="cpu", storage_path=work / "store", budget_gb=budget / 1e9)
            model = auto.from_pretrained(work / "model", device_map="tensorstream", tensorstream_config=cfg)
            plan = model._tensorstream_engine.plan
            result["plan"] = plan.describe()
            result["streamed"] = len(plan.streamed)
            actual = logits(model, batch)
            result["tensorstream"] = "ok" if torch.equal(actual, expected) else _diff(actual, expected)
            del model
        except Exception as err:
            result["tensorstream"] = _first_line(err)
            result["tensorstream_trace"] = traceback.format_exc()[-1500:]
    if "accelerate" in columns:
        try:
            model = auto.from_pretrained(
                work / "model", device_map="auto", max_memory={"cpu": budget}, offload_folder=work / "offload"
            )
            actual = logits(model, batch)
            result["accelerate"] = "ok" if torch.equal(actual, expected) else _diff(actual, expected)
            del model
        except Exception as err:
            result["accelerate"] = _first_line(err)
    return result


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once (tied weights are one tensor)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _diff(actual: Any, expected: Any) -> str:
    if actual.shape != expected.shape:
        return f"wrong output shape {list(actual.shape)} vs {list(expected.shape)}"
    return f"not bit-exact: max abs difference {(actual.float() - expected.float()).abs().max().item():.3g}"


def worker(keys: list[str], columns: tuple[str, ...]) -> None:
    """Run models given as ``task:model_type``; print ``start`` and result lines as JSON."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    for key in keys:
        task, model_type = key.split(":", 1)
        print(json.dumps({"start": key}), flush=True)
        with tempfile.TemporaryDirectory(prefix="sweep-") as work:
            try:
                result = run_one(task, model_type, columns, Path(work))
            except BaseException as err:
                result = {"task": task, "model_type": model_type, "build": "crashed: " + _first_line(err)}
        print(json.dumps({"result": result}), flush=True)


def sweep(keys: list[str], columns: tuple[str, ...], out: Path, timeout: float) -> None:
    """Run ``keys`` in worker processes (replaced after a crash or a timeout), appending results to ``out``."""
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add(f"{r['task']}:{r['model_type']}")
    todo = [k for k in keys if k not in done]
    with out.open("a") as sink:
        while todo:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", "--columns", *columns, "--only-keys", *todo],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert proc.stdout is not None
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            current: str | None = None
            started = time.monotonic()
            while True:
                if not sel.select(timeout=5):
                    if current is not None and time.monotonic() - started > timeout:
                        proc.kill()
                        proc.wait()
                        _record(sink, current, f"timed out after {timeout:.0f} s")
                        todo.remove(current)
                        break
                    continue
                line = proc.stdout.readline()
                if not line:  # the worker died
                    proc.wait()
                    if current is not None:
                        _record(sink, current, f"worker process died (exit code {proc.returncode})")
                        todo.remove(current)
                    break
                if not line.startswith("{"):
                    continue
                message = json.loads(line)
                if "start" in message:
                    current, started = message["start"], time.monotonic()
                    print(f"[{len(done) + 1}/{len(keys)}] {current}", file=sys.stderr, flush=True)
                elif "result" in message:
                    sink.write(json.dumps(message["result"]) + "\n")
                    sink.flush()
                    r = message["result"]
                    print(
                        f"    build={r.get('build')} ts={r.get('tensorstream')} acc={r.get('accelerate')}",
                        file=sys.stderr,
                        flush=True,
                    )
                    done.add(current)
                    todo.remove(current)  # type: ignore[arg-type]
                    current = None
            if proc.poll() is None:
                proc.wait()


def _record(sink: Any, key: str, reason: str) -> None:
    task, model_type = key.split(":", 1)
    sink.write(json.dumps({"task": task, "model_type": model_type, "build": reason}) + "\n")
    sink.flush()


def load_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merge_reused(results: list[dict[str, Any]], reused: Path) -> None:
    """Take the accelerate column from an earlier run (same models, same budgets)."""
    old = {(r["task"], r["model_type"]): r for r in load_results(reused)}
    for r in results:
        prev = old.get((r["task"], r["model_type"]))
        if (
            prev is not None
            and "accelerate" in prev
            and "accelerate" not in r
            and r.get("build") == "ok"
            and prev.get("budget_bytes") == r.get("budget_bytes")
        ):
            r["accelerate"] = prev["accelerate"]


def write_docs(results: list[dict[str, Any]], path: Path) -> None:
    """Replace the generated part of ``path`` (between the markers) with the table of ``results``."""
    import transformers

    built = [r for r in results if r.get("build") == "ok"]
    ts_ok = [r for r in built if r.get("tensorstream") == "ok"]
    acc_ok = [r for r in built if r.get("accelerate") == "ok"]
    acc_not_ts = [r for r in acc_ok if r.get("tensorstream") != "ok"]
    lines = [
        BEGIN,
        "",
        f"Generated by `scripts/registry_sweep.py` with transformers {transformers.__version__} on CPU: every model "
        "type of the causal LM, masked LM, seq2seq LM and image classification auto mappings, built tiny by one "
        f"generic rule, saved with `save_pretrained`, run with a budget of {BUDGET_FRACTION:.0%} of its weight "
        'bytes through tensorstream and through accelerate\'s disk offload (`device_map="auto"`, `max_memory`, '
        "`offload_folder`), and compared with `torch.equal` on the logits against the fully resident model.",
        "",
        f"- {len(results)} entries, {len(built)} built and ran resident;",
        f"- tensorstream bit-exact: **{len(ts_ok)}** of {len(built)};",
        f"- accelerate disk offload bit-exact: **{len(acc_ok)}** of {len(built)};",
        f"- accelerate bit-exact but tensorstream not: **{len(acc_not_ts)}**"
        + (": " + ", ".join(f"`{r['model_type']}`" for r in acc_not_ts) if acc_not_ts else "."),
        "",
        "| task | model type | class | tensorstream | accelerate disk offload |",
        "| --- | --- | --- | --- | --- |",
    ]

    def cell(value: Any) -> str:
        if value is None:
            return "not run"
        return "bit-exact" if value == "ok" else str(value).replace("|", "\\|").replace("\n", " ")

    for r in sorted(built, key=lambda r: (r["task"], r["model_type"])):
        lines.append(
            f"| {r['task']} | `{r['model_type']}` | `{r.get('class', '')}` | {cell(r.get('tensorstream'))} | "
            f"{cell(r.get('accelerate'))} |"
        )
    lines += [
        "",
        "Models that could not be built or run resident by the generic tiny-config rule (neither tool is tried):",
        "",
        "| task | model type | reason |",
        "| --- | --- | --- |",
    ]
    for r in sorted((r for r in results if r.get("build") != "ok"), key=lambda r: (r["task"], r["model_type"])):
        lines.append(f"| {r['task']} | `{r['model_type']}` | {cell(r.get('build'))} |")
    lines += ["", END]
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + "\n".join(lines) + tail
    else:
        text = text.rstrip("\n") + "\n\n## Registry sweep\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)


def results_from_docs(path: Path) -> list[dict[str, Any]]:
    """The results a generated table in ``path`` was written from (cells back to values), to merge a partial run into.

    Example:
        ``python scripts/registry_sweep.py --results part.jsonl --merge-docs --docs docs/models.md``
    """
    text = path.read_text()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]

    def value(cell: str) -> str | None:
        cell = cell.replace("\\|", "|")
        return {"bit-exact": "ok", "not run": None}.get(cell, cell)

    results: list[dict[str, Any]] = []
    for line in table.splitlines():
        if not line.startswith("| ") or line.startswith(("| task", "| ---")):
            continue
        cells = [c[1:-1] if c[:1] == c[-1:] == " " else c for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        task, model_type = cells[0], cells[1].strip("`")
        if len(cells) == 5:
            row = {"task": task, "model_type": model_type, "class": cells[2].strip("`"), "build": "ok"}
            for key, cell in (("tensorstream", cells[3]), ("accelerate", cells[4])):
                if value(cell) is not None:
                    row[key] = value(cell)
            results.append(row)
        elif len(cells) == 3:
            results.append({"task": task, "model_type": model_type, "build": value(cells[2])})
    return results


def merge(base: list[dict[str, Any]], newer: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``base`` with each model of ``newer`` replaced; a column ``newer`` did not run keeps ``base``'s value."""
    index = {(r["task"], r["model_type"]): i for i, r in enumerate(base)}
    out = list(base)
    for r in newer:
        key = (r["task"], r["model_type"])
        if key in index:
            old = out[index[key]]
            kept = {c: old[c] for c in ("tensorstream", "accelerate") if c in old and c not in r}
            out[index[key]] = {**r, **(kept if r.get("build") == "ok" == old.get("build") else {})}
        else:
            out.append(r)
    return out


BEGIN = "<!-- registry-sweep: begin (generated by scripts/registry_sweep.py; do not edit) -->"
END = "<!-- registry-sweep: end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON-lines results file (appended; finished models are skipped)")
    parser.add_argument("--tasks", nargs="+", default=list(MAPPINGS), choices=list(MAPPINGS))
    parser.add_argument("--only", nargs="+", help="model types to run (default: all of the tasks' mappings)")
    parser.add_argument("--columns", nargs="+", default=["tensorstream", "accelerate"])
    parser.add_argument("--reuse", type=Path, help="take the accelerate column from this earlier results file")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--results", type=Path, help="results to write --docs from (default: --out)")
    parser.add_argument("--docs", type=Path, help="write the generated table into this markdown file")
    parser.add_argument(
        "--merge-docs",
        action="store_true",
        help="with --docs: start from the table already in it and replace only the models of --results",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only-keys", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    columns = tuple(args.columns)
    if args.worker:
        worker(args.only_keys, columns)
        return 0
    if args.reuse is not None:
        columns = tuple(c for c in columns if c != "accelerate")
    if args.out is not None:
        keys = [f"{t}:{m}" for t, m in entries(args.tasks) if args.only is None or m in args.only]
        sweep(keys, columns, args.out, args.timeout)
    source = args.results or args.out
    if source is not None:
        results = load_results(source)
        if args.reuse is not None:
            merge_reused(results, args.reuse)
            source.write_text("".join(json.dumps(r) + "\n" for r in results))
        if args.docs is not None:
            if args.merge_docs:
                results = merge(results_from_docs(args.docs), results)
            write_docs(results, args.docs)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
