"""``tensorstream bench``: how close streaming gets to the hardware, as ratios measured in one run.

Everything is measured in the same process, one condition after the other, so a noisy machine cannot flatter
the result:

1. **the disk**: raw reads of the model's ``.ts`` files, cold (page cache dropped with
   ``posix_fadvise(DONTNEED)`` before each pass, or bypassed with ``O_DIRECT``), 1 to N threads, 16 MiB requests;
   the best is "the disk";
2. **tensorstream**: decode seconds per token (median over runs of the median step) at batch 1 and a larger
   batch, with the given budget, cold (the page cache of every store file dropped before every decode step:
   the "model larger than RAM" regime) and warm;
3. **accelerate** (``--compare accelerate``): its disk offload (``device_map="auto"`` with ``max_memory`` equal
   to the budget), same model, same cache conditions (its offload index points at the checkpoint files, whose
   cache is dropped the same way);
4. **resident**: the model fully in memory, when it fits;
5. **assisted generation** (``assistant=``): greedy decoding with prompt lookup (``"prompt-lookup"``) or a small
   resident draft model, on the same store, warm: tokens per weight pass (new tokens ÷ forwards of the streamed
   model) and tokens/s against plain greedy, and whether its tokens equal the resident model's under the same
   settings;
6. **KV caches** (``kv_caches``): tensorstream and the resident model decode with each of transformers' cache
   implementations asked for (``"offloaded"``: the KV cache in host RAM, brought to the device layer by layer,
   for batches whose cache would not fit next to the budget; CUDA only), and each streamed row's tokens are
   compared with the resident model's under the same cache.

Memory: for every row the peaks of the anonymous and file-backed RSS (``RssAnon``, ``RssFile``, sampled every
2 ms) are reported separately; the budget bounds the anonymous part. With the zero-copy ``mmap`` backend the
streamed weights are mapped page-cache pages: file-backed, reclaimable by the kernel.

The lower bound for a decode step is ``max(t_compute, storage_bytes / disk_GBps)`` with ``t_compute`` the
resident model's step time at the same batch; the ratios are streaming GB/s ÷ disk GB/s, s/token ÷ the lower
bound, and tokens/s ÷ accelerate's.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._quiet import quiet_torchao
from .backends.posix import choose_direct_io, drop_page_cache, raw_read_gb_per_s
from .config import Config
from .encoding import QUANTIZE_SCHEMES, store_kind
from .errors import ConfigError

__all__ = ["build_standard_model", "drop_page_cache", "raw_read_gb_per_s", "run_bench"]

logger = logging.getLogger(__name__)
STANDARD_MODEL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
    vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    initializer_range=0.2,
)  # fmt: skip
PROMPT_TOKENS = 16
# transformers' cache_implementation values measured by ``kv_caches``: "offloaded" keeps each layer's KV cache in
# host RAM and brings it to the device for its layer (CUDA only in transformers 5: it synchronises with CUDA streams)
KV_CACHES = ("dynamic", "offloaded", "static", "offloaded_static")


def build_standard_model(folder: Path, *, dtype: torch.dtype = torch.bfloat16, **overrides: Any) -> Path:
    """The standard benchmark model: a random Llama of ~1.9 GB in bf16 with 16 blocks, built once into ``folder``."""
    if (folder / "config.json").exists():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    logger.info("tensorstream bench: building the standard benchmark model in %s (once)", folder)
    torch.manual_seed(0)
    config = LlamaConfig(**{**STANDARD_MODEL, **overrides})
    with torch.device("cpu"):
        model: Any = LlamaForCausalLM(config)
        model = model.to(dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


class _StepTimer:
    """A ``generate`` streamer that timestamps every token; decode step times are the gaps after the first."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_steps(self) -> list[float]:
        # times[0]: the prompt (before prefill), times[1]: first token (after prefill), then one per decode step
        return [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]


@contextmanager
def cold_steps(model: Any, files: Sequence[Path]) -> Iterator[None]:
    """Drop the page cache of ``files`` before every forward of ``model`` (one decode step each).

    Files that a streaming engine is reading at that moment are left alone: dropping pages its readahead brought
    in but the read has not copied yet would make the same bytes come from the disk twice, which no real
    larger-than-RAM run does. They are dropped at the next step, after their read.
    """
    engine = getattr(model, "_tensorstream_engine", None)

    def drop(*_: Any) -> None:
        busy = set()
        if engine is not None:
            busy = {engine.store.file(engine.blocks[b].entry) for b, load in engine.pipeline.items()
                    if not load.done.is_set()}  # fmt: skip
        drop_page_cache([path for path in files if path not in busy])

    handle = model.register_forward_pre_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def cache_config(config: Config, cache: str, store_path: Path, model_bytes: int) -> Config:
    """``config`` for the ``cache`` condition: cold, ``direct_io=None`` becomes what it picks for a store larger than
    RAM (the regime the cold condition stands for)."""
    if cache == "cold" and config.direct_io is None and config.backend in ("auto", "posix"):
        return config.replace(direct_io=choose_direct_io(store_path, model_bytes, larger_than_ram=True))
    return config


def unmap_when_cold(engine: Any, cache: str) -> None:
    """Cold: unmap each block after use. The zero-copy mode keeps a store that fits in memory mapped, and the kernel
    does not drop mapped pages, so "cold" would stay warm; a store larger than RAM is unmapped after each block."""
    if cache == "cold" and getattr(engine.backend, "keep_mapped", False):
        engine.backend.keep_mapped = False


@dataclass
class _Measure:
    s_per_token: float
    runs: list[float]
    output: torch.Tensor | None = None  # the last generation's tokens (compared with the resident model's)


def _decode(
    model: Any,
    batch: int,
    tokens: int,
    runs: int,
    cold_files: Sequence[Path] | None,
    device: torch.device,
    kv_cache: str = "dynamic",
) -> _Measure:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, max(vocab - 1, 4), (batch, PROMPT_TOKENS), generator=generator).to(device)
    args: dict[str, Any] = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}
    if kv_cache != "dynamic":  # transformers' default; left unset so the default rows run exactly as before
        args["cache_implementation"] = kv_cache
    medians = []
    out = None
    with torch.inference_mode():
        if cold_files is None:  # warm: one untimed pass fills the page cache
            model.generate(ids, **{**args, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(runs):
            timer = _StepTimer()
            if cold_files is not None:
                drop_page_cache(cold_files)
                with cold_steps(model, cold_files):
                    out = model.generate(ids, streamer=timer, **args)
            else:
                out = model.generate(ids, streamer=timer, **args)
            medians.append(statistics.median(timer.decode_steps()))
    return _Measure(statistics.median(medians), medians, None if out is None else out.cpu())


class _MemorySampler:
    """Samples this process's anonymous and file-backed RSS every 2 ms on a thread and keeps their peaks."""

    def __init__(self) -> None:
        import threading

        from .stats import process_memory

        self._read = process_memory
        start = process_memory()
        self.baseline_anon = start["anon"]
        self.peak_anon = start["anon"]
        self.peak_file = start["file"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tensorstream-bench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self._sample()

    def _sample(self) -> None:
        memory = self._read()
        self.peak_anon = max(self.peak_anon, memory["anon"])
        self.peak_file = max(self.peak_file, memory["file"])

    def close(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {"peak_anon_rss_above_baseline": self.peak_anon - self.baseline_anon, "peak_file_rss": self.peak_file}


def _prompt(model: Any, batch: int, device: torch.device) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(3, max(vocab - 1, 4), (batch, PROMPT_TOKENS), generator=generator).to(device)


def _assisted(
    model: Any, assistant: str, source: Any, tokens: int, runs: int, device: torch.device, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Plain greedy and assisted greedy on the (warm) streamed model at batch 1: tokens/s and tokens per pass.

    A weight pass is one forward of the streamed model (each streams every block once). The assisted tokens are
    compared with the fully resident model's under the same settings (``same_as_resident``).
    """
    from transformers import AutoModelForCausalLM

    ids = _prompt(model, 1, device)
    base = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}
    if assistant == "prompt-lookup":
        extra: dict[str, Any] = {"prompt_lookup_num_tokens": 10}
    else:
        draft: Any = AutoModelForCausalLM.from_pretrained(assistant)
        extra = {"assistant_model": draft.to(device)}
    passes = [0]
    handle = model.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    rows, outputs = [], {}
    try:
        for mode, kwargs in (("greedy", base), (f"assisted ({assistant})", {**base, **extra})):
            say(f"tensorstream, warm cache, {mode}")
            times, counts = [], []
            with torch.inference_mode():
                model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
                for _ in range(runs):
                    passes[0] = 0
                    start = time.perf_counter()
                    out = model.generate(ids, **kwargs)
                    times.append(time.perf_counter() - start)
                    counts.append(passes[0])
            new = out.shape[1] - ids.shape[1]
            outputs[mode] = out
            seconds = statistics.median(times)
            rows.append({
                "system": "tensorstream", "cache": "warm", "batch": 1, "mode": mode, "s_per_token": seconds / new,
                "tokens_per_s": new / seconds, "runs": times, "weight_passes": statistics.median(counts),
                "tokens_per_pass": new / statistics.median(counts),
            })  # fmt: skip
    finally:
        handle.remove()
    resident: Any = AutoModelForCausalLM.from_pretrained(source)
    resident = resident.to(device)
    with torch.inference_mode():
        expected = resident.generate(ids, **{**base, **extra})
    del resident
    for row, out in zip(rows, outputs.values(), strict=True):
        row["system"] = "ts+assistant" if row["mode"] != "greedy" else "ts greedy"
        row["same_as_resident"] = bool(torch.equal(out.cpu(), expected.cpu())) if row["mode"] != "greedy" else None
    return rows


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes (Linux)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _ = line.split()
                values[key] = int(amount) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def bench_settings(
    config: Config | None, device: str | None, workdir: str | os.PathLike[str] | None
) -> tuple[Config, Path]:
    """The settings a bench runs with (``config``, else the environment's, on ``device`` when given) and its work
    folder (``workdir``, else ``<storage_path>/bench``), created."""
    base = config or Config.from_env()
    if device is not None:
        base = base.replace(device=device)
    work = Path(workdir) if workdir else base.store_root / "bench"
    work.mkdir(parents=True, exist_ok=True)
    return base, work


def run_bench(
    source: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] | None = None,
    budget_fraction: float = 0.25,
    budget_gb: float | None = None,
    device: str | None = None,
    batches: Sequence[int] = (1, 4),
    tokens: int = 8,
    runs: int = 3,
    caches: Sequence[str] = ("cold", "warm"),
    compare: Sequence[str] = (),
    resident: bool = True,
    max_threads: int = 4,
    config: Config | None = None,
    progress: Callable[[str], None] | None = None,
    backends: Sequence[str] = (),
    assistant: str | None = None,
    kinds: Sequence[str] = (),
    kv_caches: Sequence[str] = ("dynamic",),
) -> dict[str, Any]:
    """Measure the disk, tensorstream, and optionally accelerate and the resident model; return every figure.

    Args:
        source: a model folder or Hub id; ``None`` builds the standard benchmark model (a ~1.9 GB bf16 Llama with
            16 blocks) in ``workdir``.
        workdir: where the standard model, the stores and accelerate's offload folder live
            (default: ``<storage_path>/bench``).
        budget_fraction, budget_gb: the weights budget, as a fraction of the model or in GB (``budget_gb`` wins).
        device: the execution device (default: `Config`'s default).
        batches: decode batch sizes.
        tokens: new tokens per generation (decode steps measured: ``tokens - 1``).
        runs: generations per condition; the figure is the median of the runs' median step times.
        caches: ``"cold"`` (page cache dropped before every step) and/or ``"warm"``.
        compare: ``("accelerate",)`` to measure accelerate's disk offload at the same budget.
        resident: also measure the fully resident model (when it fits in 80% of free memory).
        max_threads: the raw read test tries 1, 2, ... up to this many threads.
        config: base `Config` (its ``storage_path``, ``backend``, ``direct_io``, ``prefetch``... are used).
        progress: called with a line of text as each measurement starts.
        backends: measure tensorstream with each of these backends (``"posix"``, ``"mmap"``...), one after the
            other in this run (default: the config's). In the cold condition a mapped store is unmapped after each
            block, as a store larger than RAM is (the regime the cold condition stands for).
        assistant: also measure assisted generation on the streamed model (warm, batch 1): ``"prompt-lookup"``
            (``prompt_lookup_num_tokens=10``) or a draft model's folder or Hub id (kept resident).
        kinds: also measure these store kinds (``"int8"``, ``"int4"``, ``"lossless"``; see docs/quantization.md),
            each resharded from the same source, with the first backend, in every cache condition; rows are named
            ``ts <kind>`` and compared with the plain store's (bytes read per step and tokens/s).
        kv_caches: transformers' KV cache implementations to decode tensorstream and the resident model with, each
            in the same run (`KV_CACHES`; default: the dynamic cache). ``"offloaded"`` keeps the cache in host RAM
            and moves each layer's part to the device for its layer: the cache no longer has to fit next to the
            budget. transformers runs it on CUDA only; on another device this raises `ConfigError` before
            anything is measured. Every tensorstream row records its ``kv_cache`` and ``kv_cache_bytes`` (what
            the cache holds at the end of a generation, `tensorstream.plan.kv_cache_bytes`), and, when the
            resident model was measured, ``same_as_resident``: whether its tokens equal the resident model's with
            the same cache.

    Returns:
        A JSON-serialisable dict: ``machine``, ``model``, ``budget``, ``disk``, ``results`` (one row per system,
        cache condition and batch), ``ratios`` and ``targets``.

    Example:
        ```python
        >>> result = run_bench(compare=["accelerate"])
        >>> print(format_table(result))
        ```
    """
    from transformers import AutoModelForCausalLM

    from . import stats as ts_stats
    from .plan import auto_budget_bytes, kv_cache_bytes
    from .reshard import reshard
    from .store import MANIFEST_NAME, Store

    say = progress or (lambda line: logger.info("tensorstream bench: %s", line))
    model: Any
    engine: Any
    base, work = bench_settings(config, device, workdir)
    run_device = base.execution_device
    if source is None:
        say("standard model (random Llama, ~1.9 GB bf16, 16 blocks)")
        source = build_standard_model(work / "standard-llama-2gb")
    for cache in caches:
        if cache not in ("cold", "warm"):
            raise ConfigError(f"caches={list(caches)}: each must be 'cold' or 'warm'.")
    _check_kv_caches(kv_caches, run_device)
    storage = base.store_root if config is not None else work / "stores"
    given_store = (Path(source) / MANIFEST_NAME).is_file()
    from .integrations.diffusers_reshard import is_diffusers_model

    if not given_store and Path(source).is_dir() and is_diffusers_model(Path(source)):
        raise ConfigError(
            f"{source} is a diffusers model: it is measured per denoising step by "
            "tensorstream.integrations.diffusers_bench.run_diffusion_bench (`tensorstream bench --diffusers`)."
        )
    if given_store:  # a store (or preshard snapshot): benchmark it as it is, not the source it was built from
        if kinds:
            raise ConfigError(
                f"{source} is a store: it is measured as it is. --quantize/--compression reshard a model, so pass "
                "the model folder (or Hub id) it was built from."
            )
        store = Store.open(source, verify="header")
    else:
        store = Store.open(reshard(source, storage, dtype=base.dtype, dequantize=base.dequantize, progress=False))
    kind_stores: dict[str | None, Any] = {None: store}
    for extra in kinds:
        say(f"{extra} store (resharding once)")
        quantize, compression = (extra, None) if extra in QUANTIZE_SCHEMES else (None, extra)
        store_kind(quantize, compression)  # ConfigError for an unknown kind
        kind_stores[extra] = Store.open(
            reshard(source, storage, dtype=base.dtype, quantize=quantize, compression=compression, progress=False)
        )
    files = [store.file(entry) for entry in store.entries()]
    model_bytes = store.total_bytes
    budget = round(budget_gb * 1e9) if budget_gb is not None else round(budget_fraction * model_bytes)
    _check_budget(store, budget, base.prefetch)  # before any measurement
    config_run = base.replace(storage_path=storage, budget_gb=budget / 1e9)

    disk_runs: list[dict[str, Any]] = []
    direct_ok = hasattr(os, "O_DIRECT")
    if "cold" in caches:  # the disk figure is what cold runs are compared with; warm runs need none
        say("raw cold reads of the store files")
    for direct in ((False, True) if direct_ok else (False,)) if "cold" in caches else ():
        threads = 1
        while threads <= max_threads:
            try:
                speed = raw_read_gb_per_s(files, direct=direct, threads=threads)
            except OSError as err:  # O_DIRECT refused by the filesystem
                logger.info("tensorstream bench: %s reads failed (%s)", "O_DIRECT" if direct else "buffered", err)
                break
            disk_runs.append({"mode": "O_DIRECT" if direct else "buffered", "threads": threads, "gb_per_s": speed})
            threads *= 2
    disk = max(disk_runs, key=lambda run: run["gb_per_s"]) if disk_runs else None

    results: list[dict[str, Any]] = []
    outputs: list[tuple[dict[str, Any], torch.Tensor | None]] = []  # (tensorstream row, its tokens)
    plan_info: dict[str, Any] = {}
    measured = [
        (kind, backend, cache)
        for kind in kind_stores
        for backend in (backends or (base.backend,))[: None if kind is None else 1]
        for cache in caches
    ]
    for kind, backend, cache in measured:
        kind_store = kind_stores[kind]
        kind_files = [kind_store.file(entry) for entry in kind_store.entries()]
        say(f"tensorstream ({kind or 'plain'} store, {backend}), {cache} cache")
        gc.collect()
        _reset_peak()
        baseline, _ = _rss()
        sampler = _MemorySampler()
        quantize, compression = (kind, None) if kind in QUANTIZE_SCHEMES else (None, kind)
        config_cache = config_run.replace(backend=backend, quantize=quantize, compression=compression)
        config_cache = cache_config(config_cache, cache, store.path, model_bytes)
        model = AutoModelForCausalLM.from_pretrained(
            source, device_map="tensorstream", tensorstream_config=config_cache
        )
        engine = model._tensorstream_engine
        unmap_when_cold(engine, cache)
        plan = engine.plan
        # bytes read per step: the streamed blocks' files (compact bytes for a quantized or compressed store); a block
        # whose experts are routed reads its other tensors and the experts its router picks (docs/moe.md)
        step_bytes = sum(entry.data_size for entry in kind_store.blocks if entry.name in set(plan.streamed))
        active_bytes = active_step_bytes(model) if plan.routed else step_bytes
        if kind is None:
            plan_info = {
                "resident_blocks": len(plan.resident), "streamed_blocks": len(plan.streamed), "slots": plan.num_slots,
                "storage_bytes_per_step": step_bytes, "backend": engine.backend.name, "describe": plan.describe(),
            }  # fmt: skip
        for batch, kv_cache in [(batch, kv_cache) for batch in batches for kv_cache in kv_caches]:
            stats = ts_stats(model)
            stats.reset()
            started = time.perf_counter()
            cold = kind_files if cache == "cold" else None
            measure = _decode(model, batch, tokens, runs, cold, run_device, kv_cache)
            elapsed = time.perf_counter() - started
            _, peak = _rss()
            sampler._sample()
            results.append({
                "system": "tensorstream" if kind is None else f"ts {kind}", "store": kind or "plain",
                "cache": cache, "batch": batch, "s_per_token": measure.s_per_token,
                "tokens_per_s": batch / measure.s_per_token, "runs": measure.runs, "bytes_per_step": step_bytes,
                "resident_blocks": len(plan.resident), "streamed_blocks": len(plan.streamed),
                "gb_per_s": step_bytes / measure.s_per_token / 1e9,
                "wait_fraction": stats.wait_seconds / elapsed if elapsed else 0.0,
                "read_gb_per_s": stats.read_gb_per_s, "sync_loads": stats.sync_loads,
                "peak_rss_above_baseline": peak - baseline, "backend": engine.backend.name,
                "peak_anon_rss_above_baseline": sampler.peak_anon - sampler.baseline_anon,
                "peak_file_rss": sampler.peak_file, "kv_cache": kv_cache, "active_bytes_per_step": active_bytes,
                "measured_read_bytes": stats.bytes_read + stats.expert_bytes_read, "routed_blocks": len(plan.routed),
                "expert_hits": stats.expert_hits, "expert_misses": stats.expert_misses,
                "prediction_accuracy": stats.prediction_accuracy,
                "kv_cache_bytes": kv_cache_bytes(model.config, batch_size=batch,
                                                 sequence_length=PROMPT_TOKENS + tokens, dtype=model.dtype),
            })  # fmt: skip
            if kind in (None, "lossless"):  # a quantized store computes with other weights by design
                outputs.append((results[-1], measure.output))
        if assistant and cache == "warm" and kind is None:
            results += _assisted(model, assistant, source, tokens, runs, run_device, say)
        sampler.close()
        del model, engine
        gc.collect()

    if "accelerate" in compare:
        # accelerate loads a store as an ordinary checkpoint (its index names the .ts files)
        checkpoint_files = (
            files if given_store else sorted(Path(store.manifest.get("folder", source)).glob("*.safetensors"))
        )
        for cache in caches:
            say(f"accelerate disk offload, {cache} cache")
            with tempfile.TemporaryDirectory(dir=work) as offload:
                max_memory: dict[Any, Any] = {"cpu": budget}
                if run_device.type == "cuda":
                    max_memory = {run_device.index or 0: budget, "cpu": 0}
                with quiet_torchao():
                    model = AutoModelForCausalLM.from_pretrained(
                        source,
                        device_map="auto",
                        max_memory=max_memory,
                        offload_folder=offload,
                        dtype=base.dtype or "auto",
                    )
                cold = [*checkpoint_files, *Path(offload).glob("*")] if cache == "cold" else None
                for batch in batches:
                    measure = _decode(model, batch, tokens, runs, cold, run_device)
                    results.append({
                        "system": "accelerate", "cache": cache, "batch": batch, "s_per_token": measure.s_per_token,
                        "tokens_per_s": batch / measure.s_per_token, "runs": measure.runs,
                    })  # fmt: skip
                del model
                gc.collect()

    fits = model_bytes <= 0.8 * auto_budget_bytes(run_device)
    if resident and fits:
        say("fully resident model")
        with quiet_torchao():  # transformers' load of a pre-quantized checkpoint imports torchao: CUDA-only noise
            model = AutoModelForCausalLM.from_pretrained(source, dtype=base.dtype or "auto")  # as the stores hold it
        model = model.to(run_device)
        for batch, kv_cache in [(batch, kv_cache) for batch in batches for kv_cache in kv_caches]:
            measure = _decode(model, batch, tokens, runs, None, run_device, kv_cache)
            results.append({
                "system": "resident", "cache": "warm", "batch": batch, "s_per_token": measure.s_per_token,
                "tokens_per_s": batch / measure.s_per_token, "runs": measure.runs, "kv_cache": kv_cache,
            })  # fmt: skip
            for row, out in outputs:  # the same prompt and settings: the streamed tokens must be these
                if (row["batch"], row["kv_cache"]) == (batch, kv_cache):
                    row["same_as_resident"] = bool(
                        out is not None and measure.output is not None and torch.equal(out, measure.output)
                    )
        del model
        gc.collect()

    result = {
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "device": str(run_device),
            "gpu": torch.cuda.get_device_name(run_device) if run_device.type == "cuda" else None,
        },
        "model": {"source": str(source), "store": str(store.path), "bytes": model_bytes, "blocks": len(store.blocks)},
        "budget": {"bytes": budget, "fraction": budget / model_bytes, **plan_info},
        "disk": None if disk is None else {"best_gb_per_s": disk["gb_per_s"], "best": disk, "runs": disk_runs},
        "settings": {"batches": list(batches), "tokens": tokens, "runs": runs, "caches": list(caches),
                     "backends": list(backends or (base.backend,)), "assistant": assistant, "kinds": list(kinds),
                     "kv_caches": list(kv_caches), "prompt_tokens": PROMPT_TOKENS},
        "results": results,
    }  # fmt: skip
    result["ratios"], result["targets"] = _ratios(result)
    return result


def active_step_bytes(model: Any) -> int:
    """Bytes one decode token needs of a streaming model's streamed blocks: each block's tensors outside its routed
    experts, plus k of E of those experts (k from the config's ``num_experts_per_tok``)."""
    from .experts import routed_layouts

    engine = model._tensorstream_engine
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    k = int(getattr(config, "num_experts_per_tok", None) or 1)
    layouts = routed_layouts(engine.store)
    total = 0
    for name in engine.plan.streamed:
        layout = layouts.get(name)
        if layout is None:
            total += engine.plan.block_bytes[name]
        else:
            total += layout.prefix_bytes + min(k, layout.num_experts) * layout.expert_bytes
    return total


def _row(
    result: dict[str, Any], system: str, cache: str, batch: int, kv_cache: str = "dynamic"
) -> dict[str, Any] | None:
    for row in result["results"]:
        if (row["system"], row["cache"], row["batch"], row.get("kv_cache", "dynamic")) == (system, cache, batch,
                                                                                           kv_cache):  # fmt: skip
            return row
    return None


def _check_kv_caches(kv_caches: Sequence[str], device: torch.device) -> None:
    """`ConfigError` for an unknown KV cache name, or an offloaded one that transformers cannot run on ``device``."""
    unknown = [name for name in kv_caches if name not in KV_CACHES]
    if unknown or not kv_caches:
        raise ConfigError(f"kv_caches={list(kv_caches)}: each must be one of {', '.join(KV_CACHES)}.")
    offloaded = [name for name in kv_caches if name.startswith("offloaded")]
    if not offloaded:
        return
    from transformers import DynamicCache

    try:  # one layer's update, as generate would do it: transformers 5 synchronises it with CUDA streams
        probe = torch.zeros(1, 1, 1, 1, device=device)
        DynamicCache(offloading=True).update(probe, probe.clone(), 0)
    except Exception as err:  # what fails depends on the torch build: AssertionError, RuntimeError
        raise ConfigError(
            f"--kv-cache {offloaded[0]}: transformers' offloaded KV cache does not run on {device} "
            f"({type(err).__name__}: {err}). It moves the cache from an accelerator to host RAM; on a CPU the cache "
            "is in host RAM already, so measure it on a GPU (e.g. --device cuda)."
        ) from None


def _check_budget(store: Any, budget: int, prefetch: int) -> None:
    """`BudgetError` with the CLI flag to use when ``budget`` cannot stream ``store`` (checked before measuring)."""
    from .errors import BudgetError
    from .plan import make_plan

    try:
        make_plan(store.non_block.data_size, [(e.name, e.data_size) for e in store.blocks], budget, prefetch)
    except BudgetError as err:
        minimum = err.minimum_bytes or budget
        gb = math.ceil(minimum / 1e7) / 100  # rounded up: the suggested value works
        fraction = math.ceil(minimum / store.total_bytes * 100) / 100
        raise BudgetError(
            f"tensorstream bench: a budget of {budget / 1e9:.3g} GB ({budget / store.total_bytes:.0%} of the "
            f"{store.total_bytes / 1e9:.3g} GB model) is below the {gb:g} GB this model needs (non-block weights plus "
            f"two streaming slots); rerun with --budget-gb {gb:g} or --budget-fraction {fraction:g}.",
            minimum,
        ) from None


def _ratios(result: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    disk = result["disk"]["best_gb_per_s"] if result["disk"] else None
    storage = result["budget"].get("storage_bytes_per_step", 0)
    ratios = []
    for row in result["results"]:
        if row["system"] != "tensorstream":
            continue
        kv_cache = row.get("kv_cache", "dynamic")
        entry: dict[str, Any] = {"cache": row["cache"], "batch": row["batch"], "backend": row.get("backend", ""),
                                 "kv_cache": kv_cache}  # fmt: skip
        resident = _row(result, "resident", "warm", row["batch"], kv_cache)
        compute = resident["s_per_token"] if resident else 0.0
        if row["cache"] == "cold" and disk:
            bound = max(compute, storage / (disk * 1e9))
            entry["lower_bound_s_per_token"] = bound
            entry["s_per_token_over_bound"] = row["s_per_token"] / bound if bound else None
            entry["gb_per_s_over_disk"] = row["gb_per_s"] / disk
        if resident:
            entry["tokens_per_s_over_resident"] = row["tokens_per_s"] / resident["tokens_per_s"]
        accelerate = _row(result, "accelerate", row["cache"], row["batch"])
        if accelerate:
            entry["tokens_per_s_over_accelerate"] = row["tokens_per_s"] / accelerate["tokens_per_s"]
        ratios.append(entry)
    targets: dict[str, Any] = {}
    for entry in ratios:
        if entry["batch"] != 1 or entry["kv_cache"] != "dynamic":
            continue
        if entry["cache"] == "cold":
            if entry.get("s_per_token_over_bound") is not None:
                targets["cold_s_per_token_within_1.15x_bound"] = entry["s_per_token_over_bound"] <= 1.15
            if "tokens_per_s_over_accelerate" in entry:
                targets["cold_1.8x_accelerate"] = entry["tokens_per_s_over_accelerate"] >= 1.8
        else:
            if "tokens_per_s_over_resident" in entry:
                targets["warm_0.8x_resident"] = entry["tokens_per_s_over_resident"] >= 0.8
            if "tokens_per_s_over_accelerate" in entry:
                targets["warm_2.5x_accelerate"] = entry["tokens_per_s_over_accelerate"] >= 2.5
    # issue 14's targets, per backend measured (the best backend per condition decides)
    for cache, key, check in (
        ("warm", "tokens_per_s_over_resident", ("warm_0.9x_resident", 0.9)),
        ("warm", "tokens_per_s_over_accelerate", ("warm_1.5x_accelerate", 1.5)),
        ("cold", "gb_per_s_over_disk", ("cold_0.95x_disk", 0.95)),
        ("cold", "tokens_per_s_over_accelerate", ("cold_1.0x_accelerate", 1.0)),
    ):
        values = [e[key] for e in ratios if e["batch"] == 1 and e["cache"] == cache and e.get(key) is not None
                  and e["kv_cache"] == "dynamic"]  # fmt: skip
        if values:
            targets[check[0]] = max(values) >= check[1]
    _kind_ratios(result, ratios, targets)
    anon = [r["peak_anon_rss_above_baseline"] for r in result["results"] if "peak_anon_rss_above_baseline" in r]
    if anon:
        targets["peak_anon_rss_above_baseline_bytes"] = max(anon)
        targets["peak_anon_rss_within_budget_plus_64MB"] = max(anon) <= result["budget"]["bytes"] + 64e6
    rss = [r["peak_rss_above_baseline"] for r in result["results"] if "peak_rss_above_baseline" in r]
    if rss:
        targets["peak_rss_above_baseline_bytes"] = max(rss)
        targets["peak_rss_within_budget_plus_64MB"] = max(rss) <= result["budget"]["bytes"] + 64e6
    return ratios, targets


#: Issue 12's targets for the store kinds, batch 1: bytes read per step and cold tokens/s against the plain store.
KIND_TARGETS = {"int8": (0.55, 1.6), "int4": (0.32, 2.5), "lossless": (None, 1.15)}


def _kind_ratios(result: dict[str, Any], ratios: list[dict[str, Any]], targets: dict[str, Any]) -> None:
    """Each quantized or compressed store's rows against the plain store's, same cache condition and batch.

    The plain row taken is the one with the same backend when there is one (the same read path), else the fastest.
    """
    for row in result["results"]:
        kind = row.get("store")
        if row["system"] == "tensorstream" or kind in (None, "plain"):
            continue
        plain = [
            r for r in result["results"] if r["system"] == "tensorstream" and (r["cache"], r["batch"], r.get(
                "kv_cache")) == (row["cache"], row["batch"], row.get("kv_cache"))
        ]  # fmt: skip
        if not plain:
            continue
        same = [r for r in plain if r.get("backend") == row.get("backend")]
        best = max(plain, key=lambda r: r["tokens_per_s"])
        base = same[0] if same else best
        plain_bytes = base.get("bytes_per_step")
        entry = {
            "store": kind, "cache": row["cache"], "batch": row["batch"], "backend": row.get("backend", ""),
            "kv_cache": row.get("kv_cache", "dynamic"),
            "bytes_per_step_over_plain": row["bytes_per_step"] / plain_bytes if plain_bytes else None,
            "tokens_per_s_over_plain": row["tokens_per_s"] / base["tokens_per_s"],
            "tokens_per_s_over_best_plain": row["tokens_per_s"] / best["tokens_per_s"],
        }  # fmt: skip
        ratios.append(entry)
        if row["batch"] != 1 or kind not in KIND_TARGETS or entry["kv_cache"] != "dynamic":
            continue
        max_bytes, min_cold = KIND_TARGETS[kind]
        if max_bytes is not None and entry["bytes_per_step_over_plain"] is not None:
            targets[f"{kind}_bytes_{max_bytes}x"] = entry["bytes_per_step_over_plain"] <= max_bytes
        if row["cache"] == "cold":
            targets[f"cold_{kind}_{min_cold}x_plain"] = entry["tokens_per_s_over_plain"] >= min_cold
        else:
            targets[f"warm_{kind}_no_worse_than_plain"] = entry["tokens_per_s_over_best_plain"] >= 1.0


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table with the ratios."""
    lines = [
        f"model {result['model']['bytes'] / 1e9:.2f} GB, {result['model']['blocks']} blocks; budget "
        f"{result['budget']['bytes'] / 1e9:.2f} GB ({result['budget']['fraction']:.0%}); "
        f"device {result['machine']['device']}",
        f"plan: {result['budget'].get('describe', '')}",
        (
            f"disk (best raw cold read): {result['disk']['best_gb_per_s']:.2f} GB/s "
            f"({result['disk']['best']['mode']}, {result['disk']['best']['threads']} threads)"
            if result["disk"]
            else "disk: not measured (no cold runs)"
        ),
        "",
        f"{'system':<13}{'cache':<6}{'batch':>6}{'s/token':>10}{'tokens/s':>10}{'GB/s':>8}{'waited':>8}"
        f"{'anon GB':>9}{'file GB':>9}{'tok/pass':>9}  backend",
    ]
    for row in result["results"]:
        gbps = f"{row['gb_per_s']:.2f}" if "gb_per_s" in row else "-"
        wait = f"{row['wait_fraction']:.0%}" if "wait_fraction" in row else "-"
        anon = f"{row['peak_anon_rss_above_baseline'] / 1e9:.2f}" if "peak_anon_rss_above_baseline" in row else "-"
        file = f"{row['peak_file_rss'] / 1e9:.2f}" if "peak_file_rss" in row else "-"
        per_pass = f"{row['tokens_per_pass']:.2f}" if "tokens_per_pass" in row else "-"
        kv = f" KV {row['kv_cache']}" if row.get("kv_cache", "dynamic") != "dynamic" else ""
        lines.append(
            f"{row['system']:<13}{row['cache']:<6}{row['batch']:>6}{row['s_per_token']:>10.3f}"
            f"{row['tokens_per_s']:>10.2f}{gbps:>8}{wait:>8}{anon:>9}{file:>9}{per_pass:>9}  {row.get('backend', '')}"
            + kv
            + (f" same as resident: {row['same_as_resident']}" if row.get("same_as_resident") is not None else "")
        )
        if row.get("routed_blocks"):  # mixture of experts: what a decode step read against what it needs
            runs = len(row.get("runs") or [1])
            lines.append(
                f"{'':<13}routed experts in {row['routed_blocks']} blocks: read "
                f"{row['measured_read_bytes'] / 1e9:.3f} GB over {runs} generations; active bytes per step "
                f"{row['active_bytes_per_step'] / 1e9:.3f} GB "
                f"(whole blocks {row['bytes_per_step'] / 1e9:.3f} GB); expert cache {row['expert_hits']} hits, "
                f"{row['expert_misses']} misses; prediction {row['prediction_accuracy']:.0%} used"
            )
    lines += ["", "ratios (tensorstream):"]
    for entry in result["ratios"]:
        if "store" in entry:
            lines.append(
                f"  {entry['store']} store, {entry['cache']}, batch {entry['batch']}: bytes/step / plain "
                f"{entry['bytes_per_step_over_plain'] or 0:.2f}; tokens/s / plain "
                f"{entry['tokens_per_s_over_plain']:.2f} (/ best plain {entry['tokens_per_s_over_best_plain']:.2f})"
            )
            continue
        parts = []
        for key, label in (
            ("gb_per_s_over_disk", "GB/s / disk"),
            ("s_per_token_over_bound", "s/token / lower bound"),
            ("tokens_per_s_over_resident", "tokens/s / resident"),
            ("tokens_per_s_over_accelerate", "tokens/s / accelerate"),
        ):
            if entry.get(key) is not None:
                parts.append(f"{label} {entry[key]:.2f}")
        backend = f", {entry['backend']}" if entry.get("backend") else ""
        kv = f", KV {entry['kv_cache']}" if entry.get("kv_cache", "dynamic") != "dynamic" else ""
        lines.append(f"  {entry['cache']}, batch {entry['batch']}{backend}{kv}: " + ("; ".join(parts) or "-"))
    if result["targets"]:
        lines += ["", "targets: " + ", ".join(f"{k}={v}" for k, v in result["targets"].items())]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Bar chart of tokens/s per system and cache condition (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'tensorstream[bench]'.") from None
    rows = result["results"]
    labels = [
        f"{r['system']}\n{r['cache']}, b={r['batch']}"
        + (f"\nKV {r['kv_cache']}" if r.get("kv_cache", "dynamic") != "dynamic" else "")
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.1), 4))
    colors = {"tensorstream": "#2a9d8f", "accelerate": "#e76f51", "resident": "#264653"}
    ax.bar(
        range(len(rows)), [r["tokens_per_s"] for r in rows], color=[colors.get(r["system"], "#8ab17d") for r in rows]
    )
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("decode tokens/s")
    disk = f", disk {result['disk']['best_gb_per_s']:.2f} GB/s" if result["disk"] else ""
    ax.set_title(f"{result['model']['bytes'] / 1e9:.2f} GB model, budget {result['budget']['fraction']:.0%}{disk}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (no ``0.30000000000000004`` in JSON)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value


def to_json(result: dict[str, Any], indent: int | None = None) -> str:
    """The result as JSON, floats rounded to 4 significant digits (measurement noise is larger)."""
    return json.dumps(rounded(result), indent=indent)


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(to_json(result, indent=1))
