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

__all__ = ["Backend", "choose_backend", "get_backend"]

logger = logging.getLogger(__name__)


def get_backend(name: str, device: torch.device, *, direct_io: bool | None = None) -> Backend:
    """The backend called ``name`` (``"auto"``, ``"posix"``, ``"mmap"`` or ``"kvikio"``) for ``device``.

    ``"auto"`` is KvikIO on a CUDA device where GPUDirect Storage is available, else the POSIX backend (buffered
    unless ``direct_io=True``); the engine first resolves ``"auto"`` on CPU with `choose_backend` (which knows
    the store's size) to the zero-copy ``"mmap"`` mode when the store fits in memory. The choice is logged once
    at INFO with the GDS and O_DIRECT status.

    Raises:
        `BackendUnavailableError`: the backend cannot run here; the message says how to fix it.

    Example:
        ```python
        >>> get_backend("posix", torch.device("cpu")).name
        'posix'
        ```
    """
    backend: Backend
    if name == "kvikio" or (name == "auto" and device.type == "cuda" and _gds_available()):
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
        from .kvikio import KvikioBackend

        backend = KvikioBackend()
    elif name == "mmap":
        if direct_io:
            raise BackendUnavailableError(
                "backend='mmap' reads through the page cache; it cannot honour direct_io=True."
            )
        from .mmap import MmapBackend

        backend = MmapBackend()
    elif name in ("auto", "posix"):
        from .posix import PosixBackend

        backend = PosixBackend(direct=bool(direct_io))
    else:
        raise BackendUnavailableError(f"backend={name!r} is unknown; use 'auto', 'posix', 'mmap' or 'kvikio'.")
    _log_choice(backend, device)
    return backend


def choose_backend(name: str, device: torch.device, *, direct_io: bool | None = None) -> str:
    """What ``backend=name`` means on ``device``: ``"auto"`` resolved for CPU.

    On a CPU device, ``"auto"`` is ``"mmap"`` where the kernel can populate mappings (``MADV_POPULATE_READ``,
    Linux >= 5.14), whatever the store's size: parameters are views of the page cache (zero-copy), and the blocks a
    step needs are populated ahead by the reader threads. A store that fits in half the memory available stays
    mapped between passes; a larger one is unmapped after each block (`tensorstream.engine`), so the kernel can
    reclaim its pages. Measured cold on this project's 2-core machine (`benchmarks/cold_runs.py`, three fresh
    processes): the mapped mode reads at 0.97 to 1.10 of the best raw cold read, ``O_DIRECT`` reads into the slots at
    0.71 to 0.93. Without ``MADV_POPULATE_READ``, or with ``direct_io=True``, ``"auto"`` stays ``"auto"``, which
    `get_backend` makes the POSIX backend. Any other name or device is returned as is.

    An ``encoded`` store (quantized or compressed) is expanded straight from the mapping instead of bound, so its
    compact bytes are page cache and the arena holds only what the model binds.

    Example:
        ```python
        >>> choose_backend("auto", torch.device("cpu"))
        'mmap'
        ```
    """
    if name != "auto" or device.type != "cpu" or direct_io:
        return name
    from .mmap import populate_supported

    if populate_supported():
        return "mmap"
    return name


def memory_available() -> int:
    """Bytes of memory available to this process: ``MemAvailable``, capped by the cgroup's limit if it has one."""
    from ..plan import _cgroup_available, _meminfo_available

    available = _meminfo_available()
    cgroup = _cgroup_available()
    return available if cgroup is None else min(available, cgroup)


def _gds_available() -> bool:
    """KvikIO importable and reporting real GDS; imported only here, on CUDA devices."""
    if importlib.util.find_spec("kvikio") is None:
        return False
    from .kvikio import gds_available

    return gds_available()


_logged: set[tuple[str, str]] = set()


def _log_choice(backend: Backend, device: torch.device) -> None:
    key = (backend.name, str(device))
    if key in _logged:
        return
    _logged.add(key)
    direct = "on" if backend.alignment > 1 and backend.name.startswith("posix") else "off"
    gds = "yes" if getattr(backend, "gds", False) else "no"
    logger.info("tensorstream: I/O backend %s for %s (GDS: %s, O_DIRECT: %s)", backend.name, device, gds, direct)
