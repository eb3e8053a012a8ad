"""The streaming engine: one arena for the blocks in flight, reader threads, and the prefetch schedule.

One `Engine` serves one model. It owns one arena allocated once (see `tensorstream.slots`: each block in flight
takes a region of its own size, at most ``num_slots`` blocks in flight) and a pool of ``io_threads`` readers.
Blocks are read in execution order, up to ``prefetch`` ahead of the one computing (fewer while the arena has no
room for the next one), wrapping around to the first streamed block for the next step. The hook of each block
calls `Engine.acquire` before the block runs (wait for its read, bind its parameters as views of the slot) and
`Engine.release` after (rebind to meta, free the slot, start the next read).

The schedule follows execution, not names: it starts from the structural order and counts, for every block,
which blocks actually ran next; the most frequent one is its predicted successor. An encoder-decoder model whose
decode steps skip the encoder therefore prefetches the decoder's first block after the decoder's last one (many
times per ``generate``), not the encoder's first (once per call, at its start: one miss per call). A block that is
not in the prefetch pipeline when it is needed (a miss) is read synchronously and the schedule restarts after
it: slower, counted in `StreamStats.sync_loads`, never wrong. A failed read reaches the forward call as
`StreamingError` (or the typed error that caused it); the engine stays usable for the next call.

Blocks chosen for the host cache tier (``host_cache_gb``, CUDA) are read once into pinned RAM at start-up; their
loads are a copy from RAM, the others come from storage.

Threading: the schedule state is changed only under `Engine.lock` (a re-entrant lock the hooks hold for a whole
block forward, and `tensorstream.stream` for a whole model forward), so several threads calling one model are
served one forward at a time, each correct. Reader threads only fill buffers, start the device copy (see
`tensorstream.slots`) and signal an event, with one lock for the statistics.

Interrupts: an exception can land on any line of a schedule transition (Ctrl-C is delivered between any two
bytecodes). Each entry point marks the state dirty on entry and clean on return; an entry that finds it dirty
first repairs it (`Engine._repair`): it abandons every read in flight (a queued read that has not started never
starts; a running one is waited for), restores every placeholder and frees every slot. No slot is lost and no load
waits for reads that were never queued.

Integrity: unless ``verify="off"``, each block's data checksum is checked the first time the engine reads it (on a
reader thread, one pass over the block); ``verify="checksum"`` checks it on every read.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import Backend, choose_backend, get_backend
from .config import Config
from .encoding import BlockCodec
from .errors import ConfigError, CorruptFileError, StaleStoreError, StreamingError, TooManyOpenFilesError
from .format import aligned_empty, aligned_runs, data_checksum, read_data, verify_buffer
from .plan import Plan
from .slots import MappedSlots, copy_runs, make_slots
from .stats import StreamStats
from .store import BlockEntry, Store, repair_hint

__all__ = ["Engine"]

logger = logging.getLogger(__name__)
MIN_REQUEST = 4 << 20
MAX_REQUEST = 64 << 20


class _Load:
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


class _Block:
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


class Engine:
    """Streams the blocks of one model through one arena allocated once.

    Args:
        store: the opened store.
        plan: which blocks are streamed (and cached in host RAM), the arena's size and the blocks in flight.
        modules: block name -> module, for every streamed block.
        config: the settings (device, backend, direct_io, verify, io_threads).
    """

    def __init__(self, store: Store, plan: Plan, modules: Mapping[str, nn.Module], config: Config) -> None:
        self.store = store
        self.plan = plan
        self.device = config.execution_device
        direct_io = config.direct_io
        backend = backend_name(config, store)
        if direct_io is None and backend in ("auto", "posix"):
            from .backends.posix import choose_direct_io

            direct_io = choose_direct_io(store.path, store.total_bytes)
        self.backend: Backend = get_backend(backend, self.device, direct_io=direct_io)
        self.verify_checksum = config.verify == "checksum"
        self.verify_first_read = config.verify != "off"
        #: Held for every schedule transition and, by the hooks, for a whole block forward (re-entrant).
        self.lock = threading.RLock()
        self._dirty = False
        # Everything that must be released is registered here as it is created, so that an exception (or Ctrl-C)
        # anywhere in __init__ closes what was opened, and the engine's collection closes the rest.
        self._resources = _Resources(self.backend)
        self._finalizer = weakref.finalize(self, self._resources.close)
        self.stats = StreamStats(
            resident_blocks=len(plan.resident),
            streamed_blocks=len(plan.streamed),
            num_slots=plan.num_slots,
            backend=self.backend.name,
            store_kind=store.kind or "plain",
        )
        entries = {entry.name: entry for entry in store.blocks}
        tied = store.manifest.get("tied", {})
        self.blocks: list[_Block] = []
        self.index = {name: i for i, name in enumerate(plan.streamed)}
        try:
            self._build(store, plan, modules, config, entries, tied)
        except BaseException:
            self._finalizer()
            raise

    def _build(
        self,
        store: Store,
        plan: Plan,
        modules: Mapping[str, nn.Module],
        config: Config,
        entries: dict[str, BlockEntry],
        tied: Mapping[str, str],
    ) -> None:
        for name in plan.streamed:
            entry = entries[name]
            codec = device_codec(store, entry, self.device)
            targets = _targets(name, modules[name], codec, tied, store)
            handle = _open_block(self.backend, store.file(entry), len(plan.streamed))
            self._resources.handles.append(handle)
            self.blocks.append(_Block(name, entry, codec, handle, targets))
            self.blocks[-1].identity = _identity(store.file(entry).stat())
        direct = bool(getattr(self.backend, "reads_device_memory", False))
        #: zero-copy: parameters are views of the backend's mapping of each file (CPU and ``backend="mmap"``);
        #: the arena then holds no memory, it only counts the blocks in flight, and a read populates mapped pages.
        maps = self.device.type == "cpu" and bool(getattr(self.backend, "maps", False))
        self.mapped = maps and store.kind is None
        #: An encoded store's blocks are expanded into the arena, so they are never bound as mapped pages; on CPU
        #: with the mmap backend they are expanded straight from the mapping (the compact bytes are page cache).
        self.expand_mapped = maps and store.kind is not None
        if self.mapped or self.expand_mapped:
            self.backend.keep_mapped = _keep_mapped(store.total_bytes)  # type: ignore[attr-defined]
        self.slots: Any = (
            MappedSlots(plan.arena_bytes) if self.mapped else make_slots(self.device, plan.arena_bytes, direct=direct)
        )
        self._resources.slots = self.slots
        #: off the CPU, tensors are bound at 64-byte aligned places (each run moved down by its shift), as a
        #: device-resident model holds them; on the CPU at the file's phases, as memory-mapped resident tensors are
        self.realign = self.device.type != "cpu"
        self._load_host_cache(plan.cached)
        self.request = min(max(MIN_REQUEST, plan.slot_bytes // max(config.io_threads, 1)), MAX_REQUEST)
        self.request = -(-self.request // 4096) * 4096
        self._views: dict[tuple[int, int], list[nn.Parameter]] = {}
        self.pipeline: OrderedDict[int, _Load] = OrderedDict()
        self.bound: tuple[int, Any] | None = None
        count = len(self.blocks)
        #: successor[b]: the block expected to run after b; starts structural, then learned from execution.
        self.successor = [(b + 1) % count for b in range(count)] if count else []
        #: transitions[b][c]: how often c ran right after b.
        self.transitions: list[dict[int, int]] = [{} for _ in range(count)]
        self.last_run: int | None = None
        self.next = 0
        self.read_ahead = plan.prefetch > 0
        self._active = 0
        self._busy_since = 0.0
        self._last_read: tuple[_Block, torch.Tensor] | None = None
        self.executor = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="tensorstream-io")
        self._resources.executor = self.executor
        self._fill()

    def _load_host_cache(self, cached: tuple[str, ...]) -> None:
        """Read the host-cache tier's blocks into pinned RAM once (chosen by the planner, never evicted)."""
        for name in cached:
            block = self.blocks[self.index[name]]
            buffer = aligned_empty(block.header.data_size, pin_memory=self.device.type == "cuda")
            read_data(self.store.file(block.entry), block.header, buffer)
            if self.verify_first_read:
                verify_buffer(block.header, buffer)
                block.verified = True
            block.cached = buffer

    def read_block(self, block: _Block, device: torch.device | None = None) -> torch.Tensor:
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
            if not stat.S_ISREG(info.st_mode) or _identity(info) != block.identity:
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

    # -- the schedule (model thread only) ------------------------------------------------------------------------

    def acquire(self, name: str) -> None:
        """Wait for block ``name``'s weights and bind them; called by the hook before the block runs."""
        b = self.index[name]
        with self.lock:
            if self._dirty:
                self._repair()
            self._dirty = True
            self._acquire(b)
            self._dirty = False

    def release(self, name: str) -> None:
        """Rebind block ``name`` to meta, free its slot and start the next read; called after the block ran."""
        b = self.index[name]
        with self.lock:
            if self._dirty:
                self._repair()
            self._dirty = True
            self._release(b)
            self._dirty = False

    def _acquire(self, b: int) -> None:
        if self.bound is not None:  # the previous block raised before its release ran
            self._unbind()
        if self.last_run is not None:  # learn the order blocks actually run in
            seen = self.transitions[self.last_run]
            seen[b] = seen.get(b, 0) + 1
            if seen[b] >= seen.get(self.successor[self.last_run], 0):
                self.successor[self.last_run] = b
        load = self.pipeline.get(b)
        if load is None:
            with self.stats._lock:
                self.stats.sync_loads += 1
            load = self._restart_at(b)
        else:
            while next(iter(self.pipeline)) != b:  # blocks predicted before b did not run this time
                self._drop(next(iter(self.pipeline)))
            if load.done.is_set() and self.read_ahead:
                with self.stats._lock:
                    self.stats.prefetch_hits += 1
        if not load.done.is_set():
            start = time.perf_counter()
            load.done.wait()
            with self.stats._lock:
                self.stats.wait_seconds += time.perf_counter() - start
        if load.error is not None:
            self._drop(b)
            self.last_run = None
            self._dirty = False  # consistent again: the failed load is forgotten, the rest of the pipeline stays
            error = load.error
            if isinstance(error, StreamingError | CorruptFileError | StaleStoreError):
                raise error
            raise StreamingError(f"reading {self.store.file(self.blocks[b].entry)} failed: {error}") from error
        expanding = self.expand_mapped and not self.slots.expanded(load.slot)
        self.slots.before_compute(load.slot)
        if expanding:  # the mapped compact bytes are no longer needed
            block = self.blocks[b]
            self.backend.evict(block.handle, block.header.data_offset, block.header.data_size)  # type: ignore[attr-defined]
        self._bind(b, load.slot)

    def _release(self, b: int) -> None:
        if self.bound is None or self.bound[0] != b:
            return
        self._unbind()
        self.last_run = b
        with self.stats._lock:
            self.stats.blocks_run += 1
        self.next = self.successor[b]
        self._fill()

    def _bind(self, b: int, slot: Any) -> None:
        block = self.blocks[b]
        if self.mapped:
            self._check_mapped(block)
        key = (b, -1 if self.mapped else slot.start)  # mapped: the views are the block's own, whatever its slot
        views = self._views.get(key)
        if views is None:
            buf = self._mapped_data(block) if self.mapped else self.slots.device_buffer(slot)
            views = [_parameter(buf, target, self.realign) for target in block.targets]
            if len(self._views) > 8 * len(self.blocks):  # regions land at a few offsets per block: bounded
                self._views.clear()
            self._views[key] = views
        self.bound = (b, slot)  # first: an interrupt while binding leaves placeholders that `_unbind` restores
        for (module, attr, *_), param in zip(block.targets, views, strict=True):
            module._parameters[attr] = param

    def _mapped_data(self, block: _Block) -> torch.Tensor:
        data = self.backend.data(block.handle, block.header.data_offset, block.header.data_size)  # type: ignore[attr-defined]
        if data is None:
            raise CorruptFileError(
                f"{self.store.file(block.entry)}: the file is shorter than its header says (it shrank while "
                f"mapped); {repair_hint(self.store.path)}"
            )
        return data

    def _check_mapped(self, block: _Block) -> None:
        """Before binding views of a mapping: the file must still hold them (a shrunk file would be SIGBUS)."""
        self._mapped_data(block)

    def _unbind(self) -> None:
        assert self.bound is not None
        b, slot = self.bound
        for module, attr, placeholder, *_ in self.blocks[b].targets:
            module._parameters[attr] = placeholder
        self.bound = None
        self.pipeline.pop(b, None)
        if self.mapped:
            block = self.blocks[b]
            self.backend.evict(block.handle, block.header.data_offset, block.header.data_size)  # type: ignore[attr-defined]
        self.slots.release(slot)

    def _fill(self) -> None:
        """Start reads for the blocks predicted to run next while slots are free.

        The prediction continues from the last block already in the pipeline (``self.next`` only when the pipeline
        is empty), so a freed slot always receives the next block not yet being read.
        """
        if not self.read_ahead:
            return
        while len(self.pipeline) < self.plan.num_slots:
            candidate = self.successor[next(reversed(self.pipeline))] if self.pipeline else self.next
            if candidate in self.pipeline:  # every predicted block up to a full cycle is already on its way
                break
            if self._issue(candidate) is None:  # no room in the arena until the computing block is released
                break

    def _restart_at(self, b: int) -> _Load:
        """A miss: drain the pipeline, read ``b`` now, and continue the schedule after it."""
        for pending in list(self.pipeline):
            self._drop(pending)
        load = self._issue(b)
        assert load is not None, "an empty arena holds any block"
        self.next = self.successor[b]
        self._fill()
        return load

    def _drop(self, b: int) -> None:
        """Forget the read of ``b`` (waiting for it to finish first: a running read cannot be cancelled)."""
        load = self.pipeline[b]
        load.done.wait()  # before forgetting it: a Ctrl-C here must not lose the slot
        del self.pipeline[b]
        self.slots.drop(load.slot)

    def _issue(self, b: int) -> _Load | None:
        """Start reading block ``b`` into a new region of the arena; None when the arena has no room for it now."""
        block = self.blocks[b]
        slot = self.slots.allocate(block_memory(block.codec, self.expand_mapped))
        if slot is None:
            return None
        if block.cached is not None:
            load = _Load(b, slot, 1)
            self.pipeline[b] = load
            self._submit(load, [(self._copy_cached, load, block)])
            return load
        align = self.backend.alignment
        size = -(-block.header.data_size // align) * align
        if self.slots.direct and block.shifted:  # reads land in device memory: each run at its aligned place
            chunks = [
                (start, min(start + self.request, end), shift)
                for run_start, end, shift in block.runs
                for start in range(run_start, end, self.request)
            ]
        else:
            chunks = [(start, min(start + self.request, size), 0) for start in range(0, size, self.request) or [0]]
        load = _Load(b, slot, len(chunks))
        self.pipeline[b] = load
        self._submit(load, [(self._read, load, block, *chunk) for chunk in chunks])
        return load

    def _submit(self, load: _Load, tasks: list[tuple[Any, ...]]) -> None:
        """Queue the reader tasks of ``load`` (already in the pipeline, so `_repair` can abandon it if interrupted)."""
        for fn, *args in tasks:
            self.executor.submit(self._run, load, fn, *args)

    def _repair(self) -> None:
        """Bring the schedule back to a consistent state after a transition was interrupted.

        Every read in the pipeline is abandoned (tasks not started never start; running ones are waited for), every
        block's placeholders are restored, every slot is freed and the prediction restarts at the next call.
        """
        for load in list(self.pipeline.values()):
            with load.lock:
                load.abandoned = True
                while load.running:
                    load.idle.wait()
        for block in self.blocks:
            for module, attr, placeholder, *_ in block.targets:
                module._parameters[attr] = placeholder
        bound = self.bound[1] if self.bound is not None else None
        for region in list(self.slots.live):  # the arena forgets every region: the bound one ran, the rest did not
            if bound is not None and region is bound:
                self.slots.release(region)
            else:
                self.slots.drop(region)
        self.bound = None
        self.last_run = None
        self.pipeline = OrderedDict()
        self._dirty = False

    # -- reader threads ----------------------------------------------------------------------------------------

    def _run(self, load: _Load, fn: Any, *args: Any) -> None:
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

    def _copy_cached(self, load: _Load, block: _Block) -> None:
        try:
            self.slots.prepare_read(load.slot)
            runs = block.runs if self.realign else None
            self.slots.finish_read(
                load.slot, block.header.data_size, source=block.cached, codec=_codec(block), runs=runs
            )
            with self.stats._lock:
                self.stats.cache_loads += 1
        except BaseException as err:
            load.error = err
        finally:
            load.done.set()

    def _read(self, load: _Load, block: _Block, start: int, end: int, shift: int) -> None:
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
            expected = min(end, block.header.data_size) - start
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

    def _finish(self, load: _Load, block: _Block) -> None:
        """The last chunk of a read is in: verify it if asked, start the device copy, wake the model thread."""
        try:
            if load.error is None:
                size = block.header.data_size
                if self.verify_checksum or (self.verify_first_read and not block.verified):
                    if self.mapped or self.expand_mapped:
                        view = self._mapped_data(block).numpy().data
                    elif self.slots.direct and block.shifted:
                        view = self._file_layout(load.slot, block)
                    else:
                        view = self.slots.host_view(load.slot, size, block.codec.compact_offset)
                    actual = data_checksum(view)
                    if actual != block.entry.checksum:
                        raise CorruptFileError(
                            f"{self.store.file(block.entry)}: data checksum {actual} does not match "
                            f"{block.entry.checksum}; the file is damaged. "
                            f"{repair_hint(self.store.path, sentence=True)}"
                        )
                    block.verified = True
                if self.expand_mapped:
                    self.slots.expand_from(load.slot, block.codec, self._mapped_data(block))
                    if self.slots.expanded(load.slot):  # else expanded when acquired, then evicted (`_acquire`)
                        self.backend.evict(block.handle, block.header.data_offset, size)  # type: ignore[attr-defined]
                else:
                    runs = block.runs if self.realign else None
                    self.slots.finish_read(load.slot, size, codec=_codec(block), runs=runs)
                with self.stats._lock:
                    self.stats.blocks_loaded += 1
        except BaseException as err:
            load.error = err
        finally:
            load.done.set()

    def _file_layout(self, slot: Any, block: _Block) -> memoryview:
        """The data section as the file holds it, from a direct read that put each run at its aligned place."""
        host = torch.zeros(block.header.data_size, dtype=torch.uint8)  # fillers are zeros
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

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the readers, unbind any block and close the files. The engine cannot be used afterwards."""
        with self.lock:
            if self._dirty:
                self._repair()
            if self.bound is not None:
                self._unbind()
            self._finalizer()


def _keep_mapped(total_bytes: int) -> bool:
    """Zero-copy mode: leave a block's pages mapped after it ran when the whole store fits in half the memory
    available (they are the page cache's pages either way; unmapping and re-faulting them every pass costs CPU)."""
    from .backends import memory_available

    return total_bytes <= memory_available() // 2


class _Resources:
    """What an engine must release: reader threads, slots, file handles (filled in as they are created)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.executor: ThreadPoolExecutor | None = None
        self.slots: Any = None
        self.handles: list[Any] = []

    def close(self) -> None:
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


def _open_block(backend: Backend, path: Path, blocks: int) -> Any:
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


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def load_resident_blocks(
    store: Store, names: Collection[str], modules: Mapping[str, nn.Module], device: torch.device, verify: str
) -> None:
    """Read and expand the encoded blocks ``names`` that stay resident, and bind them for good.

    transformers loads a plain store's resident blocks itself (views of the ``.ts`` files); an encoded block has to
    be expanded, with the same `BlockCodec.decode` the streamed blocks use, so that resident and streamed blocks
    compute with the weights `tensorstream.detach` gives.

    Raises:
        `CorruptFileError`: a block's data does not match its checksum (unless ``verify="off"``).
    """
    entries = {entry.name: entry for entry in store.blocks}
    tied = store.manifest.get("tied", {})
    for name in names:
        entry = entries[name]
        codec = device_codec(store, entry, device)
        targets = _targets(name, modules[name], codec, tied, store)
        buffer = aligned_empty(codec.header.data_size)
        read_data(store.file(entry), codec.header, buffer)
        if verify != "off":
            verify_buffer(codec.header, buffer)
        bind_expanded(targets, codec.expand(buffer.to(device)))


def bind_expanded(targets: list[Any], data: torch.Tensor, realigned: bool = False) -> None:
    """Bind every target parameter to a view of ``data`` (a block's bytes as `Engine.read_block` gives them, each
    tensor moved down by its phase when ``realigned``); tied tensors stay tied."""
    made: dict[tuple[int, int], nn.Parameter] = {}
    for target in targets:
        module, attr, _, start, end, *_ = target
        if (start, end) not in made:
            made[(start, end)] = _parameter(data, target, realigned)
        module._parameters[attr] = made[(start, end)]


def _parameter(data: torch.Tensor, target: tuple[Any, ...], realigned: bool) -> nn.Parameter:
    """The parameter a target binds: a view of ``data`` at its place (moved down by its phase when ``realigned``),
    exactly as the resident model holds it (a parameter that requires grad makes some models take other kernels:
    Longformer, LED, FSMT's logits differ in the last bit otherwise)."""
    _, _, placeholder, start, end, dtype, shape, phase = target
    shift = phase if realigned else 0
    view = data[start - shift : end - shift].view(dtype).view(shape)
    return nn.Parameter(view, requires_grad=placeholder.requires_grad)


def backend_name(config: Config, store: Store) -> str:
    """The backend the engine uses for ``store`` under ``config`` (``"auto"`` resolved where it can be, cheaply).

    A lossless store's blocks are expanded on the CPU (zstd), so on CUDA they are read into host memory: ``"auto"``
    is the POSIX backend and ``"kvikio"`` (reads into GPU memory) a `ConfigError`.
    """
    device = config.execution_device
    backend = choose_backend(config.backend, device, direct_io=config.direct_io)
    if store.kind == "lossless" and device.type == "cuda" and backend in ("auto", "kvikio"):
        if backend == "kvikio":
            raise ConfigError(
                "backend='kvikio' reads straight into GPU memory, but a lossless store's blocks are expanded on the "
                "CPU (zstd); use backend='posix' (or 'auto') with this store."
            )
        backend = "posix"
    return backend


def device_codec(store: Store, entry: BlockEntry, device: torch.device) -> BlockCodec:
    """``entry``'s codec, laying an encoded block out for ``device``: each tensor at its source address phase on the
    CPU (as the memory-mapped resident model holds it), 64-byte aligned elsewhere (as a device copy is). Both
    layouts take the same bytes, so the plan made from `Store.codec` holds either."""
    codec = store.codec(entry)
    if device.type == "cpu" or not codec.encoded:
        return codec
    return BlockCodec(codec.header, phased=False)


def block_memory(codec: BlockCodec, expand_mapped: bool) -> int:
    """Bytes one load of the block takes in the arena: its data for a plain block, else its region (see
    `BlockCodec`), without the compact bytes when they are expanded straight from a mapping."""
    if not codec.encoded:
        return codec.header.data_size
    return codec.mapped_region_bytes if expand_mapped else codec.region_bytes


def expands_from_mapping(config: Config, store: Store) -> bool:
    """Whether the engine expands ``store``'s blocks straight from mappings of its files (encoded store, CPU, mmap)."""
    return store.kind is not None and config.execution_device.type == "cpu" and backend_name(config, store) == "mmap"


def _codec(block: _Block) -> BlockCodec | None:
    """The codec the slots expand ``block`` with, None for a plain block (bound where it is read)."""
    return block.codec if block.codec.encoded else None


def _targets(name: str, module: nn.Module, codec: BlockCodec, tied: Mapping[str, str], store: Store) -> list[Any]:
    """(submodule, attribute, placeholder, start, end, dtype, shape, phase) for each parameter of block ``name``.

    ``phase`` is the shift a device copy removes (`tensorstream.format.aligned_runs`): the file's for a plain block,
    0 for an encoded one (its codec lays the tensors out for the device already).
    """
    file = codec.header.path
    targets = []
    for local, param in module.named_parameters(remove_duplicate=False):
        full = f"{name}.{local}"
        info = codec.tensors.get(tied.get(full, full))
        if info is None:
            raise StaleStoreError(
                f"{file} has no tensor {full!r}, which the model needs: the store was built for a different model "
                f"or transformers version; {repair_hint(store.path)}"
            )
        if tuple(param.shape) != info.shape or param.dtype != info.torch_dtype:
            raise StaleStoreError(
                f"{file}: {full!r} is {info.dtype}{list(info.shape)} in the store but the model expects "
                f"{param.dtype}{list(param.shape)}; {repair_hint(store.path)}"
            )
        submodule_name, _, attr = local.rpartition(".")
        submodule = module.get_submodule(submodule_name)
        phase = 0 if codec.encoded else info.phase
        targets.append((submodule, attr, param, info.start, info.end, info.torch_dtype, info.shape, phase))
    return targets
