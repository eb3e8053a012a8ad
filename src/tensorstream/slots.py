"""The slot pool: where block reads land and how they reach the execution device.

The engine owns the schedule; a pool owns the buffers and the device synchronisation. Its methods are called in
this order for each load of a block into slot ``s``::

    prepare_read(s)          reader thread: wait until the buffer the read lands in may be overwritten
    read_target(s)           reader thread(s): the buffer the backend reads into
    finish_read(s, n)        reader thread: start moving the n bytes to the device (CUDA: async copy)
    before_compute(s)        model thread: make the compute wait for the data (CUDA: stream waits an event)
    device_buffer(s)         model thread: the buffer whose views become the block's parameters
    after_compute(s)         model thread: mark the slot reusable once the compute enqueued so far is done

Three pools:

* `HostSlots` (CPU): reads land in the slot itself; nothing to synchronise.
* `CudaSlots`: reads land in page-aligned pinned staging buffers (one per slot, allocated once); the reader
  thread that completes a read enqueues ``copy_(non_blocking=True)`` into the device slot on a dedicated copy
  stream, after making that stream wait for the event recorded when the slot's previous block finished computing,
  and records a "copied" event. The compute stream waits for that event before the block runs. No
  ``synchronize()`` runs on the model thread; a reader thread waits (on the host) only for the previous copy out
  of the staging buffer it is about to overwrite. With ``direct=True`` (the KvikIO backend), reads land in the
  device slot itself and the reader waits for the slot's previous compute instead.
* `GenericSlots` (MPS and other accelerators): reads land in host staging and are copied with a blocking
  ``copy_`` when the block is acquired. Correct everywhere, with no overlap of the copy.

`CudaSlots` takes the ``torch.cuda`` module as ``api`` so tests can drive the same state machine with a fake.
"""

from __future__ import annotations

from typing import Any

import torch

from .format import aligned_empty

__all__ = ["CudaSlots", "GenericSlots", "HostSlots", "make_slots"]


class HostSlots:
    """Slots in host memory that are also the execution memory (CPU device)."""

    direct = False

    def __init__(self, num: int, slot_bytes: int) -> None:
        self.buffers = [aligned_empty(slot_bytes) for _ in range(num)]
        self.views = [buf.numpy().data.cast("B") for buf in self.buffers]

    def prepare_read(self, slot: int) -> None:
        pass

    def read_target(self, slot: int) -> Any:
        return self.views[slot]

    def host_view(self, slot: int, nbytes: int) -> memoryview:
        return self.views[slot][:nbytes]

    def finish_read(self, slot: int, nbytes: int, source: torch.Tensor | None = None) -> None:
        if source is not None:  # a block from the host cache tier
            self.buffers[slot][:nbytes].copy_(source[:nbytes])

    def before_compute(self, slot: int) -> None:
        pass

    def device_buffer(self, slot: int) -> torch.Tensor:
        return self.buffers[slot]

    def after_compute(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


class CudaSlots:
    """Device slots fed through pinned staging buffers and a dedicated copy stream (see the module docstring)."""

    def __init__(
        self,
        device: torch.device,
        num: int,
        slot_bytes: int,
        *,
        direct: bool = False,
        api: Any = None,
        pin_memory: bool = True,
    ) -> None:
        self.api = api if api is not None else torch.cuda
        self.device = device
        self.direct = direct
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num)]
        self.staging = [] if direct else [aligned_empty(slot_bytes, pin_memory=pin_memory) for _ in range(num)]
        self.views = [buf.numpy().data.cast("B") for buf in self.staging]
        self.copy_stream = self.api.Stream(device=device)
        self.copied: list[Any] = [None] * num  # event after the last copy into the slot
        self.released: list[Any] = [None] * num  # event after the last compute that read the slot

    def prepare_read(self, slot: int) -> None:
        waited = self.released[slot] if self.direct else self.copied[slot]
        if waited is not None:
            waited.synchronize()  # reader thread only: the buffer we are about to overwrite is free

    def read_target(self, slot: int) -> Any:
        return self.buffers[slot] if self.direct else self.views[slot]

    def host_view(self, slot: int, nbytes: int) -> memoryview:
        if self.direct:
            host = self.buffers[slot][:nbytes].cpu()
            return host.numpy().data.cast("B")
        return self.views[slot][:nbytes]

    def finish_read(self, slot: int, nbytes: int, source: torch.Tensor | None = None) -> None:
        if self.direct and source is None:
            return
        src = self.staging[slot] if source is None else source
        stream = self.copy_stream
        with self.api.device(self.device), self.api.stream(stream):
            if self.released[slot] is not None:
                stream.wait_event(self.released[slot])  # the previous block in this slot has finished computing
            self.buffers[slot][:nbytes].copy_(src[:nbytes], non_blocking=True)
            event = self.api.Event()
            event.record(stream)
        self.copied[slot] = event

    def before_compute(self, slot: int) -> None:
        event = self.copied[slot]
        if event is not None:
            self.api.current_stream(self.device).wait_event(event)

    def device_buffer(self, slot: int) -> torch.Tensor:
        return self.buffers[slot]

    def after_compute(self, slot: int) -> None:
        event = self.api.Event()
        event.record(self.api.current_stream(self.device))
        self.released[slot] = event

    def close(self) -> None:
        self.copy_stream.synchronize()


class GenericSlots:
    """Host staging plus a blocking copy at acquire time: for MPS and other non-CUDA accelerators."""

    direct = False

    def __init__(self, device: torch.device, num: int, slot_bytes: int) -> None:
        self.host = HostSlots(num, slot_bytes)
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num)]
        self.sizes = [0] * num
        self.sources: list[torch.Tensor | None] = [None] * num

    def prepare_read(self, slot: int) -> None:
        pass

    def read_target(self, slot: int) -> Any:
        return self.host.read_target(slot)

    def host_view(self, slot: int, nbytes: int) -> memoryview:
        return self.host.host_view(slot, nbytes)

    def finish_read(self, slot: int, nbytes: int, source: torch.Tensor | None = None) -> None:
        self.sizes[slot] = nbytes
        self.sources[slot] = source

    def before_compute(self, slot: int) -> None:
        n = self.sizes[slot]
        source = self.sources[slot]
        src = self.host.buffers[slot] if source is None else source
        self.buffers[slot][:n].copy_(src[:n])

    def device_buffer(self, slot: int) -> torch.Tensor:
        return self.buffers[slot]

    def after_compute(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_slots(device: torch.device, num: int, slot_bytes: int, *, direct: bool = False) -> Any:
    """The pool for ``device``: `HostSlots` on CPU, `CudaSlots` on CUDA, `GenericSlots` elsewhere."""
    if device.type == "cpu":
        return HostSlots(num, slot_bytes)
    if device.type == "cuda":
        return CudaSlots(device, num, slot_bytes, direct=direct)
    return GenericSlots(device, num, slot_bytes)
