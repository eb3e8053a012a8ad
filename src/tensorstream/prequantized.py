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
* **not streamed yet** (GPTQ/AWQ, torchao, and FP8/MXFP4 with their kernels): the model holds the method's own
  modules or tensor subclasses, and some convert tensors after loading. `check_method` and `check_loaded` raise
  `UnsupportedQuantizationError` naming the method, the reason and what works instead, before any store is written.

`check_offload` does the same for `tensorstream.offload` on a model already loaded.

Example:
    ```python
    >>> quantization_method({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    'gptq'
    >>> check_method("gptq", "./tiny-gptq")
    Traceback (most recent call last):
    tensorstream.errors.UnsupportedQuantizationError: ./tiny-gptq is quantized with gptq, ...
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
from .errors import TensorStreamError, UnsupportedQuantizationError

__all__ = [
    "FP8_SCALE_SUFFIX",
    "RULED_METHODS",
    "check_loaded",
    "check_method",
    "check_offload",
    "check_expansion",
    "checkpoint_parts",
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
FP8_SCALE_SUFFIX = "_scale_inv"
_FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))

_ALTERNATIVES = (
    "load it without device_map='tensorstream' (transformers runs it resident), or stream the unquantized original "
    "checkpoint instead (tensorstream.Config(quantize='int8') or 'int4' makes a compact store of it)"
)
#: Why each method is not streamed yet (docs/quantization.md, "Pre-quantized checkpoints").
_REASONS = {
    "gptq": (
        "GPTQ/AWQ layers (gptqmodel) convert the checkpoint's zero points when a model loads (qzeros v1 -> v2); a "
        "streamed model would convert the stored, already converted values once more and compute wrong numbers"
    ),
}
_REASONS["awq"] = _REASONS["gptq"]


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
    if method == CT_KIND:
        return  # its compact tensors decompressed per block (`tensorstream.ctensors`)
    reason = _REASONS.get(
        method,
        f"tensorstream streams pre-quantized checkpoints only where transformers dequantizes them at load "
        f"({' and '.join(DEQUANTIZED_METHODS)} without their kernels); {method} keeps its own quantized layers",
    )
    raise _refuse(where, method, reason)


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
        if tensor.dtype in _FLOAT8:
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
    if (
        method is not None
        and method not in RULED_METHODS
        and (getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None)
    ):
        raise _refuse(where, method, _REASONS.get(method, f"{method} keeps its own quantized layers"))
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


def checkpoint_parts(
    folder: Path, model: torch.nn.Module, config: Any
) -> tuple[str, Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None]] | None:
    """For a fine-grained FP8 or MXFP4 checkpoint that transformers dequantized: the store kind (``"fp8"`` or
    ``"mxfp4"``) and a function giving, for a runtime tensor name and the tensor transformers made of it, the
    checkpoint's compact tensors ``{"q": ..., "scale": ...}`` when they dequantize (`fp8_dequantize`,
    `mxfp4_dequantize`) to exactly that tensor, bit for bit; ``None`` otherwise (the tensor is stored as it is).
    ``None`` for any other checkpoint.

    Candidates are tensors the checkpoint holds under their runtime name (no renaming or fusing at load):
    FP8, a 2-D ``float8_e4m3fn`` ``name`` with a 2-D float32/bf16 ``name_scale_inv`` whose grid divides it; MXFP4,
    ``name_blocks`` (``[E, R, G, 16]`` bytes) and ``name_scales`` (``[E, R, G]``) for a ``[E, G * 32, R]`` tensor.
    """
    method = quantization_method(config)
    if method not in DEQUANTIZED_METHODS or getattr(model, "is_quantized", False):
        return None
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file))
        except Exception:  # not a safetensors file we can read: nothing is taken from it
            continue
    handles: dict[Path, Any] = {}

    def read(key: str) -> torch.Tensor | None:
        file = where.get(key)
        if file is None:
            return None
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        return handles[file].get_tensor(key)

    def compact(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if method == "fp8":
            q, scale = read(name), read(f"{name}{FP8_SCALE_SUFFIX}")
            ok = (
                q is not None
                and scale is not None
                and q.dtype == torch.float8_e4m3fn
                and q.shape == tensor.shape
                and scale.dim() == 2
                and scale.dtype in (torch.float32, torch.bfloat16)
                and not q.shape[0] % scale.shape[0]
                and not q.shape[1] % scale.shape[1]
            )
        else:
            q, scale = read(f"{name}_blocks"), read(f"{name}_scales")
            ok = (
                q is not None
                and scale is not None
                and q.dtype == scale.dtype == torch.uint8
                and q.dim() == 4
                and q.shape[:3] == scale.shape
                and tensor.dim() == 3
                and tuple(tensor.shape) == (q.shape[0], q.shape[2] * q.shape[3] * 2, q.shape[1])
            )
        return (q, scale) if ok else None  # type: ignore[return-value]

    def parts_of(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if tensor.dim() not in (2, 3) or tensor.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        found = compact(name, tensor)
        if found is None:
            return None
        q, scale = found
        got = torch.empty_like(tensor)
        (fp8_dequantize if method == "fp8" else mxfp4_dequantize)(got, q, scale)
        if not torch.equal(got.view(torch.uint8), tensor.detach().to("cpu").contiguous().view(torch.uint8)):
            logger.warning("tensorstream: %s does not dequantize as transformers loaded it; stored as loaded", name)
            return None
        return {"q": q.contiguous(), "scale": scale.contiguous()}

    return method, parts_of


#: Values dequantized per piece on the model thread: 4 MB of float32 scratch.
FP8_PIECE = 1 << 20


def fp8_dequantize(
    out: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    scratch: torch.Tensor | None = None,
    *,
    piece: int = FP8_PIECE,
) -> None:
    """``out[...] = (q.float() * scale per block).to(out.dtype)``: transformers' ``Fp8Dequantize._dequantize_one``
    (``(q.to(float32) * s.to(float32)).to(dtype)``) computed in pieces, with the same bits: the float8 to float32
    conversion is exact, the product is one IEEE float32 multiplication, and the cast rounds it once.

    Args:
        out: ``[rows, cols]`` weight, written in place. q: ``[rows, cols]`` float8. scale: ``[rows / bm, cols / bn]``.
        scratch: float32 room for ``min(piece, rows * cols)`` values (allocated when ``None``).
        piece: values per step (rows of one block row at a time).
    """
    rows, cols = q.shape
    srows, scols = scale.shape
    bm, bn = rows // srows, cols // scols
    per = max(1, min(bm, piece // cols))
    if scratch is None:
        scratch = torch.empty(per * cols, dtype=torch.float32, device=out.device)
    r = 0
    while r < rows:
        n = min(per, rows - r, bm - r % bm)  # within one block row
        tmp = scratch[: n * cols].view(n, scols, bn)
        tmp.copy_(q[r : r + n].view(n, scols, bn))
        tmp.mul_(scale[r // bm].view(1, scols, 1))  # float32 (exact from bf16) times float32: one rounding
        out[r : r + n].copy_(tmp.view(n, cols))
        r += n


#: transformers' E2M1 values (``transformers.integrations.mxfp4.FP4_VALUES``): the 16 codes of an FP4 nibble.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_scratch_bytes(shape: tuple[int, ...], piece: int = FP8_PIECE) -> int:
    """Scratch `mxfp4_dequantize` needs for blocks of ``shape`` (``[E, R, G, B]``) in pieces of ``piece`` values."""
    _, _, groups, width = shape
    rows = max(1, min(shape[1], piece // (groups * width * 2)))
    n = rows * groups
    return n * width * 4 + n * width * 4 + n * width * 2 * 4 + n * 4 + 64  # values and tmp at up to 4 bytes


def mxfp4_dequantize(
    out: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    scratch: torch.Tensor | None = None,
    *,
    piece: int = FP8_PIECE,
) -> None:
    """``out[e] = dequantized(blocks[e], scales[e]).T``: transformers' ``convert_moe_packed_tensors`` (gpt-oss's
    MXFP4 experts) computed in pieces, with the same bits: each nibble picks its E2M1 value from the same table in
    ``out``'s dtype, and the same ``torch.ldexp(values, scale - 127, out=values)`` call scales it (elementwise: the
    pieces change nothing).

    Args:
        out: ``[E, G * 2B, R]`` weight, written in place. blocks: ``[E, R, G, B]`` uint8. scales: ``[E, R, G]`` uint8.
        scratch: uint8 room of `mxfp4_scratch_bytes` (allocated when ``None``).
    """
    experts, rows_total, groups, width = blocks.shape
    per = max(1, min(rows_total, piece // (groups * width * 2)))
    if scratch is None:
        scratch = torch.empty(mxfp4_scratch_bytes(tuple(blocks.shape), piece), dtype=torch.uint8, device=out.device)
    n_max = per * groups
    at = 0

    def take(nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal at
        view = scratch[at : at + nbytes].view(dtype)
        at += -(-nbytes // 16) * 16
        return view

    index = take(n_max * width * 4, torch.int32)
    values = take(n_max * width * out.element_size(), out.dtype)
    tmp = take(n_max * width * 2 * out.element_size(), out.dtype)
    factor = take(n_max * 4, torch.int32)
    lut = torch.tensor(FP4_VALUES, dtype=out.dtype, device=out.device)
    for e in range(experts):
        target = out[e]  # [G * 2B, R]
        for r in range(0, rows_total, per):
            n = min(per, rows_total - r) * groups
            blk = blocks[e, r : r + n // groups].reshape(n, width)
            pairs = tmp[: n * width * 2].view(n, width, 2)
            idx, vals = index[: n * width].view(n, width), values[: n * width].view(n, width)
            torch.bitwise_and(blk, 15, out=idx)
            torch.index_select(lut, 0, idx.view(-1), out=vals.view(-1))
            pairs[:, :, 0].copy_(vals)
            torch.bitwise_right_shift(blk, 4, out=idx)
            torch.index_select(lut, 0, idx.view(-1), out=vals.view(-1))
            pairs[:, :, 1].copy_(vals)
            exponent = factor[:n].view(n, 1)
            exponent.copy_(scales[e, r : r + n // groups].reshape(n, 1))
            exponent.sub_(127)
            flat = pairs.view(n, width * 2)
            torch.ldexp(flat, exponent, out=flat)  # transformers' own call, on the same values
            target[:, r : r + n // groups].copy_(flat.view(n // groups, groups * width * 2).t())


def check_expansion(header: Any, originals: Mapping[str, torch.Tensor]) -> None:
    """Expand the block file just written, as the reader thread and as the model thread do, and compare every tensor
    with ``originals`` (what transformers' resident load holds): a pre-quantized block that would not stream exactly
    is an error now, never wrong weights later."""
    if not originals:
        return
    from .encoding import BlockCodec  # encoding imports this module for its dequantize functions
    from .format import aligned_empty, read_data

    codec = BlockCodec(header)
    compact = aligned_empty(header.data_size)
    read_data(header.path, header, compact)
    for inline in (True, False):
        expanded = torch.empty(codec.expanded_bytes, dtype=torch.uint8)
        codec.decode(compact, expanded, torch.empty(codec.scratch_bytes, dtype=torch.uint8), inline=inline)
        for name, info in codec.tensors.items():
            got = expanded[info.start : info.end]
            want = originals[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            if not torch.equal(got, want):
                raise TensorStreamError(
                    f"{header.path}: {name} does not expand to the tensor transformers loaded (a tensorstream bug; "
                    "please report it). Load this checkpoint without device_map='tensorstream' meanwhile."
                )


def describe_quantization(manifest: Mapping[str, Any]) -> str | None:
    """What a store of a pre-quantized checkpoint streams, in one sentence (``tensorstream inspect``, the load's log),
    or ``None`` for a store of a checkpoint that is not quantized.

    Example:
        ```python
        >>> describe_quantization(store.manifest)
        "pre-quantized checkpoint (fp8): the store holds the checkpoint's float8 weights and block scales, ..."
        ```
    """
    info = manifest.get("quantization")
    if not isinstance(info, dict) or not isinstance(info.get("method"), str):
        return None
    method = info["method"]
    if info.get("dequantized") is False:  # RULED_METHODS: the checkpoint's tensors, rebuilt by binding rules
        how = (
            f"the store holds the checkpoint's own {method} tensors (their quantized parts), rebuilt as {method}'s "
            "tensor subclasses when each block is bound: the model computes on them as transformers' resident load "
            "does"
        )
    elif manifest.get("encoding") in DEQUANTIZED_METHODS:
        what = "float8 weights and block scales" if method == "fp8" else "FP4 blocks and E8M0 scales"
        how = (
            f"the store holds the checkpoint's {what} (tensors transformers renames or fuses at load, such as "
            "per-expert weights, as the bf16 it makes of them), dequantized to bf16 as each block loads, with "
            "transformers' arithmetic"
        )
    elif manifest.get("encoding") == CT_KIND:
        how = (
            "the store holds the checkpoint's compact tensors (packed integers or float8 weights, scales, zero "
            "points), decompressed to plain weights as each block loads with compressed-tensors' own function, as "
            "transformers' resident model does at its first forward"
        )
    elif info.get("kept") is True:
        how = (
            "the store holds the checkpoint's own tensors (packed weights and their quantization state), bound at "
            "each block's load as bitsandbytes' Linear4bit/Linear8bitLt parameters, which compute on them"
        )
    elif manifest.get("encoding") is not None:
        how = f"the store holds the weights transformers dequantizes it to at load, stored as {manifest['encoding']}"
    else:
        how = (
            "the store holds the bf16 weights transformers dequantizes it to at load (no compact form for "
            f"{method} yet, so it is larger than the checkpoint)"
        )
    total, checkpoint = manifest.get("total_bytes"), info.get("checkpoint_bytes")
    size = ""
    if isinstance(total, int) and isinstance(checkpoint, int) and checkpoint > 0:
        size = f"; {total / 1e9:.3g} GB, {total / checkpoint:.2f}x the checkpoint's {checkpoint / 1e9:.3g} GB"
    return f"pre-quantized checkpoint ({method}): {how}{size}"
