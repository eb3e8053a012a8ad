"""A checkpoint's safetensors files, read one tensor at a time: for the stores written from the checkpoint itself.

transformers cannot build a bitsandbytes or compressed-tensors model offloaded to disk (the reshard's usual way of
reading a checkpoint tensor by tensor, `tensorstream.reshard`), so their stores are written from the checkpoint's
files (`tensorstream.bnb`, `tensorstream.ctensors`): an empty skeleton of the model, built without its quantization,
gives the names, ties and blocks, and each tensor is read when its block is written (memory: about one block).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FormatError
from .format import TENSOR_ALIGNMENT, TensorInfo, read_ts_header

__all__ = ["CheckpointFiles", "skeleton_state"]


class CheckpointFiles:
    """The tensors of the safetensors files in ``folder``: their headers at once, their data when `read`."""

    def __init__(self, folder: Path, method: str) -> None:
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FormatError(f"{folder} has no safetensors file: a {method} checkpoint is streamed from safetensors.")
        self.infos: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[Path, int]] = {}
        for file in files:
            header = read_ts_header(file, require_ts=False)
            for name, info in header.tensors.items():
                self.infos[name] = info
                self._where[name] = (file, (header.data_offset + info.start) % TENSOR_ALIGNMENT)
        self._names = sorted(self.infos)
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from its file (a fresh CPU tensor)."""
        from safetensors import safe_open

        file = self._where[name][0]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(name)

    def phase(self, name: str) -> int:
        """Where a resident load that maps the file puts ``name``, modulo 64: its offset in the file."""
        return self._where[name][1] if name in self._where else 0

    def under(self, prefix: str) -> list[str]:
        """The names that start with ``prefix + "."``."""
        start = bisect.bisect_left(self._names, f"{prefix}.")
        end = bisect.bisect_left(self._names, f"{prefix}/")  # "/" follows "." in ASCII
        return self._names[start:end]


def skeleton_state(
    cls: type, config: Any, held: Callable[[str, torch.Tensor], tuple[tuple[int, ...], torch.dtype] | None]
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An empty skeleton of ``cls`` built from ``config`` without its quantization, and ``{name: meta tensor}`` of
    what the resident model holds: for each name of the skeleton's ``state_dict``, the shape and dtype ``held`` gives
    (``None``: left out), tied names sharing one tensor."""
    from accelerate import init_empty_weights

    from .integrations.transformers import _without_quantization

    with init_empty_weights(include_buffers=False):
        model = cls._from_config(_without_quantization(config))  # type: ignore[attr-defined]
    state: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:  # tied: the same tensor
            state[name] = state[first[id(tensor)]]
            continue
        got = held(name, tensor)
        if got is not None:
            state[name] = torch.empty(got[0], dtype=got[1], device="meta")
            first[id(tensor)] = name
    return model, state
