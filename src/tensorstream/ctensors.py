"""compressed-tensors checkpoints (llm-compressor's int4/int8 ``pack-quantized`` and FP8 ``float-quantized``), streamed
as published: the checkpoint's compact tensors in the store, decompressed per block with compressed-tensors' own
function.

What transformers' resident load computes with: it builds each quantized ``Linear`` compressed (``weight_packed``,
``weight_scale``, ``weight_zero_point``, ``weight_shape``; FP8: a float8 ``weight`` and ``weight_scale``) and, at the
model's first forward, a hook decompresses every layer in place with compressed-tensors' compressor
(``decompress_module``: ``compressor.decompress(state_dict, scheme)``). From then on the layers are ordinary ``Linear``
layers computing on the decompressed weights (for weight-only schemes: nothing quantizes the activations).

The store (kind ``"compressed-tensors"``, `tensorstream.encoding`) holds each such weight as the checkpoint's own
tensors, and the slot layer expands it when its block loads by calling that same ``compressor.decompress`` on views
of them (`decompress`): the same function, so the same bits, checked when the store is written. The streamed model is
built without ``quantization_config``: plain ``Linear`` layers, as the resident ones end up after their first forward.
Schemes that quantize activations (W8A8, FP8 dynamic activations) are refused: their resident layers keep a quantizing
forward, which a plain layer would not reproduce.

This module imports compressed-tensors only when a checkpoint or store uses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FormatError, UnsupportedQuantizationError

__all__ = ["CT_KIND", "CT_PARTS", "checkpoint_source", "decompress"]

CT_KIND = "compressed-tensors"
#: The checkpoint's tensors of one quantized weight (``<module>.<name>``) and the part each is stored as.
CT_PARTS = {
    "weight_packed": "packed",
    "weight_scale": "scale",
    "weight_zero_point": "zero",
    "weight_shape": "shape",
    "weight_global_scale": "gscale",
    "weight": "q",
}
_FORMATS = ("pack-quantized", "float-quantized", "naive-quantized", "int-quantized")


def decompress(out: torch.Tensor, parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """``out[...] =`` compressed-tensors' decompression of one weight from its compact ``parts`` (named as in
    `CT_PARTS`' values), with ``meta`` (``{"format": ..., "scheme": ...}``) as the checkpoint's config gives them."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme.model_validate(meta["scheme"])
    compressor = BaseCompressor.get_value_from_registry(meta["format"])
    names = {part: name for name, part in CT_PARTS.items()}
    state = {names[part]: tensor for part, tensor in parts.items()}
    weight = compressor.decompress(state, scheme)["weight"]
    if weight.dtype != out.dtype or tuple(weight.shape) != tuple(out.shape):
        raise FormatError(
            f"compressed-tensors decompressed a {weight.dtype}{list(weight.shape)} weight where the store declares "
            f"{out.dtype}{list(out.shape)}; the store is damaged or was written by another compressed-tensors version."
        )
    out.copy_(weight)


def _schemes(model: nn.Module, qc: Mapping[str, Any], where: str) -> dict[str, tuple[str, Any]]:
    """module name -> (format, scheme) for each layer compressed-tensors quantizes in ``model`` (an empty
    skeleton), matched by compressed-tensors itself."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    try:
        config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "quant_method"})
    except ValueError as err:  # pydantic's ValidationError
        raise FormatError(
            f"{where}: its config.json's quantization_config is not a compressed-tensors config this "
            f"compressed-tensors reads ({str(err).splitlines()[0]}); fix config.json, or save the quantized model "
            "again with llm-compressor or compressed-tensors."
        ) from None
    apply_quantization_config(model, config, show_progress=False)
    found = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        fmt = getattr(scheme.format, "value", scheme.format) or config.format
        if scheme.input_activations is not None or scheme.output_activations is not None:
            raise _refuse(where, "it quantizes activations too (a resident layer keeps a quantizing forward)")
        if fmt not in _FORMATS or scheme.weights is None:
            raise _refuse(where, f"its format {fmt!r} is not one tensorstream decompresses")
        found[name] = (fmt, scheme)
    if not found:
        raise FormatError(
            f"{where}: its config.json's compressed-tensors quantization_config quantizes no layer of this model; fix "
            "config.json (remove quantization_config if the weights are not quantized)."
        )
    return found


def _refuse(where: str, reason: str) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(
        f"{where} is quantized with compressed-tensors in a way tensorstream does not stream yet: {reason}. Instead, "
        "load it without device_map='tensorstream' (transformers runs it resident), or stream the unquantized "
        "original checkpoint (tensorstream.Config(quantize='int8') or 'int4' makes a compact store of it) "
        "(docs/quantization.md, 'Pre-quantized checkpoints').",
        CT_KIND,
    )


def checkpoint_source(
    folder: Path, cls: type, config: Any, where: str
) -> tuple[nn.Module, dict[str, Any], Any, Any, Any]:
    """What a store of the compressed-tensors checkpoint in ``folder`` holds, read from the checkpoint itself.

    Returns:
        (an empty skeleton of the model without ``quantization_config``, as the streamed model is built;
        ``{name: meta tensor}``, what the resident model holds after its decompression, tied names sharing one;
        ``get_tensor(name, meta)``: a quantized weight decompressed with compressed-tensors' own function, any other
        tensor read from the checkpoint; ``parts_of(name, tensor)``: a quantized weight's compact tensors and their
        ``"__meta__"`` (format and scheme), for `tensorstream.encoding.encode_tensors`, else ``None``;
        ``phase_of(name, tensor)``: a checkpoint tensor's address phase in its mapped file).

    Raises:
        `UnsupportedQuantizationError`: a scheme that quantizes activations, or an unknown format.
        `FormatError`: a quantized layer's compact tensors are missing from the checkpoint.
    """
    from accelerate import init_empty_weights

    from .checkpoint_files import CheckpointFiles, skeleton_state
    from .integrations.transformers import _without_quantization

    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    files = CheckpointFiles(folder, CT_KIND)
    with init_empty_weights(include_buffers=False):
        probe = cls._from_config(_without_quantization(config))  # type: ignore[attr-defined]
    schemes = _schemes(probe, qc, where)  # matched by compressed-tensors itself, on a skeleton of its own
    del probe

    def held(name: str, tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype] | None:
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in schemes:
            scale = files.infos.get(f"{module}.weight_scale")
            if scale is None or (f"{module}.weight_packed" not in files and name not in files):
                raise FormatError(
                    f"{folder}: {module} is quantized with compressed-tensors ({schemes[module][0]}) but the "
                    f"checkpoint lacks its compact tensors ({module}.weight_packed or .weight, and .weight_scale): "
                    "it is damaged or incomplete."
                )
            return tuple(tensor.shape), scale.torch_dtype  # compressed-tensors decompresses to its scales' dtype
        return (files.infos[name].shape, files.infos[name].torch_dtype) if name in files else None

    model, state = skeleton_state(cls, config, held)

    def compact(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        module, _, attr = name.rpartition(".")
        if attr != "weight" or module not in schemes:
            return None
        fmt, scheme = schemes[module]
        parts = {part: files.read(f"{module}.{key}") for key, part in CT_PARTS.items() if f"{module}.{key}" in files}
        return parts, {"format": fmt, "scheme": json.loads(scheme.model_dump_json())}

    def get_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
        got = compact(name)
        if got is None:
            return files.read(name)
        out = torch.empty(tensor.shape, dtype=tensor.dtype)
        decompress(out, *got)
        return out

    def parts_of(name: str, tensor: torch.Tensor) -> dict[str, Any] | None:
        got = compact(name)
        if got is None:
            return None
        parts, meta = got
        return {**{part: value.contiguous() for part, value in parts.items()}, "__meta__": meta}

    def phase_of(name: str, tensor: torch.Tensor) -> int:
        same = name in files and files.infos[name].torch_dtype == tensor.dtype
        return files.phase(name) if same else 0

    return model, state, get_tensor, parts_of, phase_of
