"""Start and stop streaming on a model: `offload`, `detach`, `stats`, and the setup both entry points share.

``from_pretrained(..., device_map="tensorstream")`` (see `tensorstream.integrations.transformers`) and
`offload` both end in `start_streaming`: plan the budget, build the engine, attach one hook per streamed block.

A streaming model refuses what it cannot do correctly, at the call and leaving the model usable:
``model.to(dtype)``, ``.half()``, ``.float()``, ``.bfloat16()``, ``.to(other device)``, ``.cuda()``, ``.cpu()``
(when they would change a dtype or device) raise `UnsupportedOperationError` before any tensor is touched; a
call that changes nothing (``model.to(model.device)``, ``model.eval()``) is accepted.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .binding import (
    StateGuard,
    bind_expanded,
    block_memory,
    expands_from_mapping,
    guard_of,
    install_placeholders,
    load_resident_blocks,
    maps_store,
)
from .config import Config, parse_dtype
from .engine import Engine
from .errors import BudgetError, ConfigError, NotStreamingError, StaleStoreError, UnsupportedOperationError
from .experts import routed_layouts
from .hooks import attach_hooks, remove_hooks
from .integrations.diffusers_reshard import kept_in_fp32
from .plan import Plan, auto_budget_bytes, find_blocks, format_gb, gb_rounded_up, log_plan, make_plan
from .prequantized import check_offload, describe_quantization
from .reshard import reshard_module
from .stats import StreamStats
from .store import Store, repair_hint

__all__ = ["check_device", "detach", "offload", "plan_for", "start_streaming", "stats"]

logger = logging.getLogger(__name__)
ENGINE_ATTR = "_tensorstream_engine"


def check_device(device: torch.device) -> None:
    """Raise `ConfigError` for a device this machine does not have; warn once for non-CUDA accelerators."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device={str(device)!r} but this machine has no usable CUDA device; use device='cpu' "
                "(or unset TENSORSTREAM_DEVICE to pick automatically)."
            )
        if (device.index or 0) >= count:
            raise ConfigError(
                f"device={str(device)!r} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}."
            )
    elif device.type not in ("cpu", "meta"):
        warnings.warn(
            f"device={str(device)!r}: tensorstream streams into {device.type} through host staging with a blocking "
            "copy per block (no copy/compute overlap); CUDA and CPU have the fast paths.",
            UserWarning,
            stacklevel=3,
        )


def plan_for(store: Store, config: Config) -> Plan:
    """The plan for ``store`` under ``config``'s budget (sized from free memory when ``budget_gb`` is None)."""
    check_device(config.execution_device)
    budget = config.budget_bytes
    if budget is None:
        budget = auto_budget_bytes(config.execution_device)
        logger.info("tensorstream: budget_gb not set; using %.2f GB (80%% of free memory)", budget / 1e9)
    # a block of a quantized or compressed store takes its expanded, compact and scratch bytes in memory (without the
    # compact ones when the CPU expands it straight from a mapping of its file)
    mapped = expands_from_mapping(config, store)
    blocks = [(entry.name, block_memory(store.codec(entry), mapped)) for entry in store.blocks]
    host_cache = round(config.host_cache_gb * 1e9)
    device = config.execution_device
    if host_cache and device.type != "cuda":
        warnings.warn(
            f"host_cache_gb={config.host_cache_gb} is ignored on {device}: the host cache tier sits between storage "
            "and a GPU; on this device the budget already is the memory blocks are read into.",
            UserWarning,
            stacklevel=3,
        )
        host_cache = 0
    units = store.manifest.get("units", [])
    plan = _plan_with_experts(store, config, blocks, budget, host_cache, units)
    reason = store.manifest.get("whole_block_experts")
    plan = dataclasses.replace(
        plan,
        units=tuple(units),
        non_block_parts=_non_block_parts(store),
        whole_block_reason=reason if isinstance(reason, str) and store.kind is None else "",
        read_bytes={entry.name: entry.data_size for entry in store.blocks} if store.kind is not None else {},
        quantization=describe_quantization(store.manifest) or "",
    )
    log_plan(plan, config.prefetch)
    return plan


def _plan_with_experts(
    store: Store, config: Config, blocks: list[tuple[str, int]], budget: int, host_cache: int, units: list[str]
) -> Plan:
    """`make_plan`, with the routed experts of mixture-of-experts blocks as a unit kind of their own.

    A streamed block whose experts are routed (`tensorstream.experts.routed_layouts`) takes its size without the
    experts in the arena. Unless its store is mapped on the CPU (where the page cache holds experts), the budget
    also holds a buffer that gathers one layer's routed experts (as large as all experts of the largest layer, for a
    long prompt) and the expert cache: ``expert_cache_gb`` if given, else what the plan leaves over.
    """
    mapped = maps_store(config, store)
    # gathered experts keep the resident phases only when each expert's slice is a multiple of 64 bytes
    every = routed_layouts(store)
    layouts = {name: layout for name, layout in every.items() if mapped or layout.gathers_exactly}

    def whole_blocks() -> Plan:
        return make_plan(
            store.non_block.data_size,
            blocks,
            budget,
            config.prefetch,
            host_cache_bytes=host_cache,
            prefer_resident=units,
        )

    if not layouts or not config.routed_experts:
        return whole_blocks()
    whole_error: BudgetError | None = None
    try:
        plain: Plan | None = whole_blocks()
    except BudgetError as err:  # too small for whole blocks; routed blocks may still fit
        plain, whole_error = None, err
    if plain is not None and not plain.streamed:
        return plain
    loads = {name: -(-layout.prefix_bytes // 4096) * 4096 for name, layout in layouts.items()}
    work = 0 if mapped else max(layout.all_bytes for layout in layouts.values())
    wanted = round(config.expert_cache_gb * 1e9) if config.expert_cache_gb is not None and not mapped else 0
    try:
        plan = make_plan(
            store.non_block.data_size,
            blocks,
            budget - work - wanted,
            config.prefetch,
            host_cache_bytes=host_cache,
            prefer_resident=units,
            stream_sizes=loads,
        )
    except BudgetError as err:
        if plain is not None:  # whole blocks fit where gathering experts does not
            return plain
        minimum = None if err.minimum_bytes is None else err.minimum_bytes + work + wanted
        whole_minimum = None if whole_error is None else whole_error.minimum_bytes
        if whole_error is not None and whole_minimum is not None and minimum is not None and whole_minimum <= minimum:
            raise whole_error from None  # streaming whole blocks needs less: that is the minimum
        if minimum is None:
            raise
        suggested = gb_rounded_up(minimum)
        extra = f" and {format_gb(wanted)} of expert cache (expert_cache_gb)" if wanted else ""
        raise BudgetError(
            f"budget_gb={budget / 1e9:.6g} is too small for this mixture-of-experts model: it needs at least "
            f"{suggested} GB (the non-block weights and the streamed blocks without their experts "
            f"{format_gb(err.minimum_bytes or 0)}, a buffer that gathers one layer's routed experts {format_gb(work)}"
            f"{extra}). Raise budget_gb (or TENSORSTREAM_BUDGET_GB) to at least {suggested}.",
            minimum,
            round(float(suggested) * 1e9),
        ) from None
    routed = tuple(name for name in plan.streamed if name in layouts)
    if not routed:
        return plain if plain is not None else whole_blocks()
    if len(layouts) < len(every):
        logger.info(
            "tensorstream: %d blocks' expert slices are not multiples of 64 bytes: gathering them would move them "
            "off the address phase the resident model computes with, so they stream whole (backend='mmap' on CPU "
            "routes them)",
            len(every) - len(layouts),
        )
    slot = max(layouts[name].slot_bytes for name in routed)
    if mapped:
        cache = 0
    elif config.expert_cache_gb is not None:
        cache = wanted
    else:
        cache = max(budget - plan.device_bytes - work, 0)
    cache = min(cache, sum(layouts[name].num_experts for name in routed) * slot) // slot * slot
    return dataclasses.replace(
        plan,
        routed=routed,
        stream_bytes={name: loads[name] for name in routed},
        expert_mode="mapped" if mapped else "slots",
        expert_work_bytes=work,
        expert_cache_bytes=cache,
        expert_slot_bytes=slot,
    )


def _non_block_parts(store: Store, limit: int = 8) -> tuple[tuple[str, int, str], ...]:
    """The largest non-block parts, with why each is not streamed: as the reshard recorded them in the manifest.

    A store written before the manifest recorded them: the non-block file's tensors grouped by module.
    """
    recorded = store.manifest.get("resident_parts")
    if isinstance(recorded, list) and all(
        isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and type(p[1]) is int and isinstance(p[2], str)
        for p in recorded
    ):
        return tuple((name, size, why) for name, size, why in recorded[:limit])
    groups: dict[str, int] = {}
    for name, info in store.header(store.non_block).tensors.items():
        module = name.rpartition(".")[0] or name
        groups[module] = groups.get(module, 0) + info.nbytes
    largest = sorted(groups.items(), key=lambda item: -item[1])[:limit]
    return tuple((name, size, "outside the streamed units") for name, size in largest if size)


def start_streaming(model: nn.Module, store: Store, plan: Plan, config: Config) -> Engine:
    """Build the engine for ``model`` and attach the hooks; the streamed blocks' parameters must be on meta."""
    modules = {}
    for name in plan.streamed:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise StaleStoreError(
                f"the store {store.path} streams the block {name!r}, which this {type(model).__name__} does not have: "
                f"the store was built for a different model or configuration; {repair_hint(store.path)}"
            ) from None
    resident = [name for name in plan.resident if store.codec(_entry(store, name)).needs_binding]
    if resident:  # an encoded store's resident blocks: expanded here, as the engine expands the streamed ones
        load_resident_blocks(
            store, resident, {n: model.get_submodule(n) for n in resident}, config.execution_device, config.verify
        )
    engine = Engine(store, plan, modules, config)
    install_placeholders(model, engine.blocks, engine.device)
    StateGuard(
        model, engine.blocks, engine.device
    )  # every later change to the weights passes through it (see `guard_of`)
    attach_hooks(model, engine)
    _guard_casts(model, engine)
    if any(store.codec(entry).rules for entry in store.blocks) and callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained = _RefusedSave(type(model).__name__)  # type: ignore[assignment]
    setattr(model, ENGINE_ATTR, engine)
    logger.info(
        "tensorstream: streaming %d of %d blocks from %s into %s with the %s backend",
        len(plan.streamed),
        len(plan.streamed) + len(plan.resident),
        store.path,
        engine.device,
        engine.backend.name,
    )
    return engine


def _entry(store: Store, name: str) -> Any:
    return next(entry for entry in store.blocks if entry.name == name)


def _engine(model: nn.Module) -> Engine:
    engine = getattr(model, ENGINE_ATTR, None)
    if engine is None:
        raise NotStreamingError(
            f"this {type(model).__name__} is not streaming; load it with from_pretrained(..., "
            "device_map='tensorstream') or call tensorstream.offload(model)."
        )
    return engine


def stats(model: nn.Module) -> StreamStats:
    """What tensorstream did for ``model``: bytes read, GB/s, prefetch hits, synchronous loads, time waited.

    Raises:
        `NotStreamingError`: ``model`` is not streaming.

    Example:
        ```python
        >>> model.generate(**inputs, max_new_tokens=20)
        >>> print(tensorstream.stats(model))
        StreamStats(read 2.41 GB in 240 block loads at 1.21 GB/s, 238 prefetch hits, 2 sync loads, ...)
        ```
    """
    return _engine(model).stats


def _owner(name: str, blocks: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in blocks:
            return prefix
    return None


def offload(model: nn.Module, config: Config | None = None) -> nn.Module:
    """Stream a model that is already loaded in memory; frees the streamed blocks' RAM.

    The model is resharded from its in-memory weights into ``config.storage_path`` (reused when the same
    weights were resharded before), non-block weights and the blocks the budget can hold are moved to
    ``config.device``, and every other block streams from the store.

    Args:
        model (`torch.nn.Module`): a transformers model (or any model with a stack of repeated blocks).
        config (`Config`, *optional*): defaults to `Config.from_env()`; fields it was not given come from the
            ``TENSORSTREAM_*`` variables (`Config.with_env`).

    Returns:
        `torch.nn.Module`: the same model, streaming.

    Example:
        ```python
        >>> model = AutoModelForCausalLM.from_pretrained("./my-llama")
        >>> model = tensorstream.offload(model, tensorstream.Config(budget_gb=1, device="cpu"))
        >>> model.generate(**inputs)
        ```
    """
    config = config.with_env() if config is not None else Config.from_env()  # given fields win, env fills the rest
    check_device(config.execution_device)  # before any reshard
    if getattr(model, ENGINE_ATTR, None) is not None:
        raise ConfigError(f"this {type(model).__name__} is already streaming; call tensorstream.detach(model) first.")
    find_blocks(model)  # fail early, before writing anything, on a model without blocks
    check_offload(model)  # a quantized model's own parameter classes would be lost: refused, typed
    store = Store.open(
        reshard_module(model, config.store_root, dtype=config.dtype, kind=config.kind), verify=config.verify
    )
    plan = plan_for(store, config)
    # an encoded store's blocks all leave memory: the resident ones come back expanded from the store
    streamed = set(plan.streamed) | {entry.name for entry in store.blocks if store.codec(entry).needs_binding}
    device, dtype = config.execution_device, parse_dtype(config.dtype)
    keep = kept_in_fp32(model) if dtype is not None else None  # as the reshard converted them
    moved: dict[int, torch.Tensor] = {}

    def convert(tensor: torch.Tensor, to_meta: bool, name: str) -> torch.Tensor:
        if id(tensor) not in moved:  # tied tensors stay tied
            target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            if keep is not None and tensor.is_floating_point() and keep(name):
                target_dtype = torch.float32
            if to_meta and type(tensor) not in (torch.Tensor, nn.Parameter):  # a quantized tensor subclass
                data = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")  # rebuilt by its binding rule
            else:
                data = tensor.detach().to(device="meta" if to_meta else device, dtype=target_dtype)
            moved[id(tensor)] = nn.Parameter(data, requires_grad=False) if isinstance(tensor, nn.Parameter) else data
        return moved[id(tensor)]

    with torch.no_grad():
        for module_name, module in model.named_modules():
            in_streamed = _owner(module_name, streamed) is not None
            prefix = f"{module_name}." if module_name else ""
            for attr, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[attr] = convert(param, in_streamed, prefix + attr)
            for attr, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[attr] = convert(buffer, False, prefix + attr)
    moved.clear()
    start_streaming(model, store, plan, config)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Stop streaming: load every streamed block into memory on the execution device and remove the hooks.

    Raises:
        `NotStreamingError`: ``model`` is not streaming.

    Example:
        ```python
        >>> model = tensorstream.detach(model)   # now an ordinary, fully resident model
        ```
    """
    engine = _engine(model)
    with engine.lock:
        # read everything first: a failure leaves the model streaming, unchanged. An encoded block is expanded on
        # the device by the function the slots run, so the model computes with the weights the stream computed with;
        # off the CPU, each tensor sits at a 64-byte aligned place, as the engine binds them.
        loaded = [(block.targets, engine.read_block(block, engine.device)) for block in engine.blocks]
        engine.close()
        guard = guard_of(model)
        if guard is not None:
            guard.release(model)
        for targets, data in loaded:
            bind_expanded(targets, data, engine.realign)
        _unguard_casts(model)
        remove_hooks(model, engine)
        delattr(model, ENGINE_ATTR)
    return model


class _CastGuard:
    """A module's ``_apply`` on a streaming model: refuse a dtype or device change, skip the meta placeholders.

    ``to``, ``half``, ``float``, ``cuda``, ``cpu``, ``type`` and ``to_empty`` all go through ``_apply``, which a
    parent calls on each child: the guard probes ``fn`` on an empty tensor of every (dtype, device) the module
    holds before anything changes, so a refused call changes nothing.
    """

    def __init__(self, module: nn.Module, engine: Engine) -> None:
        self._module = weakref.ref(module)
        self._engine = weakref.ref(engine)

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        module = self._module()
        engine = self._engine()
        if module is None or engine is None:
            raise ReferenceError("the module of this _apply was deleted")
        device = engine.device
        kinds = {(t.dtype, device if t.is_meta else t.device) for t in _tensors(module, recurse)}
        for dtype, where in sorted(kinds, key=str):
            probe = fn(torch.empty(0, dtype=dtype, device=where))
            if probe.dtype != dtype or probe.device != where:
                raise UnsupportedOperationError(
                    f"this call would change a streaming {type(module).__name__}'s {dtype} tensors on {where} into "
                    f"{probe.dtype} on {probe.device}; a streaming model keeps the dtype of its store and the device "
                    "of its Config. Load it again with from_pretrained(..., device_map='tensorstream', "
                    "dtype=..., tensorstream_config=tensorstream.Config(device=...)), or call "
                    "tensorstream.detach(model) first to make it an ordinary resident model. The model is unchanged."
                )
        with engine.lock:
            return type(module)._apply(module, lambda t: t if t.is_meta else fn(t), recurse)


def _tensors(module: nn.Module, recurse: bool) -> list[torch.Tensor]:
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return [t for t in tensors if t is not None]


def _guard_casts(model: nn.Module, engine: Engine) -> None:
    for module in model.modules():
        module._apply = _CastGuard(module, engine)  # type: ignore[method-assign]


def _unguard_casts(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("_apply"), _CastGuard):
            del module._apply
    if isinstance(model.__dict__.get("save_pretrained"), _RefusedSave):
        del model.save_pretrained


class _RefusedSave:
    """``save_pretrained`` of a streaming model whose store holds quantized tensors (binding rules): refused, typed.
    transformers writes torchao's tensors only for a model it quantized itself (its quantizer flattens them)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedOperationError(
            f"save_pretrained of this streaming {self.model_name}: its weights are quantized tensors (an int8/int4 "
            "store, or a torchao checkpoint), which transformers writes only for a model it quantized itself. Save "
            "the source checkpoint instead (the store is built from it), or stream the plain store to save plain "
            "weights. Nothing was written."
        )
