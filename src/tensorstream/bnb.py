"""bitsandbytes 4-bit and 8-bit checkpoints, streamed as published: the binding rules of their parameter classes.

transformers loads a pre-quantized bitsandbytes checkpoint into ``Linear4bit`` / ``Linear8bitLt`` layers whose
``weight`` is bitsandbytes' own parameter class, converting nothing:

* 4-bit: ``weight`` is a ``Params4bit`` (packed ``uint8 [n/2, 1]``) carrying its ``QuantState`` (``absmax``,
  ``quant_map``, with double quantization ``nested_absmax`` and ``nested_quant_map``, and the packed JSON of the
  rest), made by ``Params4bit.from_prequantized`` (transformers' ``Bnb4bitDeserialize``).
* 8-bit: ``weight`` is an ``Int8Params`` (``int8 [out, in]``) with ``CB`` (the weight itself) and ``SCB`` (the
  row scales, stored as ``<layer>.SCB``).

transformers cannot build such a model offloaded to disk, so its store is written from the checkpoint's files
(`checkpoint_tensors`): each quantized weight made into that same parameter with the same call, and stored as its
parts by its binding rule (`Params4bitRule`, `Int8ParamsRule`; `tensorstream.rules`). The streamed model is built
plain and its ruled layers made bitsandbytes' by transformers' ``replace_with_bnb_linear`` (`bnb_layers`); each
bind rebuilds the parameter from views of the slot. It is rebuilt at *every* bind, never cached
(``rebuild_each_bind``): a forward changes these objects (``Linear8bitLt`` moves ``CB``/``SCB`` into its ``state``;
``Linear4bit`` on a CPU with AVX512-BF16 repacks the weight for its CPU kernel in place), so a fresh one computes
exactly what the resident model computes, from the slot's bytes, and nothing converted outlives the block's forward.

bitsandbytes itself is imported only when a store or model uses it.

Example:
    ```python
    >>> rule_for(model.model.layers[0].self_attn.q_proj.weight).name   # tensorstream.rules.rule_for
    'bnb-4bit'
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .rules import BindingRule, register_rule

__all__ = [
    "KEPT_METHODS",
    "Int8ParamsRule",
    "Params4bitRule",
    "bnb_layers",
    "checkpoint_tensors",
    "cpu_packed",
    "is_bnb_parameter",
    "restore_int8_state",
]

#: The pre-quantized methods streamed in the form transformers keeps them (bitsandbytes' own layers).
KEPT_METHODS = ("bitsandbytes_4bit", "bitsandbytes_8bit")


def _is_bnb(obj: Any, name: str) -> bool:
    cls = type(obj)
    return cls.__name__ == name and cls.__module__.startswith("bitsandbytes.")


def is_bnb_parameter(tensor: Any) -> bool:
    """Whether ``tensor`` is one of bitsandbytes' parameter classes (``Params4bit``, ``Int8Params``)."""
    return _is_bnb(tensor, "Params4bit") or _is_bnb(tensor, "Int8Params")


class Params4bitRule(BindingRule):
    """bitsandbytes' ``Params4bit``: the packed weight and its ``QuantState`` as bitsandbytes serializes it
    (``QuantState.as_dict(packed=True)``: ``absmax``, ``quant_map``, ``nested_*`` and the packed JSON of the rest),
    rebuilt with ``Params4bit.from_prequantized``, the call transformers' ``Bnb4bitDeserialize`` makes."""

    name = "bnb-4bit"
    #: the forward changes the parameter (`tensorstream.bnb`): rebuilt at every bind, never cached
    rebuild_each_bind = True
    #: a built ``Linear4bit``'s meta weight is ``[out, in]``; loaded, ``[out * in / 2, 1]``: the placeholder takes
    #: the stored shape (`tensorstream.binding.block_targets`)
    reshapes = True

    def matches(self, tensor: torch.Tensor) -> bool:
        return _is_bnb(tensor, "Params4bit")

    def flatten(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state = getattr(tensor, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            raise TypeError("its quantization state is missing or repacked for the CPU kernel")
        stats = state.as_dict(packed=True)
        (key,) = [k for k in stats if k.startswith("quant_state.")]
        parts = {"data": tensor.data, **{k: v for k, v in stats.items() if k != key}, "quant_state": stats[key]}
        return parts, {"quant_state_key": key}

    def rebuild(self, parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any], requires_grad: bool) -> nn.Parameter:
        import bitsandbytes as bnb

        data = parts["data"]
        stats = {str(meta["quant_state_key"]) if k == "quant_state" else k: v for k, v in parts.items() if k != "data"}
        return bnb.nn.Params4bit.from_prequantized(
            data=data, quantized_stats=stats, requires_grad=requires_grad, device=data.device
        )


class Int8ParamsRule(BindingRule):
    """bitsandbytes' ``Int8Params``: the ``int8`` weight (also its ``CB``) and its row scales ``SCB``."""

    name = "bnb-int8"
    rebuild_each_bind = True  # ``Linear8bitLt.forward`` moves CB and SCB into the layer's state

    def matches(self, tensor: torch.Tensor) -> bool:
        return _is_bnb(tensor, "Int8Params")

    def flatten(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        scb = getattr(tensor, "SCB", None)
        if scb is None or getattr(tensor, "has_fp16_weights", False):
            raise TypeError("its row scales (SCB) are not on the parameter (restore_int8_state)")
        return {"data": tensor.data, "SCB": scb}, {}

    def rebuild(self, parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any], requires_grad: bool) -> nn.Parameter:
        import bitsandbytes as bnb

        data = parts["data"]
        return bnb.nn.Int8Params(data, requires_grad=requires_grad, has_fp16_weights=False, CB=data, SCB=parts["SCB"])


register_rule(Params4bitRule())
register_rule(Int8ParamsRule())


def restore_int8_state(model: nn.Module) -> None:
    """Put back on each ``Int8Params`` the ``CB``/``SCB`` its ``Linear8bitLt`` moved into its ``state`` at a forward
    (what the layer's next forward reads from either place: nothing it computes changes), so it can be stored."""
    for module in model.modules():
        weight, state = getattr(module, "weight", None), getattr(module, "state", None)
        moved = getattr(state, "CB", None) is not None and getattr(state, "SCB", None) is not None
        if _is_bnb(weight, "Int8Params") and getattr(weight, "CB", None) is None and moved:
            weight.CB, weight.SCB = state.CB, state.SCB  # type: ignore[union-attr]


def cpu_packed(model: nn.Module) -> str | None:
    """The name of a 4-bit weight bitsandbytes repacked for its CPU kernel (``Linear4bit``'s first forward on a CPU
    with AVX512-BF16 does, in place), or ``None``: such a model's ``state_dict`` is not what it computes with."""
    for name, param in model.named_parameters():
        if getattr(getattr(param, "quant_state", None), "packing_format_for_cpu", False):
            return name
    return None


def bnb_layers(model: nn.Module, config: Any, store: Any, blocks: Any) -> None:
    """Make the layers of ``blocks`` whose weights the store holds as bitsandbytes parameters (`Params4bitRule`,
    `Int8ParamsRule`) bitsandbytes' own ``Linear4bit`` / ``Linear8bitLt``, with transformers' own
    ``replace_with_bnb_linear`` and ``config``'s quantization config: what the resident load builds.

    The streamed model is built by transformers without the quantization config (its quantizer refuses offloaded
    blocks, and would deserialize the stored parts), so the layers are plain ``Linear`` on the meta device until this
    replaces them; their placeholders then take the stored parameters' shapes when their blocks are bound.
    """
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.utils.quantization_config import BitsAndBytesConfig

    qc = config.quantization_config
    qc = BitsAndBytesConfig.from_dict(qc) if isinstance(qc, dict) else qc
    entries = {entry.name: entry for entry in store.blocks}
    for block in blocks:
        ruled = store.codec(entries[block]).rules
        held = {n for n, r in ruled.items() if r.rule.name in (Params4bitRule.name, Int8ParamsRule.name)}
        if not held:
            continue
        module = model.get_submodule(block)
        keep = [
            name
            for name, sub in module.named_modules()
            if isinstance(sub, nn.Linear) and f"{block}.{name}.weight" not in held
        ]
        replace_with_bnb_linear(module, modules_to_not_convert=keep, quantization_config=qc, pre_quantized=True)
        module.train(module.training)  # the new layers in the block's mode (eval: bitsandbytes' CPU kernel path)
    # what transformers' bitsandbytes quantizers record on the model they load (PEFT's k-bit training reads it)
    model.config.quantization_config = qc  # type: ignore[union-attr]
    setattr(model, "is_loaded_in_8bit" if qc.load_in_8bit else "is_loaded_in_4bit", True)


def checkpoint_tensors(
    folder: Path, cls: type, config: Any, method: str
) -> tuple[nn.Module, dict[str, torch.Tensor], Any, Any]:
    """What a store of the bitsandbytes checkpoint in ``folder`` (quantized with ``method``, one of `KEPT_METHODS`)
    holds, read from the checkpoint itself.

    transformers cannot build a bitsandbytes model offloaded to disk (the reshard's usual way of reading a checkpoint
    tensor by tensor), and its resident load converts nothing: each quantized weight becomes a ``Params4bit``
    (``Params4bit.from_prequantized`` of the weight and its serialized quantization state) or an ``Int8Params``
    (the weight, ``CB`` the weight, ``SCB`` the layer's ``SCB``). So the store is written from the checkpoint's
    files, one layer at a time: those same parameters, made with the same calls, which the binding rules
    (`Params4bitRule`, `Int8ParamsRule`) store as their parts.

    Returns:
        (an empty skeleton of the model, ``{name: meta tensor}`` of what the resident model's ``state_dict(keep_vars=
        True)`` holds, tied names sharing one tensor, ``get_tensor(name, meta)`` making it from the checkpoint,
        ``phase_of(name, tensor)``: a plain tensor's address phase in the mapped file, where the resident load binds
        it).

    Raises:
        `FormatError`: the checkpoint holds no bitsandbytes quantization state (its config says bitsandbytes, but it
            was not saved quantized), or no safetensors file.
    """
    from .checkpoint_files import CheckpointFiles, skeleton_state
    from .errors import FormatError

    files = CheckpointFiles(folder, method)
    eight = method == "bitsandbytes_8bit"
    marker = ".SCB" if eight else ".quant_state.bitsandbytes__"
    if not any(marker in name for name in files.infos):
        raise FormatError(
            f"{folder}/config.json says the checkpoint is quantized with bitsandbytes, but its weights hold no "
            f"bitsandbytes quantization state (no '*{marker}*' tensor): it was not saved quantized. Remove "
            "quantization_config from config.json, or save the quantized model again (save_pretrained of a model "
            "loaded with BitsAndBytesConfig)."
        )

    def quantized(name: str) -> bool:
        if not name.endswith(".weight"):
            return False
        if eight:
            return f"{name.rpartition('.')[0]}.SCB" in files
        return any(f"{name}.quant_state.bitsandbytes__{t}" in files for t in ("nf4", "fp4"))

    def held(name: str, tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype] | None:
        return (files.infos[name].shape, files.infos[name].torch_dtype) if name in files else None

    model, state = skeleton_state(cls, config, held)

    def get_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = files.read(name)
        if not quantized(name):
            return weight
        if eight:
            scb = files.read(f"{name.rpartition('.')[0]}.SCB")
            return bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb)
        stats = {key[len(name) + 1 :]: files.read(key) for key in files.under(name)}
        return bnb.nn.Params4bit.from_prequantized(
            data=weight, quantized_stats=stats, requires_grad=False, device=weight.device
        )

    def phase_of(name: str, tensor: torch.Tensor) -> int:
        return 0 if quantized(name) else files.phase(name)

    return model, state, get_tensor, phase_of
