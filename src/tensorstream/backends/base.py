"""The one small protocol every I/O backend implements.

A backend opens a ``.ts`` file once and then serves ``read_into`` calls from several reader threads at once:
read ``len(out)`` bytes at ``offset`` into ``out``, or fewer at the end of the file. ``out`` is a writable
``memoryview`` of a host slot, or, for a backend with ``reads_device_memory = True`` (KvikIO), a ``uint8``
CUDA tensor (a slice of the device slot). Backends are chosen by `tensorstream.backends.get_backend` and imported
only when chosen, so ``import tensorstream`` never imports kvikio or CUDA.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

__all__ = ["Backend"]


class Backend(Protocol):
    """Reads byte ranges of files into caller-owned buffers."""

    #: Short name shown in logs and stats (``"posix"``, ``"posix+O_DIRECT"``, ``"mmap"``, ``"kvikio"``).
    name: str
    #: Reads need offsets, sizes and buffer addresses aligned to this many bytes (1 = no constraint).
    alignment: int

    def open(self, path: str | os.PathLike[str]) -> Any:
        """Open ``path`` for reading; the handle is shared by all reader threads."""
        ...

    def read_into(self, handle: Any, offset: int, out: Any) -> int:
        """Read up to ``len(out)`` bytes at ``offset``; return the count (short only at the end of the file)."""
        ...

    def close(self, handle: Any) -> None:
        """Release ``handle``."""
        ...
