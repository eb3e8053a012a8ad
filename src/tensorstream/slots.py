"""The slot pool: one arena where block reads land, carved into regions sized by the blocks in flight.

The engine owns the schedule; a pool owns the memory and the device synchronisation. Memory is one buffer of
``arena_bytes`` (allocated once), and each block in flight takes a *region* of it exactly its size (rounded up to
4096 bytes), so a stack of small and large blocks (dense and mixture-of-experts layers, CNN stages, hybrid stacks)
needs only as much as the blocks in flight together, not as many times the largest block.

Placement: a new region goes at the bottom of the arena if that is free, else flush with its top, else next to a
region in flight. With two blocks in flight (one computing, one loading) the regions therefore alternate between
the two ends, and an arena as large as the two largest consecutive blocks always holds the next block while the
current one computes (`Arena.allocate`). When nothing fits, the engine simply reads ahead less until a region is
freed; with nothing in flight, any block up to the arena's size fits, so the schedule always makes progress.

The methods are called in this order for each load of a block::

    allocate(nbytes)         model thread: a region, or None when it does not fit now
    prepare_read(r)          reader thread: wait until the memory the read lands in may be overwritten
    read_target(r)           reader thread(s): the buffer the backend reads into
    finish_read(r, n, codec)  reader thread: start moving the n bytes to the device (CUDA: async copy) and, for a
                             block of a quantized or compressed store, expanding them (see below)
    before_compute(r)        model thread: make the compute wait for the data (CUDA: stream waits an event)
    device_buffer(r)         model thread: the buffer whose views become the block's parameters
    release(r) | drop(r)     model thread: the block ran (release) or was read but not run (drop); the region is
                             free for new allocations, which wait for what still uses its memory

Synchronisation across regions of different sizes: the arena remembers, for every byte range, the event after
which its last use is over (the compute that read it, or the copy that wrote it); a new region waits for the events
of every range it overlaps. Compute runs in order on one stream, so the latest event per range is enough.

Three pools:

* `HostSlots` (CPU): reads land in the arena itself; nothing to synchronise.
* `CudaSlots`: reads land in a page-aligned pinned staging arena (same layout, allocated once); the reader thread
  that completes a read enqueues ``copy_(non_blocking=True)`` into the device region on a dedicated copy stream,
  after making that stream wait for the compute that last read that memory, and records a "copied" event. The
  compute stream waits for that event before the block runs. No ``synchronize()`` runs on the model thread; a
  reader thread waits (on the host) only for the previous copy out of the staging memory it is about to overwrite.
  With ``direct=True`` (the KvikIO backend), reads land in the device region itself and the reader waits for the
  region's previous compute instead.
* `GenericSlots` (MPS and other accelerators): reads land in host staging and are copied with a blocking
  ``copy_`` when the block is acquired. Correct everywhere, with no overlap of the copy.

Encoded blocks (a quantized or lossless store, `tensorstream.encoding`): the region of such a block is laid out as
``[expanded | compact | scratch]`` (`BlockCodec`); the reader fills the compact part (the engine offsets its reads by
``codec.compact_offset``) and ``finish_read`` expands it into the expanded part, whose views the parameters bind:
on the reader thread for the CPU; on the copy stream, after copying the compact bytes, for CUDA; in host staging
before the copy of the expanded bytes for a codec that expands on the host (zstd). Expanding is the one function
`BlockCodec.decode`, so every pool, the resident blocks and `tensorstream.detach` compute with the same weights.

`CudaSlots` takes the ``torch.cuda`` module as ``api`` so tests can drive the same state machine with a fake.
"""

from __future__ import annotations

from typing import Any

import torch

from .encoding import BlockCodec
from .format import aligned_empty

__all__ = [
    "REGION_ALIGNMENT",
    "Arena",
    "CudaSlots",
    "GenericSlots",
    "HostSlots",
    "MappedSlots",
    "Region",
    "copy_runs",
    "make_slots",
]

REGION_ALIGNMENT = 4096


def region_bytes(nbytes: int) -> int:
    """``nbytes`` rounded up to the region alignment (4096: O_DIRECT and GDS read whole pages)."""
    return -(-nbytes // REGION_ALIGNMENT) * REGION_ALIGNMENT


class Region:
    """The bytes ``[start, end)`` of the arena, holding one block in flight."""

    __slots__ = ("copied", "device_waits", "end", "staging_waits", "start")

    def __init__(self, start: int, end: int, device_waits: list[Any], staging_waits: list[Any]) -> None:
        self.start = start
        self.end = end
        #: events after which the device memory may be overwritten (computes that read it, copies into it).
        self.device_waits = device_waits
        #: events after which the staging memory may be overwritten (copies out of it).
        self.staging_waits = staging_waits
        #: the event after the copy into this region (CUDA, not direct); None until then.
        self.copied: Any = None

    def __repr__(self) -> str:
        return f"Region({self.start}, {self.end})"


class _Marks:
    """For each byte range of the arena, the event that ends its last use (non-overlapping painted ranges)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, Any]] = []

    def paint(self, start: int, end: int, event: Any) -> None:
        kept: list[tuple[int, int, Any]] = []
        for s, e, old in self.ranges:
            if e <= start or s >= end:
                kept.append((s, e, old))
                continue
            if s < start:
                kept.append((s, start, old))
            if e > end:
                kept.append((end, e, old))
        kept.append((start, end, event))
        self.ranges = kept

    def overlapping(self, start: int, end: int) -> list[Any]:
        events: dict[int, Any] = {}
        for s, e, event in self.ranges:
            if s < end and e > start:
                events[id(event)] = event
        return list(events.values())


class Arena:
    """The placement of variable-size regions in ``size`` bytes (no memory of its own; see the module docstring).

    Example:
        ```python
        >>> arena = Arena(12288)
        >>> a = arena.allocate(8192); b = arena.allocate(4096)   # two consecutive blocks: both ends
        >>> (a.start, b.start), arena.allocate(4096)
        ((0, 8192), None)
        >>> arena.release(a); arena.allocate(8192).start          # the freed bottom takes the next one
        0
        ```
    """

    def __init__(self, size: int) -> None:
        self.size = size
        #: regions allocated and not yet released or dropped, in allocation order.
        self.live: list[Region] = []
        self._device = _Marks()
        self._staging = _Marks()

    def allocate(self, nbytes: int) -> Region | None:
        """A region of ``nbytes`` (rounded up to 4096) that overlaps no region in flight, or None if none fits."""
        n = region_bytes(max(nbytes, 1))
        for start in self._candidates(n):
            if (
                start >= 0
                and start + n <= self.size
                and not any(r.start < start + n and start < r.end for r in self.live)
            ):
                region = Region(
                    start,
                    start + n,
                    self._device.overlapping(start, start + n),
                    self._staging.overlapping(start, start + n),
                )
                self.live.append(region)
                return region
        return None

    def _candidates(self, n: int) -> list[int]:
        # both ends first, so that two blocks in flight alternate between them; then next to the regions in flight
        return [0, self.size - n, *(r.end for r in self.live), *(r.start - n for r in self.live)]

    def _free(self, region: Region, device_event: Any, staging_event: Any) -> None:
        self.live.remove(region)
        if device_event is not None:
            self._device.paint(region.start, region.end, device_event)
        if staging_event is not None:
            self._staging.paint(region.start, region.end, staging_event)

    def release(self, region: Region) -> None:
        """The block in ``region`` ran: its memory is free once the compute enqueued so far is done."""
        self._free(region, None, None)

    def drop(self, region: Region) -> None:
        """The block in ``region`` was read but will not run (a wrong prediction): free the region."""
        self._free(region, region.copied, region.copied)


class HostSlots(Arena):
    """An arena in host memory that is also the execution memory (CPU device).

    A quantized block is expanded on the model thread when it is acquired (`before_compute`), with whole-tensor
    operations that use every core, while the reader threads go on reading: expanding on a reader thread meant
    pieces below PyTorch's parallel grain (an OpenMP team per reader thread oversubscribes the cores), at half the
    speed (measured on 2 cores: 3.3 GB/s against 6.0 GB/s of int8 output). A lossless block is expanded on the
    reader thread: zstd runs on one core whatever the thread, so it overlaps the compute there.
    """

    direct = False

    def __init__(self, arena_bytes: int) -> None:
        super().__init__(region_bytes(arena_bytes))
        self.buffer = aligned_empty(self.size)
        self.view = self.buffer.numpy().data.cast("B")
        #: id(region) -> (codec, compact bytes) of a block read and not yet expanded (expanded at acquire time)
        self.pending: dict[int, tuple[BlockCodec, torch.Tensor, int]] = {}

    def prepare_read(self, region: Region) -> None:
        pass

    def read_target(self, region: Region) -> Any:
        return self.view[region.start : region.end]

    def host_view(self, region: Region, nbytes: int, offset: int = 0) -> memoryview:
        return self.view[region.start + offset : region.start + offset + nbytes]

    def finish_read(
        self,
        region: Region,
        nbytes: int,
        source: torch.Tensor | None = None,
        codec: BlockCodec | None = None,
        runs: Any = None,
    ) -> None:
        # ``runs`` (see `tensorstream.format.aligned_runs`) is for device copies: on CPU, tensors keep the file's
        # phases, as the resident model's memory-mapped tensors do
        at = region.start + (codec.compact_offset if codec is not None else 0)
        if source is not None:  # a block from the host cache tier
            self.buffer[at : at + nbytes].copy_(source[:nbytes])
        if codec is not None:
            self._expand_or_defer(region, codec, self.buffer[at : at + nbytes], codec.scratch_offset)

    def expand_from(self, region: Region, codec: BlockCodec, compact: torch.Tensor) -> None:
        """Expand ``compact`` (a mapping of the block's data section) into ``region``, laid out
        ``[expanded | scratch]``: the CPU zero-copy read of an encoded store (see `BlockCodec`). Returns before
        expanding a quantized block (see the class docstring); `expanded` says whether it is done."""
        self._expand_or_defer(region, codec, compact, codec.mapped_scratch_offset)

    def expanded(self, region: Region) -> bool:
        """Whether ``region`` holds no block waiting to be expanded (`before_compute` expands it)."""
        return id(region) not in self.pending

    def _expand_or_defer(self, region: Region, codec: BlockCodec, compact: torch.Tensor, scratch_offset: int) -> None:
        if codec.host_decode:
            self._decode(region, codec, compact, scratch_offset, inline=True)
        else:
            self.pending[id(region)] = (codec, compact, scratch_offset)

    def _decode(
        self, region: Region, codec: BlockCodec, compact: torch.Tensor, scratch_offset: int, *, inline: bool
    ) -> None:
        base = region.start
        codec.decode(
            compact,
            self.buffer[base : base + codec.expanded_bytes],
            self.buffer[base + scratch_offset : region.end],
            inline=inline,
        )

    def before_compute(self, region: Region) -> None:
        waiting = self.pending.pop(id(region), None)
        if waiting is not None:  # the model thread: whole-tensor operations on every core
            self._decode(region, *waiting, inline=False)

    def device_buffer(self, region: Region) -> torch.Tensor:
        return self.buffer[region.start : region.end]

    def release(self, region: Region) -> None:
        self.pending.pop(id(region), None)
        super().release(region)

    def drop(self, region: Region) -> None:
        self.pending.pop(id(region), None)
        super().drop(region)

    def close(self) -> None:
        self.pending.clear()


class CudaSlots(Arena):
    """A device arena fed through a pinned staging arena and a dedicated copy stream (see the module docstring)."""

    def __init__(
        self,
        device: torch.device,
        arena_bytes: int,
        *,
        direct: bool = False,
        api: Any = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__(region_bytes(arena_bytes))
        self.api = api if api is not None else torch.cuda
        self.device = device
        self.direct = direct
        self.buffer = torch.empty(self.size, dtype=torch.uint8, device=device)
        self.staging = None if direct else aligned_empty(self.size, pin_memory=pin_memory)
        self.view = None if self.staging is None else self.staging.numpy().data.cast("B")
        self.copy_stream = self.api.Stream(device=device)

    def prepare_read(self, region: Region) -> None:
        # reader thread only: the memory we are about to overwrite is no longer used
        for event in region.device_waits if self.direct else region.staging_waits:
            event.synchronize()

    def read_target(self, region: Region) -> Any:
        if self.direct:
            return self.buffer[region.start : region.end]
        assert self.view is not None
        return self.view[region.start : region.end]

    def host_view(self, region: Region, nbytes: int, offset: int = 0) -> memoryview:
        start = region.start + offset
        if self.direct:
            host = self.buffer[start : start + nbytes].cpu()
            return host.numpy().data.cast("B")
        assert self.view is not None
        return self.view[start : start + nbytes]

    def finish_read(
        self,
        region: Region,
        nbytes: int,
        source: torch.Tensor | None = None,
        codec: BlockCodec | None = None,
        runs: Any = None,
    ) -> None:
        if self.direct and source is None and codec is None:
            return  # the engine read each run to its aligned place (`Engine._issue`)
        at = codec.compact_offset if codec is not None else 0
        if codec is not None and codec.host_decode:  # expand in host staging, then copy the expanded bytes
            assert self.staging is not None, "a host-expanded store is never read with direct I/O (see Engine)"
            if source is not None:
                self.staging[region.start + at : region.start + at + nbytes].copy_(source[:nbytes])
            _expand(codec, self.staging, region, nbytes)
            source, at, nbytes, codec = None, 0, codec.expanded_bytes, None
        stream = self.copy_stream
        with self.api.device(self.device), self.api.stream(stream):
            for event in region.device_waits:  # the computes that last read this memory have finished
                stream.wait_event(event)
            if codec is not None:  # compact bytes to the device, expanded there, in order on this stream
                if not (self.direct and source is None):  # direct: the compact bytes are in device memory already
                    src = self.staging[region.start + at : region.end] if source is None else source  # type: ignore[index]
                    self.buffer[region.start + at : region.start + at + nbytes].copy_(src[:nbytes], non_blocking=True)
                _expand(codec, self.buffer, region, nbytes)
            else:
                src = self.staging[region.start : region.end] if source is None else source  # type: ignore[index]
                copy_runs(self.buffer, region.start, src, nbytes, runs, non_blocking=True)
            event = self.api.Event()
            event.record(stream)
        region.copied = event

    def before_compute(self, region: Region) -> None:
        if region.copied is not None:
            self.api.current_stream(self.device).wait_event(region.copied)

    def device_buffer(self, region: Region) -> torch.Tensor:
        return self.buffer[region.start : region.end]

    def release(self, region: Region) -> None:
        event = self.api.Event()
        event.record(self.api.current_stream(self.device))
        # the device memory is free after this compute; the staging memory after the copy out of it
        self._free(region, event, region.copied)

    def close(self) -> None:
        self.copy_stream.synchronize()


class GenericSlots(Arena):
    """Host staging plus a blocking copy at acquire time: for MPS and other non-CUDA accelerators."""

    direct = False

    def __init__(self, device: torch.device, arena_bytes: int) -> None:
        super().__init__(region_bytes(arena_bytes))
        self.host = HostSlots(self.size)
        self.buffer = torch.empty(self.size, dtype=torch.uint8, device=device)
        self.sources: dict[int, tuple[int, torch.Tensor | None, BlockCodec | None, Any]] = {}

    def prepare_read(self, region: Region) -> None:
        pass

    def read_target(self, region: Region) -> Any:
        return self.host.read_target(region)

    def host_view(self, region: Region, nbytes: int, offset: int = 0) -> memoryview:
        return self.host.host_view(region, nbytes, offset)

    def finish_read(
        self,
        region: Region,
        nbytes: int,
        source: torch.Tensor | None = None,
        codec: BlockCodec | None = None,
        runs: Any = None,
    ) -> None:
        if codec is not None and codec.host_decode:
            self.host.finish_read(region, nbytes, source, codec)
            source, nbytes, codec = None, codec.expanded_bytes, None
        self.sources[id(region)] = (nbytes, source, codec, runs)

    def before_compute(self, region: Region) -> None:
        n, source, codec, runs = self.sources.pop(id(region), (0, None, None, None))
        if codec is None:
            src = self.host.buffer[region.start : region.end] if source is None else source
            copy_runs(self.buffer, region.start, src, n, runs)
            return
        at = region.start + codec.compact_offset
        src = self.host.buffer[at : region.end] if source is None else source
        self.buffer[at : at + n].copy_(src[:n])
        _expand(codec, self.buffer, region, n)

    def device_buffer(self, region: Region) -> torch.Tensor:
        return self.buffer[region.start : region.end]

    def drop(self, region: Region) -> None:
        self.sources.pop(id(region), None)
        super().drop(region)

    def close(self) -> None:
        pass


class MappedSlots(Arena):
    """An arena with no memory of its own, for the zero-copy mode on CPU (``backend="mmap"``).

    The block's parameters are views of the backend's mapping of its file (the page cache); the regions only bound
    how many blocks are populated ahead at once, exactly as they bound the reads of the other pools.
    """

    direct = False

    def __init__(self, arena_bytes: int) -> None:
        super().__init__(region_bytes(arena_bytes))

    def prepare_read(self, region: Region) -> None:
        pass

    def finish_read(
        self,
        region: Region,
        nbytes: int,
        source: torch.Tensor | None = None,
        codec: BlockCodec | None = None,
        runs: Any = None,
    ) -> None:
        assert codec is None, "an encoded store's blocks are expanded into a pool with memory (see Engine)"

    def before_compute(self, region: Region) -> None:
        pass

    def close(self) -> None:
        pass


def _expand(codec: BlockCodec, buffer: torch.Tensor, region: Region, nbytes: int) -> None:
    """Expand the compact bytes of ``region`` (in ``buffer``) into its expanded part (see the module docstring)."""
    base = region.start
    codec.decode(
        buffer[base + codec.compact_offset : base + codec.compact_offset + nbytes],
        buffer[base : base + codec.expanded_bytes],
        buffer[base + codec.scratch_offset : region.end],
    )


def copy_runs(
    buffer: torch.Tensor, base: int, src: torch.Tensor, nbytes: int, runs: Any, *, non_blocking: bool = False
) -> None:
    """Copy a block's ``nbytes`` from ``src`` into ``buffer`` at ``base``, each run moved down by its shift.

    ``runs`` (`tensorstream.format.aligned_runs`) puts every tensor of a format-2 block at a multiple of 64 on the
    device, as a device-resident model holds it; ``None`` or no shift: one copy of the whole block.
    """
    if not runs or not any(shift for _, _, shift in runs):
        buffer[base : base + nbytes].copy_(src[:nbytes], non_blocking=non_blocking)
        return
    for start, end, shift in runs:
        buffer[base + start - shift : base + end - shift].copy_(src[start:end], non_blocking=non_blocking)


def make_slots(device: torch.device, arena_bytes: int, *, direct: bool = False) -> Any:
    """The pool for ``device``: `HostSlots` on CPU, `CudaSlots` on CUDA, `GenericSlots` elsewhere."""
    if device.type == "cpu":
        return HostSlots(arena_bytes)
    if device.type == "cuda":
        return CudaSlots(device, arena_bytes, direct=direct)
    return GenericSlots(device, arena_bytes)
