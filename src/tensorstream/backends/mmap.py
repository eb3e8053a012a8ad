"""Memory-mapped reads: copy from a read-only ``mmap`` of the file (the page cache) into the slot."""

from __future__ import annotations

import mmap
import os

__all__ = ["MmapBackend"]


class MmapBackend:
    """Copies out of a shared read-only mapping; useful where ``pread`` is slow (some FUSE filesystems).

    Notes:
        Touching a mapped page beyond the end of a file that shrank after it was mapped kills the process with
        ``SIGBUS``. Each read therefore first checks the file's current size and copies only what is still there,
        so a store file truncated while the model runs gives a short read (which the engine reports as
        `CorruptFileError`) instead of a crash.
    """

    name = "mmap"
    alignment = 1

    def open(self, path: str | os.PathLike[str]) -> tuple[mmap.mmap, int]:
        fd = os.open(path, os.O_RDONLY)
        try:
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ), fd
        except BaseException:
            os.close(fd)
            raise

    def read_into(self, handle: tuple[mmap.mmap, int], offset: int, out: memoryview) -> int:
        mapping, fd = handle
        end = min(offset + len(out), len(mapping), os.fstat(fd).st_size)
        n = max(end - offset, 0)
        out[:n] = memoryview(mapping)[offset:end]
        # Unmap what was copied so the mapping does not keep the whole file in this process's RSS; the pages stay
        # in the page cache. madvise needs a page-aligned start.
        start = offset - offset % mmap.PAGESIZE
        if end > start:
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
        return n

    def close(self, handle: tuple[mmap.mmap, int]) -> None:
        mapping, fd = handle
        mapping.close()
        os.close(fd)
