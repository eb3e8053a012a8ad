"""The tensorstream demo: stream a ~480 MB random Llama with a budget of a quarter of its size, on CPU.

Run with ``make demo`` (or ``python examples/demo.py``). The model is built once (random weights, nothing is
downloaded) and cached in ``.demo/``; the store is written once to ``.demo/stores``.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tensorstream

ROOT = Path(__file__).resolve().parent.parent / ".demo"


def build_model(folder: Path) -> None:
    """A Llama-shaped model of ~480 MB (fp32, 16 blocks of 28 MB), random weights, saved once."""
    if (folder / "config.json").exists():
        return
    print(f"building a random Llama in {folder} (once) ...", flush=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=4096,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def rss_gb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, in GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def reset_peak_rss() -> None:
    """Restart the VmHWM high-water mark from the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=24, help="tokens to generate")
    parser.add_argument("--budget-fraction", type=float, default=0.25, help="budget as a fraction of the model")
    parser.add_argument("--workdir", type=Path, default=ROOT, help="where the model and its store are cached")
    args = parser.parse_args()
    root = args.workdir

    source = root / "llama-480m"
    build_model(source)
    prompt = torch.tensor([[1, 306, 3658, 278, 593, 310, 2834, 338]])

    # 1. Reshard once (a progress bar shows blocks and GB/s; later runs reuse the store).
    store = tensorstream.reshard(source, root / "stores")
    model_bytes = sum(p.stat().st_size for p in store.rglob("*.safetensors"))
    budget_gb = args.budget_fraction * model_bytes / 1e9
    print(f"\nstore: {store} ({model_bytes / 1e9:.3f} GB)")

    # 2. Stream it: only `budget_gb` of weights is ever in memory.
    reset_peak_rss()
    baseline = rss_gb()
    config = tensorstream.Config(device="cpu", storage_path=root / "stores", budget_gb=budget_gb)
    model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=config)
    plan = model._tensorstream_engine.plan
    print(f"plan:  {plan.describe()}")
    with torch.inference_mode():
        start = time.perf_counter()
        streamed = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False)
        seconds = time.perf_counter() - start
    stats = tensorstream.stats(model)
    print(f"\nstreamed generation ({args.tokens} tokens in {seconds:.2f} s, {args.tokens / seconds:.1f} tokens/s):")
    print(f"  {streamed[0].tolist()}")
    print(f"stats: {stats}")
    print(
        f"peak RSS while streaming: {rss_gb('VmHWM') - baseline:.3f} GB above the {baseline:.3f} GB of the "
        f"interpreter and libraries (weights budget {budget_gb:.3f} GB)"
    )
    del model

    # 3. The same model fully resident, for comparison.
    reference = AutoModelForCausalLM.from_pretrained(source)
    with torch.inference_mode():
        start = time.perf_counter()
        expected = reference.generate(prompt, max_new_tokens=args.tokens, do_sample=False)
        seconds = time.perf_counter() - start
    print(f"\nfully resident generation ({args.tokens / seconds:.1f} tokens/s):")
    print(f"  {expected[0].tolist()}")
    same = torch.equal(streamed, expected)
    print(
        f"\n{'OK' if same else 'MISMATCH'}: the streamed output is {'bit-identical to' if same else 'DIFFERENT from'} "
        "the fully resident model's."
    )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
