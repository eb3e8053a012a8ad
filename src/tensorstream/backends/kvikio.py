"""KvikIO / cuFile (GPUDirect Storage) reads straight into the device slot.

Imported only when the ``kvikio`` backend is chosen. ``backend="auto"`` picks it on a CUDA device only when
``kvikio.cufile_driver.get("is_gds_available")`` is true: in compatibility mode (no GDS) KvikIO bounces through
its own host buffer and synchronises a blocking stream, which the POSIX path (pinned staging plus an async copy
on a dedicated stream) beats.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import BackendUnavailableError

__all__ = ["KvikioBackend", "gds_available"]

INSTALL_HINT = "pip install 'tensorstream[gds-cu12]' (CUDA 12) or 'tensorstream[gds-cu13]' (CUDA 13)"


def _import_kvikio() -> Any:
    try:
        import kvikio
        import kvikio.cufile_driver
    except ImportError as err:
        raise BackendUnavailableError(f"backend='kvikio' needs KvikIO: {INSTALL_HINT} ({err}).") from None
    return kvikio


def gds_available() -> bool:
    """Whether KvikIO is installed and reports real GPUDirect Storage (not its POSIX compatibility mode)."""
    try:
        kvikio = _import_kvikio()
        return bool(kvikio.cufile_driver.get("is_gds_available"))
    except Exception:
        return False


class KvikioBackend:
    """``CuFile.pread`` into a ``uint8`` CUDA tensor (the slot).

    Notes:
        GDS only helps for reads whose file offset, size and device address are multiples of 4096 bytes: the
        ``.ts`` layout and the engine's slots guarantee all three.
    """

    alignment = 4096
    reads_device_memory = True

    def __init__(self) -> None:
        self._kvikio = _import_kvikio()
        self.gds = gds_available()
        self.name = "kvikio (GDS)" if self.gds else "kvikio (compat mode)"

    def open(self, path: str | os.PathLike[str]) -> Any:
        return self._kvikio.CuFile(str(path), "r")

    def read_into(self, handle: Any, offset: int, out: torch.Tensor) -> int:
        return int(handle.pread(out, out.numel(), offset).get())

    def close(self, handle: Any) -> None:
        handle.close()
