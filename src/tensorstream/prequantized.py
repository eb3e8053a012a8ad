"""Pre-quantized checkpoints: which ones stream, in what form, and a typed refusal for every other one.

A checkpoint is pre-quantized when its ``config.json`` has a ``quantization_config`` (or one is passed to
``from_pretrained``). transformers then loads it through a quantizer, and what the loaded model holds depends on the
method and the machine:

* **dequantized at load** (fine-grained FP8 and MXFP4 without their kernels, as on a CPU): the quantizer converts the
  checkpoint's compact tensors to plain bf16 weights, removes ``quantization_config`` from the model and leaves
  ordinary modules. tensorstream streams these. Its store holds what the resident model holds, so the streamed
  model is built *without* ``quantization_config`` (as the resident one ends up): no load-time conversion runs a
  second time on tensors that were already converted (the root of the GPTQ double ``qzeros`` conversion). For
  fine-grained FP8, the store keeps the checkpoint's own float8 weights and block scales (store kind ``"fp8"``)
  and each block is dequantized when it is loaded with the same arithmetic as transformers' ``Fp8Dequantize``
  (`fp8_dequantize`), checked bit for bit against transformers' own result at reshard time.
* **decompressed at the first forward** (compressed-tensors' weight-only ``pack-quantized`` int4/int8 and
  ``float-quantized`` FP8): the resident model holds compressed layers that a hook decompresses in place into plain
  ``Linear`` layers when it first runs. The store (kind ``"compressed-tensors"``) keeps the checkpoint's compact
  tensors and each block is decompressed when it loads with compressed-tensors' own function
  (`tensorstream.ctensors`); the streamed model is built without ``quantization_config``, as for FP8 above.
  Schemes that quantize activations are refused (their layers keep a quantizing forward).
* **kept in the method's own layers** (bitsandbytes 4-bit and 8-bit): the resident model computes with
  ``Linear4bit``/``Linear8bitLt`` on the checkpoint's own tensors, unconverted. The store holds them as the parts of
  those parameters (binding rules), the streamed model gets bitsandbytes' layers where the store has such
  parameters, and each bind rebuilds ``Params4bit``/``Int8Params`` from views of the slot (`tensorstream.bnb`).
  Both this and the previous kind are written from the checkpoint's files block by block: transformers cannot
  disk-offload them.
* **loaded into the method's own layers at each forward** (GPTQ and AWQ, where gptqmodel is installed): the resident
  model converts GPTQ's ``qzeros`` once after loading and its CPU kernel repacks at the first forward; the store holds
  the checkpoint's tensors unconverted and each forward of a streamed layer repeats that load (`tensorstream.gptq`).
* **not streamed yet** (GPTQ/AWQ without gptqmodel, and FP8/MXFP4 with their kernels): the model holds the method's
  own modules or tensor subclasses, and some convert tensors after loading. `check_method` and `check_loaded` raise
  `UnsupportedQuantizationError` naming the method, the reason and what works instead, before any store is written.

`check_offload` does the same for `tensorstream.offload` on a model already loaded.

Example:
    ```python
    >>> quantization_method({"quantization_config": {"quant_method": "hqq", "nbits": 4}})
    'hqq'
    >>> check_method("hqq", "./tiny-hqq")
    Traceback (most recent call last):
    tensorstream.errors.UnsupportedQuantizationError: ./tiny-hqq is quantized with hqq, ...
    ```
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .bnb import KEPT_METHODS, cpu_packed, restore_int8_state
from .ctensors import CT_KIND
from .dequantize import (
    FLOAT8,
    FP8_SCALE_SUFFIX,
    CheckpointParts,
    check_expansion,
    fp8_dequantize,
    mxfp4_dequantize,
)
from .errors import UnsupportedQuantizationError
from .gptq import GPTQ_METHODS, NEEDS, gptq_available

__all__ = [
    "FP8_SCALE_SUFFIX",
    "RULED_METHODS",
    "check_fp8_blocks",
    "check_loaded",
    "check_method",
    "check_offload",
    "check_expansion",
    "CheckpointParts",
    "checkpoint_parts",
    "describe_quantization",
    "fp8_dequantize",
    "mxfp4_dequantize",
    "quantization_identity",
    "quantization_method",
    "torchao_tensors",
]

logger = logging.getLogger(__name__)

#: Methods tensorstream streams in the form transformers dequantizes them to at load (see the module docstring).
DEQUANTIZED_METHODS = ("fp8", "mxfp4")
#: Methods whose quantized tensors stream as they are, rebuilt by a binding rule (`tensorstream.rules`): the store
#: holds the checkpoint's own parts, the streamed model is built without the quantization (`torchao_tensors`).
RULED_METHODS = ("torchao",)

_ALTERNATIVES = (
    "load it without device_map='tensorstream' (transformers runs it resident), or stream the unquantized original "
    "checkpoint instead (tensorstream.Config(quantize='int8') or 'int4' makes a compact store of it)"
)
#: Why each method is not streamed yet (docs/quantization.md, "Pre-quantized checkpoints").
_REASONS: dict[str, str] = {}
#: What works instead, where it differs from `_ALTERNATIVES`.
_FIXES: dict[str, str] = {}
#: `check_method`'s refusal of a GPTQ or AWQ checkpoint where gptqmodel (or, for GPTQ, optimum) is not installed.
_GPTQ_MISSING = (
    "tensorstream streams {method} in gptqmodel's own layers, loading the checkpoint's tensors (qweight, qzeros, "
    "scales) into them at each forward as transformers' load does, and {needs}, which transformers' {method} load "
    "needs too, {are} not installed here"
)
_GPTQ_FIX = (
    "`pip install {install}` (gptqmodel needs torch 2.14.1 or later; `make gptq` in tensorstream's repository "
    "builds such an environment), or stream the model's unquantized release with a compact store of tensorstream's "
    "own (tensorstream_config=tensorstream.Config(quantize='int4'), or `tensorstream reshard <unquantized model> "
    "--quantize int4`)"
)
#: `check_offload`'s fix: the model is loaded already.
_OFFLOAD_FIX = (
    "keep it resident (without tensorstream.offload), or load the model's unquantized release with "
    "device_map='tensorstream' (tensorstream_config=tensorstream.Config(quantize='int8') or 'int4' makes a compact "
    "store of it)"
)


def quantization_method(config: Any) -> str | None:
    """The ``quant_method`` of ``config`` (a transformers config, its dict, or a quantization config), or ``None``.

    bitsandbytes is told apart as transformers does: ``"bitsandbytes_4bit"`` / ``"bitsandbytes_8bit"``.
    """
    qc = _quantization_config(config)
    if qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else lambda key, default=None: getattr(qc, key, default)
    method = get("quant_method")
    method = getattr(method, "value", method)
    if not isinstance(method, str) or not method:
        return "unknown"
    if method == "bitsandbytes":
        return "bitsandbytes_8bit" if get("load_in_8bit", False) else "bitsandbytes_4bit"
    return method


def _quantization_config(config: Any) -> Any:
    if isinstance(config, dict):
        qc = config.get("quantization_config", config if "quant_method" in config else None)
    elif hasattr(config, "quant_method"):
        qc = config
    else:
        qc = getattr(config, "quantization_config", None)
        text = getattr(config, "get_text_config", None)
        if qc is None and callable(text):
            qc = getattr(text(decoder=True), "quantization_config", None)
    return qc or None


def quantization_identity(config: Any) -> dict[str, Any] | None:
    """Every field of ``config``'s quantization config (loading attributes such as ``dequantize`` or
    ``run_compressed`` included), for the store's fingerprint; ``None`` without one."""
    qc = _quantization_config(config)
    if qc is None:
        return None
    fields = qc if isinstance(qc, dict) else {k: v for k, v in vars(qc).items() if not k.startswith("_")}
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def _refuse(where: str, method: str, reason: str, fix: str = _ALTERNATIVES) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(
        f"{where} is quantized with {method}, which tensorstream does not stream yet: {reason}. Instead, {fix} "
        "(docs/quantization.md, 'Pre-quantized checkpoints').",
        method,
    )


def quantization_details(config: Any) -> dict[str, Any]:
    """The fields of ``config``'s quantization config that say how it is quantized, for the manifest and
    `describe_quantization`: FP8's ``weight_block_size`` (``None``: one scale per tensor) and ``fmt``."""
    qc = _quantization_config(config)
    if quantization_method(config) != "fp8" or qc is None:
        return {}
    get = qc.get if isinstance(qc, dict) else lambda key, default=None: getattr(qc, key, default)
    block = get("weight_block_size")
    block = list(block) if isinstance(block, list | tuple) and all(isinstance(b, int) for b in block) else None
    return {"weight_block_size": block, "fmt": str(get("fmt", "e4m3"))}


def check_method(method: str | None, where: str, *, on_the_fly: bool = False) -> None:
    """`UnsupportedQuantizationError` unless checkpoints quantized with ``method`` may stream (``None``: plain).

    ``on_the_fly``: the ``quantization_config`` was passed to ``from_pretrained`` for a checkpoint that is not
    quantized (transformers would quantize while loading), which is never streamed.
    """
    if method is None:
        return
    if on_the_fly:
        raise _refuse(
            where,
            method,
            "a quantization_config passed to from_pretrained for a checkpoint that is not quantized makes "
            "transformers quantize while loading, which a store cannot hold",
            "drop quantization_config and use tensorstream's own compact stores "
            "(tensorstream_config=tensorstream.Config(quantize='int8') or 'int4'), or load it without "
            "device_map='tensorstream'",
        )
    if method in DEQUANTIZED_METHODS or method in RULED_METHODS:
        return  # `check_loaded` confirms that transformers dequantized it; a ruled tensor is checked as it is stored
    if method in KEPT_METHODS:
        return  # streamed in bitsandbytes' own layers (`tensorstream.bnb`)
    if method in GPTQ_METHODS:  # streamed in gptqmodel's own layers (`tensorstream.gptq`)
        if not gptq_available(method):
            needs = NEEDS[method]
            reason = _GPTQ_MISSING.format(method=method, needs=" and ".join(needs), are="are" if needs[1:] else "is")
            raise UnsupportedQuantizationError(
                f"{where} is quantized with {method}, which needs gptqmodel: {reason}. Instead, "
                f"{_GPTQ_FIX.format(install=' '.join(needs))} (docs/quantization.md, 'Pre-quantized checkpoints').",
                method,
            )
        return
    if method == CT_KIND:
        return  # its compact tensors decompressed per block (`tensorstream.ctensors`)
    reason = _REASONS.get(
        method,
        f"tensorstream streams pre-quantized checkpoints only where transformers dequantizes them at load "
        f"({' and '.join(DEQUANTIZED_METHODS)} without their kernels); {method} keeps its own quantized layers",
    )
    raise _refuse(where, method, reason, _FIXES.get(method, _ALTERNATIVES))


def check_fp8_blocks(folder: Path, config: Any, where: str) -> None:
    """`UnsupportedQuantizationError` for a fine-grained FP8 checkpoint holding a weight that is not a whole number of
    its ``weight_block_size`` blocks (DeepSeek-V3's ``kv_a_proj_with_mqa``, ``[576, 7168]`` with ``[5, 56]`` scales of
    128x128 blocks): transformers (5.24) dequantizes a weight by splitting it evenly over its scale grid, so its
    resident CPU load fails ("not divisible by scale grid") or, where the grid happens to divide the weight, applies
    the scales to the wrong rows. Read from the safetensors headers only, before anything is built."""
    if quantization_method(config) != "fp8":
        return
    block = quantization_details(config).get("weight_block_size")
    if not isinstance(block, list) or len(block) != 2:
        return  # one scale per tensor: nothing is split
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({key: list(f.get_slice(key).get_shape()) for key in list(f.keys())})
        except Exception:  # not a safetensors file we can read: transformers reports it
            continue
    for key, grid in shapes.items():
        weight = shapes.get(key.removesuffix(FP8_SCALE_SUFFIX)) if key.endswith(FP8_SCALE_SUFFIX) else None
        if weight is None or len(weight) < 2 or not (weight[-2] % block[0] or weight[-1] % block[1]):
            continue
        import transformers

        raise _refuse(
            where,
            "fp8",
            f"{key.removesuffix(FP8_SCALE_SUFFIX)} is {weight}, not a whole number of the checkpoint's "
            f"{block[0]}x{block[1]} blocks (scale grid {grid}, its last blocks partial); transformers "
            f"{transformers.__version__} dequantizes a weight by splitting it evenly over its scale grid, so its own "
            "resident load on this machine fails ('not divisible by scale grid') or, where the grid divides the "
            "weight, scales rows with the wrong blocks",
            "run it resident on a GPU with FP8 kernels (load it without device_map='tensorstream'; transformers "
            "computes on the float8 weights there), or stream the model's bf16 release "
            "(tensorstream.Config(quantize='int8') or 'int4' makes a compact store of it)",
        )


def check_loaded(model: torch.nn.Module, method: str | None, where: str) -> None:
    """After transformers built ``model`` from a checkpoint quantized with ``method`` (allowed by `check_method`):
    `UnsupportedQuantizationError` unless transformers dequantized it to plain tensors."""
    if method is None:
        return
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        config = {"fp8": "FineGrainedFP8Config", "mxfp4": "Mxfp4Config"}.get(method, "its quantization config")
        raise _refuse(
            where,
            method,
            "on this machine transformers keeps its quantized layers and kernels, and tensorstream streams "
            f"{method} only in the form transformers dequantizes it to",
            f"pass quantization_config=transformers.{config}(dequantize=True) to from_pretrained (the store then "
            "keeps the compact bytes and dequantizes each block as it is loaded), or load it without "
            "device_map='tensorstream'",
        )
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.dtype in FLOAT8:
            import transformers

            raise _refuse(
                where,
                method,
                f"transformers {transformers.__version__} itself cannot load this layout resident on this machine: "
                f"{name} stays {str(tensor.dtype).removeprefix('torch.')} after its dequantizing load (no scale is "
                "applied to it, so a resident model would compute with wrong weights too)",
                "use the model's bf16 release (tensorstream.Config(quantize='int8') or 'int4' makes a compact store "
                "of it), or run this checkpoint resident on a GPU with FP8 kernels",
            )


def check_offload(model: torch.nn.Module) -> None:
    """`UnsupportedQuantizationError` when `tensorstream.offload` is given a model transformers keeps quantized,
    or one holding parameter classes or tensor subclasses (bitsandbytes, torchao) that streamed blocks would lose."""
    method = quantization_method(getattr(model, "config", None))
    where = f"this {type(model).__name__}"
    if method in KEPT_METHODS:  # bitsandbytes' parameter classes are rebuilt at each bind (`tensorstream.bnb`)
        restore_int8_state(model)
        packed = cpu_packed(model)
        if packed is not None:
            raise _refuse(
                where,
                method,
                f"{packed} was repacked by bitsandbytes for this CPU's 4-bit kernel at the model's first forward, "
                "and bitsandbytes' state_dict undoes that only approximately (its block scales went through bf16)",
                "call tensorstream.offload(model, ...) before the model's first forward, or stream the checkpoint "
                "with from_pretrained(..., device_map='tensorstream')",
            )
        return
    if method in GPTQ_METHODS:
        raise _refuse(
            where,
            method,
            f"a loaded {method} model holds its state as its load left it (GPTQ's zero points converted to v2) and, "
            f"after its first forward, weights repacked for its kernel; tensorstream streams {method} from the "
            "checkpoint's own tensors, loaded into gptqmodel's layers at each block's forward",
            "keep it resident (without tensorstream.offload), or stream its checkpoint with "
            "from_pretrained(<checkpoint>, device_map='tensorstream')",
        )
    if (
        method is not None
        and method not in RULED_METHODS
        and (getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None)
    ):
        raise _refuse(where, method, _REASONS.get(method, f"{method} keeps its own quantized layers"), _OFFLOAD_FIX)
    from .rules import flatten, rule_for

    for name, tensor in model.state_dict(keep_vars=True).items():
        if rule_for(tensor) is not None:
            flatten(name, tensor)  # a typed refusal now, before anything is written, for state no rule records
        elif type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise _refuse(
                where,
                method or type(tensor).__name__,
                f"{name} is a {type(tensor).__name__}, a tensor class of its own (with state a streamed view would "
                "lose)",
                _OFFLOAD_FIX,
            )


# -- torchao: the checkpoint's tensor subclasses, as transformers' torchao loader rebuilds them ----------------------


def torchao_tensors(folder: Path) -> Callable[[str, torch.Tensor], torch.Tensor | None]:
    """For a torchao checkpoint in safetensors: a function giving, for a runtime tensor name and the model's
    placeholder, the tensor subclass transformers' torchao loader makes of the checkpoint's entries
    (``{module}._{weight}_{part}``, with the class and attributes in the file's metadata), as a parameter with the
    placeholder's ``requires_grad`` as transformers binds it; ``None`` for a plain tensor. One tensor is read at a
    time (memory stays bounded by the largest tensor), with torchao's own ``unflatten_tensor_state_dict``.

    Raises:
        `UnsupportedQuantizationError`: the checkpoint is not in safetensors with torchao's metadata.
    """
    from safetensors import safe_open

    with _quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
        from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

    where: dict[str, tuple[Path, dict[str, str]]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        if not is_metadata_torchao(metadata):
            continue
        for name in json.loads(metadata["tensor_names"]):
            if json.loads(metadata[name]).get("_type") != torch.Tensor.__name__:
                where[name] = (file, metadata)
    if not where:
        raise _refuse(
            str(folder),
            "torchao",
            "only torchao checkpoints in safetensors (with torchao's tensor metadata) stream; this one has none",
            "save it with save_pretrained(..., safe_serialization=True) from a torchao-quantized model, or load it "
            "without device_map='tensorstream'",
        )

    def tensor_of(name: str, placeholder: torch.Tensor) -> torch.Tensor | None:
        if name not in where:
            return None
        file, metadata = where[name]
        module, _, weight = name.rpartition(".")
        prefix = f"{module}._{weight}_"
        with safe_open(str(file), framework="pt") as f:
            data = {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}  # noqa: SIM118
        with _quiet_torchao():
            rebuilt, _ = unflatten_tensor_state_dict(data, {"tensor_names": json.dumps([name]), name: metadata[name]})
        return torch.nn.Parameter(rebuilt[name], requires_grad=placeholder.requires_grad)

    return tensor_of


def _quiet_torchao() -> Any:
    from ._quiet import quiet_torchao

    return quiet_torchao()


# -- fine-grained FP8: the checkpoint's compact tensors, dequantized as transformers does -----------------------------
def checkpoint_parts(folder: Path, model: torch.nn.Module, config: Any) -> CheckpointParts | None:
    """For a fine-grained FP8 or MXFP4 checkpoint that transformers dequantized: a `CheckpointParts` giving, for a
    runtime tensor name and the tensor transformers made of it, the checkpoint's compact tensors
    ``{"q": ..., "scale": ...}`` when they dequantize (`fp8_dequantize`, `mxfp4_dequantize`) to exactly that tensor,
    bit for bit; ``None`` otherwise (the tensor is stored as it is). ``None`` for any other checkpoint.

    FP8 candidates: ``name`` (``float8_e4m3fn``, 2-D, or ``[E, R, C]`` fused experts) with ``name_scale_inv``
    (float32/bf16, its block grid dividing it); for a fused expert tensor (``gate_up_proj``, ``down_proj``) of a
    checkpoint holding per-expert weights (``experts.{e}.gate_proj.weight`` and ``up_proj``, or Mixtral's ``w1``,
    ``w3``, ``w2``), those weights and scales fused as transformers fuses them (stacked over experts, gate and up
    concatenated). MXFP4: ``name_blocks`` (``[E, R, G, 16]`` bytes) and ``name_scales`` (``[E, R, G]``) for a
    ``[E, G * 32, R]`` tensor.
    """
    method = quantization_method(config)
    if method not in DEQUANTIZED_METHODS or getattr(model, "is_quantized", False):
        return None
    return CheckpointParts(folder, method)


def quantization_name(info: Mapping[str, Any]) -> str:
    """The method of a store's ``manifest["quantization"]`` as a user knows it: ``"fp8 (fine-grained, 128x128
    blocks)"``, ``"mxfp4 (gpt-oss experts, 32-value blocks, E8M0 scales)"``, or the method's name."""
    method = str(info.get("method"))
    block = info.get("weight_block_size")
    if method == "fp8":
        grid = "x".join(str(b) for b in block) if isinstance(block, list) and block else None
        return f"fp8 (fine-grained, {grid} blocks)" if grid else "fp8 (one scale per tensor)"
    if method == "mxfp4":
        return "mxfp4 (32-value blocks, E8M0 scales)"
    return method


def describe_quantization(manifest: Mapping[str, Any]) -> str | None:
    """What a store of a pre-quantized checkpoint streams, in one sentence (``tensorstream inspect``,
    `Plan.describe`, `tensorstream.StreamStats`, the load's log): the method, where it is dequantized, the bytes a
    token reads when every block streams and, where the store is larger than the checkpoint, why. ``None`` for a
    store of a checkpoint that is not quantized.

    Example:
        ```python
        >>> describe_quantization(store.manifest)
        "fp8 (fine-grained, 128x128 blocks): the store holds the checkpoint's float8 weights and block scales, ...
        dequantized per block on the CPU as transformers does ...; 1.2 GB per token with every block streamed, 1.01x
        the checkpoint's 1.19 GB"
        ```
    """
    info = manifest.get("quantization")
    if not isinstance(info, dict) or not isinstance(info.get("method"), str):
        return None
    method = info["method"]
    name = quantization_name(info)
    encoding = manifest.get("encoding")
    if info.get("dequantized") is False:  # RULED_METHODS: the checkpoint's tensors, rebuilt by binding rules
        how = (
            f"the store holds the checkpoint's own {method} tensors (their quantized parts), rebuilt as {method}'s "
            "tensor subclasses when each block is bound: the model computes on them as transformers' resident load "
            "does"
        )
    elif encoding in DEQUANTIZED_METHODS:
        what = "float8 weights and block scales" if method == "fp8" else "FP4 blocks and E8M0 scales"
        how = (
            f"the store holds the checkpoint's {what} (fused experts included), dequantized per block on the CPU "
            "as transformers does (its arithmetic, checked bit for bit when the store was written; on a CPU this "
            "takes longer than reading the dequantized weights would: Config(dequantize='once') stores those "
            "instead)"
        )
    elif encoding == CT_KIND:
        how = (
            "the store holds the checkpoint's compact tensors (packed integers or float8 weights, scales, zero "
            "points), decompressed to plain weights as each block loads with compressed-tensors' own function, as "
            "transformers' resident model does at its first forward"
        )
    elif info.get("kept") is True and method in GPTQ_METHODS:
        what = "qweight, qzeros in GPTQ's v1 format, scales, g_idx" if method == "gptq" else "qweight, qzeros, scales"
        done = "qzeros converted to v2 by gptqmodel, post_init" if method == "gptq" else "post_init"
        how = (
            f"the store holds the checkpoint's own tensors ({what}), loaded at each block's forward into gptqmodel's "
            f"layers as transformers' resident load does ({done}), which compute on them"
        )
    elif info.get("kept") is True:
        how = (
            "the store holds the checkpoint's own tensors (packed weights and their quantization state), bound at "
            "each block's load as bitsandbytes' Linear4bit/Linear8bitLt parameters, which compute on them"
        )
    elif manifest.get("dequantize") == "once":
        how = (
            "the store holds the weights transformers dequantizes it to at load, dequantized once when the store was "
            "written (dequantize='once'): nothing is dequantized per pass, for more bytes read"
        )
    elif encoding is not None:
        how = f"the store holds the weights transformers dequantizes it to at load, stored as {encoding}"
    else:
        how = f"the store holds the weights transformers dequantizes {method} to at load (no compact form for it)"
    total, checkpoint = manifest.get("total_bytes"), info.get("checkpoint_bytes")
    text = f"{name}: {how}"
    if not isinstance(total, int):
        return text
    text += f"; {total / 1e9:.3g} GB per token with every block streamed"
    if not isinstance(checkpoint, int) or checkpoint <= 0:
        return text
    text += f", {total / checkpoint:.2f}x the checkpoint's {checkpoint / 1e9:.3g} GB"
    if total <= checkpoint * 1.02:
        return text
    expanded = info.get("expanded")
    if isinstance(expanded, dict) and isinstance(expanded.get("tensors"), int) and expanded["tensors"]:
        examples = [e for e in expanded.get("examples", []) if isinstance(e, str)]
        return (
            f"{text}: larger, since {expanded['tensors']} tensor{'s' * (expanded['tensors'] > 1)} "
            f"({expanded.get('bytes', 0) / 1e9:.3g} GB) are stored as the bf16 transformers makes of them (no "
            f"compact form under their runtime names in the checkpoint{': ' + ', '.join(examples) if examples else ''}"
            ")"
        )
    if manifest.get("dequantize") == "once":
        return f"{text}: larger, since the store holds the dequantized weights (dequantize='once')"
    if encoding not in DEQUANTIZED_METHODS:
        return f"{text}: larger, since the store holds the dequantized weights"
    return text
