"""The CUDA slot state machine, driven with a fake ``torch.cuda`` so it runs (and is checked) on CPU."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets, streaming
from tensorstream.slots import CudaSlots, GenericSlots, HostSlots, make_slots


class FakeEvent:
    count = 0

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        FakeEvent.count += 1
        self.id = FakeEvent.count
        self.log = log
        self.stream: str | None = None

    def record(self, stream: FakeStream) -> None:
        self.stream = stream.name
        self.log.append(("record", stream.name, self.id, threading.current_thread().name))

    def synchronize(self) -> None:
        self.log.append(("sync", self.id, threading.current_thread().name))


class FakeStream:
    def __init__(self, log: list[tuple[Any, ...]], name: str) -> None:
        self.log = log
        self.name = name

    def wait_event(self, event: FakeEvent) -> None:
        assert event.stream is not None, "waiting on an event that was never recorded"
        self.log.append(("wait", self.name, event.id))

    def synchronize(self) -> None:
        self.log.append(("stream-sync", self.name, threading.current_thread().name))


class FakeCuda:
    """Just enough of torch.cuda for CudaSlots: streams, events, device and stream contexts."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()
        self.compute = FakeStream(self.log, "compute")

    def Stream(self, device: Any = None) -> FakeStream:  # mirrors torch.cuda.Stream
        return FakeStream(self.log, "copy")

    def Event(self) -> FakeEvent:  # mirrors torch.cuda.Event
        return FakeEvent(self.log)

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.compute

    @contextlib.contextmanager
    def device(self, device: Any) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        yield


def make_fake(num: int = 2, size: int = 8192, direct: bool = False) -> tuple[CudaSlots, FakeCuda]:
    api = FakeCuda()
    return CudaSlots(torch.device("cpu"), num, size, direct=direct, api=api, pin_memory=False), api


def test_protocol_order_for_one_slot() -> None:
    slots, api = make_fake(num=1)
    slots.prepare_read(0)  # first use: nothing to wait for
    slots.read_target(0)[:4] = b"abcd"
    slots.finish_read(0, 4)
    copied_1 = slots.copied[0]
    slots.before_compute(0)
    assert bytes(slots.device_buffer(0)[:4].tolist()) == b"abcd"
    slots.after_compute(0)
    released_1 = slots.released[0]
    slots.prepare_read(0)  # the staging buffer is reused only after its copy finished
    slots.finish_read(0, 4)
    assert api.log == [
        ("record", "copy", copied_1.id, threading.current_thread().name),
        ("wait", "compute", copied_1.id),
        ("record", "compute", released_1.id, threading.current_thread().name),
        ("sync", copied_1.id, threading.current_thread().name),
        ("wait", "copy", released_1.id),  # the next copy into the slot waits for the compute that used it
        ("record", "copy", slots.copied[0].id, threading.current_thread().name),
    ]


def test_direct_reads_wait_for_the_compute_not_the_copy() -> None:
    slots, api = make_fake(num=1, direct=True)
    assert slots.read_target(0) is slots.device_buffer(0)
    slots.finish_read(0, 16)  # kvikio wrote into the device slot: no copy
    slots.before_compute(0)
    slots.after_compute(0)
    released = slots.released[0]
    slots.prepare_read(0)
    assert api.log[-1] == ("sync", released.id, threading.current_thread().name)
    assert not [entry for entry in api.log if entry[0] == "wait"]


def test_host_cache_source_is_copied_on_the_copy_stream() -> None:
    slots, _ = make_fake(num=1)
    source = torch.arange(16, dtype=torch.uint8)
    slots.finish_read(0, 16, source=source)
    assert torch.equal(slots.device_buffer(0)[:16], source)


def test_pool_kinds() -> None:
    assert isinstance(make_slots(torch.device("cpu"), 2, 4096), HostSlots)
    assert isinstance(make_slots(torch.device("meta"), 1, 4096), GenericSlots)


@pytest.mark.parametrize("cache", [False, True])
def test_streaming_through_the_cuda_state_machine(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch, cache: bool
) -> None:
    """A real model streamed through CudaSlots (fake CUDA on CPU): exact output and the synchronisation rules."""
    import importlib

    engine_module = importlib.import_module("tensorstream.engine")
    pools: list[tuple[CudaSlots, FakeCuda]] = []

    def fake_pool(device: torch.device, num: int, slot_bytes: int, *, direct: bool = False) -> CudaSlots:
        pools.append(make_fake(num, slot_bytes, direct))
        return pools[-1][0]

    monkeypatch.setattr(engine_module, "make_slots", fake_pool)
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    # backend="posix": the CPU device's zero-copy mmap mode (what "auto" picks) has no slot buffers to fake
    model = streaming(
        model_dirs["llama"], storage, budget_gb=budgets(storage, 2)["stream_all"], prefetch=2, backend="posix"
    )
    if cache:  # serve every other block from the pinned host cache tier
        engine = model._tensorstream_engine
        for block in engine.blocks[::2]:
            buffer = torch.empty(block.header.data_size, dtype=torch.uint8)
            from tensorstream.format import read_data

            read_data(engine.store.file(block.entry), block.header, buffer)
            block.cached = buffer
    ids = torch.randint(3, 250, (2, 7))
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(ids).logits, reference(ids).logits)
        args = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(ids, **args), reference.generate(ids, **args))
    _, api = pools[-1]
    main = threading.current_thread().name
    assert not [e for e in api.log if e[0] == "sync" and e[2] == main], "the model thread synchronised"
    # every compute-stream wait is on a copy event, every copy-stream wait on a compute event
    streams = {e[2]: e[1] for e in api.log if e[0] == "record"}
    for entry in api.log:
        if entry[0] == "wait":
            assert streams[entry[2]] == ("copy" if entry[1] == "compute" else "compute")
    assert tensorstream.stats(model).sync_loads == 0
    if cache:
        assert tensorstream.stats(model).cache_loads > 0
