"""The engine's schedule and failure handling, driven through a streaming model."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets, streaming
from tensorstream.slots import MappedSlots
from tensorstream.store import Store


@pytest.fixture
def setup(model_dirs: dict[str, Path], storage: Path):  # type: ignore[no-untyped-def]
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    return model_dirs["llama"], storage, reference


def ids() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(3, 250, (1, 6))


def test_prefetch_wraps_around_to_the_next_step(setup) -> None:  # type: ignore[no-untyped-def]
    source, storage, _ = setup
    model = streaming(source, storage, budget_gb=budgets(storage, 2)["stream_all"], prefetch=2)
    engine = model._tensorstream_engine
    assert list(engine.pipeline) == [0, 1, 2]  # reads start at load time
    with torch.inference_mode():
        model(ids())
    assert list(engine.pipeline) == [0, 1, 2]  # the next step's first blocks are already on their way
    stats = tensorstream.stats(model)
    assert stats.sync_loads == 0 and stats.blocks_run == 6


def test_out_of_order_block_is_loaded_synchronously_and_output_stays_exact(setup) -> None:  # type: ignore[no-untyped-def]
    source, storage, reference = setup
    model = streaming(source, storage, budget_gb=budgets(storage, 2)["stream_all"], prefetch=2)
    layer = model.model.layers[4]
    hidden = torch.randn(1, 6, 64)
    position_ids = torch.arange(6)[None]
    emb = model.model.rotary_emb(hidden, position_ids)
    with torch.inference_mode():
        out = layer(hidden, position_embeddings=emb)  # block 4 runs first: not in the pipeline
        expected = reference.model.layers[4](hidden, position_embeddings=emb)
    assert torch.equal(
        out[0] if isinstance(out, tuple) else out, expected[0] if isinstance(expected, tuple) else expected
    )
    assert tensorstream.stats(model).sync_loads == 1
    with torch.inference_mode():
        assert torch.equal(model(ids()).logits, reference(ids()).logits)


def test_a_failed_read_reaches_the_forward_and_the_model_recovers(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    source, storage, reference = setup
    model = streaming(source, storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1, backend="posix")
    engine = model._tensorstream_engine
    with torch.inference_mode():
        model(ids())
    real = engine.backend.read_into
    engine.backend.read_into = lambda *a: (_ for _ in ()).throw(OSError(5, "Input/output error"))  # type: ignore[method-assign]
    with pytest.raises(tensorstream.StreamingError, match="Input/output error"), torch.inference_mode():
        model(ids())
        model(ids())
    engine.backend.read_into = real  # type: ignore[method-assign]
    with torch.inference_mode():
        assert torch.equal(model(ids()).logits, reference(ids()).logits)


def test_checksum_mode_catches_a_damaged_block_at_run_time(setup) -> None:  # type: ignore[no-untyped-def]
    source, storage, _ = setup
    (path,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    store = Store.open(path)
    header = store.header(store.blocks[3])
    with open(header.path, "r+b") as f:
        f.seek(header.data_offset + 100)
        byte = f.read(1)
        f.seek(header.data_offset + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    model = streaming(source, storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1, verify="checksum")
    with pytest.raises(tensorstream.CorruptFileError, match=r"model\.layers\.3"), torch.inference_mode():
        model(ids())


def test_an_exception_inside_a_block_leaves_the_model_usable(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    source, storage, reference = setup
    model = streaming(source, storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1)
    mlp = model.model.layers[2].mlp
    original = mlp.forward
    mlp.forward = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt), torch.inference_mode():
        model(ids())
    mlp.forward = original  # type: ignore[method-assign]
    with torch.inference_mode():
        assert torch.equal(model(ids()).logits, reference(ids()).logits)


def test_stale_store_is_detected(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    source, storage, _ = setup
    (path,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    (path / "blocks" / "model.layers.2.ts.safetensors").unlink()
    reshard_module = importlib.import_module("tensorstream.reshard")
    with pytest.raises(tensorstream.StaleStoreError, match=r"model\.layers\.2"):
        reshard_module.reshard(source, storage, progress=False)


def test_a_freed_slot_receives_the_next_block_not_yet_read(setup) -> None:  # type: ignore[no-untyped-def]
    """With two slots, releasing block k must start block k+2 at once (k+1 is already being read)."""
    source, storage, _ = setup
    model = streaming(source, storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1)
    engine = model._tensorstream_engine
    assert engine.plan.num_slots == 2 and list(engine.pipeline) == [0, 1]
    names = engine.plan.streamed
    for k in range(len(names)):
        engine.acquire(names[k])
        engine.release(names[k])
        expected = [(k + 1) % len(names), (k + 2) % len(names)]
        assert list(engine.pipeline) == expected, (k, list(engine.pipeline))
    assert tensorstream.stats(model).sync_loads == 0


# -- the zero-copy mapped mode (backend="mmap" on CPU) ----------------------------------------------------------


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {name: AutoModelForCausalLM.from_pretrained(model_dirs[name]) for name in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("keep_mapped", [True, False], ids=["keep mapped", "evict after use"])
def test_mapped_mode_binds_views_of_the_file_and_is_bit_identical(
    model_dirs: dict[str, Path], references: dict[str, torch.nn.Module], storage: Path, family: str, keep_mapped: bool
) -> None:
    tensorstream.reshard(model_dirs[family], storage, progress=False)
    model = streaming(model_dirs[family], storage, budget_gb=budgets(storage)["stream_all"], backend="mmap")
    engine = model._tensorstream_engine
    assert engine.mapped and engine.backend.name == "mmap"
    engine.backend.keep_mapped = keep_mapped
    assert isinstance(engine.slots, MappedSlots) and not hasattr(engine.slots, "buffer")  # nothing is copied
    seen: list[bool] = []
    block = engine.blocks[0]
    start = block.handle.address + block.header.data_offset
    first = engine.index[block.name]

    def inside(module: torch.nn.Module, args: object) -> None:  # a submodule of block 0 runs: the block is bound
        assert engine.bound is not None and engine.bound[0] == first
        seen.extend(start <= p.data_ptr() < start + block.header.data_size for p in module.parameters(False))

    handles = [
        sub.register_forward_pre_hook(inside)
        for sub in model.get_submodule(block.name).modules()
        if any(True for _ in sub.parameters(False))
    ]
    vocab = model.config.vocab_size
    torch.manual_seed(3)
    batch = {"input_ids": torch.randint(3, vocab - 1, (2, 7))}
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(**batch).logits, references[family](**batch).logits)
        out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = references[family].generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for handle in handles:
        handle.remove()
    assert torch.equal(out, expected)
    assert seen and all(seen)  # every parameter of the block is a view of its mapped file
    assert tensorstream.stats(model).sync_loads == 0
    # the arena still bounds the blocks in flight: every live region holds one read, none lost or invented
    live = sorted(id(region) for region in engine.slots.live)
    assert live == sorted(id(load.slot) for load in engine.pipeline.values())
    assert 0 < len(live) <= engine.plan.num_slots


def test_auto_picks_the_mapped_mode_on_cpu_and_unmaps_a_store_larger_than_memory(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """``auto`` on CPU is the mapped mode whatever the store's size (measured at the disk's speed cold, see
    ``benchmarks/cold_runs.py``); a store larger than memory is unmapped block by block; ``direct_io=True`` and a
    kernel without ``MADV_POPULATE_READ`` take the POSIX reads."""
    source, storage, reference = setup
    model = streaming(source, storage, budget_gb=budgets(storage)["stream_all"])
    assert model._tensorstream_engine.backend.name == "mmap"
    assert model._tensorstream_engine.backend.keep_mapped  # a tiny store: leave its pages mapped
    import tensorstream.backends.mmap
    import tensorstream.plan

    monkeypatch.setattr(tensorstream.plan, "_meminfo_available", lambda: 1 << 20)  # "larger than RAM"
    monkeypatch.setattr(tensorstream.plan, "_cgroup_available", lambda: None)
    model = streaming(source, storage, budget_gb=budgets(storage)["stream_all"])
    assert model._tensorstream_engine.backend.name == "mmap"
    assert not model._tensorstream_engine.backend.keep_mapped  # larger than memory: unmap each block after use
    model = streaming(source, storage, budget_gb=budgets(storage)["stream_all"], direct_io=True)
    assert model._tensorstream_engine.backend.name.startswith("posix")
    monkeypatch.setattr(tensorstream.backends.mmap, "populate_supported", lambda: False)
    model = streaming(source, storage, budget_gb=budgets(storage)["stream_all"])
    assert model._tensorstream_engine.backend.name.startswith("posix")
    model = streaming(source, storage, budget_gb=budgets(storage)["stream_all"], backend="mmap")
    with torch.inference_mode():
        assert torch.equal(model(ids()).logits, reference(ids()).logits)


def test_mapped_mode_a_file_truncated_after_its_pages_were_populated_is_an_error_not_sigbus(setup) -> None:  # type: ignore[no-untyped-def]
    """Block 0 is populated for the next step; truncating it then would make its compute die of SIGBUS."""
    source, storage, _ = setup
    model = streaming(source, storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1, backend="mmap")
    engine = model._tensorstream_engine
    with torch.inference_mode():
        model(ids())
    load = engine.pipeline[0]  # the next step's first block, already read ahead (its pages populated)
    load.done.wait()
    header = engine.blocks[0].header
    with open(header.path, "r+b") as f:
        f.truncate(header.data_offset + 100)
    shrank = r"model\.layers\.0.*shrank.*tensorstream reshard"
    with pytest.raises(tensorstream.CorruptFileError, match=shrank), torch.inference_mode():
        model(ids())


def test_mapped_mode_a_failed_populate_reaches_the_forward_and_the_model_recovers(setup) -> None:  # type: ignore[no-untyped-def]
    source, storage, reference = setup
    model = streaming(source, storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1, backend="mmap")
    engine = model._tensorstream_engine
    with torch.inference_mode():
        model(ids())
    real = engine.backend.populate
    engine.backend.populate = lambda *a: (_ for _ in ()).throw(OSError(5, "Input/output error"))
    with pytest.raises(tensorstream.StreamingError, match="Input/output error"), torch.inference_mode():
        model(ids())
        model(ids())
    engine.backend.populate = real
    with torch.inference_mode():
        assert torch.equal(model(ids()).logits, reference(ids()).logits)


def test_stats_report_anonymous_and_file_backed_memory(setup) -> None:  # type: ignore[no-untyped-def]
    from tensorstream.stats import process_memory

    source, storage, _ = setup
    model = streaming(source, storage, budget_gb=budgets(storage)["stream_all"], backend="mmap")
    with torch.inference_mode():
        model(ids())
    stats = tensorstream.stats(model)
    figures = stats.as_dict()
    memory = process_memory()
    assert figures["rss_anon_bytes"] > 0 and figures["rss_file_bytes"] > 0
    assert memory["rss"] == memory["anon"] + memory["file"] + memory["shmem"]
    assert "anonymous" in str(stats) and "file-backed" in str(stats)


@pytest.mark.parametrize("keep_mapped", [True, False], ids=["keep mapped", "evict after use"])
def test_mapped_mode_kept_mapping_is_not_walked_again_each_pass(setup, keep_mapped: bool) -> None:  # type: ignore[no-untyped-def]
    from tensorstream.backends.mmap import MADV_POPULATE_READ, Mapping

    source, storage, reference = setup
    model = streaming(source, storage, budget_gb=budgets(storage)["stream_all"], backend="mmap")
    engine = model._tensorstream_engine
    engine.backend.keep_mapped = keep_mapped
    calls: list[int] = []
    real = Mapping.advise

    def counting(self: Mapping, advice: int, offset: int, length: int) -> bool:
        calls.append(advice)
        return real(self, advice, offset, length)

    with torch.inference_mode():
        model(ids())
        for _ in range(2):
            model(ids())  # a whole pass after the first: every block was populated before
        calls.clear()
        Mapping.advise = counting  # type: ignore[method-assign]
        try:
            assert torch.equal(model(ids()).logits, reference(ids()).logits)
            for load in list(engine.pipeline.values()):  # the next pass's read-ahead, started by this pass
                load.done.wait()
        finally:
            Mapping.advise = real  # type: ignore[method-assign]
    populates = calls.count(MADV_POPULATE_READ)
    assert (populates == 0) if keep_mapped else (populates >= len(engine.blocks))
