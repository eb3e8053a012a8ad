"""Pre-quantized checkpoints transformers keeps quantized: streamed in the method's own layers (docs/quantization.md,
"Pre-quantized checkpoints").

Each checkpoint is made with the library's own API (transformers' ``BitsAndBytesConfig`` then ``save_pretrained``),
and every streamed result is compared with transformers' resident load of that *checkpoint* (never only with
``detach``, which would share a wrong store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import tensorstream
from helpers.models import budgets, streaming
from helpers.prequantized import tiny_llama
from tensorstream.errors import FormatError, UnsupportedQuantizationError
from tensorstream.format import read_ts_header
from tensorstream.prequantized import describe_quantization
from tensorstream.store import Store

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])

#: bitsandbytes' formats: 4-bit NF4 with double quantization (the QLoRA default), 4-bit FP4, 8-bit (LLM.int8()).
BNB = {
    "nf4": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
    },
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bf16")
    tiny_llama(layers=6, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(BNB))
def bnb_checkpoint(
    request: pytest.FixtureRequest, bf16_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A checkpoint quantized by bitsandbytes through transformers, saved as it is published."""
    folder = tmp_path_factory.mktemp(f"bnb-{request.param}")
    quantization = BitsAndBytesConfig(**BNB[request.param])
    model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, quantization_config=quantization, device_map="cpu")
    model.save_pretrained(folder)
    return folder


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


def bound_weights(model: torch.nn.Module) -> dict[str, Any]:
    """What the streamed block's bitsandbytes layers compute on, captured during a forward."""
    seen: dict[str, Any] = {}
    layer = model.model.layers[-1]

    def capture(module: torch.nn.Module, args: Any) -> None:
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        seen[type(module).__name__] = {
            "class": type(weight).__name__,
            "quant_state": state is not None and state.absmax is not None,
            "CB": getattr(weight, "CB", None) is not None and weight.CB.data_ptr() == weight.data_ptr(),
            "SCB": getattr(weight, "SCB", None) is not None,
        }

    handle = layer.self_attn.q_proj.register_forward_pre_hook(capture)
    try:
        logits(model, 1)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("backend", ["auto", pytest.param("posix", marks=pytest.mark.slow)])
def test_a_bitsandbytes_checkpoint_streams_its_own_bytes_bit_exact_to_the_resident_load(
    bnb_checkpoint: Path, tmp_path: Path, backend: str
) -> None:
    expected = logits(resident(bnb_checkpoint))  # the second forward too: bitsandbytes changes its layers in the first
    storage = tmp_path / "store"
    tensorstream.reshard(bnb_checkpoint, storage, progress=False)
    store = only_store(storage)
    method = store.manifest["quantization"]["method"]
    assert method in ("bitsandbytes_4bit", "bitsandbytes_8bit") and store.manifest["quantization"]["kept"]
    for entry in store.blocks:  # the checkpoint's own tensors, block by block
        assert entry.data_size <= 1.15 * block_bytes(bnb_checkpoint, entry.name)
    model = streaming(bnb_checkpoint, storage, budget_gb=budgets(storage)["stream_all"], backend=backend)
    assert torch.equal(logits(model)[0], expected[0]) and torch.equal(logits(model)[1], expected[1])
    stats = tensorstream.stats(model)
    # reads may be in flight into every slot (their bytes counted, their loads not yet)
    assert stats.blocks_loaded > 0 and stats.bytes_read <= 1.15 * block_bytes(bnb_checkpoint, "model.layers.0") * (
        stats.blocks_loaded + stats.num_slots
    )
    layer = bound_weights(model)
    if method == "bitsandbytes_4bit":
        assert layer == {"Linear4bit": {"class": "Params4bit", "quant_state": True, "CB": False, "SCB": False}}
    else:
        assert layer == {"Linear8bitLt": {"class": "Int8Params", "quant_state": False, "CB": True, "SCB": True}}
    assert model.config.quantization_config.quant_method == "bitsandbytes"  # as transformers' load leaves it
    placeholder = model.model.layers[-1].self_attn.q_proj.weight
    assert type(placeholder).__name__ == "StreamedParameter"  # between forwards: the resident parameter's shape
    assert placeholder.shape == resident(bnb_checkpoint).model.layers[-1].self_attn.q_proj.weight.shape
    assert str(describe_quantization(store.manifest)).startswith(f"{method}: ")


def test_a_bitsandbytes_checkpoint_with_resident_blocks_is_bit_exact(bnb_checkpoint: Path, tmp_path: Path) -> None:
    expected = logits(resident(bnb_checkpoint), 1)[0]
    storage = tmp_path / "store"
    tensorstream.reshard(bnb_checkpoint, storage, progress=False)
    model = streaming(bnb_checkpoint, storage, budget_gb=budgets(storage)["some_resident"])
    assert torch.equal(logits(model, 1)[0], expected)
    assert tensorstream.stats(model).resident_blocks >= 1


def test_the_offload_of_a_bitsandbytes_model_is_bit_exact(bnb_checkpoint: Path, tmp_path: Path) -> None:
    expected = logits(resident(bnb_checkpoint))
    model = resident(bnb_checkpoint)
    config = tensorstream.Config(device="cpu", storage_path=tmp_path, budget_gb=0.0006, prefetch=1)
    model = tensorstream.offload(model, config)
    assert tensorstream.stats(model).streamed_blocks >= 3
    assert torch.equal(logits(model)[0], expected[0]) and torch.equal(logits(model)[1], expected[1])


def test_offload_after_a_cpu_forward_of_a_4bit_model_is_refused_or_exact(
    bf16_checkpoint: Path, tmp_path: Path
) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward on a CPU with AVX512-BF16, and its
    state_dict undoes that only approximately: refused there, with a fix that works as printed."""
    from tensorstream.bnb import cpu_packed

    quantization = BitsAndBytesConfig(**BNB["nf4"])
    model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, quantization_config=quantization, device_map="cpu")
    expected = logits(model, 1)[0]
    config = tensorstream.Config(device="cpu", storage_path=tmp_path, budget_gb=0.0006, prefetch=1)
    if cpu_packed(model) is None:  # no AVX512-BF16 here: nothing was repacked
        assert torch.equal(logits(tensorstream.offload(model, config), 1)[0], expected)
        return
    with pytest.raises(UnsupportedQuantizationError, match="before the model's first forward") as info:
        tensorstream.offload(model, config)
    assert info.value.method == "bitsandbytes_4bit" and not any(tmp_path.iterdir())
    fresh = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, quantization_config=quantization, device_map="cpu")
    assert torch.equal(logits(tensorstream.offload(fresh, config), 1)[0], expected)  # the fix, as printed


def test_a_bitsandbytes_config_over_unquantized_weights_is_a_format_error(
    bf16_checkpoint: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(bf16_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="no bitsandbytes quantization state"):
        tensorstream.reshard(folder, tmp_path / "store", progress=False)


# -- compressed-tensors: int4/int8 pack-quantized and FP8 float-quantized, decompressed per block ---------------------

#: llm-compressor's weight-only schemes: W4A16 (int4, groups of 128), W8A16 (int8 per channel), FP8 per channel.
CT = {
    "w4a16": (
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
        "pack-quantized",
    ),
    "w8a16": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "pack-quantized"),
    "fp8": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, "float-quantized"),
}


def write_compressed(
    folder: Path, weights: dict[str, Any], fmt: str, activations: dict[str, Any] | None = None
) -> Path:
    """A checkpoint in compressed-tensors' published layout, made with its own API: the scheme applied, min-max
    scales (``calculate_qparams``, as an observer would give), then ``ModelCompressor.compress_model`` and
    ``save_pretrained`` with the compressor's config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_llama(layers=6, hidden=256, dtype=torch.bfloat16)
    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=args,
        input_activations=None if activations is None else QuantizationArgs(**activations),
    )
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status=QuantizationStatus.FROZEN
    )
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.detach().float()
            groups = w.view(w.shape[0], -1, args.group_size) if args.group_size else w.unsqueeze(1)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype).view_as(module.weight_scale))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.view_as(module.weight_zero_point))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    return folder


@pytest.fixture(scope="module", params=list(CT))
def ct_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("compressed_tensors")
    weights, fmt = CT[request.param]
    return write_compressed(tmp_path_factory.mktemp(f"ct-{request.param}"), weights, fmt)


@pytest.mark.parametrize("backend", ["auto", pytest.param("posix", marks=pytest.mark.slow)])
def test_a_compressed_tensors_checkpoint_streams_its_compact_bytes_bit_exact_to_the_resident_load(
    ct_checkpoint: Path, tmp_path: Path, backend: str
) -> None:
    expected = logits(resident(ct_checkpoint))  # decompressed by transformers' hook at the first forward
    storage = tmp_path / "store"
    tensorstream.reshard(ct_checkpoint, storage, progress=False)
    store = only_store(storage)
    assert store.kind == "compressed-tensors" and store.manifest["quantization"]["method"] == "compressed-tensors"
    for entry in store.blocks:  # the checkpoint's compact tensors, block by block
        assert entry.data_size <= 1.15 * block_bytes(ct_checkpoint, entry.name)
    model = streaming(ct_checkpoint, storage, budget_gb=budgets(storage)["stream_all"], backend=backend)
    got = logits(model)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    stats = tensorstream.stats(model)
    # reads may be in flight into every slot (their bytes counted, their loads not yet)
    assert stats.streamed_blocks >= 4 and stats.bytes_read <= 1.15 * block_bytes(ct_checkpoint, "model.layers.0") * (
        stats.blocks_loaded + stats.num_slots
    )
    assert "decompressed to plain weights as each block loads with compressed-tensors' own function" in str(
        describe_quantization(store.manifest)
    )


def test_a_compressed_tensors_loading_attribute_is_applied_and_part_of_the_fingerprint(tmp_path: Path) -> None:
    """``CompressedTensorsConfig(dequantize=True)`` (formerly ``run_compressed=False``): transformers decompresses at
    load instead of at the first forward, to the same weights; the streamed model equals that load, from its own
    store."""
    pytest.importorskip("compressed_tensors")
    import warnings

    from transformers import CompressedTensorsConfig

    folder = write_compressed(tmp_path / "ct", *CT["w4a16"])
    with warnings.catch_warnings():  # transformers: "loading attributes ... will be overwritten"
        warnings.simplefilter("ignore", UserWarning)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    expected = logits(loaded, 1)[0]
    storage = tmp_path / "store"
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=0.0046)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        device_map="tensorstream",
        tensorstream_config=cfg,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    )
    assert torch.equal(logits(model, 1)[0], expected)
    AutoModelForCausalLM.from_pretrained(folder, device_map="tensorstream", tensorstream_config=cfg)
    assert len([p for p in storage.iterdir() if not p.name.startswith(".")]) == 2  # two fingerprints


def test_a_compressed_tensors_scheme_quantizing_activations_is_refused_with_a_fix_that_works(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    folder = write_compressed(tmp_path / "w8a8", weights, "int-quantized", activations)
    with pytest.raises(UnsupportedQuantizationError, match="quantizes activations too") as info:
        streaming(folder, tmp_path / "store")
    assert info.value.method == "compressed-tensors" and not any((tmp_path / "store").glob("*/tensorstream.json"))
    assert "without device_map='tensorstream'" in str(info.value)
    logits(resident(folder), 1)  # the fix, as printed: transformers runs it resident


def test_a_compressed_tensors_config_that_is_not_one_is_a_format_error(bf16_checkpoint: Path, tmp_path: Path) -> None:
    import json
    import shutil

    pytest.importorskip("compressed_tensors")
    folder = tmp_path / "model"
    shutil.copytree(bf16_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="not a compressed-tensors config"):
        tensorstream.reshard(folder, tmp_path / "store", progress=False)


def test_quantizing_with_bitsandbytes_while_loading_is_refused_with_a_fix_that_works(
    bf16_checkpoint: Path, tmp_path: Path
) -> None:
    quantization = BitsAndBytesConfig(**BNB["nf4"])
    config = tensorstream.Config(device="cpu", storage_path=tmp_path / "store")
    with pytest.raises(UnsupportedQuantizationError, match="without device_map='tensorstream'") as info:
        AutoModelForCausalLM.from_pretrained(
            bf16_checkpoint, device_map="tensorstream", tensorstream_config=config, quantization_config=quantization
        )
    assert info.value.method == "bitsandbytes_4bit" and not (tmp_path / "store").exists()
    AutoModelForCausalLM.from_pretrained(bf16_checkpoint, quantization_config=quantization, device_map="cpu")
