"""GPTQ and AWQ checkpoints, streamed as published: the checkpoint's tensors in gptqmodel's layers, loaded per forward.

transformers loads a GPTQ checkpoint through optimum and gptqmodel: every quantized linear of a block becomes the
``QuantLinear`` class gptqmodel selects for the device (on a CPU, ``TorchAtenLinear``), holding the checkpoint's
``qweight``, ``qzeros``, ``scales``, ``g_idx`` (and ``bias``) as *buffers*; then, once, optimum converts ``qzeros``
from the checkpoint's v1 format to gptqmodel's v2 (``0x77777777`` -> ``0x88888888`` at 4 bits,
``convert_gptq_v1_to_v2_format_module``) and calls each layer's ``post_init``; at its first forward
``TorchAtenLinear`` repacks ``qweight``/``qzeros``/``scales`` for the CPU's int4 kernel, in place of the buffers.

A store built from a loaded model held converted values that a streamed load converted again (every zero point off by
one). So the store is written from the checkpoint's files (`checkpoint_tensors`): its tensors as they are, ``qzeros``
marked by the binding rule ``gptq-qzeros-v1`` (`GptqZerosRule`: still in the checkpoint's v1 format). The streamed
model gets gptqmodel's layers where the store holds ``qweight`` (`gptq_layers`, with the class optimum's quantizer
selects for the execution device), their state registered as parameters, which the engine binds like any other. A
forward pre-hook then does, at *every* forward, what the resident load did once: the layer's own state back to what
its constructor made, the bound tensors as its buffers, ``qzeros`` copied (the slot is never written) and converted
by gptqmodel's own function, ``post_init``. The forward repacks as the resident layer's first forward did; a post-hook
puts the bound parameters back and drops what the forward made. Nothing converted outlives the forward.

AWQ goes the same way without the ``qzeros`` conversion: transformers builds its layers with
``replace_with_awq_linear`` (gptqmodel's class for ``METHOD.AWQ``; ``TorchAtenAwqLinear`` on a CPU), loads the
checkpoint's ``qweight``, ``qzeros``, ``scales`` into them and calls ``post_init``; the first forward repacks for the
CPU's int4 kernel. Its ``qzeros`` are marked by the rule ``awq-qzeros`` (no conversion). Model types whose AWQ load
also scales activations (``replace_quantization_scales``: Falcon, MPT, BLOOM, ...) are refused.

Only kernels whose streamed forward was compared bit for bit with the resident one are used (`VERIFIED_KERNELS`);
another kernel selected on this device (a GPU's Marlin, ...) is refused with `UnsupportedQuantizationError`.
gptqmodel and optimum are imported only when such a store or model is used.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .rules import BindingRule, register_rule

__all__ = [
    "GPTQ_METHODS",
    "AwqZerosRule",
    "GptqZerosRule",
    "VERIFIED_KERNELS",
    "checkpoint_tensors",
    "gptq_available",
    "gptq_layers",
]

#: The pre-quantized methods streamed in gptqmodel's own layers.
GPTQ_METHODS = ("gptq", "awq")
#: gptqmodel's layer classes whose streamed forward is tested bit-exact against the resident load (tests/test_gptq.py).
VERIFIED_KERNELS = ("TorchAtenLinear", "TorchAtenAwqLinear")
#: What transformers' load of each method needs installed.
NEEDS = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",)}
#: A quantized layer's state in a GPTQ checkpoint (``bias`` where the layer has one), in the resident layer's order.
STATE = ("qweight", "qzeros", "scales", "g_idx", "bias")
_INTERNALS = frozenset(nn.Module().__dict__)  # torch's own module state (hooks, parameters, training, ...)


def gptq_available(method: str = "gptq") -> bool:
    """Whether what transformers' own load of ``method`` needs is installed (`NEEDS`: gptqmodel, and for GPTQ
    optimum)."""
    return all(importlib.util.find_spec(name) is not None for name in NEEDS.get(method, ("gptqmodel",)))


class _V1Zeros(torch.Tensor):
    """A checkpoint's ``qzeros`` in GPTQ's v1 format, as `checkpoint_tensors` reads it (for `GptqZerosRule`)."""


class _AwqZeros(torch.Tensor):
    """A checkpoint's AWQ ``qzeros``, as `checkpoint_tensors` reads it (for `AwqZerosRule`)."""


class GptqZerosRule(BindingRule):
    """A GPTQ layer's ``qzeros`` in the checkpoint's v1 format: stored as they are, bound as a view of the slot; the
    layer's pre-hook converts a copy to v2 at every forward (`gptq_layers`). The record makes the block one that
    tensorstream binds itself (resident or streamed), into the layers `gptq_layers` makes."""

    name = "gptq-qzeros-v1"
    marker: type = _V1Zeros
    meta: ClassVar[dict[str, Any]] = {"format": 1}

    def matches(self, tensor: torch.Tensor) -> bool:
        return type(tensor) is self.marker

    def flatten(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"data": tensor.as_subclass(torch.Tensor)}, dict(self.meta)

    def rebuild(self, parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any], requires_grad: bool) -> nn.Parameter:
        return nn.Parameter(parts["data"], requires_grad=False)

    def validate(self, meta: Mapping[str, Any]) -> None:
        if {k: meta.get(k) for k in self.meta} != self.meta:
            raise ValueError(f"{self.name} record {dict(meta)!r}, expected {self.meta!r}")


class AwqZerosRule(GptqZerosRule):
    """An AWQ layer's ``qzeros``, stored and bound as they are (AWQ's load converts nothing)."""

    name = "awq-qzeros"
    marker = _AwqZeros
    meta: ClassVar[dict[str, Any]] = {"method": "awq"}


register_rule(GptqZerosRule())
register_rule(AwqZerosRule())


def checkpoint_tensors(
    folder: Path, cls: type, config: Any, method: str
) -> tuple[nn.Module, dict[str, torch.Tensor], Any, Any]:
    """What a store of the GPTQ checkpoint in ``folder`` holds, read from the checkpoint itself: for every name of
    the resident model's ``state_dict`` (a quantized linear's ``qweight``, ``qzeros``, ``scales``, ``g_idx``,
    ``bias`` in place of its ``weight``), the checkpoint's tensor, ``qzeros`` as `GptqZerosRule` stores it.

    Returns:
        (an empty skeleton of the model, ``{name: meta tensor}``, ``get_tensor(name, meta)``, ``phase_of(name,
        tensor)``), as `tensorstream.bnb.checkpoint_tensors`.

    Raises:
        `FormatError`: no safetensors file, or no quantized layer (``*.qweight``) in it.
        `UnsupportedQuantizationError`: a quantized layer outside the model's blocks (a quantized ``lm_head``).
    """
    from .checkpoint_files import CheckpointFiles, skeleton_state
    from .errors import FormatError, UnsupportedQuantizationError
    from .plan import find_units

    if method == "awq":
        from transformers.integrations.awq import AWQ_SCALES_MAPPINGS

        if getattr(config, "model_type", None) in AWQ_SCALES_MAPPINGS:
            raise UnsupportedQuantizationError(
                f"{folder} is quantized with awq for a {config.model_type} model, whose AWQ load also scales its "
                "activations (transformers' replace_quantization_scales), which tensorstream does not reproduce yet. "
                "Instead, load it without device_map='tensorstream' (docs/quantization.md, 'Pre-quantized "
                "checkpoints').",
                method,
            )
    files = CheckpointFiles(folder, method)
    if not any(name.endswith(".qweight") for name in files.infos):
        raise FormatError(
            f"{folder}/config.json says the checkpoint is quantized with {method}, but its weights hold no quantized "
            "layer (no '*.qweight' tensor): it was not saved quantized. Remove quantization_config from config.json, "
            "or save the quantized model again."
        )

    def held(name: str, tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype] | None:
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{layer}.qweight" in files:
            return (0,), torch.int32  # replaced below by the layer's quantized state
        return (files.infos[name].shape, files.infos[name].torch_dtype) if name in files else None

    model, skeleton = skeleton_state(cls, config, held)
    blocks = tuple(f"{name}." for name, kind in find_units(model) if kind == "block")
    outside = [n for n in files.infos if n.endswith(".qweight") and not n.startswith(blocks)]
    if outside:
        raise UnsupportedQuantizationError(
            f"{folder} is quantized with {method} outside the model's repeated blocks ({outside[0]}: a quantized "
            "head or embedding, GPTQ's lm_head=True), and tensorstream streams GPTQ layers inside blocks only. "
            "Instead, load it without device_map='tensorstream' (docs/quantization.md, 'Pre-quantized checkpoints').",
            method,
        )
    state: dict[str, torch.Tensor] = {}
    for name, tensor in skeleton.items():
        layer = name.removesuffix(".weight")
        if not (name.endswith(".weight") and f"{layer}.qweight" in files):
            state[name] = tensor
            continue
        for part in STATE:
            if f"{layer}.{part}" in files:
                info = files.infos[f"{layer}.{part}"]
                state[f"{layer}.{part}"] = torch.empty(info.shape, dtype=info.torch_dtype, device="meta")

    marker = _V1Zeros if method == "gptq" else _AwqZeros

    def get_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
        data = files.read(name)
        return data.as_subclass(marker) if name.endswith(".qzeros") else data

    def phase_of(name: str, tensor: torch.Tensor) -> int:
        return files.phase(name)

    return model, state, get_tensor, phase_of


def _layer_factory(method: str, qc: Any, device: torch.device) -> tuple[Any, Any]:
    """(gptqmodel's layer class transformers' load of ``method`` selects for ``device``, a function making one such
    layer for an ``nn.Linear`` as that load makes it)."""
    if method == "gptq":  # optimum's GPTQQuantizer, made and used as transformers' GptqHfQuantizer does
        from optimum.gptq import GPTQQuantizer

        quantizer = GPTQQuantizer.from_dict(qc.to_dict_optimum())
        quantizer.select_quant_linear(device_map={"": device}, pack=False)

        def gptq(linear: nn.Linear) -> nn.Module:
            return quantizer.quant_linear(  # optimum's `_replace_by_quant_layers`
                quantizer.bits,
                quantizer.group_size,
                quantizer.desc_act,
                quantizer.sym,
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                weight_dtype=linear.weight.dtype,
            )

        return quantizer.quant_linear, gptq
    from gptqmodel.quantization import METHOD
    from gptqmodel.utils.importer import hf_select_quant_linear_v2

    kernel = hf_select_quant_linear_v2(  # transformers' `replace_with_awq_linear`
        bits=qc.bits,
        group_size=qc.group_size,
        desc_act=False,
        sym=False,
        format=qc.format,
        backend=qc.backend,
        device_map={"": device},
        quant_method=METHOD.AWQ,
        zero_point=qc.zero_point,
        pack=False,
    )

    def awq(linear: nn.Linear) -> nn.Module:
        with torch.device("meta"):
            layer = kernel(
                bits=qc.bits,
                sym=qc.sym,
                desc_act=qc.desc_act,
                group_size=qc.group_size,
                in_features=linear.in_features,
                out_features=linear.out_features,
                bias=linear.bias is not None,
                dev=linear.weight.device,
                register_buffers=True,
            )
        return layer.requires_grad_(False)

    return kernel, awq


def gptq_layers(model: nn.Module, config: Any, store: Any, blocks: Any, device: torch.device, method: str) -> None:
    """Make the linears of ``blocks`` whose ``qweight`` the store holds gptqmodel's layers, of the class transformers'
    load selects for ``device`` and made as it makes them (`_layer_factory`), each with its state as meta parameters
    that the engine binds, and the hooks that load it at every forward (module docstring).

    Raises:
        `UnsupportedQuantizationError`: the class selected is not one of `VERIFIED_KERNELS`.
    """
    from transformers.utils.quantization_config import AwqConfig, GPTQConfig

    from .errors import UnsupportedQuantizationError

    qc = config.quantization_config
    if isinstance(qc, dict):
        qc = (GPTQConfig if method == "gptq" else AwqConfig).from_dict(qc)
    kernel, make = _layer_factory(method, qc, device)
    if kernel.__name__ not in VERIFIED_KERNELS:
        raise UnsupportedQuantizationError(
            f"gptqmodel selects {kernel.__name__} for {method} layers on {device}, and tensorstream streams "
            f"{method} checkpoints only in the kernels it has compared bit for bit with transformers' resident load "
            f"({', '.join(VERIFIED_KERNELS)}, gptqmodel's CPU kernels). Instead, load it without "
            "device_map='tensorstream' (transformers runs it resident), or stream it on the CPU "
            "(tensorstream.Config(device='cpu')) (docs/quantization.md, 'Pre-quantized checkpoints').",
            method,
        )
    entries = {entry.name: entry for entry in store.blocks}
    for block in blocks:
        codec = store.codec(entries[block])
        module = model.get_submodule(block)
        for local, linear in list(module.named_modules()):
            full = f"{block}.{local}"
            if not isinstance(linear, nn.Linear) or f"{full}.qweight" not in codec.logical:
                continue
            layer = make(linear)
            layer.device = torch.device(device)
            # transformers' loader casts each checkpoint tensor to the dtype of the buffer it loads it into (a GPTQ
            # checkpoint's bf16 scales become the layer's fp16); the hook does the same at every forward
            dtypes: dict[str, torch.dtype] = {}
            for part in STATE:
                info = codec.logical.get(f"{full}.{part}")
                buffer = layer._buffers.pop(part, None)
                if info is not None:
                    dtypes[part] = buffer.dtype if buffer is not None else info.torch_dtype
                    meta = torch.empty(info.shape, dtype=info.torch_dtype, device="meta")
                    layer._parameters[part] = nn.Parameter(meta, requires_grad=False)
            layer.train(linear.training)
            _install(layer, dtypes, convert=method == "gptq")
            owner, _, attr = local.rpartition(".")
            setattr(module.get_submodule(owner), attr, layer)
    model.config.quantization_config = qc  # type: ignore[union-attr]  # what transformers' load records


def _install(layer: nn.Module, dtypes: Mapping[str, torch.dtype], convert: bool) -> None:
    """The hooks that load ``layer``'s bound state (``dtypes``: the dtype of each buffer it is loaded into;
    ``convert``: GPTQ's ``qzeros`` v1 -> v2) at every forward and put it back after (module docstring)."""
    fresh = {k: copy.copy(v) for k, v in layer.__dict__.items() if k not in _INTERNALS}
    names = list(dtypes)

    def load(module: Any, args: Any) -> None:
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

        # the engine bound them for this block's forward (`tensorstream.engine`); outside it they are placeholders
        bound: dict[str, torch.Tensor] = {part: module._parameters[part] for part in names}
        if any(param.is_meta for param in bound.values()):
            from .errors import UnsupportedOperationError

            raise UnsupportedOperationError(
                f"a {type(module).__name__} of a streamed block was called on its own: its weights exist only while "
                "its block runs (the block's forward binds them). Call the model (or the whole block), or load the "
                "model resident (without device_map='tensorstream', or tensorstream.detach(model))."
            )
        loaded = {part: param.detach().to(dtype=dtypes[part]) for part, param in bound.items()}  # `_materialize_copy`
        for key in [k for k in module.__dict__ if k not in _INTERNALS and k not in fresh]:
            del module.__dict__[key]  # what a forward made (the CPU kernel's packed tensors, caches)
        module.__dict__.update({k: copy.copy(v) for k, v in fresh.items()})
        module.__dict__["_tensorstream_bound"] = bound
        for part in names:
            del module._parameters[part]
        module._buffers.update(loaded)
        if convert:
            module._buffers["qzeros"] = module._buffers["qzeros"].clone()  # converted in place: never the slot
            module.qzero_format(format=1)
            convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
        module.post_init()

    def unload(module: Any, args: Any, output: Any) -> None:
        bound = module.__dict__.pop("_tensorstream_bound", {})
        for part in names:
            module._buffers.pop(part, None)
        module._parameters.update(bound)

    layer.register_forward_pre_hook(load)
    layer.register_forward_hook(unload)
