"""Memory-mapped ``.ts`` files: zero-copy on CPU (parameters are views of the page cache), a copy elsewhere.

On a CPU execution device the engine does not copy a streamed block anywhere: its parameters are bound as views
of a private, copy-on-write mapping (``MAP_PRIVATE``, as safetensors maps) of the block's ``.ts`` file, whose
pages are the page cache's own. "Reading" a block is then faulting its pages into this process's page tables
ahead of use (`MmapBackend.populate`, ``MADV_POPULATE_READ``, from the reader threads), and releasing it is
optionally zapping them again (`MmapBackend.evict`, ``MADV_DONTNEED``). The pages stay in the page cache either
way; what this process maps counts as *file-backed* RSS (``RssFile``), which the kernel can reclaim under
memory pressure like any clean cache page, not as anonymous memory. See ``docs/performance.md``.

On other devices (and for the pinned-staging path on CUDA) `MmapBackend.read_into` copies out of the mapping into
the slot, as before.

Truncation: touching a mapped page beyond the end of a file that shrank after it was mapped kills the process
with ``SIGBUS``, which Python cannot catch. The backend therefore checks the file's current size before every
populate, before every bind (`MmapBackend.data`) and before every copy, and reports a shrunken file as a short
read (the engine raises `CorruptFileError`). What remains is the window between that check and the end of the
block's forward (a file truncated in place *during* that block's compute): tensorstream never truncates a store
file in place (``reshard`` writes a new file and renames it over the old one, and a mapping keeps the old file's
pages), so only an outside program doing so can hit it. Use ``backend="posix"`` where that can happen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from typing import Any

import torch

__all__ = ["MADV_POPULATE_READ", "Mapping", "MmapBackend", "populate_supported"]

#: ``madvise`` advice that faults a range in, read-only, without copying (Linux >= 5.14).
MADV_POPULATE_READ = 22
PAGE = mmap.PAGESIZE


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


#: libc ``madvise`` through ctypes, which releases the GIL for the call (``mmap.madvise`` does not, and a
#: populate of cold pages waits for the disk); ``None`` where there is no libc.
_madvise = _load_libc()
_populate_read_works: bool | None = None
_probe_lock = threading.Lock()


def populate_supported() -> bool:
    """Whether this kernel supports ``MADV_POPULATE_READ`` (probed once on an anonymous page, then cached)."""
    global _populate_read_works
    with _probe_lock:
        if _populate_read_works is None:
            probe = mmap.mmap(-1, PAGE)
            try:
                tensor = torch.frombuffer(probe, dtype=torch.uint8)
                ok = _madvise is not None and _madvise(tensor.data_ptr(), PAGE, MADV_POPULATE_READ) == 0
                del tensor
            finally:
                probe.close()
            _populate_read_works = ok
        return _populate_read_works


class Mapping:
    """One ``.ts`` file mapped copy-on-write, with its whole length as a ``uint8`` CPU tensor."""

    __slots__ = ("address", "fd", "mapping", "path", "populated", "size", "tensor")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        #: ranges (offset, length) populated since the last eviction: kept mapped, they are not walked again.
        self.populated: set[tuple[int, int]] = set()
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self.fd).st_size
            # ACCESS_COPY = MAP_PRIVATE with PROT_WRITE: reads share the page cache; the buffer is writable, so
            # torch.frombuffer does not warn; a write (no inference path writes a weight) would copy the page
            # into anonymous memory and never reach the file.
            self.mapping = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
            self.tensor = torch.frombuffer(self.mapping, dtype=torch.uint8)
            self.address = self.tensor.data_ptr()
        except BaseException:
            os.close(self.fd)
            raise

    def available(self, offset: int, length: int) -> int:
        """How many of the ``length`` bytes at ``offset`` the file still holds (fewer if it shrank)."""
        end = min(offset + length, self.size, os.fstat(self.fd).st_size)
        return max(end - offset, 0)

    def advise(self, advice: int, offset: int, length: int) -> bool:
        """``madvise`` on the pages covering ``[offset, offset + length)``; False if the kernel refused it."""
        start = offset - offset % PAGE
        length += offset - start
        if _madvise is not None:
            if _madvise(self.address + start, length, advice) == 0:
                return True
            if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):
                return False
            raise OSError(ctypes.get_errno(), f"madvise({advice}) on {self.path} failed")
        try:
            self.mapping.madvise(advice, start, length)
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENOSYS):
                return False
            raise
        return True

    def close(self) -> None:
        """Drop this handle's references; the pages are unmapped when the last view of them is gone.

        Never ``mapping.close()``: ``torch.frombuffer`` keeps a reference to the mmap object but not a buffer
        export, so closing it would unmap pages that a parameter view (held by a caller, or bound) still points
        at, and the next access would crash the process.
        """
        self.tensor = None  # type: ignore[assignment]
        self.mapping = None  # type: ignore[assignment]
        os.close(self.fd)


class MmapBackend:
    """Maps each ``.ts`` file; the engine binds views of it on CPU and copies out of it elsewhere.

    Attributes:
        maps: the engine may bind parameters as views of the mapping (`data`) instead of reading into a slot.
        keep_mapped: leave a block's pages mapped after it ran (set by the engine when the store fits in the
            memory available); otherwise `evict` zaps them from this process's page tables after use.

    Example:
        ```python
        >>> backend = MmapBackend()
        >>> handle = backend.open("blocks/model.layers.0.ts.safetensors")
        >>> backend.populate(handle, 4096, 1 << 20)  # fault the first MiB of data in (page cache, no copy)
        1048576
        >>> weights = backend.data(handle, 4096, 1 << 20)  # a uint8 view of the same pages
        ```
    """

    name = "mmap"
    alignment = 1
    maps = True

    def __init__(self) -> None:
        self.keep_mapped = False

    def open(self, path: str | os.PathLike[str]) -> Mapping:
        return Mapping(path)

    def read_into(self, handle: Mapping, offset: int, out: memoryview) -> int:
        """Copy out of the mapping (devices other than CPU), then unmap what was copied."""
        n = handle.available(offset, len(out))
        out[:n] = memoryview(handle.mapping)[offset : offset + n]
        if n:
            handle.advise(mmap.MADV_DONTNEED, offset, n)
        return n

    def populate(self, handle: Mapping, offset: int, length: int) -> int:
        """Fault ``length`` bytes at ``offset`` into the mapping (reading them from disk if they are not cached).

        Returns the bytes the file still holds (short if it shrank: the engine reports `CorruptFileError`).
        Uses ``MADV_POPULATE_READ``; on kernels without it (before 5.14), ``MADV_WILLNEED`` plus reading one byte
        per page. With `keep_mapped`, a range populated before is not walked again (walking 1.6 GB of populated
        page tables costs ~60 ms of kernel time per pass on 2 cores); if the kernel reclaimed some of its pages
        meanwhile, the compute faults them back in: slower, never wrong.
        """
        global _populate_read_works
        n = handle.available(offset, length)
        if n == 0:
            return 0
        if self.keep_mapped and (offset, n) in handle.populated:
            return n
        if _populate_read_works is not False:
            if handle.advise(MADV_POPULATE_READ, offset, n):
                _populate_read_works = True
                handle.populated.add((offset, n))
                return n
            with _probe_lock:
                _populate_read_works = False
        handle.advise(mmap.MADV_WILLNEED, offset, n)
        tensor = handle.tensor
        first = offset - offset % PAGE
        tensor[first : offset + n : PAGE].sum()  # touch one byte per page
        return n

    def data(self, handle: Mapping, offset: int, length: int) -> torch.Tensor | None:
        """The ``length`` bytes at ``offset`` as a ``uint8`` view of the mapping; ``None`` if the file shrank."""
        if handle.available(offset, length) < length:
            return None
        return handle.tensor[offset : offset + length]

    def evict(self, handle: Mapping, offset: int, length: int) -> None:
        """Drop the range from this process's page tables (``MADV_DONTNEED``); the page cache keeps the pages."""
        if not self.keep_mapped and length:
            handle.populated.clear()
            handle.advise(mmap.MADV_DONTNEED, offset, length)

    def close(self, handle: Mapping) -> None:
        handle.close()
