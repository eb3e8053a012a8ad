"""tensorstream's own ``int8`` / ``int4`` stores: linear weights quantized once, computed on in their compact form.

A store of kind ``int8`` or ``int4`` holds, for every `torch.nn.Linear` weight of its streamed units, the quantized
tensor torchao makes of it, flattened by the generic binding rule (`tensorstream.rules.SubclassRule`): the block's
file is a plain ``.ts`` file of int8 / packed int4 values and scales, bound as views (on the CPU, views of the
file's mapping: no copy, no expansion) and rebuilt into the tensor subclass whose ``F.linear`` runs the quantized
kernel:

* ``int8``: symmetric, one scale per output channel, quantized by torchao's ``Int8Tensor.from_hp(w, PerRow())``
  (the values torchao's ``Int8WeightOnlyConfig`` gives); bound as `Int8PackedTensor`, an ``Int8Tensor`` whose linear
  is ``torch.ops.aten._weight_int8pack_mm`` with the scale in the weight's dtype (torchao's own weight-only path
  converts the whole int8 matrix to the activation dtype at every call, 4x slower than the bf16 matmul here:
  `benchmarks/quantized_matmul.py`);
* ``int4``: asymmetric, groups of 64 (32 where 64 does not divide), torchao's ``Int4OpaqueTensor``
  (``PrototypeInt4WeightOnlyConfig``: tinygemm's CPU kernel ``_weight_int4pack_mm_for_cpu``), stored in the packed
  layout that kernel reads. That layout depends on the CPU's vector width (`int4_layout`), so it is part of the
  store's fingerprint (a machine with another layout builds its own store) and checked when a block is bound.

The reference is the same model quantized resident (`quantize_linears` on a resident model, or torchao's
``quantize_`` with the same configuration, then `as_packed` for int8): a streamed model's outputs are ``torch.equal``
to it, and `tensorstream.detach` gives it back (the same subclasses).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._quiet import quiet_torchao
from .errors import BackendUnavailableError, ConfigError
from .rules import int4_layout

__all__ = [
    "COMPACT_KINDS",
    "as_packed",
    "kind_identity",
    "linear_weights",
    "packed_class",
    "quantize_linears",
    "quantize_model",
    "quantize_weight",
]

#: Store kinds whose blocks are bound compact (no expansion): their tensors are ruled parameters.
COMPACT_KINDS = ("int8", "int4")
#: Revision of the compact layout, part of the fingerprint (1 expanded every block to bf16; 2 missed linear units).
COMPACT_REVISION = 3
INT4_GROUPS = (64, 32)


def kind_identity(kind: str | None) -> str | None:
    """What the fingerprint records for store kind ``kind`` (the compact kinds with their revision and layout)."""
    if kind == "int8":
        return f"int8/{COMPACT_REVISION}"
    if kind == "int4":
        return f"int4/{COMPACT_REVISION}/{int4_layout()}"
    return kind


def _torchao() -> Any:
    try:
        with quiet_torchao():
            import torchao.quantization as quantization
            from torchao.prototype.quantization import int4
    except ImportError as err:
        raise BackendUnavailableError(
            f"int8 and int4 stores are quantized with torchao, which cannot be imported ({err}); install it with "
            "`pip install 'tensorstream[quantize]'`."
        ) from None
    return quantization, int4


_PACKED: list[type] = []


def packed_class() -> type:
    """`Int8PackedTensor`: torchao's ``Int8Tensor`` with ``F.linear`` on ``_weight_int8pack_mm`` (made once)."""
    if _PACKED:
        return _PACKED[0]
    quantization, _ = _torchao()
    base = quantization.Int8Tensor

    class Int8PackedTensor(base):  # type: ignore[misc, valid-type]
        """A per-channel ``Int8Tensor`` (scale in the weight's dtype) whose linear is ``_weight_int8pack_mm`` (off the
        CPU: the int8 values converted, the bf16 matmul, then the scale)."""

    def linear(func: Any, types: Any, args: Any, kwargs: Any) -> torch.Tensor:
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias") if kwargs else None
        flat = x.reshape(-1, x.shape[-1])
        scale = weight.scale.reshape(-1).to(x.dtype)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), weight.qdata, scale)
        else:
            y = torch.mm(flat, weight.qdata.t().to(x.dtype)) * scale
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y + bias if bias is not None else y

    Int8PackedTensor.implements(torch.ops.aten.linear.default)(linear)
    Int8PackedTensor.implements_torch_function(torch.nn.functional.linear)(linear)
    Int8PackedTensor.__module__ = __name__
    Int8PackedTensor.__qualname__ = "Int8PackedTensor"
    globals()["Int8PackedTensor"] = Int8PackedTensor  # importable by the binding rule: tensorstream.compact:...
    torch.serialization.add_safe_globals([Int8PackedTensor])
    _PACKED.append(Int8PackedTensor)
    return Int8PackedTensor


def __getattr__(name: str) -> Any:  # ``tensorstream.compact:Int8PackedTensor``, made when first asked for
    if name == "Int8PackedTensor":
        return packed_class()
    raise AttributeError(name)


def as_packed(tensor: torch.Tensor) -> torch.Tensor:
    """torchao's per-channel ``Int8Tensor`` as `Int8PackedTensor` (its scale rounded to the weight's dtype, as
    torchao's own weight-only linear rounds it at each call); any other tensor as it is."""
    quantization, _ = _torchao()
    cls = packed_class()
    if type(tensor) is not quantization.Int8Tensor:
        return tensor
    t: Any = tensor
    return cls(t.qdata, t.scale.to(t.dtype), list(t.block_size), t.dtype)


def quantize_weight(weight: torch.Tensor, kind: str) -> torch.Tensor | None:
    """``weight`` (a 2-D float linear weight) quantized for store kind ``kind``; None when it stays as it is."""
    if weight.dim() != 2 or weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    quantization, int4 = _torchao()
    w = weight.detach().to("cpu")
    with quiet_torchao():
        if kind == "int8":
            return as_packed(quantization.Int8Tensor.from_hp(w, quantization.PerRow()))
        rows, cols = w.shape
        group = next((g for g in INT4_GROUPS if cols % g == 0), None)
        if group is None or rows % 16:
            return None
        return int4.Int4OpaqueTensor.from_hp(w, [1, group])


def linear_weights(model: nn.Module, prefixes: Iterable[str] = ("",)) -> set[str]:
    """Names of the weights of ``model``'s `torch.nn.Linear` modules under ``prefixes`` (what torchao quantizes)."""
    starts = tuple(f"{p}." if p else "" for p in prefixes)
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and f"{name}.".startswith(starts)  # a unit that is a linear layer too
    }


def quantize_linears(
    tensors: Mapping[str, torch.Tensor], kind: str, linear: set[str]
) -> tuple[dict[str, torch.Tensor], int]:
    """``tensors`` with every linear weight (a name in ``linear``) quantized for ``kind``, and how many were."""
    if kind not in COMPACT_KINDS:
        raise ConfigError(f"store kind {kind!r} is not one of {COMPACT_KINDS}")
    out: dict[str, torch.Tensor] = {}
    count = 0
    for name, tensor in tensors.items():
        quantized = quantize_weight(tensor, kind) if name in linear else None
        out[name] = tensor if quantized is None else quantized
        count += quantized is not None
    return out, count


def quantize_model(model: nn.Module, kind: str, prefixes: Iterable[str] = ("",)) -> nn.Module:
    """Quantize ``model``'s linear weights under ``prefixes`` in place, as a ``kind`` store holds them: the resident
    reference a streamed model of that store equals."""
    names = linear_weights(model, prefixes)
    for name in sorted(names):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        quantized = quantize_weight(module._parameters[attr], kind)  # type: ignore[arg-type]
        if quantized is not None:
            module._parameters[attr] = nn.Parameter(quantized, requires_grad=False)
    return model
