"""The engine's schedule and failure handling, driven through a streaming model."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets, streaming
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
    model = streaming(source, storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1)
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
