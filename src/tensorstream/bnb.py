"""bitsandbytes 4-bit and 8-bit checkpoints, streamed as published: the binding rules of their parameter classes.

transformers loads a pre-quantized bitsandbytes checkpoint into ``Linear4bit`` / ``Linear8bitLt`` modules whose
``weight`` is bitsandbytes' own parameter class, and nothing is converted at load: the checkpoint's tensors are what
the resident model holds (bitsandbytes' ``state_dict`` writes exactly them back).

* 4-bit: ``weight`` is a ``Params4bit`` (packed ``uint8 [n/2, 1]``) carrying its ``QuantState`` (``absmax``,
  ``quant_map``, with double quantization ``nested_absmax`` and ``nested_quant_map``, and the packed JSON tensor
  ``quant_state.bitsandbytes__nf4|fp4``), stored in the checkpoint as ``<weight>.<part>``.
* 8-bit: ``weight`` is an ``Int8Params`` (``int8 [out, in]``) with ``CB`` (the weight itself) and ``SCB`` (the
  row scales, stored as ``<module>.SCB``).

The store of such a checkpoint holds the checkpoint's own tensors, block by block, under their own names (so it is
as large as the checkpoint). A streamed block's parameter is rebuilt at each bind from views of the slot by the same
bitsandbytes calls transformers' load makes (`rebuild`): ``Params4bit.from_prequantized`` (transformers'
``Bnb4bitDeserialize``) and ``Int8Params(data, CB=data, SCB=scb)``. It is rebuilt at *every* bind, never cached: a
forward changes these objects (``Linear8bitLt`` moves ``CB``/``SCB`` into its ``state``; ``Linear4bit`` on a CPU with
AVX512-BF16 repacks the weight for its CPU kernel in place), so a fresh one computes exactly what the resident model
computes, from the slot's bytes, and nothing converted outlives the block's forward.

This module is imported only when a model holds bitsandbytes layers or a store says so (bitsandbytes itself is
imported lazily).

Example:
    ```python
    >>> rule = rule_for(model.model.layers[0].self_attn.q_proj, "weight")
    >>> rule.parts("model.layers.0.self_attn.q_proj.weight")
    {'': 'model.layers.0.self_attn.q_proj.weight', 'absmax': 'model.layers.0.self_attn.q_proj.weight.absmax', ...}
    ```
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "KEPT_METHODS",
    "checkpoint_tensors",
    "cpu_packed",
    "PARTS_4BIT",
    "Rule",
    "allow_offloaded_build",
    "is_bnb_parameter",
    "rule_for",
]

#: The pre-quantized methods streamed in the form transformers keeps them (bitsandbytes' own layers).
KEPT_METHODS = ("bitsandbytes_4bit", "bitsandbytes_8bit")
#: A 4-bit weight's quantization state as serialized next to the weight (bitsandbytes' ``QuantState.as_dict``).
PARTS_4BIT = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
)


def _is_bnb(obj: Any) -> bool:
    return type(obj).__module__.startswith("bitsandbytes.")


def is_bnb_parameter(tensor: Any) -> bool:
    """Whether ``tensor`` is one of bitsandbytes' parameter classes (``Params4bit``, ``Int8Params``)."""
    return _is_bnb(tensor) and type(tensor).__name__ in ("Params4bit", "Int8Params")


@dataclass(frozen=True)
class Rule:
    """How the parameter ``attr`` of a bitsandbytes layer is stored (its parts) and rebuilt (`rebuild`)."""

    kind: str  # "4bit" or "8bit"
    module: nn.Module
    attr: str

    def parts(self, full: str, available: Mapping[str, Any] | None = None) -> dict[str, str]:
        """``{part: store name}`` of the tensors this parameter is made of (``full`` is its own name; part ``""``,
        the weight itself, comes first).

        ``available``: the block's tensors; the optional 4-bit parts it lacks (no double quantization, the other
        quant type) are left out.
        """
        if self.kind == "8bit":
            return {"": full, "SCB": f"{full.rpartition('.')[0]}.SCB"}
        names = {part: f"{full}.{part}" for part in PARTS_4BIT}
        return {"": full, **{p: n for p, n in names.items() if available is None or n in available}}

    def rebuild(self, views: Mapping[str, torch.Tensor], requires_grad: bool) -> nn.Parameter:
        """The parameter transformers' load makes of these tensors (``{part: view}`` as `parts` names them), with
        bitsandbytes' own calls; every tensor of it is one of ``views`` (no copy)."""
        import bitsandbytes as bnb

        weight = views[""]
        if self.kind == "8bit":
            scb = views["SCB"]
            return bnb.nn.Int8Params(weight, requires_grad=requires_grad, has_fp16_weights=False, CB=weight, SCB=scb)
        stats = {part: view for part, view in views.items() if part}
        module: Any = self.module
        return bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=stats, requires_grad=requires_grad, device=weight.device, module=module
        )


def rule_for(module: nn.Module, attr: str) -> Rule | None:
    """The `Rule` of ``module.attr`` when it is the weight of a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
    if attr != "weight" or not _is_bnb(module):
        return None
    for cls in type(module).__mro__:
        if cls.__name__ in ("Linear4bit", "Linear8bitLt") and cls.__module__.startswith("bitsandbytes."):
            return Rule("4bit" if cls.__name__ == "Linear4bit" else "8bit", module, attr)
    return None


def cpu_packed(model: nn.Module) -> str | None:
    """The name of a 4-bit weight bitsandbytes repacked for its CPU kernel (``Linear4bit``'s first forward on a CPU
    with AVX512-BF16 does, in place), or ``None``: such a model's ``state_dict`` is not what it computes with."""
    for name, param in model.named_parameters():
        if getattr(getattr(param, "quant_state", None), "packing_format_for_cpu", False):
            return name
    return None


@contextlib.contextmanager
def allow_offloaded_build() -> Iterator[None]:
    """While tensorstream builds a streaming model: transformers' bitsandbytes quantizers accept a device map that
    puts blocks on ``"disk"``.

    They refuse one (unless it is all ``"cpu"``) because an offloaded layer would be kept unquantized; tensorstream
    never lets transformers load those blocks' weights: it binds them from the store (`Rule.rebuild`).
    """
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    originals = {cls: cls.validate_environment for cls in (Bnb4BitHfQuantizer, Bnb8BitHfQuantizer)}

    def patched(original: Any) -> Any:
        def validate_environment(self: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["device_map"] = None  # the device map check only; the environment is still checked
            return original(self, *args, **kwargs)

        return validate_environment

    for cls, original in originals.items():
        cls.validate_environment = patched(original)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.validate_environment = original  # type: ignore[method-assign]


def checkpoint_tensors(
    folder: Path, cls: type, config: Any, method: str
) -> tuple[nn.Module, dict[str, torch.Tensor], Any, Any]:
    """What a store of the bitsandbytes checkpoint in ``folder`` (quantized with ``method``, one of `KEPT_METHODS`)
    holds, read from the checkpoint itself.

    transformers cannot build a bitsandbytes model offloaded to disk (the reshard's usual way of reading a checkpoint
    tensor by tensor), and its resident load holds the checkpoint's tensors unchanged: so the store is written from
    the checkpoint's safetensors files, one tensor at a time, under the names the resident model's ``state_dict``
    gives them (the same names; ties are found on an empty skeleton of the model).

    Returns:
        (the empty skeleton, ``{name: meta tensor}`` in the checkpoint's order with tied names sharing one tensor,
        ``get_tensor(name, meta)`` reading a tensor from its file, ``phase_of(name, tensor)`` its address phase in
        the mapped file, where the resident load binds it).
    """
    from accelerate import init_empty_weights

    from .errors import FormatError
    from .format import TENSOR_ALIGNMENT, read_ts_header

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder} has no safetensors file: a bitsandbytes checkpoint is streamed from safetensors.")
    found: dict[str, tuple[Path, Any, int]] = {}
    for file in files:
        header = read_ts_header(file, require_ts=False)
        for name, info in header.tensors.items():
            found[name] = (file, info, (header.data_offset + info.start) % TENSOR_ALIGNMENT)
    marker = ".SCB" if method == "bitsandbytes_8bit" else ".quant_state.bitsandbytes__"
    if not any(marker in name for name in found):
        raise FormatError(
            f"{folder}/config.json says the checkpoint is quantized with bitsandbytes, but its weights hold no "
            f"bitsandbytes quantization state (no '*{marker}*' tensor): it was not saved quantized. Remove "
            "quantization_config from config.json, or save the quantized model again (save_pretrained of a model "
            "loaded with BitsAndBytesConfig)."
        )
    plain = copy.deepcopy(config)
    for part in {id(c): c for c in (plain, plain.get_text_config(decoder=True))}.values():
        if "quantization_config" in vars(part):
            del part.quantization_config
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(plain)  # type: ignore[attr-defined]
    skeleton = model.state_dict(keep_vars=True)
    owners = {name.rpartition(".")[0] for name in skeleton}
    state: dict[str, torch.Tensor] = {}
    for name, (_, info, _) in found.items():
        module = name.rpartition(".")[0]
        if name in skeleton or module in owners or _weights(name, skeleton):
            state[name] = torch.empty(info.shape, dtype=info.torch_dtype, device="meta")
    first: dict[int, str] = {}
    for name, tensor in skeleton.items():
        if name in state:
            first.setdefault(id(tensor), name)
    for name, tensor in skeleton.items():  # a tied tensor the checkpoint holds once: the same tensor
        if name not in state and id(tensor) in first:
            state[name] = state[first[id(tensor)]]
    handles: dict[Path, Any] = {}

    def get_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        file = found[name][0]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        return handles[file].get_tensor(name)

    def phase_of(name: str, tensor: torch.Tensor) -> int:
        return found[name][2] if name in found else 0

    return model, state, get_tensor, phase_of


def _weights(name: str, skeleton: Mapping[str, Any]) -> list[str]:
    """The weight names ``name`` may be a serialized part of (``<weight>.absmax``, ``<weight>.quant_state...``)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in skeleton]
