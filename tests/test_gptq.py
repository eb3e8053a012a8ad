"""GPTQ checkpoints, streamed in gptqmodel's own layers (docs/quantization.md, "Pre-quantized checkpoints").

Two tiny checkpoints: one quantized by gptqmodel's own API on this CPU (act-order, so ``g_idx`` is a permutation),
one written in the published layout (``tests/helpers/prequantized.py``: v1 ``qzeros`` ``0x77777777``). Every streamed
result is compared with transformers' resident load of that *checkpoint* (through gptqmodel), never only with
``detach``: the bug this guards against (``qzeros`` converted from v1 to v2 twice) gave a store and a detached model
that agreed with each other and not with the checkpoint.

gptqmodel needs torch 2.14.1 or later: these tests run in the environment ``make gptq`` builds, and are skipped
without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets, streaming
from helpers.prequantized import GPTQ_CONFIG, gptq_convert, tiny_llama, write_quantized
from tensorstream.errors import UnsupportedQuantizationError
from tensorstream.format import read_ts_header
from tensorstream.prequantized import describe_quantization
from tensorstream.store import Store

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")
# gptqmodel's QuantizeConfig makes a temporary folder at every GPTQ load (resident ones too) and leaves its removal to
# the garbage collector
pytestmark = pytest.mark.filterwarnings("ignore:Implicitly cleaning up:ResourceWarning")

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 14, 2]])


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published GPTQ layout (4 bits, group 32, v1 ``qzeros``), written tensor by tensor."""
    return write_quantized(
        tmp_path_factory.mktemp("gptq-published"),
        tiny_llama(layers=6, dtype=torch.bfloat16),
        gptq_convert,
        GPTQ_CONFIG,
    )


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint quantized by gptqmodel itself on this CPU (4 bits, group 32, act-order), saved as it publishes."""
    from helpers.tokenizer import save_tokenizer

    # gptqmodel's loader asks for 2 CPU workers and, by default, gets half the cores: 1 on a 2-core machine
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    source = tmp_path_factory.mktemp("gptq-bf16")
    tiny_llama(layers=6, dtype=torch.bfloat16).save_pretrained(source)
    save_tokenizer(source)
    model = GPTQModel.load(str(source), QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=True), device="cpu")
    generator = torch.Generator().manual_seed(1)
    calibration = [
        {"input_ids": torch.randint(4, 96, (1, 32), generator=generator), "attention_mask": torch.ones(1, 32)}
        for _ in range(8)
    ]
    cwd = Path.cwd()
    os.chdir(source)  # gptqmodel writes its quantization log into ./logs
    try:
        model.quantize(calibration, batch_size=1)
    finally:
        os.chdir(cwd)
    folder = tmp_path_factory.mktemp("gptq-native")
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def awq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint quantized with AWQ by gptqmodel on this CPU (4 bits, group 32, GEMM), saved as it publishes."""
    from helpers.tokenizer import save_tokenizer

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import AWQConfig, GPTQModel

    source = tmp_path_factory.mktemp("awq-bf16")
    tiny_llama(layers=6, dtype=torch.bfloat16).save_pretrained(source)
    save_tokenizer(source)
    model = GPTQModel.load(str(source), AWQConfig(bits=4, group_size=32), device="cpu")
    generator = torch.Generator().manual_seed(2)
    calibration = [
        {"input_ids": torch.randint(4, 96, (1, 32), generator=generator), "attention_mask": torch.ones(1, 32)}
        for _ in range(8)
    ]
    cwd = Path.cwd()
    os.chdir(source)  # gptqmodel writes its quantization log into ./logs
    try:
        model.quantize(calibration, batch_size=1)
    finally:
        os.chdir(cwd)
    folder = tmp_path_factory.mktemp("awq-native")
    model.save(str(folder))
    return folder


@pytest.fixture(params=["native", "published", "awq"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def resident(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder)


def logits(model: torch.nn.Module, times: int = 2) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(IDS).logits for _ in range(times)]


def block_bytes(folder: Path, block: str) -> int:
    header = read_ts_header(folder / "model.safetensors", require_ts=False)
    return sum(info.nbytes for name, info in header.tensors.items() if name.startswith(f"{block}."))


def only_store(storage: Path) -> Store:
    (path,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    return Store.open(path)


@pytest.mark.parametrize("backend", ["auto", "posix"])
def test_a_gptq_checkpoint_streams_bit_exact_to_the_resident_load(
    checkpoint: Path, tmp_path: Path, backend: str
) -> None:
    reference = resident(checkpoint)
    expected = logits(reference)  # the second forward too: the CPU kernel repacks the layer in the first
    tokens = reference.generate(IDS, max_new_tokens=6, do_sample=False)
    storage = tmp_path / "store"
    tensorstream.reshard(checkpoint, storage, progress=False)
    store = only_store(storage)
    method = store.manifest["quantization"]["method"]
    assert method == reference.config.quantization_config.quant_method and store.manifest["quantization"]["kept"]
    source = read_ts_header(checkpoint / "model.safetensors", require_ts=False)
    for entry in store.blocks:  # the checkpoint's own tensors, qzeros unconverted (v1)
        assert entry.data_size <= 1.15 * block_bytes(checkpoint, entry.name)
        header = read_ts_header(store.file(entry))
        zeros = f"{entry.name}.self_attn.q_proj.qzeros"
        assert source.tensors[zeros].nbytes == header.tensors[f"{zeros}.__data__"].nbytes
    model = streaming(checkpoint, storage, budget_gb=budgets(storage)["stream_all"], backend=backend)
    got = logits(model)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    stats = tensorstream.stats(model)
    assert stats.streamed_blocks == len(store.blocks) and stats.resident_blocks == 0
    # reads may be in flight into every slot (their bytes counted, their loads not yet)
    assert stats.blocks_loaded > 0 and stats.bytes_read <= 1.15 * block_bytes(checkpoint, "model.layers.0") * (
        stats.blocks_loaded + stats.num_slots
    )
    assert torch.equal(model.generate(IDS, max_new_tokens=6, do_sample=False), tokens)
    layer = model.model.layers[-1].self_attn.q_proj
    assert type(layer) is type(reference.model.layers[-1].self_attn.q_proj)  # gptqmodel's kernel, as selected
    assert type(layer.qweight).__name__ == "StreamedParameter"  # between forwards: nothing converted is kept
    assert type(model.config.quantization_config) is type(reference.config.quantization_config)  # as loaded
    assert str(describe_quantization(store.manifest)).startswith(f"{method}: ")


def test_the_published_v1_zero_points_are_converted_once_per_forward(published: Path, tmp_path: Path) -> None:
    """The store holds the checkpoint's v1 ``qzeros`` (``0x77777777``); each forward computes on gptqmodel's v2
    (``0x88888888``), as the resident layer does: converted once, never twice (the bug this replaces)."""
    reference = resident(published).model.layers[0].self_attn.q_proj
    assert int(reference.qzeros.flatten()[0]) & 0xFFFFFFFF == 0x88888888  # before its first forward
    storage = tmp_path / "store"
    model = streaming(published, storage, budget_gb=0.0006)
    store = only_store(storage)
    entry = next(e for e in store.blocks if e.name == "model.layers.0")
    stored = tensorstream.load_ts(store.file(entry))["model.layers.0.self_attn.q_proj.qzeros.__data__"]
    assert int(stored.flatten()[0]) & 0xFFFFFFFF == 0x77777777
    seen: list[int] = []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(int(module.qzeros.flatten()[0])))
    try:
        logits(model)
    finally:
        handle.remove()
    assert [v & 0xFFFFFFFF for v in seen] == [0x88888888, 0x88888888]
    assert int(stored.flatten()[0]) & 0xFFFFFFFF == 0x77777777  # the store's bytes are never written


def test_checkpoint_tensors_are_cast_to_the_layer_buffers_dtype_as_transformers_loads_them(
    published: Path, tmp_path: Path
) -> None:
    """transformers casts each checkpoint tensor to the dtype of the buffer it loads it into: ``scales`` saved in bf16
    become the layer's fp16. The store keeps the checkpoint's bf16 bytes; each forward casts them the same way."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bf16-scales"
    shutil.copytree(published, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors = {k: v.to(torch.bfloat16) if k.endswith(".scales") else v for k, v in tensors.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    reference = resident(folder)
    assert reference.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16
    expected = logits(reference)
    model = streaming(folder, tmp_path / "store", budget_gb=0.0006)
    seen: list[torch.dtype] = []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.scales.dtype))
    try:
        got = logits(model)
    finally:
        handle.remove()
    assert seen == [torch.float16, torch.float16]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_streamed_layer_called_outside_its_block_is_refused_and_the_model_still_exact(
    published: Path, tmp_path: Path
) -> None:
    """Outside its block's forward a layer holds placeholders: calling it alone is a typed error, and nothing of it
    changes (the next forward of the model is still the resident load's)."""
    from tensorstream.errors import UnsupportedOperationError

    expected = logits(resident(published), 1)[0]
    storage = tmp_path / "store"
    tensorstream.reshard(published, storage, progress=False)
    model = streaming(published, storage, budget_gb=budgets(storage)["stream_all"])
    assert tensorstream.stats(model).resident_blocks == 0
    with pytest.raises(UnsupportedOperationError, match="called on its own"), torch.no_grad():
        model.model.layers[0].self_attn.q_proj(torch.zeros(1, 128, dtype=torch.bfloat16))
    assert torch.equal(logits(model, 1)[0], expected)


def test_a_gptq_checkpoint_with_resident_blocks_and_detached_is_bit_exact(native: Path, tmp_path: Path) -> None:
    expected = logits(resident(native))
    storage = tmp_path / "store"
    tensorstream.reshard(native, storage, progress=False)
    model = streaming(native, storage, budget_gb=budgets(storage, prefetch=1)["some_resident"], prefetch=1)
    assert tensorstream.stats(model).resident_blocks >= 1 and tensorstream.stats(model).streamed_blocks >= 1
    got = logits(model)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    detached = tensorstream.detach(model)
    got = logits(detached)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_offload_of_a_loaded_gptq_model_is_refused_with_a_fix_that_works(published: Path, tmp_path: Path) -> None:
    """A loaded GPTQ model holds converted zero points (and, after a forward, repacked weights): refused, naming the
    fix, which streams the checkpoint bit-exact (the test above)."""
    model = resident(published)
    config = tensorstream.Config(device="cpu", storage_path=tmp_path / "store", budget_gb=0.0006)
    with pytest.raises(UnsupportedQuantizationError, match="device_map='tensorstream'") as info:
        tensorstream.offload(model, config)
    assert info.value.method == "gptq"
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    expected = logits(model, 1)[0]
    assert torch.equal(logits(streaming(published, tmp_path / "fix", budget_gb=0.0006), 1)[0], expected)


def test_without_gptqmodel_a_gptq_checkpoint_is_refused_naming_the_install(
    published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorstream.prequantized as prequantized

    monkeypatch.setattr(prequantized, "gptq_available", lambda method: False)
    with pytest.raises(UnsupportedQuantizationError, match="pip install gptqmodel optimum") as info:
        streaming(published, tmp_path / "store")
    assert info.value.method == "gptq"
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_a_quantized_head_is_refused_naming_it(tmp_path: Path) -> None:
    """GPTQ's ``lm_head=True`` quantizes the head too: tensorstream streams GPTQ layers inside blocks only."""

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name != "lm_head.weight":
            return gptq_convert(name, tensor)
        return {
            key.replace("head.layers.proj", "lm_head"): t
            for key, t in gptq_convert("head.layers.proj.weight", tensor).items()
        }

    folder = write_quantized(
        tmp_path / "model", tiny_llama(layers=6, dtype=torch.bfloat16), convert, {**GPTQ_CONFIG, "lm_head": True}
    )
    with pytest.raises(UnsupportedQuantizationError, match=r"lm_head\.qweight") as info:
        streaming(folder, tmp_path / "store")
    assert info.value.method == "gptq"
