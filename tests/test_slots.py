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
from tensorstream.slots import Arena, CudaSlots, GenericSlots, HostSlots, make_slots


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


def make_fake(size: int = 8192, direct: bool = False) -> tuple[CudaSlots, FakeCuda]:
    api = FakeCuda()
    return CudaSlots(torch.device("cpu"), size, direct=direct, api=api, pin_memory=False), api


def test_protocol_order_for_one_region() -> None:
    slots, api = make_fake(size=4096)
    first = slots.allocate(4)
    assert first is not None and slots.allocate(4) is None  # the arena holds one page
    slots.prepare_read(first)  # first use: nothing to wait for
    slots.read_target(first)[:4] = b"abcd"
    slots.finish_read(first, 4)
    copied_1 = first.copied
    slots.before_compute(first)
    assert bytes(slots.device_buffer(first)[:4].tolist()) == b"abcd"
    slots.release(first)
    released_1 = api.log[-1][2]
    second = slots.allocate(4)
    assert second is not None and second.start == first.start
    slots.prepare_read(second)  # the staging memory is reused only after its copy finished
    slots.finish_read(second, 4)
    assert api.log == [
        ("record", "copy", copied_1.id, threading.current_thread().name),
        ("wait", "compute", copied_1.id),
        ("record", "compute", released_1, threading.current_thread().name),
        ("sync", copied_1.id, threading.current_thread().name),
        ("wait", "copy", released_1),  # the next copy into the memory waits for the compute that used it
        ("record", "copy", second.copied.id, threading.current_thread().name),
    ]


def test_direct_reads_wait_for_the_compute_not_the_copy() -> None:
    slots, api = make_fake(size=4096, direct=True)
    region = slots.allocate(16)
    assert region is not None and slots.read_target(region).data_ptr() == slots.device_buffer(region).data_ptr()
    slots.finish_read(region, 16)  # kvikio wrote into the device region: no copy
    slots.before_compute(region)
    slots.release(region)
    released = api.log[-1][2]
    again = slots.allocate(16)
    assert again is not None
    slots.prepare_read(again)
    assert api.log[-1] == ("sync", released, threading.current_thread().name)
    assert not [entry for entry in api.log if entry[0] == "wait"]


def test_host_cache_source_is_copied_on_the_copy_stream() -> None:
    slots, _ = make_fake()
    source = torch.arange(16, dtype=torch.uint8)
    region = slots.allocate(16)
    assert region is not None
    slots.finish_read(region, 16, source=source)
    assert torch.equal(slots.device_buffer(region)[:16], source)


def test_pool_kinds() -> None:
    assert isinstance(make_slots(torch.device("cpu"), 8192), HostSlots)
    assert isinstance(make_slots(torch.device("meta"), 4096), GenericSlots)


# -- the arena: regions sized by the blocks in flight ------------------------------------------------------------

PAGE = 4096


def test_two_blocks_in_flight_alternate_between_the_ends() -> None:
    """An arena as large as the two largest consecutive blocks always holds the next one (any size pattern)."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([1, 1, 2, 5, 9]) * PAGE for _ in range(rng.randint(2, 9))]
        pairs = max(sizes[i] + sizes[(i + 1) % len(sizes)] for i in range(len(sizes)))
        arena = Arena(pairs)
        computing = arena.allocate(sizes[0])
        assert computing is not None and computing.start == 0
        for step in range(1, 3 * len(sizes)):
            loading = arena.allocate(sizes[step % len(sizes)])
            assert loading is not None, (sizes, step)
            assert loading.end <= computing.start or loading.start >= computing.end
            arena.release(computing)
            computing = loading


def test_regions_of_a_full_arena_wait_for_every_use_they_overlap() -> None:
    """A large region over two freed small ones waits for both of their computes (CUDA events)."""
    slots, api = make_fake(size=2 * PAGE)
    small = [slots.allocate(PAGE), slots.allocate(PAGE)]
    assert all(r is not None for r in small) and {r.start for r in small if r} == {0, PAGE}
    events = []
    for region in small:
        assert region is not None
        slots.prepare_read(region)
        slots.finish_read(region, PAGE)
        slots.before_compute(region)
        slots.release(region)
        events.append(api.log[-1][2])
    big = slots.allocate(2 * PAGE)
    assert big is not None and big.start == 0
    slots.prepare_read(big)
    slots.finish_read(big, 2 * PAGE)
    waits = {entry[2] for entry in api.log if entry[0] == "wait" and entry[1] == "copy"}
    assert waits == set(events)


def test_a_dropped_region_is_reused_after_its_copy() -> None:
    """A block read but never run (a wrong prediction): the next read into its memory waits for its copy."""
    slots, api = make_fake(size=PAGE)
    region = slots.allocate(PAGE)
    assert region is not None
    slots.prepare_read(region)
    slots.finish_read(region, PAGE)
    slots.drop(region)
    again = slots.allocate(PAGE)
    assert again is not None
    slots.prepare_read(again)
    assert api.log[-1] == ("sync", region.copied.id, threading.current_thread().name)
    assert slots.live == [again]


def test_nothing_fits_until_a_region_is_freed() -> None:
    arena = Arena(3 * PAGE)
    a, b = arena.allocate(2 * PAGE), arena.allocate(PAGE)
    assert a is not None and b is not None and arena.allocate(PAGE) is None
    arena.release(a)
    c = arena.allocate(2 * PAGE)
    assert c is not None and (c.start, c.end) == (0, 2 * PAGE)


@pytest.mark.parametrize("cache", [False, True])
def test_streaming_through_the_cuda_state_machine(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch, cache: bool
) -> None:
    """A real model streamed through CudaSlots (fake CUDA on CPU): exact output and the synchronisation rules."""
    import importlib

    engine_module = importlib.import_module("tensorstream.engine")
    pools: list[tuple[CudaSlots, FakeCuda]] = []

    def fake_pool(device: torch.device, arena_bytes: int, *, direct: bool = False) -> CudaSlots:
        pools.append(make_fake(arena_bytes, direct))
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


@pytest.mark.parametrize(("kind", "direct"), [("int8", False), ("int8", True), ("lossless", False)])
def test_encoded_stores_through_the_cuda_state_machine(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch, kind: str, direct: bool
) -> None:
    """Quantized blocks are copied as they are and rebuilt by their binding rule from the slot's views; lossless ones
    expand in staging before the copy (fake CUDA).

    ``direct``: reads land in device memory (the KvikIO path) and are expanded there.
    """
    import importlib

    engine_module = importlib.import_module("tensorstream.engine")
    pools: list[tuple[CudaSlots, FakeCuda]] = []

    def fake_pool(device: torch.device, arena_bytes: int, *, direct: bool = False) -> CudaSlots:
        pools.append(make_fake(arena_bytes, direct or direct_reads))
        return pools[-1][0]

    direct_reads = direct
    monkeypatch.setattr(engine_module, "make_slots", fake_pool)
    if direct:  # KvikIO reads into device tensors; the fake device memory is host memory, read with preadv
        from tensorstream.backends.posix import PosixBackend

        read_into = PosixBackend.read_into

        def read_tensor(self: PosixBackend, handle: int, offset: int, out: Any) -> int:
            return read_into(
                self, handle, offset, out.numpy().data.cast("B") if isinstance(out, torch.Tensor) else out
            )

        monkeypatch.setattr(PosixBackend, "read_into", read_tensor)
    settings = {"compression": kind} if kind == "lossless" else {"quantize": kind}
    tensorstream.reshard(model_dirs["llama"], storage, progress=False, dtype="bf16", **settings)
    model = streaming(
        model_dirs["llama"],
        storage,
        budget_gb=budgets(storage, 2)["stream_all"],
        prefetch=2,
        backend="posix",
        dtype="bf16",
        **settings,
    )
    ids = torch.randint(3, 250, (2, 7))
    with torch.inference_mode():
        logits = model(ids).logits
        assert torch.equal(model(ids).logits, logits)
    slots, api = pools[-1]
    assert slots.direct == direct
    main = threading.current_thread().name
    assert not [e for e in api.log if e[0] == "sync" and e[2] == main], "the model thread synchronised"
    reference = tensorstream.detach(model)
    with torch.inference_mode():
        assert torch.equal(reference(ids).logits, logits)
