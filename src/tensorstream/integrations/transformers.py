"""``from_pretrained(..., device_map="tensorstream")`` on every transformers model class.

``import tensorstream`` wraps ``PreTrainedModel.from_pretrained`` once. Every Auto class, concrete class and
``pipeline()`` ends there. With any other ``device_map`` the wrapper calls the original untouched. With
``"tensorstream"`` it:

1. reshards the checkpoint into the store (once; later calls reuse it); a preshard repo or a store folder (one
   with ``tensorstream.json`` at its root) is used as the store as it is,
2. plans the budget from the store's sizes,
3. builds the model with transformers from the *store* (an ordinary dict device map: streamed blocks on
   ``"disk"``, so nothing of them is read, everything else on the execution device),
4. replaces accelerate's hooks with tensorstream's: each streamed block reads from its ``.ts`` file.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from typing import Any

import torch

from ..config import Config, parse_dtype
from ..errors import ConfigError, StaleStoreError
from ..reshard import describe_conversion, quiet_transformers, reshard, resolve_source
from ..store import Store
from ..stream import plan_for, start_streaming
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

    current = PreTrainedModel.__dict__["from_pretrained"]
    if getattr(current.__func__, "__tensorstream__", False):
        return
    _original = current.__func__

    @functools.wraps(_original)
    def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        ts_config = kwargs.pop("tensorstream_config", None)
        if kwargs.get("device_map") != DEVICE_MAP:
            if ts_config is not None:
                raise ConfigError(
                    "tensorstream_config= is only used with device_map='tensorstream'; add "
                    "device_map='tensorstream' or drop tensorstream_config."
                )
            return _original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        return load_streaming(cls, pretrained_model_name_or_path, model_args, kwargs, ts_config)

    from_pretrained.__tensorstream__ = True  # type: ignore[attr-defined]
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[assignment,method-assign]


def load_streaming(
    cls: Any, source: str | os.PathLike[str], model_args: tuple[Any, ...], kwargs: dict[str, Any], config: Any
) -> Any:
    """The ``device_map="tensorstream"`` path of ``from_pretrained`` (see the module docstring)."""
    if config is None:
        config = Config.from_env()
    if not isinstance(config, Config):
        raise ConfigError(f"tensorstream_config must be a tensorstream.Config, not {type(config).__name__}.")
    kwargs.pop("device_map")
    for name, fix in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) not in (None, False):
            raise ConfigError(f"from_pretrained({name}=...) is not used with device_map='tensorstream': {fix}.")
        kwargs.pop(name, None)
    dtype = _requested_dtype(kwargs, config)
    hub = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
    hf_config = kwargs.pop("config", None)
    folder = resolve_source(
        source,
        **{k: v for k, v in hub.items() if k in ("cache_dir", "revision", "local_files_only", "token", "subfolder")},
    )
    if hf_config is None or isinstance(hf_config, str | os.PathLike):
        hf_config, kwargs = cls.config_class.from_pretrained(hf_config or folder, return_unused_kwargs=True, **kwargs)
    if is_preshard(folder):  # a preshard repo or a store folder: stream from it in place
        store = check_preshard(folder, cls, hf_config, dtype, config.verify)
        store_path = store.path
    else:
        store_path = reshard(folder, config.store_root, dtype=dtype, model_class=cls, config=hf_config)
        store = Store.open(store_path, verify=config.verify)
    plan = plan_for(store, config)
    if config.verify == "checksum":  # resident weights are read once, by transformers' loader: check them first
        store.verify_checksums(e for e in store.entries() if e.name not in plan.streamed)
    device = config.execution_device
    device_map = _device_map(cls, hf_config, set(plan.streamed), _device_map_value(device))
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
            str(store_path),
            *model_args,
            config=hf_config,
            device_map=device_map,
            offload_folder=scratch,
            dtype=dtype or "auto",
            local_files_only=True,
            **kwargs,
        )
    _remove_accelerate_hooks(model)
    _check_loaded(model, plan.streamed, store)
    _restore_weight_conversions(model, store)
    start_streaming(model, store, plan, config)
    model.config._name_or_path = str(source)
    return model


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
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)
    for module in model.modules():  # accelerate restores ``forward`` as a bound method: a reference cycle
        forward = module.__dict__.get("forward")
        if getattr(forward, "__self__", None) is module and forward.__func__ is type(module).forward:
            del module.forward


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


def _check_loaded(model: Any, streamed: tuple[str, ...], store: Store) -> None:
    """Every parameter outside the streamed blocks must have been loaded (not left on meta)."""
    prefixes = tuple(f"{name}." for name in streamed)
    for name, param in model.named_parameters():
        if param.device.type == "meta" and not name.startswith(prefixes):
            raise StaleStoreError(
                f"{name} was not found in the store {store.path}; it was built for a different model or "
                "transformers version. Rerun `tensorstream reshard --force` on the source."
            )
