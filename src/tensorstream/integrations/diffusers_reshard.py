"""Resharding a diffusers model: its checkpoint read as diffusers' own loader reads it, into a store.

`reshard_diffusers` is what `tensorstream.reshard` (and so ``tensorstream reshard``) runs for a folder whose
``config.json`` names a diffusers class; `tensorstream.integrations.diffusers` runs it for
``from_pretrained(..., device_map="tensorstream")``. The model is built empty from its config, and each block's
tensors are read one at a time from the safetensors (or ``.bin``) files, renamed and converted as
``ModelMixin.from_pretrained`` does: to ``torch_dtype`` except the modules the class keeps in float32
(``_keep_in_fp32_modules``), or, without a dtype, to the dtype of the parameter the model was built with. Memory is
bounded by about one block. Each tensor is stored at the address phase a resident load gives it (the file's for a
tensor diffusers keeps as a view of its memory map, 0 for one it converts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import default_storage_path, parse_dtype
from ..errors import ConfigError, FormatError, UnsupportedModelError
from ..format import TENSOR_ALIGNMENT, read_ts_header
from ..reshard import _write_store, build_store, source_fingerprint
from ..store import read_config

__all__ = ["KeptInFp32", "is_diffusers_model", "kept_in_fp32", "reshard_diffusers", "skeleton"]

WEIGHTS = "diffusion_pytorch_model"


def is_diffusers_model(folder: Path, model_class: Any = None) -> bool:
    """Whether ``model_class`` is a diffusers model class, or (without one) ``folder`` holds a diffusers model.

    A diffusers ``config.json`` names its class in ``_class_name`` and has no ``model_type``; diffusers is not
    imported to tell.
    """
    if isinstance(model_class, type):
        return any(klass.__module__.startswith("diffusers.") for klass in model_class.__mro__)
    config = folder / "config.json"
    if not config.is_file():
        return False
    data = read_config(config)
    return isinstance(data.get("_class_name"), str) and "model_type" not in data


def model_class_of(config: Mapping[str, Any], model_class: Any, folder: Path) -> Any:
    import diffusers
    from diffusers import ModelMixin

    if isinstance(model_class, type):
        return model_class
    name = model_class or config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ConfigError(
            f"{folder / 'config.json'} names the class {name!r}, which is not a model class of diffusers "
            f"{diffusers.__version__}; pass model_class= (or --model-class) with the diffusers class to build."
        )
    return cls


@contextlib.contextmanager
def _default_dtype(cls: Any, dtype: torch.dtype | None) -> Iterator[None]:
    """The default dtype diffusers builds ``cls`` under for ``torch_dtype=dtype`` (unchanged without one)."""
    if dtype is None:
        yield
        return
    original = cls._set_default_torch_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(original)


def skeleton(cls: Any, config: Mapping[str, Any], dtype: torch.dtype | None, *, buffers: bool = False) -> Any:
    """``cls`` built from ``config`` as diffusers builds it before loading: parameters on meta, nothing read."""
    from accelerate import init_empty_weights
    from diffusers.models.modeling_utils import no_init_weights

    with _default_dtype(cls, dtype), no_init_weights(), init_empty_weights(include_buffers=buffers):
        return cls.from_config(dict(config))


def _checkpoint_files(folder: Path, variant: str | None) -> tuple[list[Path], bool]:
    """The weight files diffusers would load from ``folder`` (safetensors first, one file or sharded, else ``.bin``)
    and whether they are shards of an index."""
    suffix = f".{variant}" if variant else ""
    for kind in ("safetensors", "bin"):
        single = folder / f"{WEIGHTS}{suffix}.{kind}"
        index = folder / f"{WEIGHTS}{suffix}.{kind}.index.json"
        if index.is_file():
            weight_map = read_config(index, folder).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index} has no weight_map; the checkpoint is damaged.")
            files = sorted({str(f) for f in weight_map.values()})
            for file in files:
                if Path(file).is_absolute() or ".." in Path(file).parts:
                    raise FormatError(f"{index} names {file!r}, outside the model folder; it is never read.")
            return [folder / f for f in files], True
        if single.is_file():
            return [single], False
    raise FormatError(
        f"{folder} has no {WEIGHTS}{suffix}.safetensors (or .bin, sharded or not): pass the folder of a diffusers "
        "model (what save_pretrained writes), e.g. the 'transformer' or 'unet' subfolder of a pipeline."
    )


class _Checkpoint:
    """The checkpoint's tensors by name, each read when asked for (safetensors: from its memory map)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.where: dict[str, tuple[Any, str, int | None]] = {}  # name -> (handle, key, file phase)
        self._handles: list[Any] = []
        for file in files:
            if file.suffix == ".safetensors":
                handle = safe_open(str(file), framework="pt")
                self._handles.append(handle)
                header = read_ts_header(file, require_ts=False)
                for key in handle.keys():  # noqa: SIM118  (a safe_open handle is not a mapping)
                    info = header.tensors[key]
                    self.where[key] = (handle, key, (header.data_offset + info.start) % TENSOR_ALIGNMENT)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for key in state:
                    self.where[key] = (state, key, None)

    def rename(self, model: Any, sharded: bool) -> None:
        """Apply diffusers' own renames (deprecated attention blocks), as it does for unsharded checkpoints."""
        if sharded:
            return
        names: dict[str, Any] = dict(self.where)
        model._fix_state_dict_keys_on_load(names)
        self.where = names

    def read(self, name: str) -> tuple[torch.Tensor, int | None]:
        holder, key, phase = self.where[name]
        tensor = holder.get_tensor(key) if hasattr(holder, "get_tensor") else holder[key]
        return tensor, phase


def _keep_fp32(cls: Any) -> list[str]:
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    return [keep] if isinstance(keep, str) else list(keep)


@dataclasses.dataclass(frozen=True)
class KeptInFp32:
    """diffusers' rule for ``_keep_in_fp32_modules``: a tensor whose path has one of ``modules`` as a component."""

    modules: frozenset[str]

    def __call__(self, name: str) -> bool:
        return not self.modules.isdisjoint(name.split("."))


def kept_in_fp32(model: nn.Module) -> KeptInFp32 | None:
    """For a diffusers model whose class keeps modules in float32 under a ``torch_dtype``, the test of a tensor
    name; ``None`` for any other model (converted whole, as before)."""
    if not is_diffusers_model(Path(), type(model)):
        return None
    keep = _keep_fp32(type(model))
    return KeptInFp32(frozenset(keep)) if keep else None


def reshard_diffusers(
    folder: Path,
    storage_path: str | os.PathLike[str] | None = None,
    *,
    source: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    kind: str | None = None,
    model_class: Any = None,
    config: Mapping[str, Any] | None = None,
    variant: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Reshard the diffusers model in ``folder`` into a store (reused when up to date); called by `reshard`.

    Tensors are converted as ``ModelMixin.from_pretrained(folder, torch_dtype=dtype)`` converts them: floating
    ones to ``dtype``, except in the class's ``_keep_in_fp32_modules`` (float32); without ``dtype``, to the dtype
    of the model's own parameter. Peak memory is about one block: each block's tensors are read, written and
    dropped before the next block's.

    Raises:
        `UnsupportedModelError`: the checkpoint lacks a tensor the model needs (diffusers would initialise it at
            random).
    """
    source = str(source if source is not None else folder)
    config = dict(config) if config is not None else read_config(folder / "config.json", None)
    cls = model_class_of(config, model_class, folder)
    dtype = parse_dtype(dtype)
    fingerprint = source_fingerprint(folder, cls, dtype, {**config, "variant": variant}, kind)
    root = Path(storage_path).expanduser() if storage_path else default_storage_path()
    files, sharded = _checkpoint_files(folder, variant)
    keep = KeptInFp32(frozenset(_keep_fp32(cls) if dtype is not None else ()))

    def write(staging: Path) -> None:
        model = skeleton(cls, config, dtype)
        checkpoint = _Checkpoint(files)
        checkpoint.rename(model, sharded)
        phases: dict[str, int] = {}

        def get_tensor(name: str, placeholder: torch.Tensor) -> torch.Tensor:
            if name not in checkpoint.where:
                if placeholder.device.type != "meta":  # a buffer the model builds itself
                    return placeholder.detach()
                raise UnsupportedModelError(
                    f"{name} is not in the checkpoint {folder}, so diffusers would initialise it at random: no store "
                    "can hold what a resident load gives. Reshard a checkpoint that holds it (save_pretrained of "
                    "the loaded model)."
                )
            tensor, phase = checkpoint.read(name)
            target = placeholder.dtype  # without a dtype, diffusers casts to the parameter's own dtype
            if dtype is not None and tensor.is_floating_point():
                target = torch.float32 if keep(name) else dtype
            if tensor.shape != placeholder.shape:
                raise UnsupportedModelError(
                    f"{name} is {list(tensor.shape)} in {folder} but {cls.__name__} expects "
                    f"{list(placeholder.shape)}; the config does not match the weights."
                )
            converted = tensor.to(target).contiguous()
            # a resident load keeps an unconverted tensor as a view of the file (its phase), a converted one fresh
            phases[name] = phase if phase is not None and converted.dtype == tensor.dtype else 0
            return converted

        source_info = {"source": source, "folder": str(folder), "library": "diffusers"}
        _write_store(
            staging,
            model,
            get_tensor,
            fingerprint,
            cls.__name__,
            dtype,
            source_info,
            progress,
            kind,
            phase_of=lambda name, tensor: phases.get(name, 0),
        )
        (staging / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")

    needed = sum(f.stat().st_size for f in files)
    return build_store(root, fingerprint, source, needed, write, force=force)
