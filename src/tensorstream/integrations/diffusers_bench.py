"""``tensorstream bench --diffusers``: seconds per denoising step of a diffusers model, streamed and not.

One run, one process, one condition after the other (as `tensorstream.bench.run_bench` does for causal LMs):

1. **resident**: diffusers' own load (``cls.from_pretrained(folder, torch_dtype=...)``), warm; its output for each
   batch is the reference the other rows are compared with (``bit_identical``: ``torch.equal``);
2. **tensorstream**: ``cls.from_pretrained(folder, device_map="tensorstream")`` with the budget, cold (the page
   cache of every store file dropped before every step) and/or warm;
3. **diffusers group offload to disk** (``compare=("diffusers",)``): diffusers' own
   ``enable_group_offload(offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=...)``, the
   least memory it offers (one block on the device at a time, the rest of the model resident), same conditions.

A denoising step is one forward of the model over fixed random inputs (`step_inputs`: for a Flux transformer 256
image and 32 text tokens). Each row has the seconds per step (median of ``runs`` steps after a warm-up step), the
bytes the step read (tensorstream: `tensorstream.stats`' ``bytes_read``; group offload: the sizes of the group files
it loaded), the peaks of the anonymous and file-backed memory, and whether the output is bit-identical to the
resident one. The result is JSON-serialisable (`tensorstream.bench.write_json`); `format_markdown` is its table.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import Config, parse_dtype
from ..errors import ConfigError

__all__ = ["STANDARD_FLUX", "build_standard_diffusers_model", "format_markdown", "run_diffusion_bench", "step_inputs"]

#: The standard diffusion benchmark model: a random Flux transformer of ~330 MB in float32 (7 double and 4 single
#: blocks of width 512), built from diffusers' own class.
STANDARD_FLUX = dict(
    patch_size=1, in_channels=16, num_layers=7, num_single_layers=4, attention_head_dim=128, num_attention_heads=4,
    joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(32, 48, 48),
)  # fmt: skip
GROUP_OFFLOAD = "diffusers group offload"
IMAGE_TOKENS, TEXT_TOKENS = 256, 32


def build_standard_diffusers_model(folder: Path, **overrides: Any) -> Path:
    """The standard diffusion benchmark model (`STANDARD_FLUX`), saved once into ``folder``."""
    if (folder / "config.json").exists():
        return folder
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model: Any = FluxTransformer2DModel(**{**STANDARD_FLUX, **overrides})
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def step_inputs(class_name: str, config: Mapping[str, Any], batch: int, dtype: torch.dtype) -> dict[str, Any]:
    """Fixed random inputs (seeded) of one denoising step of a model of ``class_name`` built from ``config``.

    Raises:
        `ConfigError`: no inputs are known for ``class_name`` (Flux, SD3, Wan, UNet2DCondition and AutoencoderKL
            models are measured).
    """
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    def first(value: Any) -> int:
        return int(value[0] if isinstance(value, list | tuple) else value)

    timestep = torch.full((batch,), 500.0)
    if class_name == "FluxTransformer2DModel":
        inputs = {
            "hidden_states": randn(batch, IMAGE_TOKENS, config["in_channels"]),
            "encoder_hidden_states": randn(batch, TEXT_TOKENS, config["joint_attention_dim"]),
            "pooled_projections": randn(batch, config["pooled_projection_dim"]),
            "timestep": (timestep / 1000).to(dtype),
            "img_ids": torch.zeros(IMAGE_TOKENS, 3),
            "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        }
        if config.get("guidance_embeds"):
            inputs["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
        return {**inputs, "return_dict": False}
    if class_name == "SD3Transformer2DModel":
        side = 16 * config["patch_size"]  # 256 tokens
        return {
            "hidden_states": randn(batch, config["in_channels"], side, side),
            "encoder_hidden_states": randn(batch, TEXT_TOKENS, config["joint_attention_dim"]),
            "pooled_projections": randn(batch, config["pooled_projection_dim"]),
            "timestep": timestep,
            "return_dict": False,
        }
    if class_name == "WanTransformer3DModel":
        frames, height, width = (p * n for p, n in zip(config["patch_size"], (4, 8, 8), strict=True))  # 256 tokens
        return {
            "hidden_states": randn(batch, config["in_channels"], frames, height, width),
            "encoder_hidden_states": randn(batch, TEXT_TOKENS, config["text_dim"]),
            "timestep": timestep.long(),
            "return_dict": False,
        }
    if class_name == "UNet2DConditionModel" and not config.get("addition_embed_type"):
        side = first(config.get("sample_size") or 64)
        return {
            "sample": randn(batch, config["in_channels"], side, side),
            "timestep": timestep.long(),
            "encoder_hidden_states": randn(batch, TEXT_TOKENS, first(config["cross_attention_dim"])),
            "return_dict": False,
        }
    if class_name == "AutoencoderKL":
        side = first(config.get("sample_size") or 256)
        return {"sample": randn(batch, config["in_channels"], side, side), "sample_posterior": False,
                "return_dict": False}  # fmt: skip
    raise ConfigError(
        f"tensorstream bench --diffusers has no denoising-step inputs for {class_name}: it measures "
        "FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel, UNet2DConditionModel (without "
        "added conditions) and AutoencoderKL. Pass one of those (or no model: the standard Flux transformer)."
    )


@contextlib.contextmanager
def _counting_group_reads() -> Iterator[list[int]]:
    """Count the bytes of the group files diffusers' group offloading loads (``safetensors.torch.load_file``)."""
    import safetensors.torch

    original = safetensors.torch.load_file
    counted = [0]

    def load_file(filename: Any, *args: Any, **kwargs: Any) -> Any:
        counted[0] += Path(filename).stat().st_size
        return original(filename, *args, **kwargs)

    safetensors.torch.load_file = load_file
    try:
        yield counted
    finally:
        safetensors.torch.load_file = original


def _steps(
    model: Any, inputs: dict[str, Any], runs: int, cold_files: Callable[[], list[Path]] | None, read: Callable[[], int]
) -> dict[str, Any]:
    """A warm-up step, then ``runs`` timed steps (the page cache of ``cold_files()`` dropped before each forward,
    but for the files a read-ahead is reading then: `tensorstream.bench.cold_steps`)."""
    from ..bench import cold_steps

    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up: the page cache, the group files, the traced execution order
        before = read()
        for _ in range(runs):
            cold: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            if cold_files is not None:
                cold = cold_steps(model, cold_files())
            with cold:
                start = time.perf_counter()
                out = model(**inputs)[0]
                times.append(time.perf_counter() - start)
    return {
        "s_per_step": statistics.median(times),
        "s_per_step_best": min(times),  # other jobs only add time: the fastest step is the least disturbed one
        "runs": times,
        "bytes_read_per_step": (read() - before) // runs,
        "output": out.detach().cpu(),
    }


def _row(system: str, cache: str, batch: int, measured: dict[str, Any], expected: torch.Tensor | None) -> dict:
    """A result row; ``bit_identical`` and ``max_abs_diff`` (to the resident output) are ``None`` without a
    reference (the resident row, or none measured)."""
    out = measured.pop("output")
    exact = None if expected is None else bool(torch.equal(out, expected))
    diff = None if expected is None else (out.double() - expected.double()).abs().max().item()
    return {"system": system, "cache": cache, "batch": batch, **measured, "bit_identical": exact, "max_abs_diff": diff}


def run_diffusion_bench(
    source: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] | None = None,
    budget_fraction: float = 0.25,
    budget_gb: float | None = None,
    device: str | None = None,
    batches: Sequence[int] = (1,),
    runs: int = 3,
    caches: Sequence[str] = ("cold", "warm"),
    compare: Sequence[str] = (),
    resident: bool = True,
    config: Config | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Seconds per denoising step of a diffusers model: resident, tensorstream and diffusers' group offloading.

    Args:
        source: a diffusers model folder or Hub id (a pipeline's ``transformer`` or ``unet`` subfolder);
            ``None`` builds the standard model (`STANDARD_FLUX`, ~330 MB) in ``workdir``.
        workdir: where the standard model, the stores and the group files live (default: ``<storage_path>/bench``).
        budget_fraction, budget_gb: tensorstream's weights budget, as a fraction of the model or in GB.
        device: the execution device (default: `Config`'s default).
        batches: latent batch sizes.
        runs: timed steps per condition (after a warm-up step); the median is reported.
        caches: ``"cold"`` (page cache of the store or group files dropped before every step) and/or ``"warm"``.
        compare: ``("diffusers",)`` to also measure diffusers' group offloading to disk (block level, one block
            per group).
        resident: measure the resident model; without it no row is checked for bit-identity.
        config: base `Config` (its ``storage_path``, ``dtype``, ``backend``... are used).
        progress: called with a line of text as each measurement starts.

    Returns:
        A JSON-serialisable dict: ``kind`` (``"diffusion"``), ``machine``, ``model``, ``budget``, ``settings``,
        ``results`` (one row per system, cache condition and batch) and ``ratios``.

    Example:
        ```python
        >>> result = run_diffusion_bench(compare=["diffusers"], caches=["warm"])
        >>> print(format_markdown(result))
        ```
    """
    from ..bench import _check_budget, _MemorySampler, bench_settings, cache_config, unmap_when_cold
    from ..reshard import reshard
    from ..store import Store, read_config
    from ..stream import ENGINE_ATTR
    from .diffusers_reshard import model_class_of
    from .hub import resolve_source

    say = progress or (lambda line: None)
    load_before = os.getloadavg()[0]  # the step times are only as steady as the machine: reported with them
    unknown = [name for name in compare if name != "diffusers"]
    if unknown:
        raise ConfigError(f"compare={list(compare)}: a diffusion model is compared with 'diffusers' only.")
    if not caches or any(cache not in ("cold", "warm") for cache in caches):
        raise ConfigError(f"caches={list(caches)}: each must be 'cold' or 'warm'.")
    if not batches:
        raise ConfigError("batches=[]: measure at least one batch size.")
    base, work = bench_settings(config, device, workdir)
    run_device = base.execution_device
    if source is None:
        say("standard diffusion model (random Flux transformer, ~330 MB fp32, 11 blocks)")
        source = build_standard_diffusers_model(work / "standard-flux-330mb")
    folder = resolve_source(source)
    model_config = read_config(folder / "config.json", folder)
    cls = model_class_of(model_config, None, folder)
    dtype = parse_dtype(base.dtype) or torch.float32
    step = {
        batch: {k: v.to(run_device) if isinstance(v, torch.Tensor) else v
                for k, v in step_inputs(cls.__name__, model_config, batch, dtype).items()}
        for batch in batches
    }  # fmt: skip
    storage = base.store_root if config is not None else work / "stores"
    store = Store.open(reshard(folder, storage, dtype=base.dtype, progress=False))
    budget = round(budget_gb * 1e9) if budget_gb is not None else round(budget_fraction * store.total_bytes)
    _check_budget(store, budget, base.prefetch)
    dtype_kwargs = {"torch_dtype": parse_dtype(base.dtype)} if base.dtype is not None else {}
    streaming = base.replace(storage_path=storage, budget_gb=budget / 1e9)
    results: list[dict[str, Any]] = []
    expected: dict[int, torch.Tensor] = {}
    plans: list[Any] = []

    def measure(
        system: str,
        load: Callable[[str], Any],
        conditions: Sequence[str],
        files: Callable[[], list[Path]] | None,
        read: Callable[[Any], int],
    ) -> None:
        for cache in conditions:
            say(f"{system}, {cache} cache")
            gc.collect()
            sampler = _MemorySampler()
            model = load(cache)
            for batch in batches:
                cold = files if cache == "cold" else None
                measured = _steps(model, dict(step[batch]), runs, cold, functools.partial(read, model))
                if system == "resident":
                    expected[batch] = measured["output"]
                reference = None if system == "resident" else expected.get(batch)
                results.append(_row(system, cache, batch, measured, reference))
            memory = sampler.close()
            for row in results[-len(batches) :]:
                row.update(memory)
            del model
            gc.collect()

    if resident:
        measure("resident", lambda _: cls.from_pretrained(folder, **dtype_kwargs).to(run_device), ["warm"], None,
                lambda _: 0)  # fmt: skip

    def streamed(cache: str) -> Any:
        settings = cache_config(streaming, cache, store.path, store.total_bytes)
        model = cls.from_pretrained(folder, device_map="tensorstream", tensorstream_config=settings)
        unmap_when_cold(getattr(model, ENGINE_ATTR), cache)
        plans.append(getattr(model, ENGINE_ATTR).plan)
        return model

    def stats_read(model: Any) -> int:
        from .. import stats

        for load in list(getattr(model, ENGINE_ATTR).pipeline.values()):  # the read-ahead in flight, counted once done
            load.done.wait()
        return stats(model).bytes_read

    store_files = [store.file(entry) for entry in store.entries()]
    measure("tensorstream", streamed, caches, lambda: store_files, stats_read)
    if "diffusers" in compare:
        with tempfile.TemporaryDirectory(dir=work) as groups, _counting_group_reads() as counted:

            def grouped(_: str) -> Any:
                model = cls.from_pretrained(folder, **dtype_kwargs)
                model.enable_group_offload(
                    onload_device=run_device,
                    offload_device=torch.device("cpu"),
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    offload_to_disk_path=groups,
                )
                return model

            measure(GROUP_OFFLOAD, grouped, caches, lambda: sorted(Path(groups).glob("*.safetensors")),
                    lambda _: counted[0])  # fmt: skip
    plan = plans[0]
    result: dict[str, Any] = {
        "kind": "diffusion",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": str(run_device), "threads": torch.get_num_threads(),
                    "load_average_1min": [load_before, os.getloadavg()[0]],
                    "gpu": torch.cuda.get_device_name(run_device) if run_device.type == "cuda" else None},
        "model": {"source": str(source), "class": cls.__name__, "store": str(store.path), "bytes": store.total_bytes,
                  "blocks": len(store.blocks), "dtype": store.manifest.get("dtype")},
        "budget": {"bytes": budget, "fraction": budget / store.total_bytes, "streamed_blocks": len(plan.streamed),
                   "resident_blocks": len(plan.resident), "streamed_bytes_per_step": plan.streamed_bytes,
                   "describe": plan.describe()},
        "settings": {"batches": list(batches), "runs": runs, "caches": list(caches), "compare": list(compare),
                     "inputs": {k: list(v.shape) for k, v in step[batches[0]].items() if isinstance(v, torch.Tensor)}},
        "results": results,
    }  # fmt: skip
    result["ratios"] = _ratios(result)
    return result


def _ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per streamed or offloaded row: s/step (median, and best) ÷ resident's, tensorstream's ÷ group offload's (same
    cache, batch), bytes read ÷ tensorstream's streamed bytes."""
    rows = result["results"]
    streamed = result["budget"]["streamed_bytes_per_step"]

    def find(system: str, cache: str, batch: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["system"], r["cache"], r["batch"]) == (system, cache, batch)), None)

    ratios = []
    for row in rows:
        if row["system"] == "resident":
            continue
        entry: dict[str, Any] = {"system": row["system"], "cache": row["cache"], "batch": row["batch"]}
        entry["read_over_streamed"] = row["bytes_read_per_step"] / streamed if streamed else None
        resident = find("resident", "warm", row["batch"])
        if resident:
            entry["s_per_step_over_resident"] = row["s_per_step"] / resident["s_per_step"]
            entry["best_s_per_step_over_resident"] = row["s_per_step_best"] / resident["s_per_step_best"]
        grouped = find(GROUP_OFFLOAD, row["cache"], row["batch"])
        if row["system"] == "tensorstream" and grouped:
            entry["s_per_step_over_group_offload"] = row["s_per_step"] / grouped["s_per_step"]
        ratios.append(entry)
    return ratios


def format_markdown(result: dict[str, Any]) -> str:
    """The result as a heading line and a Markdown table (what docs/diffusers.md shows)."""
    budget = result["budget"]
    model = result["model"]
    lines = [
        f"{model['class']} {model['bytes'] / 1e9:.3f} GB ({model['dtype'] or 'checkpoint dtype'}), "
        f"{model['blocks']} blocks; budget {budget['bytes'] / 1e9:.3f} GB ({budget['fraction']:.0%}): "
        f"{budget['streamed_blocks']} blocks streamed, {budget['streamed_bytes_per_step'] / 1e6:.0f} MB per step; "
        f"device {result['machine']['device']}, {result['machine']['threads']} threads, load average "
        + " -> ".join(f"{load:.1f}" for load in result["machine"]["load_average_1min"]),
        "",
        "| way | cache | batch | s / step (median) | s / step (best) | best vs resident | read / step | "
        "/ streamed bytes | bit-identical | peak anonymous memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ratios = {(r["system"], r["cache"], r["batch"]): r for r in result["ratios"]}
    for row in result["results"]:
        ratio = ratios.get((row["system"], row["cache"], row["batch"]), {})
        over = ratio.get("best_s_per_step_over_resident")
        read = ratio.get("read_over_streamed")
        exact = "-" if row["bit_identical"] is None else "yes" if row["bit_identical"] else "**no**"
        if row["bit_identical"] is False:
            exact += f" (max diff {row['max_abs_diff']:.1e})"
        lines.append(
            f"| {row['system']} | {row['cache']} | {row['batch']} | {row['s_per_step']:.3f} | "
            f"{row['s_per_step_best']:.3f} | {'-' if over is None else f'{over:.2f}'} | "
            f"{row['bytes_read_per_step'] / 1e6:.0f} MB | "
            f"{'-' if read is None else f'{read:.2f}'} | {exact} | "
            f"{row['peak_anon_rss_above_baseline'] / 1e6:.0f} MB |"
        )
    return "\n".join(lines)


def bench_command(args: Any) -> int:
    """``tensorstream bench --diffusers`` (or a diffusers model folder): ``args`` are the bench command's."""
    from ..bench import to_json, write_json

    flags = (("--assistant", args.assistant), ("--kv-cache", args.kv_cache), ("--quantize", args.quantize),
             ("--compression", args.compression), ("--plot", args.plot), ("--backend", args.backend),
             ("--compare accelerate", "accelerate" in args.compare))  # fmt: skip
    unused = [flag for flag, value in flags if value]
    if unused:
        raise ConfigError(
            f"{', '.join(unused)} measure{'s' if len(unused) == 1 else ''} causal language models; a diffusers model "
            "is measured per denoising step (docs/diffusers.md): drop it."
        )
    result = run_diffusion_bench(
        args.model,
        workdir=args.workdir,
        budget_fraction=args.budget_fraction,
        budget_gb=args.budget_gb,
        device=args.device,
        batches=tuple(args.batch or (1,)),
        runs=args.runs,
        caches=tuple(args.cache or ("cold", "warm")),
        compare=tuple(args.compare),
        resident=not args.no_resident,
        progress=None if args.json else (lambda line: print(f"... {line}", file=sys.stderr, flush=True)),
    )
    write_json(result, args.out)
    print(to_json(result) if args.json else f"{format_markdown(result)}\n\nwrote {args.out}")
    return 0
