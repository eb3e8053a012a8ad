"""Memory-mapped reads: copy from a read-only ``mmap`` of the file (the page cache) into the slot."""

from __future__ import annotations

import mmap
import os

__all__ = ["MmapBackend"]


class MmapBackend:
    """Copies out of a shared read-only mapping; useful where ``pread`` is slow (some FUSE filesystems)."""

    name = "mmap"
    alignment = 1

    def open(self, path: str | os.PathLike[str]) -> mmap.mmap:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def read_into(self, handle: mmap.mmap, offset: int, out: memoryview) -> int:
        end = min(offset + len(out), len(handle))
        n = max(end - offset, 0)
        out[:n] = memoryview(handle)[offset:end]
        return n

    def close(self, handle: mmap.mmap) -> None:
        handle.close()
