"""The store: one folder per resharded model, holding ``.ts`` files and the ``tensorstream.json`` manifest.

Layout of ``<storage_path>/<fingerprint>/``::

    tensorstream.json               manifest: format version, source fingerprint, block order, sizes, dtypes
    non_block.ts.safetensors        every weight outside the repeated blocks (embeddings, final norm, head)
    blocks/<module path>.ts.safetensors
                                    one file per block, e.g. blocks/model.layers.0.ts.safetensors
    config.json                     the model's config (dtype updated when resharded to another dtype)
    generation_config.json          when the source has one
    model.safetensors.index.json    a standard index, so plain transformers can load the store too

Store files are ``.ts`` files named ``*.ts.safetensors``, so that transformers' loader (which decides by the
file name) reads them as the safetensors files they are. The manifest is written last and the folder is
renamed into place when complete, so a store whose manifest
exists is complete. `Store.open` validates the manifest and the index (paths stay inside the store), refuses
symbolic links that lead out of it and weight files the manifest does not list, and, with ``verify="header"``,
checks every ``.ts`` header against the manifest and the index. A store may come from someone else (a Hub
preshard repo): nothing in it is trusted before it is checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .encoding import BlockCodec, expands
from .errors import FormatError, StaleStoreError
from .format import MAX_FORMAT_VERSION, TsHeader, aligned_empty, read_data, read_ts_header, verify_buffer

__all__ = ["INDEX_NAME", "MANIFEST_NAME", "BlockEntry", "Store", "read_config"]

MANIFEST_NAME = "tensorstream.json"
INDEX_NAME = "model.safetensors.index.json"
STORE_FORMAT = "tensorstream-store"
MAX_MANIFEST_BYTES = 64 << 20
#: A model's ``config.json`` / ``generation_config.json``: at most this many bytes and this deep.
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 32
#: A store folder written by `tensorstream.reshard` is named after its fingerprint: 16 hex digits.
FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{16}")
#: Names a model loader could pick up as weights; a store holds no such file that its manifest does not list.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf")
_FIX = "the store was damaged or changed after it was written."


def repair_command(store: str | os.PathLike[str]) -> str:
    """The command that rebuilds the store folder ``store`` from its recorded source, as a user would type it.

    Read from the manifest without trusting it further than its ``source``, ``dtype`` and ``model_class``
    strings. A store with no readable source (damaged manifest, or built by `tensorstream.offload` from a model in
    memory), or built with a ``quantization_config`` passed to ``from_pretrained`` (part of its fingerprint, which
    ``tensorstream reshard`` cannot pass), can only be removed; the next load rebuilds it.

    Example:
        ```python
        >>> repair_command("/nvme/tensorstream/0123456789abcdef")
        'tensorstream reshard --force ./my-llama /nvme/tensorstream --model-class LlamaForCausalLM'
        ```
    """
    path = Path(store)
    try:
        manifest_path = path / MANIFEST_NAME
        if not Path(os.path.realpath(manifest_path)).is_relative_to(_link_root(Path(os.path.realpath(path)))):
            raise OSError(f"{manifest_path} leads out of the store")  # never opened
        manifest = read_json(manifest_path)  # a FIFO, a nesting bomb: FormatError (a ValueError)
        source, cls, dtype, kind = (manifest.get(k) for k in ("source", "model_class", "dtype", "encoding"))
        # a quantization_config passed to from_pretrained is part of the fingerprint, and `tensorstream reshard`
        # cannot pass one: a reshard would write another store. Removing this one lets the next load rebuild it.
        passed = manifest.get("quantization_arg") is not None
        once = manifest.get("dequantize") == "once"
    except (OSError, ValueError, AttributeError):
        source = cls = dtype = kind = None
        passed = once = False
    if not isinstance(source, str) or not source or source.startswith("in-memory ") or passed:
        root = path.parent
        return f"tensorstream cache rm {path.name} --storage-path {shlex.quote(str(root))}"
    parts = ["tensorstream", "reshard", "--force", source, str(path.parent)]
    if isinstance(dtype, str) and dtype:
        parts += ["--dtype", dtype]
    if isinstance(cls, str) and cls:
        parts += ["--model-class", cls]
    if kind in ("int8", "int4"):
        parts += ["--quantize", kind]
    elif kind == "lossless":
        parts += ["--compression", kind]
    if once:
        parts += ["--dequantize", "once"]
    return " ".join(shlex.quote(part) for part in parts)


def repair_hint(store: str | os.PathLike[str], *, sentence: bool = False) -> str:
    """How to rebuild ``store``, with the one command of `repair_command`; ``sentence`` capitalises it."""
    command = repair_command(store)
    if command.startswith("tensorstream cache rm"):
        hint = (
            f"remove the store with `{command}`, then load the model again with the same arguments (its "
            "quantization_config included, if one was passed) to rebuild it."
        )
    else:
        hint = f"rebuild the store with `{command}`."
    return hint[0].upper() + hint[1:] if sentence else hint


@dataclass(frozen=True)
class BlockEntry:
    """One ``.ts`` file of the store as the manifest describes it."""

    name: str
    file: str
    data_size: int
    checksum: str
    dtypes: tuple[str, ...]
    #: bytes one load of the block takes in the arena (a region: expanded, compact and scratch bytes, see
    #: `tensorstream.encoding.BlockCodec`); the data size rounded up to 4096 for a plain file.
    memory_size: int = 0

    @property
    def region_bytes(self) -> int:
        return self.memory_size or -(-self.data_size // 4096) * 4096


class Store:
    """A complete, validated store folder.

    Example:
        ```python
        >>> store = Store.open(tensorstream.reshard("path/to/model"))
        >>> [b.name for b in store.blocks][:2], store.total_bytes
        (['model.layers.0', 'model.layers.1'], 523239424)
        ```
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.non_block = _entry(manifest["non_block"], "non_block", path)
        self.blocks = [_entry(block, f"blocks[{i}]", path) for i, block in enumerate(manifest["blocks"])]
        #: file -> tensor names, from the store's index (``None`` when the store has no index).
        self.index_names: dict[str, set[str]] | None = None
        self._headers: dict[str, TsHeader] = {}
        self._codecs: dict[str, BlockCodec] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: str = "header") -> Store:
        """Open the store at ``path``; with ``verify="header"`` or ``"checksum"`` also check every header.

        Nothing in the folder is trusted before it is checked: the manifest and the index must name files inside
        the store, no symbolic link may lead out of it (in a Hub cache snapshot: out of the repo's cache folder),
        no weight file may sit there unlisted, and a folder named like a fingerprint must hold that fingerprint.

        Raises:
            `StaleStoreError`: the folder or a file is missing, or the folder's name is not its manifest's
            fingerprint. `FormatError`: the manifest or index is invalid, from a newer format version, or names a
            path outside the store; a link leads out of the store. `CorruptFileError`: a file is truncated.
        """
        path = Path(path).resolve()
        manifest_path = path / MANIFEST_NAME
        if not path.is_dir() or not os.path.lexists(manifest_path):  # a FIFO or link: refused by `_open`
            raise StaleStoreError(
                f"{path} is not a complete tensorstream store (no {MANIFEST_NAME}); `tensorstream cache ls` lists "
                "the stores, `tensorstream reshard MODEL` builds one."
            )
        try:
            return cls._open(path, manifest_path, verify)
        except (FormatError, StaleStoreError) as err:
            if "`tensorstream " in str(err):  # already says which command repairs it
                raise
            raise type(err)(f"{err} {repair_hint(path, sentence=True)}") from None

    @classmethod
    def _open(cls, path: Path, manifest_path: Path, verify: str) -> Store:
        check_links(path)
        manifest = read_json(manifest_path)
        validate_manifest(manifest, manifest_path)
        if FINGERPRINT_PATTERN.fullmatch(path.name) and manifest["fingerprint"] != path.name:
            raise StaleStoreError(
                f"{manifest_path} says the store holds fingerprint {manifest['fingerprint']!r}, but its folder is "
                f"named {path.name!r}: the folder was renamed or its manifest replaced, so it may not match the "
                f"source. Remove it with `tensorstream cache rm {path.name} --storage-path "
                f"{shlex.quote(str(path.parent))}` and load or reshard the model again."
            )
        store = cls(path, manifest)
        store._check_files()
        if verify != "off":
            for entry in store.entries():
                store.codec(entry)
        return store

    def _check_files(self) -> None:
        """Validate the index against the manifest and refuse weight files the manifest does not list."""
        listed = {entry.file for entry in self.entries()}
        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            self.index_names = validate_index(read_json(index_path), index_path, listed)
        elif os.path.lexists(index_path):
            raise FormatError(f"{index_path} is not a regular file; {repair_hint(self.path)}")
        for folder, _, files in os.walk(self.path):
            for name in files:
                rel = (Path(folder) / name).relative_to(self.path).as_posix()
                if name.endswith(WEIGHT_SUFFIXES) and rel not in listed:
                    raise FormatError(
                        f"{self.path / rel} is a weight file that {MANIFEST_NAME} does not list; a model loader could "
                        f"read it instead of the store's checked files. Remove it, or {repair_hint(self.path)}"
                    )

    def entries(self) -> list[BlockEntry]:
        """The non-block entry, then every block in execution order."""
        return [self.non_block, *self.blocks]

    def file(self, entry: BlockEntry) -> Path:
        return self.path / entry.file

    def header(self, entry: BlockEntry) -> TsHeader:
        """The validated header of ``entry``'s file, checked against the manifest (cached)."""
        cached = self._headers.get(entry.name)
        if cached is not None:
            return cached
        file = self.file(entry)
        if not file.is_file():
            raise StaleStoreError(f"{file} is missing from the store {self.path}; {repair_hint(self.path)}")
        header = read_ts_header(file)
        dtypes = tuple(sorted({info.dtype for info in header.tensors.values()}))
        names = None if self.index_names is None else self.index_names.get(entry.file, set())
        checks = {
            "data size": header.data_size == entry.data_size,
            "checksum": header.checksum == entry.checksum,
            "block name": header.block == entry.name,
            "dtypes": not entry.dtypes or dtypes == entry.dtypes,
            "tensor names": names is None or names == set(header.tensors),
        }
        differ = [what for what, same in checks.items() if not same]
        if differ:
            raise StaleStoreError(
                f"{file} does not match the store's {MANIFEST_NAME} and index ({', '.join(differ)} differ): the store "
                f"was modified after resharding; {repair_hint(self.path)}"
            )
        self._headers[entry.name] = header
        return header

    def codec(self, entry: BlockEntry) -> BlockCodec:
        """How ``entry``'s data expands into the tensors the model binds, checked against the manifest (cached).

        Raises:
            `StaleStoreError`: the file's encoding is not the store's kind, or its layout needs another amount of
            memory than the manifest says (the plan was sized from the manifest).
        """
        cached = self._codecs.get(entry.name)
        if cached is not None:
            return cached
        header = self.header(entry)
        codec = BlockCodec(header)
        expected = self.kind if entry.name and expands(self.kind) else None  # non-block weights are always plain
        if codec.kind != expected or codec.region_bytes != entry.region_bytes:
            raise StaleStoreError(
                f"{header.path} is a {codec.kind or 'plain'} file of {codec.region_bytes} bytes in memory, but the "
                f"store's {MANIFEST_NAME} says {expected or 'plain'} and {entry.region_bytes}: the store was modified "
                f"after resharding; {repair_hint(self.path)}"
            )
        self._codecs[entry.name] = codec
        return codec

    def verify_checksums(self, entries: Iterable[BlockEntry]) -> None:
        """Read the files of ``entries`` and check their data against their checksums, one file at a time.

        Raises:
            `CorruptFileError`: a file's data does not match its checksum (the message names the file and the fix).
        """
        for entry in entries:
            header = self.header(entry)
            buffer = aligned_empty(header.data_size)
            try:
                read_data(header.path, header, buffer)
                verify_buffer(header, buffer)
            except FormatError as err:
                raise type(err)(f"{err} {repair_hint(self.path, sentence=True)}") from None

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def model_class(self) -> str:
        return str(self.manifest["model_class"])

    @property
    def total_bytes(self) -> int:
        return sum(entry.data_size for entry in self.entries())

    @property
    def kind(self) -> str | None:
        """The store kind: ``None`` (plain), ``"int8"``, ``"int4"``, ``"lossless"``, ``"fp8"`` or ``"mxfp4"`` (an FP8
        or MXFP4 checkpoint's own bytes, `tensorstream.prequantized`); see `tensorstream.encoding`."""
        kind = self.manifest.get("encoding")
        return kind if isinstance(kind, str) else None


def read_json(path: Path) -> Any:
    """Parse the JSON file ``path`` of a store (a regular file of at most 64 MB), or raise `FormatError` naming it.

    A FIFO or device is refused without blocking; JSON nested deeper than Python's parser goes (a nesting bomb) is a
    `FormatError`, not a `RecursionError`.
    """
    return _parse_json(path, _read_regular(path, MAX_MANIFEST_BYTES, "it is not a tensorstream file"))


def read_config(path: Path, root: Path | None = None) -> dict[str, Any]:
    """Parse a model's ``config.json`` (or ``generation_config.json``) before any other library reads it.

    The file must be a regular file (a FIFO or device would block or never end) of at most 16 MB, UTF-8 JSON, an
    object nested at most 32 deep. With ``root`` (a store), it must also resolve inside the store (in a Hub cache
    snapshot: inside the repo's cache folder), so a link out of the store is refused before anything is opened.

    Raises:
        `FormatError`: naming the file and what is wrong with it.
    """
    if root is not None:
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(_link_root(root)):
            raise FormatError(
                f"{path} leads to {target}, outside the store {root}; refusing to read it. Replace the link with the "
                "file it points to if you trust it."
            )
    raw = _read_regular(path, MAX_CONFIG_BYTES, "it is not a model config", "the model folder needs a config.json.")
    data = _parse_json(path, raw)
    if not isinstance(data, dict):
        raise FormatError(f"{path} is not a JSON object; {_FIX}")
    if _depth(data) > MAX_CONFIG_DEPTH:
        raise FormatError(f"{path} is nested deeper than {MAX_CONFIG_DEPTH} levels; it is not a model config. {_FIX}")
    return data


def _read_regular(path: Path, limit: int, what: str, missing: str = _FIX) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes (opened without blocking, so a
    FIFO is refused instead of waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise FormatError(f"{path} cannot be read ({err.strerror}); {missing}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FormatError(f"{path} is not a regular file (a FIFO, device or socket); refusing to read it; {_FIX}")
        if info.st_size > limit:
            raise FormatError(f"{path} is larger than {limit} bytes; {what}. {_FIX}")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise FormatError(f"{path} is larger than {limit} bytes; {what}. {_FIX}")
    return raw


def _parse_json(path: Path, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:  # a nesting bomb: deeper than the parser's recursion limit
        raise FormatError(f"{path} is JSON nested deeper than any tensorstream or model file is; {_FIX}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise FormatError(f"{path} is not valid UTF-8 JSON ({str(err)[:200]}); {_FIX}") from None


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
    return depth


def validate_manifest(manifest: Any, where: Path) -> None:
    """Raise `FormatError` unless ``manifest`` is a well-formed manifest whose paths stay inside the store."""
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise FormatError(f"{where} is not a tensorstream manifest (format != {STORE_FORMAT!r}); {_FIX}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{where}: format_version {version!r} is not a positive integer; {_FIX}")
    if version > MAX_FORMAT_VERSION:
        raise FormatError(
            f"{where}: written by a newer tensorstream (store format {version}, this one reads up to "
            f"{MAX_FORMAT_VERSION}); upgrade with `pip install -U tensorstream`."
        )
    for key in ("fingerprint", "model_class"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise FormatError(f"{where}: {key!r} must be a non-empty string; {_FIX}")
    blocks = manifest.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise FormatError(f"{where}: 'blocks' must be a non-empty list; {_FIX}")
    seen_files: set[str] = set()
    seen_names: set[str] = set()
    total = 0
    for i, entry in enumerate([manifest.get("non_block"), *blocks]):
        label = "non_block" if i == 0 else f"blocks[{i - 1}]"
        parsed = _entry(entry, label, where)
        if parsed.file in seen_files:
            raise FormatError(f"{where}: {label} reuses the file {parsed.file!r}; {_FIX}")
        if (i == 0) != (parsed.name == "") or parsed.name in seen_names:
            what = "must be ''" if i == 0 else "must be a module path named once"
            raise FormatError(f"{where}: {label} has the name {parsed.name!r}, which {what}; {_FIX}")
        seen_files.add(parsed.file)
        seen_names.add(parsed.name)
        total += parsed.data_size
    kind = manifest.get("encoding")
    if kind is not None and kind not in ("int8", "int4", "lossless", "fp8", "mxfp4", "compressed-tensors"):
        raise FormatError(f"{where}: encoding {kind!r} is not a store kind this tensorstream reads; {_FIX}")
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise FormatError(f"{where}: 'tied' must map tensor names to tensor names; {_FIX}")
    if "total_bytes" in manifest and manifest["total_bytes"] != total:
        raise FormatError(
            f"{where}: total_bytes is {manifest['total_bytes']!r} but its files hold {total} bytes; {_FIX}"
        )


def validate_index(index: Any, where: Path, files: set[str]) -> dict[str, set[str]]:
    """Check the store's safetensors index: every tensor maps to a file the manifest lists. Returns file -> names.

    The index is what transformers' loader follows, so a name that leads anywhere else is refused.
    """
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{where} has no 'weight_map' object; {_FIX}")
    names: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or file not in files:
            check_relative_path(file, where, f"weight_map[{name!r}]")
            raise FormatError(
                f"{where}: weight_map[{name!r}] names {file!r}, which the manifest does not list; {_FIX}"
            )
        names.setdefault(file, set()).add(name)
    return names


def _entry(entry: Any, label: str, where: Path) -> BlockEntry:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: {label} must be an object; {_FIX}")
    name, file, size, checksum = entry.get("name"), entry.get("file"), entry.get("data_size"), entry.get("checksum")
    dtypes = entry.get("dtypes", [])
    if not isinstance(name, str) or not isinstance(checksum, str):
        raise FormatError(f"{where}: {label} needs string 'name' and 'checksum'; {_FIX}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{where}: {label} has invalid data_size {size!r}; {_FIX}")
    if not isinstance(dtypes, list) or not all(isinstance(d, str) for d in dtypes):
        raise FormatError(f"{where}: {label} has invalid dtypes {dtypes!r}; {_FIX}")
    memory = entry.get("memory_size", 0)
    if not isinstance(memory, int) or isinstance(memory, bool) or not (memory == 0 or memory >= size):
        raise FormatError(f"{where}: {label} has invalid memory_size {memory!r}; {_FIX}")
    check_relative_path(file, where, label)
    return BlockEntry(
        name=name, file=str(file), data_size=size, checksum=checksum, dtypes=tuple(dtypes), memory_size=memory
    )


def check_relative_path(file: Any, where: Path, label: str) -> None:
    """Reject anything but a plain, normalised relative path inside the store (no ``..``, ``.``, ``//``, ``/x``)."""
    if not isinstance(file, str) or not file or "\\" in file or "\x00" in file:
        raise FormatError(f"{where}: {label} has an invalid file name {file!r}; refusing to read it.")
    pure = PurePosixPath(file)
    if pure.is_absolute() or ".." in pure.parts or str(pure) != file or not file.endswith(".safetensors"):
        raise FormatError(
            f"{where}: {label} names {file!r}, which is not a .safetensors file inside the store; refusing to read it."
        )


def check_links(root: Path) -> None:
    """Refuse a store (``root``, resolved) holding a symbolic link that resolves outside it.

    In a Hub cache snapshot (``models--org--name/snapshots/<commit>/``), files are links into the repo's
    ``blobs/`` folder: links that stay inside ``models--org--name`` are allowed there.

    Raises:
        `FormatError`: a link leads out; the message names it and its target.
    """
    allowed = _link_root(root)
    for folder, dirs, files in os.walk(root):  # does not descend into linked folders; they are checked here
        for name in [*dirs, *files]:
            link = Path(folder) / name
            if not link.is_symlink():
                continue
            target = Path(os.path.realpath(link))
            if not target.is_relative_to(allowed):
                raise FormatError(
                    f"{link} is a symbolic link to {target}, outside {allowed}; a store may only link inside itself. "
                    "Refusing to open it: if you trust this store, replace the link with the file it points to."
                )


def _link_root(root: Path) -> Path:
    """``root``, or the ``models--org--name`` folder of the Hub cache when ``root`` sits in one of its snapshots."""
    parts = root.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return Path(*parts[: i + 1])
    return root
