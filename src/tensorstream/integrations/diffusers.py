"""``from_pretrained(..., device_map="tensorstream")`` on diffusers models and pipelines.

``import tensorstream`` wraps ``ModelMixin.from_pretrained`` and ``DiffusionPipeline.from_pretrained`` the moment
diffusers' modules are imported (diffusers itself is never imported by tensorstream). With any other ``device_map``
the wrappers call diffusers untouched. With ``"tensorstream"``, a model:

1. is resharded from its checkpoint into the store (`reshard_diffusers`: once; later loads reuse it). The model is
   built empty from its config and each block's tensors are read one at a time from the safetensors (or ``.bin``)
   files and converted as diffusers' own loader converts them: to ``torch_dtype``, except the modules the class
   keeps in float32 (``_keep_in_fp32_modules``), or, without a dtype, to the dtype the model is built in. Memory is
   bounded by about one block. The store holds each tensor at the address phase a resident load gives it,
2. is planned under the budget (as for transformers models), built empty, and given its resident weights from the
   store (views of the store's files on the CPU); the streamed blocks stay on the meta device and the engine's
   hooks bind them when they run,
3. learns the order its blocks run in at its first forward, from a trace of that forward on an empty copy of the
   model (no weight is read): the read-ahead follows the execution order from the first step, not the order the
   blocks are registered in (a UNet's attentions are registered before the resnets they run after).

A pipeline (``DiffusionPipeline.from_pretrained(repo, device_map="tensorstream")``) streams its large model
components (see `streamed_components`) and loads the others the usual way; the budget is shared (`load_pipeline`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, parse_dtype
from ..errors import BudgetError, ConfigError, FormatError, StaleStoreError
from ..plan import auto_budget_bytes
from ..store import Store, read_config, repair_hint
from ..stream import check_device, plan_for, start_streaming
from . import wrap_classmethod
from .diffusers_reshard import reshard_diffusers, skeleton
from .hub import is_preshard, resolve_source

__all__ = [
    "DEVICE_MAP",
    "install_models",
    "install_pipelines",
    "load_pipeline",
    "streamed_components",
]

logger = logging.getLogger(__name__)
DEVICE_MAP = "tensorstream"
_HUB_KWARGS = ("cache_dir", "revision", "local_files_only", "token", "subfolder")
_IGNORED_HUB_KWARGS = ("force_download", "proxies", "use_safetensors")
_UNSUPPORTED_KWARGS = {
    "max_memory": "set the budget with tensorstream_config=tensorstream.Config(budget_gb=...)",
    "offload_folder": "set where stores live with tensorstream_config=tensorstream.Config(storage_path=...)",
    "offload_state_dict": "nothing is offloaded through a state dict with tensorstream",
    "quantization_config": "use tensorstream's own store kinds: tensorstream.Config(quantize='int8')",
    "parallel_config": "parallelism does not combine with streaming; run one process per GPU instead",
    "use_flashpack": "FlashPack checkpoints are not supported; pass the safetensors checkpoint",
    "output_loading_info": "a streamed model loads every weight from its store, or raises",
    "ignore_mismatched_sizes": "a store holds exactly the checkpoint's tensors",
}
#: A pipeline component streams when its weights are at least this fraction of the largest component's.
STREAM_FRACTION = 1 / 8


# -- models ---------------------------------------------------------------------------------------------------


def install_models(module: Any) -> None:
    """Wrap ``ModelMixin.from_pretrained`` of diffusers' ``modeling_utils`` ``module`` (idempotent)."""

    def make(original: Any) -> Any:
        def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
            ts_config = kwargs.pop("tensorstream_config", None)
            if kwargs.get("device_map") != DEVICE_MAP:
                if ts_config is not None:
                    raise ConfigError(
                        "tensorstream_config= is only used with device_map='tensorstream'; add "
                        "device_map='tensorstream' or drop tensorstream_config."
                    )
                return original(cls, pretrained_model_name_or_path, **kwargs)
            return load_model(cls, pretrained_model_name_or_path, kwargs, ts_config)

        return from_pretrained

    wrap_classmethod(module.ModelMixin, "from_pretrained", make)


def _resolve_config(config: Any) -> Config:
    if config is None:
        config = Config.from_env()
    if not isinstance(config, Config):
        raise ConfigError(f"tensorstream_config must be a tensorstream.Config, not {type(config).__name__}.")
    config = config.with_env()  # the fields given win; TENSORSTREAM_* variables fill the rest
    check_device(config.execution_device)  # before anything is downloaded or resharded
    return config


def load_model(cls: Any, source: str | os.PathLike[str], kwargs: dict[str, Any], config: Any) -> Any:
    """The ``device_map="tensorstream"`` path of ``ModelMixin.from_pretrained`` (see the module docstring)."""
    from .transformers import _requested_dtype

    config = _resolve_config(config)
    kwargs.pop("device_map")
    for name, fix in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) not in (None, False):
            raise ConfigError(f"from_pretrained({name}=...) is not used with device_map='tensorstream': {fix}.")
        kwargs.pop(name, None)
    if kwargs.pop("low_cpu_mem_usage", None) is False:
        raise ConfigError(
            "low_cpu_mem_usage=False loads the whole model in RAM; drop it with device_map='tensorstream'."
        )
    dtype = _requested_dtype(kwargs, config)
    hub = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
    for name in _IGNORED_HUB_KWARGS:
        kwargs.pop(name, None)
    variant = kwargs.pop("variant", None)
    if kwargs:
        raise ConfigError(
            f"from_pretrained({', '.join(f'{k}=...' for k in sorted(kwargs))}) is not supported with "
            "device_map='tensorstream' (the config comes from the checkpoint as it is); drop it."
        )
    folder = resolve_source(source, **hub)
    if is_preshard(folder):
        store = Store.open(folder, verify=config.verify)
        if store.model_class != cls.__name__:
            raise ConfigError(
                f"{folder} is a store of {store.model_class}, not of {cls.__name__}; load it with that class."
            )
    else:
        store_path = reshard_diffusers(
            folder, config.store_root, source=source, dtype=dtype, kind=config.kind, model_class=cls, variant=variant
        )
        store = Store.open(store_path, verify=config.verify)
    plan = plan_for(store, config)
    streamed = set(plan.streamed)
    if config.verify == "checksum":  # resident weights are read once, here: check them first
        store.verify_checksums(e for e in store.entries() if e.name not in streamed)
    store_config = read_config(store.path / "config.json", store.path)
    model = skeleton(cls, store_config, parse_dtype(store.manifest.get("dtype")))
    _bind_resident(model, store, streamed, config.execution_device, config.verify)
    model.eval()
    engine = start_streaming(model, store, plan, config)
    model.register_to_config(_name_or_path=str(source))
    if len(plan.streamed) > 1:
        _learn_order_at_first_forward(model, engine, cls, store_config, [*plan.resident, *plan.streamed])
    return model


def _bind_resident(model: nn.Module, store: Store, streamed: set[str], device: torch.device, verify: str) -> None:
    """Give ``model`` every tensor outside the ``streamed`` blocks from the store; streamed ones get meta placeholders
    of the store's dtype (a module kept in float32 is float32 there).

    Plain files are opened with safetensors, as diffusers' loader opens a checkpoint: on the CPU each tensor is a view
    of the file's memory map (at the phase the reshard gave it), elsewhere a copy on the device. An encoded store's
    resident blocks are expanded by `tensorstream.engine.load_resident_blocks`.
    """
    from safetensors import safe_open

    from ..binding import load_resident_blocks

    tied = store.manifest.get("tied", {})
    prefixes = tuple(f"{name}." for name in streamed)
    encoded = {entry.name for entry in store.blocks if store.codec(entry).needs_binding and entry.name not in streamed}
    located: dict[str, Any] = {}
    for entry in store.entries():
        for name, info in store.codec(entry).logical.items():
            located[name] = (entry, info)
    handles: dict[str, Any] = {}
    made: dict[int, Any] = {}
    for name, placeholder in model.state_dict(keep_vars=True).items():
        key = tied.get(name, name)
        if key not in located:
            raise StaleStoreError(
                f"{name} is not in the store {store.path}, so it would be left uninitialised: the store was built for "
                f"a different model, config or diffusers version; {repair_hint(store.path)}"
            )
        entry, info = located[key]
        if tuple(placeholder.shape) != info.shape:
            raise StaleStoreError(
                f"{name} is {list(info.shape)} in the store {store.path} but the model holds "
                f"{list(placeholder.shape)}; {repair_hint(store.path)}"
            )
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        is_parameter = attr in module._parameters
        streams = name.startswith(prefixes) and is_parameter
        if streams or (entry.name in encoded and is_parameter):
            value = torch.empty(info.shape, dtype=info.torch_dtype, device="meta")
        else:
            if entry.file not in handles:
                handles[entry.file] = safe_open(str(store.file(entry)), framework="pt", device=str(device))
            value = handles[entry.file].get_tensor(key)
        if id(placeholder) not in made:
            made[id(placeholder)] = (
                nn.Parameter(value, requires_grad=placeholder.requires_grad) if is_parameter else value
            )
        (module._parameters if is_parameter else module._buffers)[attr] = made[id(placeholder)]
    for module in model.modules():  # buffers the model builds itself (not saved): on the execution device
        for attr, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device and buffer.device.type != "meta":
                module._buffers[attr] = buffer.to(device)
    if encoded:
        load_resident_blocks(store, encoded, {n: model.get_submodule(n) for n in encoded}, device, verify)


# -- execution order ------------------------------------------------------------------------------------------


def trace_order(
    model: nn.Module, cls: Any, config: Mapping[str, Any], blocks: list[str], args: tuple[Any, ...], kwargs: dict
) -> list[str]:
    """The order ``blocks`` run in for a forward with ``args``/``kwargs``: traced on an empty copy of ``model``.

    The copy is built from ``config`` with every tensor on the meta device, in the dtypes of ``model``'s tensors;
    the inputs are replaced by meta tensors of their shapes and dtypes. Nothing is computed or read.
    """
    empty = skeleton(cls, config, None, buffers=True)
    real = dict(model.state_dict(keep_vars=True))
    real.update(dict(model.named_buffers()))
    for name in [name for name, _ in [*empty.named_parameters(), *empty.named_buffers()]]:
        source = real.get(name)
        if source is None:
            continue
        module_name, _, attr = name.rpartition(".")
        module = empty.get_submodule(module_name)
        meta = torch.empty(source.shape, dtype=source.dtype, device="meta")  # a placeholder allows no op on it
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(meta, requires_grad=False)
        else:
            module._buffers[attr] = meta
    order: list[str] = []
    for name in blocks:
        empty.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: order.append(name))

    def to_meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty_like(value, device="meta")
        if isinstance(value, list | tuple):
            return type(value)(to_meta(v) for v in value)
        if isinstance(value, dict):
            return {k: to_meta(v) for k, v in value.items()}
        return value

    with torch.no_grad():
        empty(*to_meta(args), **to_meta(kwargs))
    return order


def _learn_order_at_first_forward(
    model: nn.Module, engine: Any, cls: Any, config: Mapping[str, Any], blocks: list[str]
) -> None:
    """At ``model``'s first forward, trace the order its blocks run in and make the engine read ahead in it."""

    def first_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        handle.remove()
        try:
            order = trace_order(module, cls, config, blocks, args, kwargs)
        except Exception as err:  # a forward that needs real values (``.item()``): the engine learns as it runs
            logger.debug("tensorstream: no meta trace of %s's first forward (%s)", cls.__name__, err)
            return
        engine.follow_order(order)

    handle = model.register_forward_pre_hook(first_forward, with_kwargs=True)


# -- pipelines ------------------------------------------------------------------------------------------------


def install_pipelines(module: Any) -> None:
    """Wrap ``DiffusionPipeline.from_pretrained`` of diffusers' ``pipeline_utils`` ``module`` (idempotent)."""

    def make(original: Any) -> Any:
        def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
            ts_config = kwargs.pop("tensorstream_config", None)
            components = kwargs.pop("tensorstream_components", None)
            if kwargs.get("device_map") != DEVICE_MAP:
                if ts_config is not None or components is not None:
                    raise ConfigError(
                        "tensorstream_config= and tensorstream_components= are only used with "
                        "device_map='tensorstream'; add device_map='tensorstream' or drop them."
                    )
                return original(cls, pretrained_model_name_or_path, **kwargs)
            kwargs.pop("device_map")
            return load_pipeline(
                pretrained_model_name_or_path,
                tensorstream_config=ts_config,
                components=components,
                pipeline_class=cls,
                _from_pretrained=functools.partial(original, cls),
                **kwargs,
            )

        return from_pretrained

    wrap_classmethod(module.DiffusionPipeline, "from_pretrained", make)


def _component_classes(folder: Path) -> dict[str, tuple[Any, int]]:
    """Model components of the pipeline in ``folder``: name -> (class, weight bytes on disk)."""
    import diffusers
    import transformers
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    index = read_config(folder / "model_index.json", folder)
    found = {}
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2):
            continue
        library, class_name = value
        module = {"diffusers": diffusers, "transformers": transformers}.get(str(library))
        cls = getattr(module, str(class_name), None) if module is not None else None
        if not (isinstance(cls, type) and issubclass(cls, ModelMixin | PreTrainedModel)):
            continue
        sub = folder / name
        if not sub.is_dir():
            continue
        if is_preshard(sub):  # a store (a preshard pipeline repo's component): its size is in its manifest
            found[name] = (cls, Store.open(sub, verify="header").total_bytes)
            continue
        files = [f for f in sub.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()]
        safetensors = [f for f in files if f.suffix == ".safetensors"]
        found[name] = (cls, sum(f.stat().st_size for f in safetensors or files))
    return found


def streamed_components(sizes: Mapping[str, int], fraction: float = STREAM_FRACTION) -> list[str]:
    """The components a pipeline streams by default: those with at least ``fraction`` of the largest one's bytes.

    Example:
        ```python
        >>> streamed_components({"transformer": 23.8e9, "text_encoder_2": 9.5e9, "vae": 0.17e9})
        ['transformer', 'text_encoder_2']
        ```
    """
    if not sizes:
        return []
    largest = max(sizes.values())
    return [name for name, size in sizes.items() if size >= largest * fraction]


def load_pipeline(
    source: str | os.PathLike[str],
    *,
    tensorstream_config: Config | None = None,
    components: list[str] | tuple[str, ...] | None = None,
    pipeline_class: Any = None,
    _from_pretrained: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Load a diffusers pipeline whose large model components stream; the same as
    ``DiffusionPipeline.from_pretrained(source, device_map="tensorstream", ...)``.

    Args:
        source: a local pipeline folder (with ``model_index.json``) or a Hub repo id.
        tensorstream_config: the settings; its budget (``budget_gb``, else 80 % of free memory) is shared by the
            whole pipeline: the components that stay resident are counted first, the rest is split between the
            streamed components in proportion to their sizes.
        components: the names of the components to stream (default: `streamed_components`: every model component
            with at least an eighth of the largest one's weights: a Flux pipeline's transformer and T5 encoder).
            A component whose folder is a store (a preshard repo's ``transformer``, say) always streams.
        pipeline_class: the pipeline class (default: the one ``model_index.json`` names).
        kwargs: passed to ``from_pretrained`` (``torch_dtype`` applies to every component, streamed or not).

    Raises:
        `BudgetError`: the budget does not hold the resident components plus what each streamed one needs.

    Example:
        ```python
        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "black-forest-labs/FLUX.1-dev", device_map="tensorstream", torch_dtype=torch.bfloat16,
        ...     tensorstream_config=tensorstream.Config(budget_gb=10))
        >>> image = pipe("a cat", num_inference_steps=28).images[0]
        ```
    """
    from diffusers import DiffusionPipeline

    config = _resolve_config(tensorstream_config)
    hub = {name: kwargs[name] for name in ("cache_dir", "revision", "local_files_only", "token") if name in kwargs}
    folder = resolve_source(source, **hub)
    if not (folder / "model_index.json").is_file():
        raise FormatError(
            f"{folder} has no model_index.json: it is not a diffusers pipeline. Load a single model with its class's "
            "from_pretrained(..., device_map='tensorstream')."
        )
    found = _component_classes(folder)
    names = list(components) if components is not None else streamed_components({n: s for n, (_, s) in found.items()})
    # a component that is a store (a preshard pipeline repo) can only stream: diffusers cannot load its .ts files
    names += [name for name in found if name not in names and is_preshard(folder / name)]
    unknown = [name for name in names if name not in found]
    if unknown:
        raise ConfigError(
            f"tensorstream_components={names}: {unknown} {'is' if len(unknown) == 1 else 'are'} not a model component "
            f"of {folder} (its model components: {sorted(found)})."
        )
    device = config.execution_device
    budget = config.budget_bytes if config.budget_bytes is not None else auto_budget_bytes(device)
    resident = sum(size for name, (_, size) in found.items() if name not in names)
    streamed_total = sum(found[name][1] for name in names) or 1
    left = budget - resident
    if names and left <= 0:
        raise BudgetError(
            f"budget_gb={budget / 1e9:.6g} does not even hold the pipeline's resident components "
            f"({resident / 1e9:.3g} GB); raise budget_gb or stream more components with tensorstream_components=.",
            resident,
        )
    dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    loaded: dict[str, Any] = {}
    for name in names:
        cls, size = found[name]
        share = dataclasses.replace(config, budget_gb=left * size / streamed_total / 1e9)
        component_dtype = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
        key = "torch_dtype" if issubclass(cls, _model_mixin()) else "dtype"
        extra = {key: component_dtype} if component_dtype is not None else {}
        try:
            loaded[name] = cls.from_pretrained(
                str(folder / name), device_map=DEVICE_MAP, tensorstream_config=share, **extra
            )
        except BudgetError as err:
            raise BudgetError(f"pipeline component {name!r}: {err}", err.minimum_bytes) from None
    load = _from_pretrained or (pipeline_class or DiffusionPipeline).from_pretrained
    pipe = load(str(folder), **loaded, **kwargs)
    for name, component in pipe.components.items():  # what stays resident goes to the execution device
        if name not in loaded and isinstance(component, nn.Module):
            component.to(device)
    return pipe


def _model_mixin() -> type:
    from diffusers import ModelMixin

    return ModelMixin
