"""POSIX reads: ``os.preadv`` straight into the slot, optionally with ``O_DIRECT`` (bypassing the page cache)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import BackendUnavailableError

__all__ = ["PosixBackend", "direct_io_supported"]

DIRECT_ALIGNMENT = 4096


class PosixBackend:
    """``os.preadv`` into the caller's buffer; thread-safe (``pread`` does not move a shared file offset).

    Notes:
        With ``direct=True`` every offset, size and buffer address must be a multiple of 4096: the engine's slots
        and the ``.ts`` layout guarantee it. Reads then bypass the page cache, which keeps a model larger than RAM
        from evicting everything else, at the price of no warm-cache speed-up.
    """

    def __init__(self, *, direct: bool = False) -> None:
        if direct and not hasattr(os, "O_DIRECT"):
            raise BackendUnavailableError(
                "direct_io=True needs O_DIRECT, which this platform lacks; use direct_io=None."
            )
        self.direct = direct
        self.name = "posix+O_DIRECT" if direct else "posix"
        self.alignment = DIRECT_ALIGNMENT if direct else 1

    def open(self, path: str | os.PathLike[str]) -> int:
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
        try:
            return os.open(path, flags)
        except OSError as err:
            if self.direct and err.errno == errno.EINVAL:
                raise BackendUnavailableError(
                    f"{path}: the filesystem does not support O_DIRECT (tmpfs, some network and FUSE filesystems); "
                    "set direct_io=None (or TENSORSTREAM_DIRECT_IO=auto) to use buffered reads."
                ) from None
            raise

    def read_into(self, handle: int, offset: int, out: memoryview) -> int:
        done = 0
        total = len(out)
        while done < total:
            n = os.preadv(handle, [out[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def close(self, handle: int) -> None:
        os.close(handle)


def choose_direct_io(folder: str | os.PathLike[str], total_bytes: int) -> bool:
    """``direct_io=None``: O_DIRECT when the store is larger than the RAM available, buffered otherwise.

    A store that fits in RAM stays in the page cache after the first pass, and buffered reads then run at memory
    speed. A larger one is evicted before it is read again: every pass is a cold read, and O_DIRECT then avoids a
    copy through the page cache and keeps the scan from evicting everything else.
    """
    from ..plan import _meminfo_available

    return total_bytes > _meminfo_available() and direct_io_supported(folder)


def direct_io_supported(folder: str | os.PathLike[str]) -> bool:
    """Whether files in ``folder`` can be opened with ``O_DIRECT``."""
    if not hasattr(os, "O_DIRECT"):
        return False
    for path in Path(folder).rglob("*.safetensors"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return False
        os.close(fd)
        return True
    return False
