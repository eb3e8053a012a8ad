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

Layout: the reader-thread half (reads, checksums, device copies) is `tensorstream.readers.BlockReaders`, the base
class; how a block's bytes become parameters (targets, views, layouts per device) is `tensorstream.binding`.

Integrity: unless ``verify="off"``, each block's data checksum is checked the first time the engine reads it (on a
reader thread, one pass over the block); ``verify="checksum"`` checks it on every read.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .backends import Backend, get_backend
from .binding import backend_name, block_memory, block_targets, device_codec, parameter
from .config import Config
from .encoding import expands
from .errors import CorruptFileError, StaleStoreError, StreamingError
from .expert_streamer import ExpertStreamer
from .experts import ExpertLayout, check_modules, routed_layouts
from .format import aligned_empty, read_data, verify_buffer
from .plan import Plan
from .readers import (
    BlockReaders,
    Load,
    Resources,
    StreamedBlock,
    file_identity,
    keep_mapped_pages,
    open_block,
)
from .slots import MappedSlots, make_slots
from .stats import StreamStats
from .store import BlockEntry, Store

__all__ = ["Engine"]

logger = logging.getLogger(__name__)
MIN_REQUEST = 4 << 20


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 4096) * 4096


MAX_REQUEST = 64 << 20


class Engine(BlockReaders):
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
        self._resources = Resources(self.backend)
        self._finalizer = weakref.finalize(self, self._resources.close)
        self.stats = StreamStats(
            resident_blocks=len(plan.resident),
            streamed_blocks=len(plan.streamed),
            num_slots=plan.num_slots,
            backend=self.backend.name,
            store_kind=store.kind or "plain",
            quantization=plan.quantization,
        )
        entries = {entry.name: entry for entry in store.blocks}
        tied = store.manifest.get("tied", {})
        self.blocks: list[StreamedBlock] = []
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
            targets = block_targets(name, modules[name], codec, tied, store)
            handle = open_block(self.backend, store.file(entry), len(plan.streamed))
            self._resources.handles.append(handle)
            self.blocks.append(StreamedBlock(name, entry, codec, handle, targets))
            self.blocks[-1].identity = file_identity(store.file(entry).stat())
        direct = bool(getattr(self.backend, "reads_device_memory", False))
        #: zero-copy: parameters are views of the backend's mapping of each file (CPU and ``backend="mmap"``);
        #: the arena then holds no memory, it only counts the blocks in flight, and a read populates mapped pages.
        maps = self.device.type == "cpu" and bool(getattr(self.backend, "maps", False))
        self.mapped = maps and not expands(store.kind)
        #: An encoded store's blocks are expanded into the arena, so they are never bound as mapped pages; on CPU
        #: with the mmap backend they are expanded straight from the mapping (the compact bytes are page cache).
        self.expand_mapped = maps and expands(store.kind)
        if self.mapped or self.expand_mapped:
            self.backend.keep_mapped = keep_mapped_pages(store.total_bytes)  # type: ignore[attr-defined]
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
        self.pipeline: OrderedDict[int, Load] = OrderedDict()
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
        self._last_read: tuple[StreamedBlock, torch.Tensor] | None = None
        self.executor = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="tensorstream-io")
        self._resources.executor = self.executor
        self.experts = ExpertStreamer(self, self._routed(store, plan, modules), plan.expert_cache_bytes)
        self._resources.experts = self.experts
        self._fill()

    def _routed(
        self, store: Store, plan: Plan, modules: Mapping[str, nn.Module]
    ) -> list[tuple[ExpertLayout, nn.Module, StreamedBlock]]:
        """The routed experts of the plan's routed blocks: each block loads without them (`StreamedBlock.route`)."""
        layouts = {name: layout for name, layout in routed_layouts(store).items() if name in plan.routed}
        check_modules(layouts, modules, store)
        layers = []
        for name, layout in layouts.items():
            block = self.blocks[self.index[name]]
            module = modules[name].get_submodule(layout.module[len(name) + 1 :])
            attrs = {(id(module), t.attr) for t in layout.tensors}
            block.route(layout.prefix_bytes, layout.prefix_checksum, attrs, self.mapped)
            layers.append((layout, module, block))
        return layers

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

    def follow_order(self, order: list[str]) -> None:
        """Predict the streamed blocks in ``order`` (a traced forward) before any of them ran.

        The successor of each streamed block becomes the next streamed block in ``order`` (wrapping around); the
        reads already in flight are kept when they are the first blocks of ``order``, else dropped and the read-ahead
        restarts at its first block. Once a block has run, the engine learns the order from execution instead.
        """
        streamed = [self.index[name] for name in order if name in self.index]
        if not streamed:
            return
        with self.lock:
            if self.last_run is not None or self.bound is not None:
                return  # blocks ran already: the engine learns from them
            for current, following in zip(streamed, [*streamed[1:], streamed[0]], strict=True):
                self.successor[current] = following
            expected = []
            b = streamed[0]
            for _ in self.pipeline:
                expected.append(b)
                b = self.successor[b]
            if list(self.pipeline) != expected:
                for pending in list(self.pipeline):
                    self._drop(pending)
            self.next = streamed[0]
            self._fill()

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
            views = [parameter(buf, target, self.realign) for target in block.bound_targets]
            if len(self._views) > 8 * len(self.blocks):  # regions land at a few offsets per block: bounded
                self._views.clear()
            # a ruled parameter its forward changes (bitsandbytes', `tensorstream.bnb`) is rebuilt at every bind
            if not any(getattr(t[8] and t[8].rule, "rebuild_each_bind", False) for t in block.bound_targets):
                self._views[key] = views
        self.bound = (b, slot)  # first: an interrupt while binding leaves placeholders that `_unbind` restores
        for (module, attr, placeholder, *_), param in zip(block.bound_targets, views, strict=True):
            if param.requires_grad != placeholder.requires_grad:  # changed since the view was made (requires_grad_)
                param.requires_grad_(placeholder.requires_grad)
            module._parameters[attr] = param

    def _unbind(self) -> None:
        assert self.bound is not None
        b, slot = self.bound
        for module, attr, placeholder, *_ in self.blocks[b].bound_targets:
            module._parameters[attr] = placeholder
        self.bound = None
        self.pipeline.pop(b, None)
        if self.mapped:  # a routed block's experts stay mapped: only the routed ones are, and they are the cache
            block = self.blocks[b]
            self.backend.evict(block.handle, block.header.data_offset, block.read_bytes)  # type: ignore[attr-defined]
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

    def _restart_at(self, b: int) -> Load:
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

    def _issue(self, b: int) -> Load | None:
        """Start reading block ``b`` into a new region of the arena; None when the arena has no room for it now."""
        block = self.blocks[b]
        routed = block.read_bytes < block.header.data_size
        slot = self.slots.allocate(
            _aligned(block.read_bytes) if routed else block_memory(block.codec, self.expand_mapped)
        )
        if slot is None:
            return None
        if block.cached is not None:
            load = Load(b, slot, 1)
            self.pipeline[b] = load
            self._submit(load, [(self._copy_cached, load, block)])
            return load
        align = self.backend.alignment
        size = -(-block.read_bytes // align) * align
        if self.slots.direct and block.shifted:  # reads land in device memory: each run at its aligned place
            chunks = [
                (start, min(start + self.request, end), shift)
                for run_start, end, shift in block.runs
                for start in range(run_start, end, self.request)
            ]
        else:
            chunks = [(start, min(start + self.request, size), 0) for start in range(0, size, self.request) or [0]]
        load = Load(b, slot, len(chunks))
        self.pipeline[b] = load
        self._submit(load, [(self._read, load, block, *chunk) for chunk in chunks])
        return load

    def _submit(self, load: Load, tasks: list[tuple[Any, ...]]) -> None:
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
        self.experts.repair()
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

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the readers, unbind any block and close the files. The engine cannot be used afterwards."""
        with self.lock:
            if self._dirty:
                self._repair()
            if self.bound is not None:
                self._unbind()
            self._finalizer()
