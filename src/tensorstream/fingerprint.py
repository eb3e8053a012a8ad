"""A store's fingerprint: the short hash that names its folder, of everything that decides its content.

`source_fingerprint` hashes the weight files (by name, size and Hub blob name or modification time: a large
checkpoint is never read to fingerprint it), the config, the model class, dtype, store kind and the quantization
settings; a store is reused only for the same fingerprint, so a changed source or setting gets a new store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .compact import kind_identity
from .format import FORMAT_VERSION
from .prequantized import DEQUANTIZED_METHODS, quantization_identity, quantization_method

__all__ = ["LAYOUT_REVISION", "WEIGHT_SUFFIXES", "source_fingerprint"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SOURCE_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
_CONFIG_KEYS_IGNORED = {
    "_name_or_path",
    "transformers_version",
    "_diffusers_version",
    "_commit_hash",
    "dtype",
    "torch_dtype",
}
#: A Hub cache blob is named by its content hash: a sha256 (LFS files) or a git blob sha1.
_HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: What a store's layout holds beyond the format version (part of the fingerprint): 2 = converted tensors at the
#: resident phase (0) and routed experts stored last with their checksums (docs/moe.md).
LAYOUT_REVISION = 2


def source_fingerprint(
    folder: Path,
    cls: type,
    dtype: torch.dtype | None,
    config: Any,
    kind: str | None = None,
    quantization_arg: Any = None,
    dequantize: str = "per_block",
) -> str:
    """A short hash of what decides the store's content: the weight files, the config, the class, dtype and kind,
    and a ``quantization_config`` passed to ``from_pretrained`` (``quantization_arg``, every field of it).

    ``config`` is a transformers config or, for a diffusers model, its config dict.

    Files are identified by name, size and, for Hub cache snapshots, their blob name (a content hash), else
    their modification time (a link's target's): a large checkpoint is never read to fingerprint it. A source
    changed since resharding therefore gets a new store; the old one is never used for it.
    """
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)  # a diffusers config: a dict
    config_dict = {k: v for k, v in values.items() if k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256()
    head = {"format_version": FORMAT_VERSION, "class": cls.__name__, "dtype": str(dtype), "config": config_dict}
    # stores written before tensors converted at load were given the resident model's address phase (0), and before
    # routed experts were stored last, get a new fingerprint: they are rebuilt once, never reused
    head["layout"] = LAYOUT_REVISION
    if kind is not None:  # a plain store keeps the fingerprint it always had
        head["encoding"] = kind_identity(kind)
    quantization = quantization_identity(config)
    if quantization is not None:  # every field, loading attributes (dequantize, run_compressed) included
        head["quantization"] = quantization
        if quantization_method(config) in DEQUANTIZED_METHODS:
            # FP8 stores written before fused experts were stored compact held them as bf16: rebuilt once
            head["compact_experts"] = 1
            if dequantize == "once":  # the bf16 weights transformers makes, not the compact bytes: another store
                head["dequantize"] = dequantize
    if quantization_arg is not None:
        head["quantization_arg"] = quantization_identity(quantization_arg)
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for file in sorted(folder.iterdir()):
        if not (file.suffix in WEIGHT_SUFFIXES or file.name in _SOURCE_FILES) or not file.is_file():
            continue
        stat = file.stat()  # follows links: the target's size and modification time
        identity = _hub_blob(file) or str(stat.st_mtime_ns)
        digest.update(f"{file.name}\0{stat.st_size}\0{identity}\n".encode())
    return digest.hexdigest()[:16]


def _hub_blob(file: Path) -> str | None:
    """The blob name (a content hash) when ``file`` links into a Hub cache ``blobs/`` folder, else ``None``.

    Any other link (a local folder whose weights link elsewhere) is identified by its target's modification time,
    so rewriting the target changes the fingerprint.
    """
    if not file.is_symlink():
        return None
    target = Path(os.readlink(file))
    return target.name if target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name) else None
