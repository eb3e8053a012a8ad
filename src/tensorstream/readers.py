"""The reader side of the engine: a block read in flight, the reader-thread tasks, and reading a block on demand.

`BlockReaders` is the half of `tensorstream.engine.Engine` that runs on the ``io_threads`` reader threads: each
task reads one chunk of a block's data into its region of the arena (or populates the mapped pages), the last one
checks the checksum if asked, starts the device copy or the expansion (`tensorstream.slots`) and wakes the model
thread. Reader threads never touch the schedule; they share ``stats`` under its lock and each load's counters under
the load's lock. `BlockReaders.read_block` reads a block outside the pipeline (`tensorstream.detach`,
``save_pretrained``), re-opening its file and checking it is still the file the engine opened.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .backends import Backend
from .encoding import BlockCodec
from .errors import CorruptFileError, StaleStoreError, TooManyOpenFilesError
from .format import aligned_empty, aligned_runs, data_checksum, read_data, verify_buffer
from .slots import copy_runs
from .stats import StreamStats
from .store import BlockEntry, Store, repair_hint

__all__ = [
    "BlockReaders",
    "Load",
    "Resources",
    "StreamedBlock",
    "file_identity",
    "keep_mapped_pages",
    "open_block",
    "slot_codec",
]


class Load:
    """One block read in flight or done, into one region of the arena (``slot``, a `tensorstream.slots.Region`).

    ``pending`` counts the reader tasks not finished; ``running`` the ones touching the slot now. An abandoned load
    (see `Engine._repair`) starts no further task.
    """

    __slots__ = ("abandoned", "block", "done", "error", "idle", "lock", "pending", "running", "slot")

    def __init__(self, block: int, slot: Any, pending: int) -> None:
        self.block = block
        self.slot = slot
        self.pending = pending
        self.running = 0
        self.abandoned = False
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.done = threading.Event()


class StreamedBlock:
    """A streamed block: its file, header, the parameters it binds, and its host-cache copy if it has one."""

    def __init__(self, name: str, entry: BlockEntry, codec: BlockCodec, handle: Any, targets: list[Any]) -> None:
        self.name = name
        self.entry = entry
        self.header = codec.header
        #: how the data section expands into the tensors bound (`tensorstream.encoding`; plain: as it is).
        self.codec = codec
        self.handle = handle
        #: (submodule, attribute, meta placeholder, start, end, dtype, shape) per parameter (expanded layout).
        self.targets = targets
        self.cached: torch.Tensor | None = None
        #: (start, end, shift) runs a device copy moves to 64-byte aligned places (`tensorstream.format.aligned_runs`);
        #: an encoded block is expanded into its device layout instead (one run, no shift)
        self.runs = [(0, codec.header.data_size, 0)] if codec.encoded else aligned_runs(codec.header)
        self.shifted = any(shift for _, _, shift in self.runs)
        #: Whether this process has checked the block's data checksum once (see the module docstring).
        self.verified = False
        #: (device, inode, size, mtime) of the file when the engine opened it; `Engine.read_block` re-checks it.
        self.identity: tuple[int, ...] = ()
        #: bytes a load reads (and a slot holds), and their checksum: the whole data, or the part before the routed
        #: experts (`route`)
        self.read_bytes = codec.header.data_size
        self.checksum = entry.checksum
        #: ``(id(module), attribute)`` of the routed experts' fused tensors, which the expert streamer binds (`route`)
        self.expert_attrs: set[tuple[int, str]] = set()

    def route(self, prefix_bytes: int, prefix_checksum: str, expert_attrs: set[tuple[int, str]], mapped: bool) -> None:
        """Load only the data before the routed experts; with slots, leave the experts' parameters to the streamer
        (``expert_attrs``: ``(id(module), attribute)`` of the fused tensors). Mapped, the experts stay bound as views
        of the mapping: only the routed experts' pages are ever read."""
        self.read_bytes = prefix_bytes
        self.checksum = prefix_checksum
        self.runs = [(s, min(e, prefix_bytes), shift) for s, e, shift in self.runs if s < prefix_bytes]
        if not mapped:
            self.expert_attrs = expert_attrs

    @property
    def bound_targets(self) -> list[Any]:
        """The targets a load binds: all of them, less the routed experts' (bound by
        `tensorstream.expert_streamer.ExpertStreamer`). Derived from ``targets``, whose placeholders may be replaced
        (`tensorstream.binding.install_placeholders`)."""
        if not self.expert_attrs:
            return self.targets
        return [t for t in self.targets if (id(t[0]), t[1]) not in self.expert_attrs]


class BlockReaders:
    """Reader-thread tasks and on-demand reads of streamed blocks; the base of `tensorstream.engine.Engine`.

    The engine sets these attributes before any read starts: ``store``, ``backend``, ``blocks``, ``slots``,
    ``stats``, ``mapped``, ``expand_mapped``, ``realign``, ``verify_checksum`` and ``verify_first_read``.
    """

    store: Store
    backend: Backend
    blocks: list[StreamedBlock]
    slots: Any
    stats: StreamStats
    mapped: bool
    expand_mapped: bool
    realign: bool
    verify_checksum: bool
    verify_first_read: bool
    _active: int
    _busy_since: float
    _last_read: tuple[StreamedBlock, torch.Tensor] | None

    def read_block(self, block: StreamedBlock, device: torch.device | None = None) -> torch.Tensor:
        """``block``'s tensors as they are bound (expanded, uint8) on ``device`` (default: host memory), for `detach`
        and ``save_pretrained``.

        The file is opened again by path, so it must still be the file the engine opened (same device, inode, size
        and modification time; a regular file, never a link or FIFO), and its checksum is checked unless
        ``verify="off"``. The last block read into host memory is kept, so reading a block tensor by tensor reads its
        file once. An encoded block is expanded on ``device`` by the same `BlockCodec.decode` the slots run.

        Raises:
            `StaleStoreError`: the file was replaced or changed since the model was loaded.
            `CorruptFileError`: its data does not match its checksum.
        """
        last = self._last_read
        if last is not None and last[0] is block and device is None:
            return last[1]
        path = self.store.file(block.entry)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as err:
            raise StaleStoreError(f"{path} cannot be opened again ({err.strerror}); {_CHANGED}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or file_identity(info) != block.identity:
                raise StaleStoreError(f"{path} is not the file this model was loaded from; {_CHANGED}")
            buffer = aligned_empty(block.header.data_size)
            read_data(path, block.header, buffer, fd=fd)
        finally:
            os.close(fd)
        if self.verify_first_read:
            verify_buffer(block.header, buffer)
        if device is not None:
            if block.codec.encoded:
                return block.codec.expand(buffer.to(device))
            if not self.realign:
                return buffer.to(device)
            # off the CPU, each tensor at a 64-byte aligned place, as the engine binds them (`bind_expanded`)
            placed = torch.empty(buffer.numel(), dtype=torch.uint8, device=device)
            copy_runs(placed, 0, buffer, block.header.data_size, block.runs)
            return placed
        buffer = block.codec.expand(buffer)
        self._last_read = (block, buffer)
        return buffer

    def _mapped_data(self, block: StreamedBlock) -> torch.Tensor:
        data = self.backend.data(block.handle, block.header.data_offset, block.header.data_size)  # type: ignore[attr-defined]
        if data is None:
            raise CorruptFileError(
                f"{self.store.file(block.entry)}: the file is shorter than its header says (it shrank while "
                f"mapped); {repair_hint(self.store.path)}"
            )
        return data

    def _check_mapped(self, block: StreamedBlock) -> None:
        """Before binding views of a mapping: the file must still hold them (a shrunk file would be SIGBUS)."""
        self._mapped_data(block)

    # -- reader threads ----------------------------------------------------------------------------------------

    def _run(self, load: Load, fn: Any, *args: Any) -> None:
        """Run one reader task of ``load`` unless the load was abandoned; `_repair` waits while it runs."""
        with load.lock:
            if load.abandoned:
                return
            load.running += 1
        try:
            fn(*args)
        finally:
            with load.lock:
                load.running -= 1
                if load.running == 0:
                    load.idle.notify_all()

    def _copy_cached(self, load: Load, block: StreamedBlock) -> None:
        try:
            self.slots.prepare_read(load.slot)
            runs = block.runs if self.realign else None
            self.slots.finish_read(
                load.slot, block.read_bytes, source=block.cached, codec=slot_codec(block), runs=runs
            )
            with self.stats._lock:
                self.stats.cache_loads += 1
        except BaseException as err:
            load.error = err
        finally:
            load.done.set()

    def _read(self, load: Load, block: StreamedBlock, start: int, end: int, shift: int) -> None:
        error: BaseException | None = None
        self._busy(+1)
        try:
            if start == block.runs[0][0] or start == 0:
                self.slots.prepare_read(load.slot)
            if self.mapped or self.expand_mapped:
                n = self.backend.populate(block.handle, block.header.data_offset + start, end - start)  # type: ignore[attr-defined]
            else:
                at = block.codec.compact_offset  # an encoded block is read behind the room it expands into
                target = self.slots.read_target(load.slot)[at + start - shift : at + end - shift]
                n = self.backend.read_into(block.handle, block.header.data_offset + start, target)
            expected = min(end, block.read_bytes) - start
            if n < expected:
                raise CorruptFileError(
                    f"{self.store.file(block.entry)}: file ended {expected - n} bytes early at data offset "
                    f"{start + n}; {repair_hint(self.store.path)}"
                )
            with self.stats._lock:
                self.stats.bytes_read += expected
        except BaseException as err:
            error = err
        finally:
            self._busy(-1)
        with load.lock:
            load.pending -= 1
            if error is not None and load.error is None:
                load.error = error
            last = load.pending == 0
        if last:
            self._finish(load, block)

    def _finish(self, load: Load, block: StreamedBlock) -> None:
        """The last chunk of a read is in: verify it if asked, start the device copy, wake the model thread."""
        try:
            if load.error is None:
                size = block.read_bytes
                if self.verify_checksum or (self.verify_first_read and not block.verified):
                    if self.mapped or self.expand_mapped:
                        view = self._mapped_data(block)[:size].numpy().data
                    elif self.slots.direct and block.shifted:
                        view = self._file_layout(load.slot, block)
                    else:
                        view = self.slots.host_view(load.slot, size, block.codec.compact_offset)
                    actual = data_checksum(view)
                    if actual != block.checksum:
                        raise CorruptFileError(
                            f"{self.store.file(block.entry)}: data checksum {actual} does not match "
                            f"{block.checksum}; the file is damaged. "
                            f"{repair_hint(self.store.path, sentence=True)}"
                        )
                    block.verified = True
                if self.expand_mapped:
                    self.slots.expand_from(load.slot, block.codec, self._mapped_data(block))
                    if self.slots.expanded(load.slot):  # else expanded when acquired, then evicted (`_acquire`)
                        self.backend.evict(block.handle, block.header.data_offset, size)  # type: ignore[attr-defined]
                else:
                    runs = block.runs if self.realign else None
                    self.slots.finish_read(load.slot, size, codec=slot_codec(block), runs=runs)
                with self.stats._lock:
                    self.stats.blocks_loaded += 1
        except BaseException as err:
            load.error = err
        finally:
            load.done.set()

    def _file_layout(self, slot: Any, block: StreamedBlock) -> memoryview:
        """The data section as the file holds it, from a direct read that put each run at its aligned place."""
        host = torch.zeros(block.read_bytes, dtype=torch.uint8)  # fillers are zeros
        device = self.slots.device_buffer(slot)
        for start, end, shift in block.runs:
            host[start:end].copy_(device[start - shift : end - shift])
        return host.numpy().data.cast("B")

    def _busy(self, delta: int) -> None:
        now = time.perf_counter()
        with self.stats._lock:
            if delta > 0 and self._active == 0:
                self._busy_since = now
            self._active += delta
            if delta < 0 and self._active == 0:
                self.stats.read_seconds += now - self._busy_since


def keep_mapped_pages(total_bytes: int) -> bool:
    """Zero-copy mode: leave a block's pages mapped after it ran when the whole store fits in half the memory
    available (they are the page cache's pages either way; unmapping and re-faulting them every pass costs CPU)."""
    from .backends import memory_available

    return total_bytes <= memory_available() // 2


class Resources:
    """What an engine must release: reader threads, slots, file handles (filled in as they are created)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.executor: ThreadPoolExecutor | None = None
        self.slots: Any = None
        self.experts: Any = None
        self.handles: list[Any] = []

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()
        if self.executor is not None:
            # The engine may be collected on one of its own reader threads, which cannot join itself.
            on_reader = threading.current_thread().name.startswith("tensorstream-io")
            self.executor.shutdown(wait=not on_reader, cancel_futures=True)
        if self.slots is not None:
            self.slots.close()
        while self.handles:
            self.backend.close(self.handles.pop())


#: Loading again validates the store afresh, and names the exact repair command if it is damaged.
_CHANGED = "the store changed after the model was loaded: load the model again."


def open_block(backend: Backend, path: Path, blocks: int) -> Any:
    """``backend.open(path)``, with the open-file limit reported as what it is (one descriptor per streamed block)."""
    try:
        return backend.open(path)
    except OSError as err:
        if err.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            wanted = max(2 * soft, soft + 2 * blocks)
            limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            fix = f"raise the limit (`ulimit -n {limit}` in the shell that starts Python) and load the model again."
        else:
            fix = (
                f"the hard limit ({hard}) is reached too: close other files, or have an administrator raise the hard "
                "limit (`ulimit -Hn`, /etc/security/limits.conf), then load the model again."
            )
        raise TooManyOpenFilesError(
            f"{path}: cannot open another file ({err.strerror}). The engine keeps one descriptor open per streamed "
            f"block ({blocks} here) and this process may open {soft}; {fix}",
            err.errno,
        ) from None


def file_identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def slot_codec(block: StreamedBlock) -> BlockCodec | None:
    """The codec the slots expand ``block`` with, None for a plain block (bound where it is read)."""
    return block.codec if block.codec.encoded else None
