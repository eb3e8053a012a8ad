"""The ``.ts`` file: a safetensors file laid out so one read brings a whole block into one buffer.

A ``.ts`` file is a valid safetensors file (any safetensors reader opens it) with three additions:

* the data section starts at a multiple of :data:`DATA_ALIGNMENT` (4096) bytes: the JSON header is padded
  with spaces, which the safetensors format allows;
* every tensor starts at its *phase* modulo :data:`TENSOR_ALIGNMENT` (64) inside the data section: 0, or the
  address phase the tensor had where the store was made from (format 2: a resident CPU model's tensors are
  views of the memory-mapped checkpoint, and some CPU kernels give other bits at other alignments).
  Tensors whose size is a multiple of 64 bytes come first, in the order given; the rest follow, largest
  item size first; where a gap is still needed, a filler tensor named ``__tensorstream_pad__.<n>`` (``U8``,
  zeros) fills it, because safetensors forbids holes. tensorstream's readers skip fillers;
* ``__metadata__`` holds ``format`` (``"tensorstream"``), ``format_version``, ``block`` (the module path the
  file holds, ``""`` for non-block weights), ``checksum`` (``crc32:<8 hex digits>`` of the whole data
  section) and, when a tensor has a non-zero phase, ``phases`` (JSON: tensor name -> phase).

So a block is read with one large request (``O_DIRECT`` or cuFile friendly) into one buffer, and every tensor
is an aligned view of that buffer. ``docs/format.md`` is the full specification.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import CorruptFileError, FormatError

__all__ = [
    "DATA_ALIGNMENT",
    "ENCODED_FORMAT_VERSION",
    "FORMAT_VERSION",
    "MAX_FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "TENSOR_ALIGNMENT",
    "TensorInfo",
    "TsHeader",
    "load_ts",
    "read_ts_header",
    "save_to_ts",
]

FORMAT_NAME = "tensorstream"
#: The version this tensorstream writes: 2 adds per-tensor address phases (``phases``) and encoded blocks
#: (``encoding``: a quantized or compressed store, see `tensorstream.encoding`) to version 1.
FORMAT_VERSION = 2
#: The lowest version a file with an ``encoding`` may have (a version 1 reader would misread it).
ENCODED_FORMAT_VERSION = 2
#: The newest version this tensorstream reads.
MAX_FORMAT_VERSION = FORMAT_VERSION
DATA_ALIGNMENT = 4096
TENSOR_ALIGNMENT = 64
#: The safetensors cap on the JSON header; anything larger is rejected before it is read.
MAX_HEADER_BYTES = 100_000_000
PAD_PREFIX = "__tensorstream_pad__."
_WRITE_CHUNK = 64 << 20

#: The one dtype table: safetensors code -> torch dtype (newer dtypes only where this torch has them).
DTYPES: dict[str, torch.dtype] = {
    code: dtype
    for code, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "C64": torch.complex64,
    }.items()
    if dtype is not None
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a ``.ts`` data section (offsets relative to the data section)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    #: ``start % 64``: the address phase the tensor had where the store was made from (format 2, see `save_to_ts`).
    phase: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class TsHeader:
    """The parsed, validated header of a ``.ts`` file.

    Attributes:
        path: the file.
        data_offset: byte offset of the data section in the file (a multiple of 4096).
        data_size: bytes in the data section; the file is ``data_offset + data_size`` bytes long.
        tensors: tensor name -> `TensorInfo`, fillers excluded, in data order.
        metadata: the ``__metadata__`` strings.
    """

    path: Path
    data_offset: int
    data_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def checksum(self) -> str | None:
        return self.metadata.get("checksum")

    @property
    def block(self) -> str | None:
        return self.metadata.get("block")

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_size


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def data_checksum(chunks: list[memoryview] | memoryview | bytes) -> str:
    """``crc32:<hex>`` of the data section, given as one buffer or a list of consecutive chunks."""
    crc = 0
    for chunk in chunks if isinstance(chunks, list) else [chunks]:
        crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def _as_bytes_view(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 and float8 included)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def _layout(
    tensors: Mapping[str, torch.Tensor], phases: Mapping[str, int], tail: Sequence[str] = ()
) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype code, shape, start, end) for tensors and fillers, in data order.

    Every tensor starts at its phase modulo 64 (0 unless ``phases`` says otherwise), and ``start - phase`` (the
    64-byte aligned place a device copy moves it to) is past the previous tensor's aligned place. The ``tail``
    tensors come last, in that order (a block's routed experts: the rest of the block is one prefix of the data).
    """
    last = [name for name in tail if name in tensors]
    head = {name: t for name, t in tensors.items() if name not in set(last)}
    first = [name for name, t in head.items() if (t.numel() * t.element_size()) % TENSOR_ALIGNMENT == 0]
    rest = [name for name in head if name not in set(first)]
    rest.sort(key=lambda name: -tensors[name].element_size())  # stable: keeps order among equal item sizes
    rest += last
    layout: list[tuple[str, str, tuple[int, ...], int, int]] = []
    offset = 0
    aligned_end = 0
    pads = 0
    for name in first + rest:
        t = tensors[name]
        phase = phases.get(name, 0)
        start = max(_align(offset - phase, TENSOR_ALIGNMENT), _align(aligned_end, TENSOR_ALIGNMENT)) + phase
        gap = start - offset
        if gap:
            layout.append((f"{PAD_PREFIX}{pads}", "U8", (gap,), offset, offset + gap))
            pads += 1
            offset += gap
        nbytes = t.numel() * t.element_size()
        layout.append((name, DTYPE_CODES[t.dtype], tuple(t.shape), offset, offset + nbytes))
        offset += nbytes
        aligned_end = offset - phase
    return layout


def save_to_ts(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    block: str = "",
    phases: Mapping[str, int] | None = None,
    tail: Sequence[str] = (),
) -> TsHeader:
    """Write tensors to a ``.ts`` file, atomically (a temporary file, fsync, then rename).

    Args:
        tensors (`Mapping[str, torch.Tensor]`):
            Name -> tensor. Tensors may live on any device; they are copied to CPU one at a time.
        path (`str` or `os.PathLike`):
            The file to write. Its folder must exist.
        metadata (`Mapping[str, str]`, *optional*):
            Extra ``__metadata__`` strings. The keys ``format``, ``format_version``, ``block`` and ``checksum``
            are reserved.
        block (`str`, *optional*):
            The module path the file holds (``"model.layers.3"``), ``""`` for non-block weights.
        phases (`Mapping[str, int]`, *optional*):
            Tensor name -> address phase (``0 <= phase < 64``, a multiple of the item size): the tensor starts at
            that offset modulo 64, so a CPU view of it sits at the same address modulo 64 as the tensor the store
            was made from (some CPU kernels give other bits for other alignments). Recorded in ``__metadata__``
            as ``phases``; omitted tensors are 64-byte aligned. See ``docs/format.md``.
        tail (`Sequence[str]`, *optional*):
            Tensors written after all the others, in this order (a block's routed experts, see
            `tensorstream.experts`), so that the other tensors are one prefix of the data section.

    Returns:
        `TsHeader`: the header of the written file.

    Example:
        ```python
        >>> import torch, tensorstream
        >>> h = tensorstream.save_to_ts({"w": torch.ones(2, 3)}, "/tmp/w.ts")
        >>> h.data_offset % 4096, h.tensors["w"].shape
        (0, (2, 3))
        ```
    """
    path = Path(path)
    metadata = dict(metadata or {})
    reserved = {"format", "format_version", "block", "checksum", "phases"} & set(metadata)
    if reserved:
        raise FormatError(f"save_to_ts({path}): metadata keys {sorted(reserved)} are reserved by the .ts format.")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise FormatError(f"save_to_ts({path}): __metadata__ holds strings only; got {key!r}: {value!r}.")
    cpu: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name.startswith(PAD_PREFIX) or name == "__metadata__":
            raise FormatError(f"save_to_ts({path}): {name!r} is not a valid tensor name.")
        if not isinstance(tensor, torch.Tensor):
            raise FormatError(f"save_to_ts({path}): {name!r} is a {type(tensor).__name__}, not a torch.Tensor.")
        if tensor.device.type == "meta":
            raise FormatError(f"save_to_ts({path}): {name!r} is on the meta device and has no data to write.")
        if tensor.dtype not in DTYPE_CODES:
            raise FormatError(f"save_to_ts({path}): {name!r} has dtype {tensor.dtype}, which safetensors cannot hold.")
        cpu[name] = tensor.detach().to("cpu").contiguous()

    phases = {name: phase for name, phase in (phases or {}).items() if phase}
    for name, phase in phases.items():
        if name not in cpu or type(phase) is not int or not 0 < phase < TENSOR_ALIGNMENT or phase % cpu[name].itemsize:
            raise FormatError(
                f"save_to_ts({path}): phase {phase!r} of {name!r} is not a multiple of its item size below 64."
            )
    layout = _layout(cpu, phases, tail)
    views = [
        _as_bytes_view(cpu[name]) if not name.startswith(PAD_PREFIX) else bytes(end - start)
        for name, _, _, start, end in layout
    ]
    data_size = layout[-1][4] if layout else 0
    meta = {
        **metadata,
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "block": block,
        "checksum": data_checksum([memoryview(v) for v in views]),
    }
    if phases:
        meta["phases"] = json.dumps(dict(sorted(phases.items())), separators=(",", ":"))
    header: dict[str, object] = {"__metadata__": meta}
    for name, code, shape, start, end in layout:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    header_len = _align(8 + len(raw), DATA_ALIGNMENT) - 8
    raw = raw + b" " * (header_len - len(raw))

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", header_len))
            f.write(raw)
            for view in views:
                for i in range(0, len(view), _WRITE_CHUNK):
                    f.write(view[i : i + _WRITE_CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    infos = {
        n: TensorInfo(c, s, a, b, a % TENSOR_ALIGNMENT) for n, c, s, a, b in layout if not n.startswith(PAD_PREFIX)
    }
    return TsHeader(path=path, data_offset=8 + header_len, data_size=data_size, tensors=infos, metadata=meta)


def read_ts_header(path: str | os.PathLike[str], *, require_ts: bool = True) -> TsHeader:
    """Read and validate the header of a ``.ts`` file (or, with ``require_ts=False``, any safetensors file).

    Checks: the header length is capped at 100 MB, the JSON is an object of well-formed entries, every dtype is
    known, every shape matches its byte count, offsets are non-negative, in bounds, without overlap or holes,
    the file is exactly as long as the header says, and (for ``.ts``) the data section is 4096-aligned and the
    format version is one this tensorstream reads.

    Raises:
        `FormatError`: the file is not a valid ``.ts`` file. `CorruptFileError`: it is truncated or too long.
        `FileNotFoundError`: the file does not exist.

    Example:
        ```python
        >>> h = tensorstream.read_ts_header("/tmp/w.ts")
        >>> h.metadata["format"], list(h.tensors)
        ('tensorstream', ['w'])
        ```
    """
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(f"{path}: {file_size} bytes is too short for a safetensors header; {_REPAIR}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap; {_REPAIR}")
        if 8 + header_len > file_size:
            raise CorruptFileError(f"{path}: header of {header_len} bytes runs past the end of the file; {_REPAIR}")
        raw = f.read(header_len)
    return parse_ts_header(raw, path=path, file_size=file_size, require_ts=require_ts)


_REPAIR = "the file is damaged or was not written by tensorstream."


def parse_ts_header(raw: bytes, *, path: Path, file_size: int, require_ts: bool = True) -> TsHeader:
    """Validate a raw JSON header (``raw`` is the N bytes after the length prefix). See `read_ts_header`."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        raise FormatError(f"{path}: header is not valid UTF-8 JSON ({err}); {_REPAIR}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is a JSON {type(header).__name__}, not an object; {_REPAIR}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent or null: safetensors allows both
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{path}: __metadata__ must map strings to strings; {_REPAIR}")
    data_offset = 8 + len(raw)
    entries: list[tuple[str, TensorInfo]] = []
    for name, entry in header.items():
        entries.append((name, _parse_entry(name, entry, path)))
    entries.sort(key=lambda item: (item[1].start, item[1].end))
    cursor = 0
    for name, info in entries:
        if info.start != cursor:
            kind = "overlaps the tensor before it" if info.start < cursor else "leaves a hole before it"
            raise FormatError(f"{path}: tensor {name!r} at offset {info.start} {kind} (expected {cursor}); {_REPAIR}")
        cursor = info.end
    data_size = cursor
    if data_offset + data_size != file_size:
        what = "truncated" if data_offset + data_size > file_size else "longer than its header says"
        raise CorruptFileError(
            f"{path}: file is {what} ({file_size} bytes, header says {data_offset + data_size}); {_REPAIR}"
        )
    if require_ts:
        if metadata.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: not a tensorstream .ts file (no format={FORMAT_NAME!r} in __metadata__).")
        version = metadata.get("format_version", "")
        if not (version.isascii() and version.isdigit()) or int(version) < 1:  # "²".isdigit() is True
            raise FormatError(f"{path}: format_version {version!r} is not a positive integer; {_REPAIR}")
        if int(version) > MAX_FORMAT_VERSION:
            raise FormatError(
                f"{path}: written by a newer tensorstream (format version {version}, this one reads up to "
                f"{MAX_FORMAT_VERSION}); upgrade with `pip install -U tensorstream`."
            )
        if "encoding" in metadata and int(version) < ENCODED_FORMAT_VERSION:  # a version 1 reader would misread it
            raise FormatError(f"{path}: format_version {version} does not match its encoding metadata; {_REPAIR}")
        if data_offset % DATA_ALIGNMENT:
            raise FormatError(f"{path}: data section starts at byte {data_offset}, not a multiple of 4096; {_REPAIR}")
        phases = _parse_phases(metadata.get("phases"), dict(entries), path)
        aligned_end = 0
        pads = 0
        for name, info in entries:
            if name.startswith(PAD_PREFIX):
                if name != f"{PAD_PREFIX}{pads}" or info.dtype != "U8":  # as written: numbered in data order
                    raise FormatError(f"{path}: filler {name!r} is not the U8 filler {PAD_PREFIX}{pads}; {_REPAIR}")
                pads += 1
                continue
            phase = phases.get(name, 0)
            if info.start % TENSOR_ALIGNMENT != phase or info.start - phase < aligned_end:
                raise FormatError(
                    f"{path}: tensor {name!r} at offset {info.start} is not at its phase {phase} modulo 64, past "
                    f"the previous tensor's aligned place; {_REPAIR}"
                )
            aligned_end = info.end - phase
        entries = [(name, replace(info, phase=phases.get(name, 0))) for name, info in entries]
    tensors = {name: info for name, info in entries if not name.startswith(PAD_PREFIX)}
    return TsHeader(path=path, data_offset=data_offset, data_size=data_size, tensors=tensors, metadata=metadata)


def _parse_phases(raw: str | None, entries: dict[str, TensorInfo], path: Path) -> dict[str, int]:
    """The ``phases`` metadata (format 2): a JSON object of tensor name -> phase in (0, 64), item-size aligned."""
    if raw is None:
        return {}
    try:
        phases = json.loads(raw)
    except ValueError:
        phases = None
    if not isinstance(phases, dict):
        raise FormatError(f"{path}: __metadata__ 'phases' is not a JSON object of tensor phases; {_REPAIR}")
    for name, phase in phases.items():
        if not (
            name in entries
            and not name.startswith(PAD_PREFIX)
            and type(phase) is int
            and 0 < phase < TENSOR_ALIGNMENT
            and phase % torch.empty((), dtype=entries[name].torch_dtype).element_size() == 0
        ):
            raise FormatError(
                f"{path}: __metadata__ 'phases' gives {name!r} the phase {phase!r}: not a tensor of the file with a "
                f"phase in 1..63 that is a multiple of its item size; {_REPAIR}"
            )
    return phases


def _parse_entry(name: str, entry: object, path: Path) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{path}: entry {name!r} must have exactly dtype, shape and data_offsets; {_REPAIR}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}; known: {sorted(DTYPES)}.")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 63 for d in shape
    ):  # safetensors (and torch) refuse a dimension past 64 bits even when another one is 0
        raise FormatError(f"{path}: tensor {name!r} has invalid shape {str(shape)[:200]}; {_REPAIR}")
    try:
        name.encode("utf-8")  # a lone surrogate (``"\ud800"`` in the JSON) is valid JSON but no UTF-8 name
    except UnicodeEncodeError:
        raise FormatError(f"{path}: tensor name {name!r} is not valid UTF-8; {_REPAIR}") from None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or offsets[0] < 0
        or offsets[1] < offsets[0]
    ):
        raise FormatError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}; {_REPAIR}")
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if numel * itemsize != offsets[1] - offsets[0]:
        raise FormatError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} needs {numel * itemsize} bytes but its "
            f"offsets span {offsets[1] - offsets[0]}; {_REPAIR}"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def aligned_empty(nbytes: int, *, alignment: int = DATA_ALIGNMENT, pin_memory: bool = False) -> torch.Tensor:
    """A CPU ``uint8`` tensor of ``nbytes`` whose first byte sits at a multiple of ``alignment``."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin_memory)
    shift = (-raw.data_ptr()) % alignment
    return raw[shift : shift + nbytes]


def tensor_views(buffer: torch.Tensor, header: TsHeader) -> dict[str, torch.Tensor]:
    """Views of every tensor of ``header`` into ``buffer``, a ``uint8`` tensor holding the data section."""
    out = {}
    for name, info in header.tensors.items():
        out[name] = buffer[info.start : info.end].view(info.torch_dtype).view(info.shape)
    return out


def aligned_runs(header: TsHeader) -> list[tuple[int, int, int]]:
    """``(start, end, shift)`` runs of the data section whose tensors share one phase, in data order.

    A device copy of the block moves each run ``shift`` bytes down (to ``start - shift``), which puts every tensor
    at a multiple of 64 inside its region: what a device-resident model holds (CUDA allocations are 512-byte
    aligned). The reader has checked that the moved runs do not overlap. Without phases, one run of shift 0.

    Example:
        ```python
        >>> aligned_runs(read_ts_header("block.ts"))   # one tensor at phase 8, then two at 0
        [(8, 4104, 8), (4160, 8256, 0)]
        ```
    """
    infos = sorted(header.tensors.values(), key=lambda info: (info.start, info.end))
    if not any(info.phase for info in infos):
        return [(0, header.data_size, 0)]
    runs: list[tuple[int, int, int]] = []
    for info in infos:
        if runs and runs[-1][2] == info.phase:
            runs[-1] = (runs[-1][0], info.end, info.phase)
        else:
            runs.append((info.start, info.end, info.phase))
    return runs


def read_data(path: Path, header: TsHeader, out: torch.Tensor, *, fd: int | None = None) -> None:
    """Read the whole data section of ``path`` into ``out`` (a CPU ``uint8`` tensor) with buffered reads.

    With ``fd``, read from that open descriptor of ``path`` (checked by the caller) instead of opening the path.
    """
    view = _as_bytes_view(out)[: header.data_size]
    own = fd is None
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < header.data_size:
            n = os.preadv(fd, [view[done:]], header.data_offset + done)
            if n == 0:
                raise CorruptFileError(f"{path}: file ended after {done} of {header.data_size} data bytes; {_REPAIR}")
            done += n
    finally:
        if own:
            os.close(fd)


def load_ts(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, verify_checksum: bool = False
) -> dict[str, torch.Tensor]:
    """Load every tensor of a ``.ts`` file with one read; tensors are views of one aligned buffer.

    Args:
        path (`str` or `os.PathLike`): the ``.ts`` file.
        device (`str` or `torch.device`, defaults to ``"cpu"``): where the tensors go (one copy of the buffer).
        verify_checksum (`bool`, defaults to `False`): also check the data against the header's checksum.

    Raises:
        `CorruptFileError`: the data does not match its checksum (with ``verify_checksum=True``).

    Example:
        ```python
        >>> tensorstream.load_ts("/tmp/w.ts")["w"].sum().item()
        6.0
        ```
    """
    header = read_ts_header(path)
    buffer = aligned_empty(header.data_size)
    read_data(header.path, header, buffer)
    if verify_checksum:
        verify_buffer(header, buffer)
    device = torch.device(device)
    if device.type != "cpu":
        buffer = buffer.to(device)
    return tensor_views(buffer, header)


def verify_buffer(header: TsHeader, buffer: torch.Tensor) -> None:
    """Raise `CorruptFileError` unless ``buffer`` (the data section, on CPU) matches the header's checksum."""
    expected = header.checksum
    if expected is None:
        raise CorruptFileError(f"{header.path}: no checksum in __metadata__; {_REPAIR}")
    actual = data_checksum(_as_bytes_view(buffer)[: header.data_size])
    if actual != expected:
        raise CorruptFileError(
            f"{header.path}: data checksum {actual} does not match the header's {expected}: the file is damaged. "
            "The file is damaged."
        )
