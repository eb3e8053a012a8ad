"""torchao checkpoints in safetensors (docs/quantization.md, "Pre-quantized checkpoints"); torchao models offloaded.

The store holds the checkpoint's own parts of each quantized weight (``qdata``, ``scale``, ``zero_point``) and the
binding rule rebuilds torchao's tensor from views of the slot. Every result is compared with transformers' resident
load of the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TorchAoConfig

import tensorstream
from helpers.models import budgets
from tensorstream.errors import ConfigError
from tensorstream.prequantized import describe_quantization
from tensorstream.store import Store

pytest.importorskip("torchao")

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 2]])


@pytest.fixture(scope="module")
def torchao_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama quantized by transformers with ``TorchAoConfig(Int8WeightOnlyConfig())``, saved in safetensors."""
    from torchao.quantization import Int8WeightOnlyConfig

    root = tmp_path_factory.mktemp("torchao")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "bf16")
    quantized = AutoModelForCausalLM.from_pretrained(
        root / "bf16", dtype=torch.bfloat16, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    quantized.save_pretrained(root / "int8", safe_serialization=True)
    return root / "int8"


def _outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        args = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        return model(IDS).logits, model.generate(IDS, **args)  # type: ignore[operator]


def _checkpoint_bytes(folder: Path, prefix: str) -> int:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return sum(_nbytes(f.get_tensor(k)) for k in f.keys() if k.startswith(prefix))  # noqa: SIM118


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("backend", ["mmap", "posix"])
def test_a_torchao_checkpoint_streams_its_own_quantized_tensors(
    torchao_checkpoint: Path, storage: Path, backend: str
) -> None:
    from torchao.quantization import Int8Tensor

    resident = AutoModelForCausalLM.from_pretrained(torchao_checkpoint, dtype=torch.bfloat16)
    assert type(resident.model.layers[0].mlp.up_proj.weight) is Int8Tensor
    expected = _outputs(resident)
    tensorstream.reshard(torchao_checkpoint, storage, progress=False)
    budget = budgets(storage, 1)["some_resident"]
    config = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=budget, prefetch=1, backend=backend)
    model = AutoModelForCausalLM.from_pretrained(
        torchao_checkpoint, device_map="tensorstream", tensorstream_config=config
    )
    engine = model._tensorstream_engine
    assert engine.plan.streamed and engine.plan.resident, engine.plan  # both kinds of block: rebuilt torchao tensors
    streamed = _outputs(model)
    assert torch.equal(streamed[0], expected[0]) and torch.equal(streamed[1], expected[1])
    # bytes read per block load: the checkpoint's own bytes for that block (no dequantized copy)
    store = Store.open(engine.store.path)
    assert store.manifest["quantization"]["method"] == "torchao"
    assert "own torchao tensors" in (describe_quantization(store.manifest) or "")
    for entry in store.blocks:
        own = _checkpoint_bytes(torchao_checkpoint, f"{entry.name}.")
        assert entry.data_size <= 1.15 * own, (entry.name, entry.data_size, own)
    stats = tensorstream.stats(model)
    largest = max(_checkpoint_bytes(torchao_checkpoint, f"{name}.") for name in engine.plan.streamed)
    assert stats.bytes_read <= 1.15 * largest * (stats.blocks_run + stats.num_slots)  # + reads in flight
    detached = tensorstream.detach(model)
    weight = detached.model.layers[0].self_attn.q_proj.weight
    resident_weight = resident.model.layers[0].self_attn.q_proj.weight
    assert type(weight) is Int8Tensor and weight.requires_grad == resident_weight.requires_grad
    assert torch.equal(_outputs(detached)[0], expected[0])


def test_a_resident_torchao_model_offloads_bit_exactly(torchao_checkpoint: Path, storage: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(torchao_checkpoint, dtype=torch.bfloat16)
    expected = _outputs(model)
    tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=storage, budget_gb=0.0016, prefetch=1))
    assert model._tensorstream_engine.plan.streamed
    streamed = _outputs(model)
    assert torch.equal(streamed[0], expected[0]) and torch.equal(streamed[1], expected[1])
    store = Store.open(model._tensorstream_engine.store.path)
    records = [json.loads(store.header(entry).metadata.get("rules", "{}")) for entry in store.blocks]
    assert records and all(r["meta"]["class"].endswith(":Int8Tensor") for rec in records for r in rec.values())


def test_a_torchao_checkpoint_with_a_store_kind_is_a_config_error(torchao_checkpoint: Path, storage: Path) -> None:
    with pytest.raises(ConfigError, match="streams its own quantized tensors"):
        tensorstream.reshard(torchao_checkpoint, storage, progress=False, quantize="int8")
