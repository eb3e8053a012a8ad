"""Store kinds: how a block's tensors are encoded in its ``.ts`` file, and how they are expanded at run time.

A *plain* store holds every tensor as the model holds it. Other kinds hold fewer bytes per block, so a step that is
bound by storage reads fewer bytes:

* ``quantize="int8"`` / ``"int4"`` (`tensorstream.compact`): linear weights quantized by torchao, stored as the parts
  of torchao's quantized tensors (binding rules, `tensorstream.rules`) in otherwise plain files: nothing expands,
  the kernels compute on the compact weights. This module only names these kinds (`store_kind`, `expands`).
* ``compression="lossless"``: 16-bit floating-point tensors are split into their two byte planes; the high plane
  (sign, exponent and the top mantissa bit: a few bits of entropy in trained weights) is compressed with zstd, the
  low plane is kept as it is. Expanding gives back the exact bytes.
* ``"fp8"`` and ``"mxfp4"`` (not settings: chosen for a fine-grained FP8 or an MXFP4 checkpoint that transformers
  dequantizes at load, `tensorstream.prequantized`): a weight is stored as the checkpoint's own compact tensors
  (float8 values and per-block scales; FP4 blocks and E8M0 scales) and expanded with transformers' dequantization
  arithmetic (`tensorstream.prequantized.fp8_dequantize`, `mxfp4_dequantize`). Entries ``name.__q__`` and
  ``name.__scale__`` hold them as the checkpoint does (``F8_E4M3`` and ``F32``/``BF16``; ``U8`` and ``U8``).

Expansion is one function, `BlockCodec.decode`, used by the engine's slots (on the reader thread for the CPU), by
the blocks kept resident and by `tensorstream.detach`: every path computes with the same weights, bit for bit.

In the file (a valid safetensors file, format version 2), an encoded tensor ``name`` is stored as entries
``name.__hi__`` (the zstd frame of the high bytes) and ``name.__lo__`` (the low bytes), or ``name.__q__`` and
``name.__scale__``. ``__metadata__["encoding"]`` is a JSON object: ``{"kind": "lossless", "tensors": {name: {"as":
"lossless", "dtype": "BF16", "shape": [...]}}}``. Every other entry is a plain tensor. `BlockCodec.from_header`
validates all of it: a store is untrusted input. (Files of the first int8/int4 layout, expanded when loaded, are no
longer read: their stores have another fingerprint and are rebuilt.)

Example:
    ```python
    >>> stored, meta = encode_tensors({"w": torch.randn(64, 256, dtype=torch.bfloat16)}, "lossless")
    >>> sorted(stored), json.loads(meta)["kind"]
    (['w.__hi__', 'w.__lo__'], 'lossless')
    ```
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .dequantize import FP8_PIECE, fp8_dequantize, mxfp4_dequantize, mxfp4_scratch_bytes
from .errors import BackendUnavailableError, ConfigError, CorruptFileError, FormatError
from .format import DTYPE_CODES, DTYPES, TENSOR_ALIGNMENT, TensorInfo, TsHeader
from .rules import RULES_KEY, RuledTensor, parse_rules, part_name

__all__ = [
    "COMPRESSIONS",
    "ENCODING_KEY",
    "PREQUANTIZED_KINDS",
    "QUANTIZE_SCHEMES",
    "BlockCodec",
    "encode_tensors",
    "expands",
    "store_kind",
]

QUANTIZE_SCHEMES = ("int8", "int4")
COMPRESSIONS = ("lossless",)
#: The ``__metadata__`` key of an encoded ``.ts`` file.
ENCODING_KEY = "encoding"
#: Smaller tensors are kept as they are (a few KB: not worth compressing).
MIN_QUANTIZED_NUMEL = 1024
ZSTD_LEVEL = 3
_PARTS = {
    "lossless": ("hi", "lo"),
    "fp8": ("q", "scale"),
    "mxfp4": ("q", "scale"),
    # compressed-tensors: the parts a checkpoint has of these (`tensorstream.ctensors.CT_PARTS`), "scale" and
    # "packed" or "q" always
    "compressed-tensors": ("packed", "scale", "zero", "shape", "gscale", "q"),
}
#: Store kinds chosen from a pre-quantized checkpoint, never asked for (`tensorstream.prequantized`).
PREQUANTIZED_KINDS = ("fp8", "mxfp4", "compressed-tensors")
_SCRATCH_ALIGNMENT = 4096
#: PyTorch's parallel grain (``at::internal::GRAIN_SIZE``): an elementwise op on fewer values runs on the caller.
_INLINE = 32768


def expands(kind: str | None) -> bool:
    """Whether a store of kind ``kind`` expands its blocks when they load (lossless, fp8, mxfp4); plain stores and
    the quantized ones (`tensorstream.compact`: linear weights bound compact, by a binding rule) bind them as read."""
    return kind is not None and kind not in QUANTIZE_SCHEMES


def store_kind(quantize: str | None, compression: str | None) -> str | None:
    """The store kind for these settings (``None``: plain), or `ConfigError` naming the argument to fix.

    Example:
        ```python
        >>> store_kind("int8", None), store_kind(None, "lossless"), store_kind(None, None)
        ('int8', 'lossless', None)
        ```
    """
    if quantize is not None and quantize not in QUANTIZE_SCHEMES:
        raise ConfigError(f"quantize={quantize!r} is not a scheme tensorstream stores; use one of {QUANTIZE_SCHEMES}.")
    if compression not in (None, "none") and compression not in COMPRESSIONS:
        raise ConfigError(f"compression={compression!r} is not supported; use 'lossless' or None.")
    compression = None if compression == "none" else compression
    if quantize is not None and compression is not None:
        raise ConfigError(
            f"quantize={quantize!r} and compression={compression!r} cannot be combined: quantized values hardly "
            "compress further. Pick one."
        )
    return quantize or compression


# -- reshard side ----------------------------------------------------------------------------------------------------


def _part(name: str, part: str) -> str:
    return f"{name}.__{part}__"


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as err:
        raise BackendUnavailableError(
            f"lossless stores are compressed with zstd through the zstandard package, which cannot be imported "
            f"({err}); install it with `pip install 'tensorstream[compression]'`."
        ) from None
    return zstandard


def _compress(tensor: torch.Tensor, level: int = ZSTD_LEVEL) -> dict[str, torch.Tensor]:
    zstd = _zstd()
    planes = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).view(-1, 2)
    hi = planes[:, 1].contiguous()
    frame = zstd.ZstdCompressor(level=level, write_content_size=True).compress(hi.numpy().data)
    return {"hi": torch.frombuffer(bytearray(frame), dtype=torch.uint8), "lo": planes[:, 0].contiguous()}


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    kind: str,
    *,
    phases: Mapping[str, int] | None = None,
    parts_of: Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """The entries a ``.ts`` file of store kind ``kind`` holds for ``tensors``, and its ``encoding`` metadata.

    Args:
        tensors: name -> tensor, one block's tensors (any device; each is moved to CPU while it is encoded).
        kind: ``"lossless"``, or ``"fp8"`` / ``"mxfp4"`` (a pre-quantized checkpoint's).
        phases: name -> the address phase (mod 64) the tensor had in its source (`tensorstream.save_to_ts`); an
            encoded tensor's is recorded in the encoding, so that the CPU expands it at that phase.
        parts_of: for ``"fp8"`` and ``"mxfp4"``: name, tensor -> the checkpoint's ``{"q", "scale"}`` that expand to
            exactly that tensor, or ``None`` to keep it as it is (`tensorstream.prequantized.checkpoint_parts`).

    Returns:
        (entries, metadata): the tensors to write with `tensorstream.save_to_ts` and the JSON string to store under
        ``__metadata__["encoding"]``.
    """
    if kind not in (*COMPRESSIONS, *PREQUANTIZED_KINDS):
        raise ConfigError(
            f"store kind {kind!r} is not encoded block by block; use one of {COMPRESSIONS} (int8 and int4 stores "
            "are built by tensorstream.compact)."
        )
    stored: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        entry: dict[str, Any] = {"as": kind, "dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape)}
        if kind == "lossless":
            parts = (
                _compress(tensor)
                if tensor.dtype in (torch.bfloat16, torch.float16) and tensor.numel() >= MIN_QUANTIZED_NUMEL
                else None
            )
        else:
            parts = parts_of(name, tensor) if parts_of is not None else None
            if parts is not None and "__meta__" in parts:  # compressed-tensors: its format and scheme
                parts = dict(parts)
                entry["ct"] = parts.pop("__meta__")
        if parts is None:
            stored[name] = tensor
            continue
        phase = (phases or {}).get(name, 0)
        if phase:
            entry["phase"] = phase
        described[name] = entry
        for part, value in parts.items():
            stored[_part(name, part)] = value
    return stored, json.dumps({"kind": kind, "tensors": described}, separators=(",", ":"))


# -- run time --------------------------------------------------------------------------------------------------------


def _scratch_bytes(kind: str, numel: int, shape: tuple[int, ...]) -> int:
    """Scratch one tensor of ``kind`` needs while it expands (fp8: float32 values of one piece, a row at least)."""
    if kind == "fp8":
        return 4 * min(numel, max(FP8_PIECE, shape[-1]))
    if kind == "mxfp4":  # the blocks' shape [E, R, G, B]: pieces of the model thread's size (the larger ones)
        return mxfp4_scratch_bytes(shape, FP8_PIECE) if len(shape) == 4 else 0
    return numel if kind == "lossless" else 0


def _rule_parts(raw: str | None) -> set[str]:
    """The entries rule records name as parts (loosely: `tensorstream.rules.parse_rules` validates them)."""
    try:
        records = json.loads(raw) if raw else {}
        return {part_name(n, str(p)) for n, r in records.items() for p in r.get("parts", [])}
    except (ValueError, RecursionError, AttributeError, TypeError):
        return set()


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


@dataclass(frozen=True)
class _Step:
    """Expand one tensor: from the compact entries ``parts`` (name -> info) into ``out`` of the expanded buffer."""

    name: str
    kind: str  # "copy", "lossless", "fp8", "mxfp4"
    out: TensorInfo
    parts: dict[str, TensorInfo]
    meta: Any = None  # compressed-tensors: {"format", "scheme"}


class BlockCodec:
    """How one block's data section (its *compact* bytes) becomes the tensors the model binds (its *expanded* layout).

    A block in flight takes one region laid out as ``[expanded | compact | scratch]``: the reader fills the compact
    part, `decode` writes the expanded part (the views the parameters bind), and scratch holds intermediate values.
    For a plain file, compact and expanded are the same bytes (``decode is None``, the region is the data section).

    On the CPU with the ``mmap`` backend, the compact bytes are read from a mapping of the file instead (page cache,
    not the budget's memory): the region is then ``[expanded | scratch]`` (``mapped_scratch_offset``,
    ``mapped_region_bytes``).

    Attributes:
        tensors: logical name -> `TensorInfo` in the expanded buffer (what the model binds).
        expanded_bytes, compact_offset, scratch_offset, region_bytes: the region's layout, in bytes.
        kind: ``None`` (plain), ``"lossless"``, ``"fp8"`` or ``"mxfp4"``.
        host_decode: expansion runs on the CPU (zstd), so on a GPU the expanded bytes are what is copied.
    """

    def __init__(self, header: TsHeader, *, phased: bool = True) -> None:
        self.header = header
        #: tensors at their source address phases (the CPU's layout) or all 64-byte aligned (a device's); both
        #: layouts take the same bytes
        self.phased = phased
        raw = header.metadata.get(ENCODING_KEY)
        self.kind: str | None = None
        self.steps: list[_Step] = []
        if raw is None:
            self.tensors = dict(header.tensors)
            self.expanded_bytes = header.data_size
            self.compact_offset = 0
            self.scratch_offset = _align(header.data_size, _SCRATCH_ALIGNMENT)
            self.scratch_bytes = 0
            self.region_bytes = self.scratch_offset
            self.mapped_scratch_offset = self.mapped_region_bytes = self.scratch_offset
            self.host_decode = False
        else:
            self._parse(raw)
        #: parameters rebuilt by a binding rule (`tensorstream.rules`) from plain parts, in the bound layout
        self.rules: dict[str, RuledTensor] = parse_rules(header.metadata.get(RULES_KEY), self.tensors, header.path)

    @property
    def needs_binding(self) -> bool:
        """Whether tensorstream binds this block itself (expanded, or with ruled parameters) rather than transformers'
        loader reading its entries as they are."""
        return self.encoded or bool(self.rules)

    @property
    def logical(self) -> dict[str, TensorInfo]:
        """Name -> dtype and shape of every tensor the block binds: a ruled parameter as itself, not its parts
        (``start`` is 0 and ``nbytes`` its logical size: for declaring names, never for reading)."""
        if not self.rules:
            return self.tensors
        parts = {part_name(name, p) for name, ruled in self.rules.items() for p in ruled.parts}
        logical = {name: info for name, info in self.tensors.items() if name not in parts}
        for name, ruled in self.rules.items():
            logical[name] = TensorInfo(DTYPE_CODES[ruled.dtype], ruled.shape, 0, ruled.nbytes)
        return logical

    @property
    def encoded(self) -> bool:
        return self.kind is not None

    def _fail(self, what: str) -> FormatError:
        return FormatError(f"{self.header.path}: {what}; the file is damaged or was not written by tensorstream.")

    def _parse(self, raw: str) -> None:
        header = self.header
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):
            raise self._fail("__metadata__['encoding'] is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("kind") not in _PARTS or not isinstance(meta.get("tensors"), dict):
            raise self._fail("__metadata__['encoding'] names no known store kind")
        kind = meta["kind"]
        self.kind = kind
        self.host_decode = kind == "lossless"
        described: dict[str, Any] = meta["tensors"]
        claimed: set[str] = set()
        encoded: dict[str, tuple[str, tuple[int, ...], dict[str, TensorInfo], int]] = {}
        metas: dict[str, Any] = {}
        scratch = 0
        for name, entry in described.items():
            if not isinstance(entry, dict) or entry.get("as") != kind:
                raise self._fail(f"encoding of {name!r} is not a {kind} entry")
            dtype, shape = entry.get("dtype"), entry.get("shape")
            if (
                dtype not in DTYPES
                or not isinstance(shape, list)
                or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 40 for d in shape)
            ):
                raise self._fail(f"encoding of {name!r} has an invalid dtype or shape")
            if name in header.tensors:
                raise self._fail(f"{name!r} is both a plain entry and an encoded one")
            phase = entry.get("phase", 0)
            itemsize = DTYPES[dtype].itemsize
            if type(phase) is not int or not 0 <= phase < TENSOR_ALIGNMENT or phase % itemsize:
                raise self._fail(f"encoding of {name!r} has phase {phase!r}, not a multiple of {itemsize} below 64")
            parts = {}
            for part in _PARTS[kind]:
                info = header.tensors.get(_part(name, part))
                if info is None and kind == "compressed-tensors":  # only those its format has
                    continue
                if info is None:
                    raise self._fail(f"{_part(name, part)!r} is missing")
                parts[part] = info
                claimed.add(_part(name, part))
            numel = math.prod(shape)
            self._check_parts(name, kind, DTYPES[dtype], tuple(shape), numel, parts)
            compact_shape = parts["q"].shape if kind == "mxfp4" else tuple(shape)  # mxfp4: by its blocks' shape
            scratch = max(scratch, _scratch_bytes(kind, numel, compact_shape))
            encoded[name] = (dtype, tuple(shape), parts, phase)
            metas[name] = meta = entry.get("ct")
            if kind == "compressed-tensors" and not (
                isinstance(meta, dict) and isinstance(meta.get("format"), str) and isinstance(meta.get("scheme"), dict)
            ):
                raise self._fail(f"encoding of {name!r} has no compressed-tensors format and scheme")
        suffixes = tuple(f".__{part}__" for parts in _PARTS.values() for part in parts)
        ruled = _rule_parts(header.metadata.get(RULES_KEY))
        for name in header.tensors:
            if name not in claimed and name not in ruled and name.endswith(suffixes):
                raise self._fail(f"{name!r} belongs to no encoded tensor")
        # the expanded layout: logical tensors in the data order of their first entry, each 64-byte aligned
        first: dict[str, int] = {}
        for name, info in header.tensors.items():
            owner = name.rsplit(".__", 1)[0] if name in claimed else name
            first[owner] = min(first.get(owner, info.start), info.start)
        offset = 0
        self.tensors = {}
        for name in sorted(first, key=first.__getitem__):
            if name in encoded:
                dtype, shape, parts, phase = encoded[name]
            else:
                plain = header.tensors[name]
                dtype, shape, parts, phase = plain.dtype, plain.shape, {"data": plain}, plain.phase
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            start = offset + (phase if self.phased else 0)
            info = TensorInfo(dtype, shape, start, start + nbytes, start % TENSOR_ALIGNMENT)
            self.tensors[name] = info
            self.steps.append(_Step(name, kind if name in encoded else "copy", info, parts, metas.get(name)))
            offset = _align(offset + (TENSOR_ALIGNMENT if phase else 0) + nbytes, TENSOR_ALIGNMENT)
        self.expanded_bytes = offset
        self.compact_offset = _align(offset, _SCRATCH_ALIGNMENT)
        self.scratch_offset = _align(self.compact_offset + header.data_size, _SCRATCH_ALIGNMENT)
        self.scratch_bytes = scratch
        self.region_bytes = _align(self.scratch_offset + scratch, _SCRATCH_ALIGNMENT)
        # expanded straight from a mapping of the file (CPU): the region holds no compact bytes
        self.mapped_scratch_offset = self.compact_offset
        self.mapped_region_bytes = _align(self.mapped_scratch_offset + scratch, _SCRATCH_ALIGNMENT)

    def _check_parts(
        self,
        name: str,
        kind: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        numel: int,
        parts: dict[str, TensorInfo],
    ) -> None:
        def expect(part: str, code: str, part_shape: tuple[int, ...]) -> None:
            info = parts[part]
            if info.dtype != code or info.shape != part_shape:
                raise self._fail(
                    f"{_part(name, part)!r} is {info.dtype}{list(info.shape)}, expected {code}{list(part_shape)}"
                )

        weight_code = DTYPE_CODES[dtype]
        if kind == "compressed-tensors":  # its format and scheme are checked by `_parse`
            if not dtype.is_floating_point or "scale" not in parts or ("packed" not in parts) == ("q" not in parts):
                raise self._fail(f"{name!r} is not a valid compressed-tensors entry")
            return
        if kind == "fp8":  # a 2-D weight, or fused [E, R, C] experts with an [E, ...] grid of scales
            if len(shape) not in (2, 3) or dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise self._fail(f"{name!r} is {weight_code}{list(shape)}: fp8 entries expand to 2-D or 3-D weights")
            expect("q", "F8_E4M3", shape)
            scale = parts["scale"]
            if (
                scale.dtype not in ("F32", "BF16")
                or len(scale.shape) != len(shape)
                or 0 in scale.shape
                or scale.shape[:-2] != shape[:-2]
                or shape[-2] % scale.shape[-2]
                or shape[-1] % scale.shape[-1]
            ):
                raise self._fail(f"{_part(name, 'scale')!r} is not a F32/BF16 block grid dividing {list(shape)}")
            return
        if kind == "mxfp4":
            if len(shape) != 3 or dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise self._fail(f"{name!r} is {weight_code}{list(shape)}: mxfp4 entries expand to 3-D float weights")
            blocks = parts["q"].shape
            if len(blocks) != 4 or shape != (blocks[0], blocks[2] * blocks[3] * 2, blocks[1]):
                raise self._fail(
                    f"{_part(name, 'q')!r} has shape {list(blocks)}, which does not expand to {list(shape)}"
                )
            expect("q", "U8", blocks)
            expect("scale", "U8", blocks[:3])
            return
        # lossless
        if dtype not in (torch.bfloat16, torch.float16):
            raise self._fail(f"{name!r} is {weight_code}: only 16-bit floats are stored as byte planes")
        expect("lo", "U8", (numel,))
        if parts["hi"].dtype != "U8" or len(parts["hi"].shape) != 1:
            raise self._fail(f"{_part(name, 'hi')!r} must be a U8 vector (a zstd frame)")

    # -- expansion ---------------------------------------------------------------------------------------------

    def decode(
        self, compact: torch.Tensor, expanded: torch.Tensor, scratch: torch.Tensor, *, inline: bool | None = None
    ) -> None:
        """Expand ``compact`` (the data section, uint8) into ``expanded`` (uint8, ``expanded_bytes`` long).

        All three are ``uint8`` tensors on one device (the CPU for a ``host_decode`` codec); ``scratch`` holds
        ``scratch_bytes``. Nothing is allocated but small views.

        ``inline`` (default: on the CPU) cuts the work into pieces of fewer than 32768 values, which PyTorch runs on
        the calling thread (below its parallel grain): for a reader thread expanding while the model computes, where
        an OpenMP team per thread would oversubscribe the cores (measured on 2 cores: 50 to 100 times slower under
        load). Without it, whole-tensor operations use every core (the model thread, `tensorstream.slots`). The
        result is the same bits either way: every value is computed alone.

        Raises:
            `CorruptFileError`: a zstd frame does not expand to exactly its tensor's bytes.
        """
        inline = compact.device.type == "cpu" if inline is None else inline
        for step in self.steps:
            out = expanded[step.out.start : step.out.end]
            if step.kind == "copy":
                src = step.parts["data"]
                out.copy_(compact[src.start : src.end])
                continue
            if step.kind == "lossless":
                self._expand_planes(step, compact, out, scratch, inline)
                continue
            if step.kind == "mxfp4":
                q, scale = step.parts["q"], step.parts["scale"]
                piece = _INLINE - 1 if inline else FP8_PIECE
                mxfp4_dequantize(
                    out.view(step.out.torch_dtype).view(step.out.shape),
                    compact[q.start : q.end].view(q.shape),
                    compact[scale.start : scale.end].view(scale.shape),
                    scratch[: mxfp4_scratch_bytes(q.shape, piece)],
                    piece=piece,
                )
                continue
            if step.kind == "compressed-tensors":
                from .ctensors import decompress

                views = {p: compact[i.start : i.end].view(i.torch_dtype).view(i.shape) for p, i in step.parts.items()}
                decompress(out.view(step.out.torch_dtype).view(step.out.shape), views, step.meta)
                continue
            if step.kind == "fp8":
                q, scale = step.parts["q"], step.parts["scale"]
                fp8_dequantize(
                    out.view(step.out.torch_dtype).view(step.out.shape),
                    compact[q.start : q.end].view(q.torch_dtype).view(q.shape),
                    compact[scale.start : scale.end].view(scale.torch_dtype).view(scale.shape),
                    scratch[: _scratch_bytes("fp8", math.prod(q.shape), q.shape)].view(torch.float32),
                    piece=_INLINE - 1 if inline else FP8_PIECE,
                )
                continue

    def _expand_planes(
        self, step: _Step, compact: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor, inline: bool
    ) -> None:
        hi_info, lo_info = step.parts["hi"], step.parts["lo"]
        numel = lo_info.nbytes
        hi = scratch[:numel]
        frame = compact[hi_info.start : hi_info.end].numpy().data
        reader = _zstd().ZstdDecompressor().stream_reader(frame, read_across_frames=False)
        target = hi.numpy().data
        got = 0
        while got < numel:
            n = reader.readinto(target[got:])
            if not n:
                break
            got += n
        if got != numel or reader.read(1):
            raise CorruptFileError(
                f"{self.header.path}: the compressed high bytes of {step.name!r} do not expand to its {numel} values: "
                "the file is damaged."
            )
        planes = out.view(-1, 2)
        lo = compact[lo_info.start : lo_info.end]
        per = _INLINE - 1 if inline else numel
        for i in range(0, numel, per):
            planes[i : i + per, 1].copy_(hi[i : i + per])
            planes[i : i + per, 0].copy_(lo[i : i + per])

    def expand(self, compact: torch.Tensor) -> torch.Tensor:
        """The expanded bytes of ``compact`` in a new buffer on ``compact``'s device (for a block kept in memory).

        Example:
            ```python
            >>> data = BlockCodec(header).expand(buffer)          # uint8, expanded_bytes long
            ```
        """
        if self.kind is None:
            return compact[: self.header.data_size]
        device = torch.device("cpu") if self.host_decode else compact.device
        expanded = torch.empty(self.expanded_bytes, dtype=torch.uint8, device=device)
        scratch = torch.empty(self.scratch_bytes, dtype=torch.uint8, device=device)
        self.decode(compact[: self.header.data_size].to(device), expanded, scratch)
        return expanded.to(compact.device)
