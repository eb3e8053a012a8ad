"""tensorstream.offload / detach / stats on a model already loaded in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import tensorstream
from tensorstream.store import Store


def ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 250, (2, 8))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_offload_is_bit_identical_and_frees_the_blocks(
    model_dirs: dict[str, Path], storage: Path, family: str
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    with torch.inference_mode():
        expected = reference(ids()).logits
        expected_gen = reference.generate(ids()[:1], max_new_tokens=20, do_sample=False)
    block_bytes = sum(p.numel() * p.element_size() for p in model.base_model.parameters()) // 2
    tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=storage, budget_gb=block_bytes / 1e9))
    engine = model._tensorstream_engine
    assert engine.plan.streamed
    for name in engine.plan.streamed:
        assert all(p.is_meta for p in model.get_submodule(name).parameters())
    with torch.inference_mode():
        assert torch.equal(model(ids()).logits, expected)
        assert torch.equal(model.generate(ids()[:1], max_new_tokens=20, do_sample=False), expected_gen)
    stats = tensorstream.stats(model)
    assert stats.blocks_run > 0 and stats.bytes_read > 0 and stats.streamed_blocks == len(engine.plan.streamed)
    assert "GB/s" in str(stats) and stats.as_dict()["bytes_read"] == stats.bytes_read

    if family == "gpt2":  # tied embeddings stay tied
        assert model.lm_head.weight is model.transformer.wte.weight

    tensorstream.detach(model)
    assert not hasattr(model, "_tensorstream_engine")
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.inference_mode():
        assert torch.equal(model(ids()).logits, expected)
    with pytest.raises(tensorstream.NotStreamingError):
        tensorstream.stats(model)


def test_offload_with_dtype_matches_the_converted_model(model_dirs: dict[str, Path], storage: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).to(torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=storage, budget_gb=3e-4, dtype="bf16"))
    assert model._tensorstream_engine.plan.streamed
    with torch.inference_mode():
        assert torch.equal(model(ids()).logits, reference(ids()).logits)


def test_offload_reuses_the_store_for_the_same_weights(model_dirs: dict[str, Path], storage: Path) -> None:
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=1)
    a = tensorstream.offload(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), cfg)
    b = tensorstream.offload(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), cfg)
    assert a._tensorstream_engine.store.path == b._tensorstream_engine.store.path
    assert len([p for p in storage.iterdir() if not p.name.startswith(".")]) == 1
    Store.open(a._tensorstream_engine.store.path, verify="checksum")


def test_offload_twice_is_an_error(model_dirs: dict[str, Path], storage: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=1)
    tensorstream.offload(model, cfg)
    with pytest.raises(tensorstream.ConfigError, match="already streaming"):
        tensorstream.offload(model, cfg)


def test_offload_of_a_model_without_blocks(storage: Path) -> None:
    with pytest.raises(tensorstream.UnsupportedModelError):
        tensorstream.offload(nn.Sequential(nn.Linear(2, 2)), tensorstream.Config(device="cpu", storage_path=storage))
    assert not storage.exists() or not list(storage.iterdir())


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)) + x


class Plain(nn.Module):
    """Not a transformers model: offload works on any module with a stack of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(Block() for _ in range(5))
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_offload_plain_torch_module(storage: Path) -> None:
    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(3, 8)
    expected = model(x)
    tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=storage, budget_gb=20e-6, prefetch=1))
    assert len(model._tensorstream_engine.plan.streamed) >= 3
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)
