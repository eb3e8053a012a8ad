"""The tensorstream demo: stream a ~480 MB random Llama with a budget of a quarter of its size, on CPU.

Run with ``make demo`` (or ``python examples/demo.py``). The model is built once (random weights, nothing is
downloaded) and cached in ``.demo/``; the store is written once to ``.demo/stores``.

What it prints, for the streamed model and then for the same model fully resident:

* speed, twice: the **first call** of ``generate`` (for the streamed model it also maps the store and touches its
  pages for the first time) and the **steady state**, the median of the calls after it, which is what a program
  that keeps the model loaded sees. Both models are timed the same way;
* memory, as two numbers: **anonymous** RSS (the process's own allocations: what the weights budget bounds, plus
  activations and the KV cache) and **file-backed** RSS (the store's pages, mapped read-only by the default
  ``backend="mmap"`` on CPU: page cache, which the kernel drops under memory pressure and reads again when needed).
  Each is the peak while the model is loaded and generating, above what the process held before loading it;
* whether the streamed tokens are bit-identical to the resident model's.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig  # lazy: no model class is loaded yet

# tensorstream is imported before transformers loads its first model class (the first `from_config` below): it
# registers device_map="tensorstream" then, and keeps torchao's CPU-only import noise, which transformers triggers
# at that moment, off the screen (src/tensorstream/_quiet.py).
import tensorstream
from tensorstream.stats import process_memory

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
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


class PeakMemory:
    """Samples this process's anonymous and file-backed RSS every 5 ms on a thread and keeps their peaks.

    The kernel keeps a peak of the total RSS only (``VmHWM``), not of its anonymous part, hence the sampling.
    """

    def __init__(self) -> None:
        before = process_memory()
        self.before_anon, self.before_file = before["anon"], before["file"]
        self.peak_anon, self.peak_file = self.before_anon, self.before_file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = process_memory()
        self.peak_anon = max(self.peak_anon, now["anon"])
        self.peak_file = max(self.peak_file, now["file"])

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def timed_generate(model: Any, prompt: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy ``generate`` of exactly ``tokens`` new tokens; returns the output and the call's wall time."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return out, time.perf_counter() - start


def measure(load: Callable[[], Any], prompt: torch.Tensor, tokens: int, repeats: int) -> dict[str, Any]:
    """Load a model and time its first ``generate`` call, then ``repeats`` more (the steady state), under `PeakMemory`.

    Every call must return the same tokens. Returns the tokens, the first call's seconds, the median seconds of the
    later calls, the memory peaks, and the model's `tensorstream.stats` and backend (None when it is not streaming).
    """
    with PeakMemory() as memory:
        model = load()
        out, first = timed_generate(model, prompt, tokens)
        steady = []
        for _ in range(repeats):
            again, seconds = timed_generate(model, prompt, tokens)
            if not torch.equal(again, out):
                raise SystemExit("MISMATCH: a later generate call returned other tokens than the first")
            steady.append(seconds)
        stats = tensorstream.stats(model) if hasattr(model, "_tensorstream_engine") else None
        result = {"tokens": out, "first": first, "steady": statistics.median(steady), "memory": memory, "stats": None}
        if stats is not None:  # str() reads the RSS now, while the model is loaded
            result.update(stats=str(stats), backend=stats.backend)
    del model, stats
    return result


def report(title: str, run: dict[str, Any], tokens: int, repeats: int, anon_note: str, file_note: str) -> None:
    """The speed lines (first call, steady state) and memory lines (anonymous, file-backed) of one model."""
    memory: PeakMemory = run["memory"]
    anon, file = memory.peak_anon - memory.before_anon, memory.peak_file - memory.before_file
    first, steady = run["first"], run["steady"]
    later = f"median of the next {repeats} calls" if repeats > 1 else "the next call"
    print(f"\n{title}, {tokens} new tokens per generate call:")
    print(f"  speed, first call:    {tokens / first:5.1f} tokens/s ({first:.2f} s)")
    print(f"  speed, steady state:  {tokens / steady:5.1f} tokens/s ({steady:.2f} s, {later})")
    before_anon, before_file = memory.before_anon / 1e9, memory.before_file / 1e9
    print(f"  memory, anonymous:    {anon / 1e9:5.3f} GB peak above the {before_anon:.3f} GB before loading")
    if anon_note:
        print(f"                        ({anon_note})")
    print(f"  memory, file-backed:  {file / 1e9:5.3f} GB peak above the {before_file:.3f} GB before loading")
    print(f"                        ({file_note})")
    print(f"  tokens: {run['tokens'][0].tolist()}")
    if run["stats"] is not None:
        print(f"  stats:  {run['stats']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24, help="tokens to generate per call")
    parser.add_argument("--repeats", type=int, default=3, help="calls after the first, for the steady-state speed")
    parser.add_argument("--budget-fraction", type=float, default=0.25, help="budget as a fraction of the model")
    parser.add_argument("--backend", default="auto", help='how blocks are read: "auto" (mmap on CPU here), "posix"')
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

    # 2. Stream it: only `budget_gb` of weights is ever held in the process's own (anonymous) memory.
    config = tensorstream.Config(device="cpu", storage_path=root / "stores", budget_gb=budget_gb, backend=args.backend)

    def load_streamed() -> Any:
        model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=config)
        print(f"plan:  {model._tensorstream_engine.plan.describe()}")
        return model

    streamed = measure(load_streamed, prompt, args.tokens, args.repeats)
    report(
        f"streamed with a weights budget of {budget_gb:.3f} GB",
        streamed,
        args.tokens,
        args.repeats,
        anon_note="what the weights budget bounds; activations and the KV cache come on top",
        file_note=(
            "the store's pages, mapped: page cache, which the kernel reclaims under memory pressure"
            if streamed["backend"].startswith("mmap")
            else f"backend {streamed['backend']} reads the blocks into the budget's arena, in anonymous memory"
        ),
    )

    # 3. The same model fully resident, loaded, timed and measured the same way.
    resident = measure(lambda: AutoModelForCausalLM.from_pretrained(source), prompt, args.tokens, args.repeats)
    report(
        "fully resident",
        resident,
        args.tokens,
        args.repeats,
        anon_note="",
        file_note="transformers maps the checkpoint's safetensors files the same way",
    )

    print(
        f"\nstreamed speed / resident speed: {resident['steady'] / streamed['steady']:.2f}x in the steady state, "
        f"{resident['first'] / streamed['first']:.2f}x on the first call"
    )
    same = torch.equal(streamed["tokens"], resident["tokens"])
    print(
        f"\n{'OK' if same else 'MISMATCH'}: the streamed output is {'bit-identical to' if same else 'DIFFERENT from'} "
        "the fully resident model's."
    )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
