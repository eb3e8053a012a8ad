"""What transformers' disk-offloaded build of a model gives the reshard, beyond its modules: the tensors of its
offload index (`offload_loader`), the address phase each has in a resident load (`source_phases`), tensors it
initialises instead of reading (`initialised_tensor`), and the weight conversions it applied (`weight_conversions`,
recorded in the manifest and restored when the streamed model is built).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TensorStreamError
from .format import TENSOR_ALIGNMENT, TsHeader, read_ts_header

__all__ = ["describe_conversion", "initialised_tensor", "offload_loader", "source_phases", "weight_conversions"]


def weight_conversions(model: nn.Module) -> list[list[Any]]:
    """The load-time conversions transformers applied to the checkpoint (renamed or fused tensors), as JSON.

    A model built later from the store loads runtime names, so transformers records no conversion and its
    ``save_pretrained`` would write the runtime layout. The manifest keeps this description so that the
    streamed model can be given back the same conversions and save the checkpoint's own layout
    (`tensorstream.integrations.transformers`).
    """
    return [describe_conversion(c) for c in getattr(model, "_weight_conversions", None) or []]


def describe_conversion(conversion: Any) -> list[Any]:
    """A transformers ``WeightTransform`` as ``[class name, source patterns, target patterns, scope prefix]``."""
    return [
        type(conversion).__name__,
        list(conversion.source_patterns),
        list(conversion.target_patterns),
        getattr(conversion, "scope_prefix", None),
    ]


def initialised_tensor(model: nn.Module, name: str, placeholder: torch.Tensor) -> torch.Tensor:
    """The value transformers gives ``name``, a tensor the checkpoint lacks, when it builds the model resident.

    Some tensors are rebuilt at init and left out of the checkpoint (Marian's sinusoidal position tables, listed in
    ``_keys_to_ignore_on_save``): a resident ``from_pretrained`` initialises them with the model's own
    ``_init_weights``, while the disk-offloaded build the reshard reads from leaves them on the meta device. The
    owning module's init (that of the nearest `PreTrainedModel` around it) is run twice on a fresh CPU tensor,
    under two different seeds and from two different fillings: a value that comes out the same both times is what
    the resident model holds, and is stored.

    Raises:
        `UnsupportedModelError`: the tensor's init is random (or leaves it untouched), so no store can hold what a
            resident load would give; the message names the tensor.

    Example:
        ```python
        >>> initialised_tensor(marian, "model.encoder.embed_positions.weight", placeholder).shape
        torch.Size([512, 32])
        ```
    """
    from .errors import UnsupportedModelError

    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    owner: Any = model
    parts = module_path.split(".") if module_path else []
    for i in range(len(parts) + 1):  # the innermost sub-model's init handles its own modules (composite models)
        candidate = model.get_submodule(".".join(parts[:i]))
        if callable(getattr(candidate, "_init_weights", None)):
            owner = candidate
    is_parameter = attr in module._parameters
    values = []
    for seed, fill in ((0, 0.0), (1, 1.0)):
        fresh = torch.full(placeholder.shape, fill, dtype=placeholder.dtype)
        tensor = nn.Parameter(fresh, requires_grad=placeholder.requires_grad) if is_parameter else fresh
        slots: dict[str, Any] = module._parameters if is_parameter else module._buffers
        slots[attr] = tensor
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                owner._init_weights(module)
        except Exception as err:
            raise UnsupportedModelError(
                f"{name} is not in the checkpoint, and initialising it as transformers does failed ({err}); "
                "reshard a checkpoint that holds it (save_pretrained of the loaded model)."
            ) from err
        finally:
            slots[attr] = placeholder
        values.append(tensor.detach())
    if not torch.equal(values[0], values[1]):
        raise UnsupportedModelError(
            f"{name} is not in the checkpoint and transformers initialises it at random: a resident load would give "
            "other values each time, so no store can hold them. Use a checkpoint that holds it (save_pretrained of "
            "the model after loading it once), or load this model without device_map='tensorstream'."
        )
    return values[0]


def source_phases(loader: Mapping[str, torch.Tensor], offload_folder: Path) -> Callable[[str, torch.Tensor], int]:
    """Where a resident CPU load puts each tensor, modulo 64: its address phase in the mapped source file.

    transformers binds a tensor it reads from a safetensors file of the checkpoint unchanged (same dtype, any name) as
    a view of the file's memory map, so its address modulo 64 is its offset in the file modulo 64; some CPU kernels
    give other bits for other alignments (``torch._grouped_mm``, oneDNN convolutions). A tensor transformers
    converted at load (experts fused into one ``[E, ...]`` tensor, a cast, a ``.bin`` file) is a fresh allocation,
    64-byte aligned: phase 0. The disk offload index names, for a converted tensor, the file transformers wrote it to
    in ``offload_folder``, never a file of the checkpoint: only the checkpoint's own files give a phase.
    """
    index = getattr(loader, "index", None) or {}
    headers: dict[str, TsHeader | None] = {}
    written = offload_folder.resolve()

    def phase_of(name: str, tensor: torch.Tensor) -> int:
        entry = index.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("safetensors_file"), str):
            return 0
        file = entry["safetensors_file"]
        if (
            Path(file).resolve().is_relative_to(written)
        ):  # written by transformers at load: converted, a fresh allocation
            return 0
        if file not in headers:
            try:
                headers[file] = read_ts_header(file, require_ts=False)
            except (TensorStreamError, OSError):
                headers[file] = None
        header = headers[file]
        info = None if header is None else header.tensors.get(entry.get("weight_name", name))
        if header is None or info is None or info.torch_dtype != tensor.dtype:
            return 0
        return (header.data_offset + info.start) % TENSOR_ALIGNMENT

    return phase_of


def offload_loader(model: nn.Module, folder: Path) -> Mapping[str, torch.Tensor]:
    for module in model.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None:
            return getattr(weights_map, "dataset", weights_map)
    raise TensorStreamError(
        f"transformers built {type(model).__name__} from {folder} without a disk offload index; this transformers "
        "version loads disk-offloaded models differently than tensorstream expects. Please report it."
    )
