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
exists is complete. `Store.open` validates the manifest (paths stay inside the store) and, with
``verify="header"``, every ``.ts`` header against it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import FormatError, StaleStoreError
from .format import FORMAT_VERSION, TsHeader, read_ts_header

__all__ = ["MANIFEST_NAME", "BlockEntry", "Store"]

MANIFEST_NAME = "tensorstream.json"
STORE_FORMAT = "tensorstream-store"
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class BlockEntry:
    """One ``.ts`` file of the store as the manifest describes it."""

    name: str
    file: str
    data_size: int
    checksum: str
    dtypes: tuple[str, ...]


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
        self._headers: dict[str, TsHeader] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: str = "header") -> Store:
        """Open the store at ``path``; with ``verify="header"`` or ``"checksum"`` also check every header.

        Raises:
            `StaleStoreError`: the folder or a file is missing. `FormatError`: the manifest is invalid, from a newer
            format version, or names a path outside the store. `CorruptFileError`: a file is truncated.
        """
        path = Path(path).resolve()
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise StaleStoreError(
                f"{path} is not a complete tensorstream store (no {MANIFEST_NAME}); run `tensorstream reshard` "
                "on the source model to build it."
            )
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise FormatError(f"{manifest_path} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a manifest.")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise FormatError(f"{manifest_path} is not valid JSON ({err}); rerun `tensorstream reshard`.") from None
        validate_manifest(manifest, manifest_path)
        store = cls(path, manifest)
        if verify != "off":
            for entry in store.entries():
                store.header(entry)
        return store

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
            raise StaleStoreError(
                f"{file} is missing from the store {self.path}; rerun `tensorstream reshard --force` on the source."
            )
        header = read_ts_header(file)
        if header.data_size != entry.data_size or header.checksum != entry.checksum or header.block != entry.name:
            raise StaleStoreError(
                f"{file} does not match {self.path / MANIFEST_NAME} (size, checksum or block name differ): the store "
                "was modified after resharding; rerun `tensorstream reshard --force` on the source."
            )
        self._headers[entry.name] = header
        return header

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def model_class(self) -> str:
        return str(self.manifest["model_class"])

    @property
    def total_bytes(self) -> int:
        return sum(entry.data_size for entry in self.entries())


def validate_manifest(manifest: Any, where: Path) -> None:
    """Raise `FormatError` unless ``manifest`` is a well-formed manifest whose paths stay inside the store."""
    fix = "rerun `tensorstream reshard --force` on the source model."
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise FormatError(f"{where} is not a tensorstream manifest (format != {STORE_FORMAT!r}); {fix}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{where}: format_version {version!r} is not a positive integer; {fix}")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{where}: written by a newer tensorstream (store format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade with `pip install -U tensorstream`."
        )
    for key in ("fingerprint", "model_class"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise FormatError(f"{where}: {key!r} must be a non-empty string; {fix}")
    blocks = manifest.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise FormatError(f"{where}: 'blocks' must be a non-empty list; {fix}")
    seen_files: set[str] = set()
    for i, entry in enumerate([manifest.get("non_block"), *blocks]):
        label = "non_block" if i == 0 else f"blocks[{i - 1}]"
        _entry(entry, label, where)
        if entry["file"] in seen_files:
            raise FormatError(f"{where}: {label} reuses the file {entry['file']!r}; {fix}")
        seen_files.add(entry["file"])


def _entry(entry: Any, label: str, where: Path) -> BlockEntry:
    fix = "rerun `tensorstream reshard --force` on the source model."
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: {label} must be an object; {fix}")
    name, file, size, checksum = entry.get("name"), entry.get("file"), entry.get("data_size"), entry.get("checksum")
    dtypes = entry.get("dtypes", [])
    if not isinstance(name, str) or not isinstance(checksum, str):
        raise FormatError(f"{where}: {label} needs string 'name' and 'checksum'; {fix}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{where}: {label} has invalid data_size {size!r}; {fix}")
    if not isinstance(dtypes, list) or not all(isinstance(d, str) for d in dtypes):
        raise FormatError(f"{where}: {label} has invalid dtypes {dtypes!r}; {fix}")
    check_relative_path(file, where, label)
    return BlockEntry(name=name, file=str(file), data_size=size, checksum=checksum, dtypes=tuple(dtypes))


def check_relative_path(file: Any, where: Path, label: str) -> None:
    """Reject anything but a plain relative path that stays inside the store (no ``..``, no absolute path)."""
    if not isinstance(file, str) or not file or "\\" in file or "\x00" in file:
        raise FormatError(f"{where}: {label} has an invalid file name {file!r}.")
    pure = PurePosixPath(file)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts) or not file.endswith(".safetensors"):
        raise FormatError(
            f"{where}: {label} names {file!r}, which is not a .safetensors file inside the store; refusing to read it."
        )
