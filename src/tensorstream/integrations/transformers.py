"""``from_pretrained(..., device_map="tensorstream")`` on every transformers model class.

``import tensorstream`` wraps ``PreTrainedModel.from_pretrained`` once. Every Auto class, concrete class and
``pipeline()`` ends there. With any other ``device_map`` the wrapper calls the original untouched. With
``"tensorstream"`` it:

1. reshards the checkpoint into the store (once; later calls reuse it); a preshard repo or a store folder (one
   with ``tensorstream.json`` at its root) is used as the store as it is,
2. plans the budget from the store's sizes,
3. builds the model with transformers from a scratch folder that tensorstream writes: the config it parsed and
   validated itself (`tensorstream.store.read_config`: regular file, bounded size and nesting, inside the store),
   an index it built from the manifest's files, and links to those files only. Whatever else a store (or a
   preshard repo) holds, an index naming other files, a ``pytorch_model.bin.index.json``, ``transformers_weights``
   in its config, is never read. An ordinary dict device map puts streamed blocks on ``"disk"`` (nothing of them
   is read) and everything else on the execution device,
4. checks every resident tensor against the store (`_check_resident`): present under its name (or a tied name),
   same dtype and shape, so a tensor that transformers would have initialised at random or cast is an error,
5. replaces accelerate's hooks with tensorstream's: each streamed block reads from its ``.ts`` file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..bnb import KEPT_METHODS, bnb_layers
from ..config import Config, parse_dtype
from ..errors import ConfigError, StaleStoreError
from ..format import TensorInfo
from ..gptq import GPTQ_METHODS, gptq_layers
from ..loaded_tensors import describe_conversion
from ..prequantized import describe_quantization, quantization_method
from ..reshard import quiet_transformers, reshard, resolve_source
from ..store import INDEX_NAME, Store, read_config, repair_hint
from ..stream import check_device, plan_for, start_streaming
from . import wrap_classmethod
from .hub import check_preshard, is_preshard

__all__ = ["DEVICE_MAP", "install"]

logger = logging.getLogger(__name__)
DEVICE_MAP = "tensorstream"
_HUB_KWARGS = ("cache_dir", "revision", "local_files_only", "token", "subfolder", "force_download", "proxies")
_UNSUPPORTED_KWARGS = {
    "max_memory": "set the budget with tensorstream_config=tensorstream.Config(budget_gb=...)",
    "offload_folder": "set where stores live with tensorstream_config=tensorstream.Config(storage_path=...)",
    "offload_buffers": "buffers always stay resident with tensorstream",
    "state_dict": "pass a checkpoint folder or Hub id, or use tensorstream.offload(model) on a loaded model",
    "gguf_file": "GGUF checkpoints are not supported; convert to safetensors first",
    "tp_plan": "tensor parallelism does not combine with streaming; run one process per GPU instead",
}
_original: Any = None


def install() -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` (idempotent); called by ``import tensorstream``."""
    global _original
    from transformers import PreTrainedModel

    def make(original: Any) -> Any:
        def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
            ts_config = kwargs.pop("tensorstream_config", None)
            if kwargs.get("device_map") != DEVICE_MAP:
                if ts_config is not None:
                    raise ConfigError(
                        "tensorstream_config= is only used with device_map='tensorstream'; add "
                        "device_map='tensorstream' or drop tensorstream_config."
                    )
                return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
            return load_streaming(cls, pretrained_model_name_or_path, model_args, kwargs, ts_config)

        return from_pretrained

    _original = wrap_classmethod(PreTrainedModel, "from_pretrained", make)
    _install_auto()


def _install_auto() -> None:
    """Parse the config ourselves for Auto classes too: ``AutoConfig`` would read a store's ``config.json`` (a FIFO,
    a nesting bomb, a link out of the store) before any tensorstream check. Every Auto model class passes its
    keyword arguments, ``device_map`` included, to ``AutoConfig.from_pretrained``: that is where we step in."""
    from transformers import AutoConfig

    def make(original: Any) -> Any:
        def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
            if kwargs.get("device_map") != DEVICE_MAP:
                return original(cls, pretrained_model_name_or_path, **kwargs)
            return_unused = kwargs.pop("return_unused_kwargs", False)
            config, unused = _auto_config(pretrained_model_name_or_path, kwargs)
            return (config, unused) if return_unused else config

        return from_pretrained

    wrap_classmethod(AutoConfig, "from_pretrained", make)


_HUB_ONLY = ("cache_dir", "revision", "local_files_only", "token", "subfolder", "force_download", "proxies")


def _auto_config(source: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``AutoConfig.from_pretrained(source, **kwargs)`` for ``device_map="tensorstream"``: (config, unused kwargs)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = resolve_source(source, **{k: v for k, v in kwargs.items() if k in _HUB_KWARGS[:5]})
    preshard = is_preshard(folder)
    if preshard:
        Store.open(folder, verify="off")  # links, manifest and index checked before the config is read
    data = _model_config(folder / "config.json", folder if preshard else None)
    data.pop("transformers_weights", None)
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"{folder / 'config.json'} has model_type {model_type!r}, which this transformers does not know; "
            "device_map='tensorstream' does not run remote code: upgrade transformers, or load the concrete class."
        )
    rest = {k: v for k, v in kwargs.items() if k not in (*_HUB_ONLY, "code_revision", "_commit_hash")}
    kept = {k: rest.pop(k) for k in ("dtype", "torch_dtype") if k in rest}
    config, unused = CONFIG_MAPPING[model_type].from_dict(data, return_unused_kwargs=True, **rest)
    return config, {**unused, **kept}


def load_streaming(
    cls: Any, source: str | os.PathLike[str], model_args: tuple[Any, ...], kwargs: dict[str, Any], config: Any
) -> Any:
    """The ``device_map="tensorstream"`` path of ``from_pretrained`` (see the module docstring)."""
    if config is None:
        config = Config.from_env()
    if not isinstance(config, Config):
        raise ConfigError(f"tensorstream_config must be a tensorstream.Config, not {type(config).__name__}.")
    config = config.with_env()  # the fields given win; TENSORSTREAM_* variables fill the rest
    check_device(config.execution_device)  # before anything is downloaded or resharded
    kwargs.pop("device_map")
    for name, fix in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) not in (None, False):
            raise ConfigError(f"from_pretrained({name}=...) is not used with device_map='tensorstream': {fix}.")
        kwargs.pop(name, None)
    dtype = _requested_dtype(kwargs, config)
    hub = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
    hf_config = kwargs.pop("config", None)
    quantization_arg = kwargs.pop("quantization_config", None)
    folder = resolve_source(
        source,
        **{k: v for k, v in hub.items() if k in ("cache_dir", "revision", "local_files_only", "token", "subfolder")},
    )
    preshard = is_preshard(folder)
    if preshard:  # a preshard repo or a store folder: opened (links, manifest, index checked) before anything else
        Store.open(folder, verify="off")
    if hf_config is None or isinstance(hf_config, str | os.PathLike):
        config_dir = Path(hf_config or folder)
        data = _model_config(config_dir / "config.json", folder if preshard and hf_config is None else None)
        data.pop("transformers_weights", None)  # a file name transformers would load weights from: never followed
        hf_config, kwargs = cls.config_class.from_dict(data, return_unused_kwargs=True, **kwargs)
    if preshard:
        store = check_preshard(folder, cls, hf_config, dtype, config.verify)
        store_path = store.path
        if config.kind is not None and store.kind != config.kind:
            raise ConfigError(
                f"{store.path} is a {store.kind or 'plain'} store, published as it is, but {config.kind!r} was asked "
                "for (Config quantize/compression or TENSORSTREAM_QUANTIZE/TENSORSTREAM_COMPRESSION). Drop that "
                "setting to stream this store, or load the original checkpoint, which is resharded as asked."
            )
    else:
        if config.budget_bytes is not None:  # a budget below the minimum fails now, not after a whole reshard
            check_budget_before_reshard(cls, hf_config, folder, dtype, config)
        store_path = reshard(
            folder,
            config.store_root,
            dtype=dtype,
            quantize=config.quantize,
            compression=config.compression,
            dequantize=config.dequantize,
            model_class=cls,
            config=hf_config,
            # applied to the reshard's load as transformers applies it (its loading attributes override the
            # checkpoint's), and part of the store's fingerprint
            model_kwargs=None if quantization_arg is None else {"quantization_config": quantization_arg},
        )
        store = Store.open(store_path, verify=config.verify)
    quantization = store.manifest.get("quantization")
    kept = isinstance(quantization, dict) and quantization.get("kept") is True  # bitsandbytes' own layers
    if isinstance(quantization, dict):
        quantized_config, hf_config = hf_config, _without_quantization(hf_config)
        logger.info("tensorstream: %s", describe_quantization(store.manifest))
    plan = plan_for(store, config)
    # transformers loads what stays resident from the store's files, except an encoded store's blocks: tensorstream
    # expands those itself (`load_resident_blocks`), so they are left out of transformers' loading
    outside = set(plan.streamed) | {entry.name for entry in store.blocks if store.codec(entry).needs_binding}
    if config.verify == "checksum":  # resident weights are read once, by transformers' loader: check them first
        store.verify_checksums(e for e in store.entries() if e.name not in plan.streamed)
    device = config.execution_device
    device_map = _device_map(cls, hf_config, outside, _device_map_value(device))
    with (
        quiet_transformers(),
        tempfile.TemporaryDirectory(prefix="tensorstream-") as scratch,
        warnings.catch_warnings(),
    ):
        # A tensor held directly by a module that also holds streamed blocks (BART's final_logits_bias) is a device
        # map key of its own: accelerate places it right but warns that the key is not a submodule.
        warnings.filterwarnings("ignore", message="The following device_map keys do not match", category=UserWarning)
        model = _original(
            cls,
            str(_model_folder(store, hf_config, Path(scratch) / "model")),
            *model_args,
            config=hf_config,
            device_map=device_map,
            offload_folder=str(Path(scratch) / "offload"),
            dtype=dtype or "auto",
            local_files_only=True,
            **kwargs,
        )
    _remove_accelerate_hooks(model)
    method = quantization_method(quantized_config) if kept else None
    if method in GPTQ_METHODS:  # gptqmodel's layers (`tensorstream.gptq`)
        gptq_layers(model, quantized_config, store, outside, device, str(method))
    elif kept:  # bitsandbytes' layers where the store binds its parameter classes (`tensorstream.bnb`)
        bnb_layers(model, quantized_config, store, outside)
    _check_resident(model, tuple(outside), store)
    _restore_weight_conversions(model, store)
    start_streaming(model, store, plan, config)
    model.config._name_or_path = str(source)
    model.name_or_path = str(source)  # not the scratch folder it was loaded from (PEFT records it in adapter configs)
    return model


def _without_quantization(hf_config: Any) -> Any:
    """``hf_config`` without ``quantization_config``: the store holds the tensors transformers dequantized at load
    (`tensorstream.prequantized`), and the resident model drops it after loading too. Built with it, the model's
    load would run the quantizer's conversions on the stored tensors a second time."""
    hf_config = copy.deepcopy(hf_config)
    for config in {id(c): c for c in (hf_config, hf_config.get_text_config(decoder=True))}.values():
        if "quantization_config" in vars(config):
            del config.quantization_config
    return hf_config


def check_budget_before_reshard(
    cls: Any, hf_config: Any, folder: Any, dtype: torch.dtype | None, config: Config
) -> None:
    """`BudgetError` before any reshard when ``config``'s budget is below what the model needs at the least.

    The sizes come from an empty skeleton of the model (parameter counts per block) and the element sizes in the
    checkpoint's safetensors headers (or ``dtype``). The check counts the blocks only, at the smallest element
    size, so it never refuses a budget the store would accept; the minimum it names counts everything at the
    largest element size, plus alignment, so it works as given. A checkpoint without safetensors files is not
    checked here (the plan checks the store).
    """
    from accelerate import init_empty_weights

    from ..errors import BudgetError, UnsupportedModelError
    from ..experts import experts_modules
    from ..plan import find_blocks, make_plan

    sizes = {dtype.itemsize} if dtype is not None else _checkpoint_itemsizes(folder)
    if not sizes or quantization_method(hf_config) in (*KEPT_METHODS, *GPTQ_METHODS):  # 4-bit: packed parameters
        return
    with init_empty_weights(include_buffers=False), quiet_transformers():
        skeleton = cls._from_config(hf_config)
    try:
        blocks = find_blocks(skeleton)
    except UnsupportedModelError:
        return  # reported by the reshard, as without a budget
    counts: dict[str, list[int]] = {name: [0, 0] for name in ["", *blocks]}  # name -> [elements, tensors]
    # routed experts (docs/moe.md) are not held in a block's slot: the lower bound leaves them out
    routed = config.kind is None and config.routed_experts
    experts = {id(p) for m in experts_modules(skeleton).values() for p in m.parameters()} if routed else set()
    expert_elements: dict[str, int] = dict.fromkeys(blocks, 0)
    seen: set[int] = set()
    for name, param in skeleton.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        owner = next((b for b in blocks if name.startswith(f"{b}.")), "")
        counts[owner][0] += param.numel()
        counts[owner][1] += 1
        if id(param) in experts and owner:
            expert_elements[owner] += param.numel()

    def plan(itemsize: int, upper: bool) -> None:
        def nbytes(name: str) -> int:
            elements, tensors = counts[name]
            return elements * itemsize + ((tensors * 64 + 4096) if upper else 0)

        # The lower bound leaves the non-block weights out: tied weights (an LM head sharing the embeddings) may
        # not be tied in an empty skeleton, and counting them twice could refuse a budget the store accepts.
        non_block = nbytes("") if upper else 0
        loads = None if upper else {b: nbytes(b) - expert_elements[b] * itemsize for b in blocks}
        make_plan(
            non_block, [(b, nbytes(b)) for b in blocks], config.budget_bytes or 0, config.prefetch, stream_sizes=loads
        )

    try:
        plan(min(sizes), upper=False)
    except BudgetError:
        try:
            plan(max(sizes), upper=True)
        except BudgetError as err:  # an upper bound, not the exact minimum: that needs the store's file sizes
            raise BudgetError(str(err), None, err.suggested_bytes) from None
        raise


def _checkpoint_itemsizes(folder: Any) -> set[int]:
    """Element sizes (bytes) of the floating-point tensors in ``folder``'s safetensors files (headers only)."""
    from pathlib import Path

    from ..format import DTYPES, read_ts_header

    sizes = set()
    for file in Path(folder).glob("*.safetensors"):
        try:
            header = read_ts_header(file, require_ts=False)
        except (OSError, ValueError):
            return set()  # let the reshard report it
        for info in header.tensors.values():
            dtype = DTYPES.get(info.dtype)
            if dtype is not None and dtype.is_floating_point:
                sizes.add(dtype.itemsize)
    return sizes


def _requested_dtype(kwargs: dict[str, Any], config: Config) -> torch.dtype | None:
    requested = kwargs.pop("dtype", None)
    legacy = kwargs.pop("torch_dtype", None)
    requested = requested if requested is not None else legacy
    if isinstance(requested, dict):
        raise ConfigError("a per-module dtype dict is not supported with device_map='tensorstream'; pass one dtype.")
    user = parse_dtype(requested, field="dtype") if requested is not None else None
    if user is not None and config.dtype is not None and user != config.dtype:
        raise ConfigError(
            f"from_pretrained(dtype={user}) and Config(dtype={config.dtype}) disagree; give the dtype in one place."
        )
    return config.dtype or user  # type: ignore[return-value]


def _device_map(cls: Any, hf_config: Any, streamed: set[str], device: str | int) -> dict[str, Any]:
    """An ordinary device map: streamed blocks on ``"disk"``, every other module on the execution device.

    Keys are the largest modules that hold no streamed block (a ``""`` key would make accelerate move the
    streamed blocks too), found on an empty skeleton of the model.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), quiet_transformers():
        skeleton = cls._from_config(hf_config)
    holders = {".".join(name.split(".")[:i]) for name in streamed for i in range(len(name.split(".")))}
    device_map: dict[str, Any] = {}

    def cover(module: torch.nn.Module, prefix: str) -> None:
        if prefix in streamed:
            device_map[prefix] = "disk"
            return
        if prefix not in holders:
            device_map[prefix] = device
            return
        for name in [*module._parameters, *module._buffers]:  # tensors held directly by a container of blocks
            device_map[f"{prefix}.{name}" if prefix else name] = device
        for name, child in module.named_children():
            cover(child, f"{prefix}.{name}" if prefix else name)

    cover(skeleton, "")
    return device_map


def _device_map_value(device: torch.device) -> str | int:
    if device.type == "cuda":
        return device.index or 0
    return str(device)


def _remove_accelerate_hooks(model: Any) -> None:
    """Remove accelerate's hooks without letting them reload what they offloaded.

    An offloading hook restores, when removed, every tensor of its module that was not on meta when it was attached
    (a block's bare parameters, e.g. XLNet's ``q``/``k``/``v``/``o``), reading it through transformers' disk
    offload index, whose paths are relative to the store and get joined twice (``blocks/blocks/...``). Those tensors
    belong to streamed blocks: the engine provides them, so nothing is restored.
    """
    from accelerate.hooks import remove_hook_from_submodules

    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for inner in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            if getattr(inner, "offload", False):
                inner.original_devices = {}
    remove_hook_from_submodules(model)
    for module in model.modules():  # accelerate restores ``forward`` as a bound method: a reference cycle
        forward = module.__dict__.get("forward")
        function = getattr(forward, "__func__", None)
        if getattr(forward, "__self__", None) is module and function is getattr(type(module), "forward", None):
            del module.forward  # type: ignore[union-attr]


def _restore_weight_conversions(model: Any, store: Store) -> None:
    """Give the model the load-time conversions of its source checkpoint, so ``save_pretrained`` writes its layout.

    Built from the store (runtime names), the model had none applied: transformers would save the runtime layout
    (Mixtral's fused ``experts.gate_up_proj`` instead of per-expert ``w1``/``w3``). The manifest names the
    conversions transformers applied when the store was resharded; they are picked from transformers' own mapping
    for this model, never built from the manifest. A store without that record gets transformers' default mapping,
    as a model built from its config would.
    """
    recorded = store.manifest.get("weight_conversions")
    if not isinstance(recorded, list):
        if "_weight_conversions" in vars(model):
            del model._weight_conversions
        return
    from transformers.conversion_mapping import get_model_conversion_mapping

    candidates = get_model_conversion_mapping(model)
    model._weight_conversions = [c for c in candidates if describe_conversion(c) in recorded]


def _model_folder(store: Store, hf_config: Any, folder: Path) -> Path:
    """The only folder transformers' loader sees: our config, our index, links to the manifest's files.

    ``generation_config.json`` is copied after `read_config` validated it (generation defaults such as the end of
    sequence tokens live there).
    """
    (folder / "blocks").mkdir(parents=True)
    hf_config.to_json_file(folder / "config.json")
    generation = store.path / "generation_config.json"
    if os.path.lexists(generation):
        data = read_config(generation, store.path)
        (folder / "generation_config.json").write_text(json.dumps(data), encoding="utf-8")
    weight_map = {}
    for entry in store.entries():
        link = folder / entry.file
        link.parent.mkdir(parents=True, exist_ok=True)
        codec = store.codec(entry)
        if codec.needs_binding:  # names, dtypes and shapes of what the block binds; tensorstream provides the data
            write_placeholder(link, codec.logical)
        else:
            link.symlink_to(store.file(entry))
        weight_map.update(dict.fromkeys(codec.logical, entry.file))
    index = {"metadata": {"total_size": store.total_bytes}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index), encoding="utf-8")
    return folder


def _model_config(path: Path, root: Path | None) -> dict[str, Any]:
    """`read_config`, then the values transformers writes as tagged objects decoded as its own loader does
    (``{"__float__": "Infinity"}``: NemotronH's ``time_step_limit``), so the config validates as it would there."""
    from transformers import PretrainedConfig

    data = read_config(path, root)
    decode = getattr(PretrainedConfig, "_decode_special_floats", None)
    return decode(data) if decode is not None else data


def write_placeholder(path: Path, tensors: Mapping[str, TensorInfo]) -> None:
    """A safetensors file declaring ``tensors`` (names, dtypes, shapes) whose data is a hole: no byte is written.

    transformers' loader sees the names of an encoded block's tensors in it and leaves them offloaded (the block is
    on ``"disk"`` in the device map), so it never reads them; the engine or `load_resident_blocks` provides them.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, info in tensors.items():
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: the data section takes no disk space


def _check_resident(model: Any, streamed: tuple[str, ...], store: Store) -> None:
    """Every tensor of the model outside the streamed blocks came from the store: same name, dtype and shape.

    transformers initialises a tensor it does not find (at random for weights) and casts one of another dtype;
    both would run with weights that are not the store's. Streamed blocks are checked when the engine is built.
    """
    prefixes = tuple(f"{name}." for name in streamed)
    tied = store.manifest.get("tied", {})
    held = {}
    for entry in store.entries():
        if entry.name not in streamed:
            held.update(store.codec(entry).logical)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(prefixes):
            continue
        info = held.get(tied.get(name, name))
        if info is None:
            raise StaleStoreError(
                f"{name} is not in the store {store.path}, so transformers would have initialised it at random: the "
                "store was built for a different model, config or transformers version; "
                f"{repair_hint(store.path)}"
            )
        if info.torch_dtype != tensor.dtype or info.shape != tuple(tensor.shape):
            raise StaleStoreError(
                f"{name} is {info.dtype}{list(info.shape)} in the store {store.path} but the model holds "
                f"{tensor.dtype}{list(tensor.shape)}; it would be cast or refused. "
                f"{repair_hint(store.path, sentence=True)}"
            )
        if tensor.device.type == "meta":
            raise StaleStoreError(f"{name} was not loaded from the store {store.path}; {repair_hint(store.path)}")
