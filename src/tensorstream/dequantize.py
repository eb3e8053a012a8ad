"""The compact forms of pre-quantized checkpoints that tensorstream stores, and their dequantization with
transformers' own arithmetic (`tensorstream.prequantized` decides which checkpoints stream; the store kinds ``"fp8"``
and ``"mxfp4"`` of `tensorstream.encoding` expand with the functions here).

* `CheckpointParts` finds, for each tensor transformers loaded, the checkpoint's float8 values and block scales (or
  FP4 blocks and E8M0 scales) that dequantize to exactly it, fusing per-expert FP8 weights as transformers fuses them.
* `fp8_dequantize` and `mxfp4_dequantize` compute transformers' ``Fp8Dequantize`` and ``convert_moe_packed_tensors``
  in pieces, with the same bits.
* `check_expansion` expands a block file just written both ways and compares it with transformers' tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import TensorStreamError

__all__ = [
    "FP4_VALUES",
    "FP8_PIECE",
    "FP8_SCALE_SUFFIX",
    "CheckpointParts",
    "check_expansion",
    "fp8_dequantize",
    "mxfp4_dequantize",
    "mxfp4_scratch_bytes",
]

logger = logging.getLogger(__name__)

FP8_SCALE_SUFFIX = "_scale_inv"
FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))

# -- fine-grained FP8: the checkpoint's compact tensors, dequantized as transformers does -----------------------------


#: Per-expert checkpoint names of a fused ``[E, ...]`` expert tensor (transformers' MergeModulelist + Concatenate
#: conversions, e.g. Qwen3-MoE's and Mixtral's): runtime attribute -> alternatives, each the parts concatenated
#: along the expert's first dimension. Every candidate is checked bit for bit against what transformers loaded.
_PER_EXPERT = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}
#: Module renamings transformers applies to per-expert checkpoints (Mixtral's ``block_sparse_moe``).
_EXPERT_PREFIXES = ((".mlp.", ".mlp."), (".mlp.", ".block_sparse_moe."))


class CheckpointParts:
    """``parts(name, tensor)``: the checkpoint's compact ``{"q", "scale"}`` for a runtime tensor of a fine-grained
    FP8 or MXFP4 checkpoint that transformers dequantized, or ``None`` (stored as transformers loaded it); see
    `checkpoint_parts`.

    Attributes:
        kind: the store kind, ``"fp8"`` or ``"mxfp4"``.
        expanded: tensors stored as transformers made them although the checkpoint holds them compact (or under
            other names), name -> bytes: why a store can be larger than its checkpoint (`describe_quantization`).
    """

    def __init__(self, folder: Path, method: str) -> None:
        from safetensors import safe_open

        self.kind = method
        self.expanded: dict[str, int] = {}
        #: `expanded` summed up for the manifest, kept up to date in place: ``{"tensors", "bytes", "examples"}``
        self.expanded_summary: dict[str, Any] = {"tensors": 0, "bytes": 0, "examples": []}
        self._where: dict[str, Path] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt") as f:
                    self._where.update(dict.fromkeys(f.keys(), file))
            except Exception:  # not a safetensors file we can read: nothing is taken from it
                continue
        self._handles: dict[Path, Any] = {}

    def _read(self, key: str) -> torch.Tensor | None:
        file = self._where.get(key)
        if file is None:
            return None
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(key)

    def _fp8(self, name: str, shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``name`` and ``name_scale_inv`` as the checkpoint holds them (2-D, or fused ``[E, ...]`` experts)."""
        q, scale = self._read(name), self._read(f"{name}{FP8_SCALE_SUFFIX}")
        ok = (
            q is not None
            and scale is not None
            and q.dtype == torch.float8_e4m3fn
            and (shape is None or tuple(q.shape) == shape)
            and scale.dim() == q.dim()
            and q.dim() in (2, 3)
            and scale.dtype in (torch.float32, torch.bfloat16)
            and q.shape[:-2] == scale.shape[:-2]
            and 0 not in scale.shape
            and not q.shape[-2] % scale.shape[-2]
            and not q.shape[-1] % scale.shape[-1]
        )
        return (q, scale) if ok else None  # type: ignore[return-value]

    def _fp8_per_expert(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A fused ``[E, R, C]`` expert tensor gathered from per-expert FP8 weights (``...experts.{e}.gate_proj``):
        the float8 values and block scales fused as transformers fuses the weights it dequantizes from them."""
        prefix, _, attr = name.rpartition(".")
        if len(shape) != 3 or attr not in _PER_EXPERT:
            return None
        for old, new in _EXPERT_PREFIXES:
            source = prefix.replace(old, new)
            for names in _PER_EXPERT[attr]:
                experts = []
                for e in range(shape[0]):
                    found = [self._fp8(f"{source}.{e}.{part}.weight") for part in names]
                    if any(f is None for f in found):
                        break
                    pairs = [f for f in found if f is not None]
                    if len({(q.dim(), q.shape[-1], s.shape[-1], q.shape[0] // s.shape[0]) for q, s in pairs}) != 1:
                        break  # the parts' block grids differ: no single grid for the fused rows
                    experts.append((torch.cat([q for q, _ in pairs]), torch.cat([s for _, s in pairs])))
                else:
                    q, scale = torch.stack([q for q, _ in experts]), torch.stack([s for _, s in experts])
                    return (q, scale) if tuple(q.shape) == shape else None
        return None

    def _mxfp4(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        q, scale = self._read(f"{name}_blocks"), self._read(f"{name}_scales")
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

    def __call__(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if tensor.dim() not in (2, 3) or tensor.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        shape = tuple(tensor.shape)
        if self.kind == "fp8":
            found = self._fp8(name, shape) or self._fp8_per_expert(name, shape)
        else:
            found = self._mxfp4(name, tensor)
        if found is None:
            held = self._read(name) if name in self._where else None
            if held is None or held.dtype in FLOAT8:  # compact in the checkpoint, or fused/renamed at load
                self._expanded(name, tensor)
            return None
        q, scale = found
        got = torch.empty_like(tensor)
        (fp8_dequantize if self.kind == "fp8" else mxfp4_dequantize)(got, q, scale)
        if not torch.equal(got.view(torch.uint8), tensor.detach().to("cpu").contiguous().view(torch.uint8)):
            logger.warning("tensorstream: %s does not dequantize as transformers loaded it; stored as loaded", name)
            self._expanded(name, tensor)
            return None
        return {"q": q.contiguous(), "scale": scale.contiguous()}

    def _expanded(self, name: str, tensor: torch.Tensor) -> None:
        self.expanded[name] = tensor.numel() * tensor.element_size()
        summary = self.expanded_summary
        summary["tensors"], summary["bytes"] = len(self.expanded), sum(self.expanded.values())
        summary["examples"] = sorted(self.expanded, key=lambda n: -self.expanded[n])[:3]


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
            Fused experts: ``[E, rows, cols]`` and ``[E, rows / bm, cols / bn]`` (transformers' ``_dequantize_one``
            reshapes them to blocks the same way).
        scratch: float32 room for ``min(piece, rows * cols)`` values (allocated when ``None``).
        piece: values per step (rows of one block row at a time).
    """
    if q.dim() == 3:  # fused experts [E, R, C] with scales [E, R / bm, C / bn]: blocks never span two experts
        out, q, scale = out.view(-1, out.shape[-1]), q.reshape(-1, q.shape[-1]), scale.reshape(-1, scale.shape[-1])
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
