"""I/O backends: ``posix`` (default), ``mmap`` and ``kvikio`` (GPUDirect Storage, CUDA only).

`get_backend` picks one by name; each is imported only when picked, so ``import tensorstream`` never imports
kvikio. A backend that cannot run here raises `BackendUnavailableError` with the fix.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from ..errors import BackendUnavailableError
from .base import Backend

__all__ = ["Backend", "get_backend"]

logger = logging.getLogger(__name__)


def get_backend(name: str, device: torch.device, *, direct_io: bool | None = None) -> Backend:
    """The backend called ``name`` (``"auto"``, ``"posix"``, ``"mmap"`` or ``"kvikio"``) for ``device``.

    ``"auto"`` is the POSIX backend; buffered unless ``direct_io=True``.

    Raises:
        `BackendUnavailableError`: the backend cannot run here; the message says how to fix it.

    Example:
        ```python
        >>> get_backend("posix", torch.device("cpu")).name
        'posix'
        ```
    """
    if name == "kvikio":
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"backend='kvikio' reads into CUDA memory, but the execution device is {device}; "
                "use backend='auto' or 'posix' on this device."
            )
        if importlib.util.find_spec("kvikio") is None:
            raise BackendUnavailableError(
                "backend='kvikio' needs KvikIO: pip install 'tensorstream[gds-cu12]' (CUDA 12) or "
                "'tensorstream[gds-cu13]' (CUDA 13)."
            )
        raise BackendUnavailableError(
            "backend='kvikio' is not available in this tensorstream release; use backend='auto' (POSIX reads into "
            "pinned memory, then a copy to the GPU)."
        )
    if name == "mmap":
        if direct_io:
            raise BackendUnavailableError(
                "backend='mmap' reads through the page cache; it cannot honour direct_io=True."
            )
        from .mmap import MmapBackend

        return MmapBackend()
    if name in ("auto", "posix"):
        from .posix import PosixBackend

        return PosixBackend(direct=bool(direct_io))
    raise BackendUnavailableError(f"backend={name!r} is unknown; use 'auto', 'posix', 'mmap' or 'kvikio'.")
