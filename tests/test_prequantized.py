"""Pre-quantized checkpoints (docs/quantization.md, "Pre-quantized checkpoints").

Every streamed result is compared with transformers' resident load of the *same checkpoint* (never only with
``detach``, which would share a wrong store). Formats not streamed yet are refused with `UnsupportedQuantizationError`
naming the method, before any store is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
)

import tensorstream
from helpers.models import budgets, streaming
from helpers.prequantized import (
    FP8_CONFIG,
    GPTQ_CONFIG,
    MXFP4_CONFIG,
    fp8_blockwise,
    fp8_convert,
    fp8_moe_convert,
    gptq_convert,
    mxfp4_convert,
    tiny_llama,
    tiny_qwen3_moe,
    write_quantized,
)
from tensorstream.encoding import BlockCodec, encode_tensors
from tensorstream.errors import UnsupportedModelError, UnsupportedQuantizationError
from tensorstream.format import aligned_empty, read_data, read_ts_header, save_to_ts
from tensorstream.prequantized import check_loaded, fp8_dequantize, mxfp4_dequantize
from tensorstream.store import Store

IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_quantized(tmp_path_factory.mktemp("fp8"), tiny_llama(), fp8_convert, FP8_CONFIG)


def resident_logits(folder: Path, **kwargs: object) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with torch.no_grad():
        return model(IDS).logits


def only_store(storage: Path) -> Store:
    (path,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    return Store.open(path)


def checkpoint_block_bytes(folder: Path, block: str) -> int:
    header = read_ts_header(folder / "model.safetensors", require_ts=False)
    return sum(info.nbytes for name, info in header.tensors.items() if name.startswith(f"{block}."))


# -- fine-grained FP8: the checkpoint's bytes, dequantized per block as transformers does -----------------------------


def test_fp8_dequantize_is_transformers_arithmetic_bit_for_bit() -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    torch.manual_seed(1)
    weight = torch.randn(256, 384) * 0.05
    q, scale = fp8_blockwise(weight)
    for scales in (scale, scale.to(torch.bfloat16)):
        expected = Fp8Dequantize(None)._dequantize_one(q, scales, output_dtype=torch.bfloat16)
        # whole tensor, the reader thread's pieces (not dividing a block row), pieces of rows, one row: the same bits
        for piece in (1 << 20, 32767, 1000, 1):
            out = torch.empty(256, 384, dtype=torch.bfloat16)
            fp8_dequantize(out, q, scales, piece=piece)
            assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_fp8_codec_expands_the_compact_entries_as_transformers_does(tmp_path: Path) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    torch.manual_seed(2)
    q, scale = fp8_blockwise(torch.randn(256, 128) * 0.05)
    expected = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.bfloat16)
    tensors = {"w": expected, "norm": torch.ones(128, dtype=torch.bfloat16)}
    stored, meta = encode_tensors(tensors, "fp8", parts_of=lambda n, t: {"q": q, "scale": scale} if n == "w" else None)
    assert set(stored) == {"w.__q__", "w.__scale__", "norm"} and stored["w.__q__"].dtype == torch.float8_e4m3fn
    header = save_to_ts(stored, tmp_path / "b.ts", {"encoding": meta}, block="b")
    codec = BlockCodec(header)
    buffer = aligned_empty(header.data_size)
    read_data(header.path, header, buffer)
    for inline in (True, False):
        expanded = torch.empty(codec.expanded_bytes, dtype=torch.uint8)
        codec.decode(buffer, expanded, torch.empty(codec.scratch_bytes, dtype=torch.uint8), inline=inline)
        info = codec.tensors["w"]
        got = expanded[info.start : info.end].view(torch.bfloat16).view(256, 128)
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert header.data_size < 256 * 128 * 2  # float8 + scales: about half the bf16 bytes


@pytest.mark.parametrize(
    ("kind", "parts", "shape"),
    [
        ("fp8", {"q": torch.zeros(256, 128, dtype=torch.float8_e4m3fn), "scale": torch.ones(3, 1)}, (256, 128)),
        ("fp8", {"q": torch.zeros(256, 128, dtype=torch.uint8), "scale": torch.ones(2, 1)}, (256, 128)),
        (
            "mxfp4",
            {"q": torch.zeros(2, 64, 2, 16, dtype=torch.uint8), "scale": torch.zeros(2, 64, 1, dtype=torch.uint8)},
            (2, 64, 64),
        ),
        (
            "mxfp4",
            {"q": torch.zeros(2, 64, 2, 16, dtype=torch.uint8), "scale": torch.zeros(2, 64, 2, dtype=torch.uint8)},
            (2, 32, 64),
        ),
    ],
)
def test_a_damaged_compact_entry_is_a_format_error(
    tmp_path: Path, kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...]
) -> None:
    from tensorstream.errors import FormatError

    weight = torch.zeros(shape, dtype=torch.bfloat16)
    stored, meta = encode_tensors({"w": weight}, kind, parts_of=lambda n, t: parts)
    header = save_to_ts(stored, tmp_path / "b.ts", {"encoding": meta}, block="b")
    with pytest.raises(FormatError, match="'w"):
        BlockCodec(header)


@pytest.mark.parametrize("budget", ["stream_all", "all_resident"])
def test_fp8_checkpoint_streams_its_own_bytes_bit_exact_to_the_resident_load(
    fp8_checkpoint: Path, tmp_path: Path, budget: str
) -> None:
    expected = resident_logits(fp8_checkpoint)  # transformers dequantizes to bf16 on a CPU (with a warning)
    storage = tmp_path / "store"
    tensorstream.reshard(fp8_checkpoint, storage, progress=False)
    model = streaming(fp8_checkpoint, storage, budget_gb=budgets(storage, prefetch=1)[budget], prefetch=1)
    with torch.no_grad():
        got = model(IDS).logits
    assert torch.equal(got, expected)
    assert getattr(model.config, "quantization_config", None) is None  # as the resident load ends up
    store = only_store(storage)
    assert store.kind == "fp8" and store.manifest["quantization"]["method"] == "fp8"
    for entry in store.blocks:  # every block reads about the checkpoint's own bytes for it
        assert entry.data_size <= 1.15 * checkpoint_block_bytes(fp8_checkpoint, entry.name)
        assert "F8_E4M3" in entry.dtypes
    stats = tensorstream.stats(model)
    if budget == "stream_all":
        # bytes read count reads in flight into the slots, not loaded yet when the stats are read
        assert stats.bytes_read <= 1.15 * checkpoint_block_bytes(fp8_checkpoint, "model.layers.0") * (
            stats.blocks_loaded + stats.num_slots
        )
        assert stats.store_kind == "fp8"


def test_a_block_that_would_not_expand_exactly_is_an_error_at_reshard(
    fp8_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorstream.encoding
    from tensorstream.errors import TensorStreamError

    def off_on_the_reader_thread(out: torch.Tensor, *args: object, piece: int) -> None:
        fp8_dequantize(out, *args, piece=piece)  # type: ignore[arg-type]
        if piece < 1 << 20:  # the pieces a reader thread expands in (a bug once skipped rows there)
            out[-1, -1] += 1

    monkeypatch.setattr(tensorstream.encoding, "fp8_dequantize", off_on_the_reader_thread)
    with pytest.raises(TensorStreamError, match="does not expand to the tensor transformers loaded"):
        tensorstream.reshard(fp8_checkpoint, tmp_path, progress=False)


def test_fp8_per_expert_moe_streams_bit_exact_to_the_resident_load(tmp_path: Path) -> None:
    folder = write_quantized(tmp_path / "moe", tiny_qwen3_moe(experts=4, top_k=2), fp8_moe_convert, FP8_CONFIG)
    expected = resident_logits(folder)
    model = streaming(folder, tmp_path / "store")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)
    store = only_store(tmp_path / "store")
    # attention and the experts (fused as transformers fuses them) keep their float8 bytes; norms stay bf16
    assert store.kind == "fp8" and "F8_E4M3" in store.blocks[0].dtypes and "BF16" in store.blocks[0].dtypes


def test_mxfp4_dequantize_is_transformers_arithmetic_bit_for_bit() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    experts, rows, groups, width = 2, 256, 2, 16  # every byte code meets every one of the 256 scales
    blocks = torch.arange(experts * rows * groups * width).remainder(256).to(torch.uint8)
    blocks = blocks.reshape(experts, rows, groups, width)
    scales = torch.arange(experts * rows * groups).remainder(256).to(torch.uint8).reshape(experts, rows, groups)
    for dtype in (torch.bfloat16, torch.float32):
        expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        for piece in (1 << 20, 32767, 100):
            out = torch.empty_like(expected)
            mxfp4_dequantize(out, blocks, scales, piece=piece)
            assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("budget", ["stream_all", "all_resident"])
def test_mxfp4_gpt_oss_streams_its_own_bytes_bit_exact_to_the_resident_load(tmp_path: Path, budget: str) -> None:
    torch.manual_seed(0)
    config = GptOssConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=96,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        layer_types=["full_attention"] * 3,
    )
    folder = write_quantized(tmp_path / "mxfp4", GptOssForCausalLM(config), mxfp4_convert, MXFP4_CONFIG)
    expected = resident_logits(folder)  # dequantized to bf16 without triton/kernels, as here
    storage = tmp_path / "store"
    tensorstream.reshard(folder, storage, progress=False)
    model = streaming(folder, storage, budget_gb=budgets(storage, prefetch=1)[budget], prefetch=1)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)
    store = only_store(storage)
    assert store.kind == "mxfp4" and store.manifest["quantization"]["method"] == "mxfp4"
    for entry in store.blocks:  # the experts' FP4 blocks and scales, not the bf16 transformers makes of them
        assert entry.data_size <= 1.15 * checkpoint_block_bytes(folder, entry.name)
    if budget == "stream_all":
        stats = tensorstream.stats(model)
        # reads may be in flight into every slot (their bytes counted, their loads not yet)
        assert stats.blocks_loaded and stats.bytes_read <= 1.15 * checkpoint_block_bytes(folder, "model.layers.0") * (
            stats.blocks_loaded + stats.num_slots
        )


def test_a_quantization_config_passed_to_from_pretrained_is_part_of_the_fingerprint(
    fp8_checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import FineGrainedFP8Config

    expected = resident_logits(fp8_checkpoint, quantization_config=FineGrainedFP8Config(dequantize=True))
    storage = tmp_path / "store"
    streaming(fp8_checkpoint, storage)
    config = tensorstream.Config(device="cpu", storage_path=storage)
    model = AutoModelForCausalLM.from_pretrained(
        fp8_checkpoint,
        device_map="tensorstream",
        tensorstream_config=config,
        quantization_config=FineGrainedFP8Config(dequantize=True),
    )
    assert len([p for p in storage.iterdir() if not p.name.startswith(".")]) == 2  # a store of its own
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


def test_dequantize_once_stores_the_bf16_weights_and_streams_bit_exact(
    fp8_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``Config(dequantize="once")``: the store holds the bf16 weights transformers dequantizes the FP8 checkpoint
    to (nothing dequantized per pass), under a fingerprint of its own; the same results; its repair passes it again;
    an unquantized checkpoint ignores it (same store)."""
    from tensorstream.cli import main
    from tensorstream.store import repair_command

    expected = resident_logits(fp8_checkpoint)
    compact = Store.open(tensorstream.reshard(fp8_checkpoint, tmp_path / "compact", progress=False))
    storage = tmp_path / "store"
    once = Store.open(tensorstream.reshard(fp8_checkpoint, storage, dequantize="once", progress=False))
    assert once.path.name != compact.path.name and once.kind is None and compact.kind == "fp8"
    for small, large in zip(compact.blocks, once.blocks, strict=True):  # block linears: 2 bytes a value, not 1
        assert 1.6 * small.data_size < large.data_size <= 2.05 * small.data_size
        assert "F8_E4M3" not in large.dtypes
    budget = budgets(storage, prefetch=1)["stream_all"]
    model = streaming(fp8_checkpoint, storage, budget_gb=budget, prefetch=1, dequantize="once")
    assert model._tensorstream_engine.store.path == once.path and model._tensorstream_engine.plan.streamed
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)
    text = tensorstream.stats(model).quantization
    assert "dequantized once when the store was written" in text and "dequantize='once'" in text
    command = repair_command(once.path)
    assert command.endswith("--dequantize once")
    assert main([*command.split()[1:], "--json"]) == 0  # the repair rebuilds this store, not the compact one
    assert json.loads(capsys.readouterr().out)["store"] == str(once.path)
    with pytest.raises(tensorstream.ConfigError, match="dequantize='twice' is not one of 'per_block', 'once'"):
        tensorstream.Config(dequantize="twice")
    plain = tmp_path / "plain"
    tiny_llama().save_pretrained(plain)
    assert tensorstream.reshard(plain, storage, progress=False) == tensorstream.reshard(
        plain, storage, dequantize="once", progress=False
    )


def test_the_offload_of_a_dequantized_fp8_model_is_bit_exact(fp8_checkpoint: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(fp8_checkpoint)
    with torch.no_grad():
        expected = model(IDS).logits
    tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=tmp_path, budget_gb=0.01))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


# -- refusals: typed, naming the method, before any store is written --------------------------------------------------


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_quantized(tmp_path_factory.mktemp("gptq"), tiny_llama(), gptq_convert, GPTQ_CONFIG)


def test_without_gptqmodel_a_gptq_checkpoint_is_refused_not_streamed_wrong(
    gptq_checkpoint: Path, tmp_path: Path
) -> None:
    """Where gptqmodel is installed, GPTQ checkpoints stream bit-exact (tests/test_gptq.py, in `make gptq`'s
    environment); without it, a typed refusal naming the method and the install, before anything is written."""
    from tensorstream.gptq import gptq_available

    if gptq_available():
        pytest.skip("gptqmodel is installed: tests/test_gptq.py streams GPTQ checkpoints")
    header = read_ts_header(gptq_checkpoint / "model.safetensors", require_ts=False)
    assert "model.layers.0.self_attn.q_proj.qzeros" in header.tensors  # GPTQ's published layout
    storage = tmp_path / "store"
    refusal = r"quantized with gptq, which needs gptqmodel.*pip install gptqmodel"
    with pytest.raises(UnsupportedQuantizationError, match=refusal) as info:
        streaming(gptq_checkpoint, storage)
    assert info.value.method == "gptq" and isinstance(info.value, UnsupportedModelError)
    with pytest.raises(UnsupportedQuantizationError, match="gptq"):
        tensorstream.reshard(gptq_checkpoint, storage, progress=False)
    assert not storage.exists() or not any(storage.iterdir())


@pytest.mark.parametrize(
    ("quantization_config", "method"),
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}, "awq"),
        ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig"}}}, "torchao"),
        ({"quant_method": "hqq", "nbits": 4}, "hqq"),
    ],
)
def test_every_other_quantization_method_is_refused_with_its_name(
    tmp_path: Path, quantization_config: dict[str, object], method: str
) -> None:
    from tensorstream.gptq import gptq_available

    if method == "awq" and gptq_available("awq"):
        pytest.skip("gptqmodel is installed: AWQ checkpoints stream (tests/test_gptq.py)")
    folder = tmp_path / "model"
    tiny_llama().to(torch.bfloat16).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match=f"quantized with {method},") as info:
        tensorstream.reshard(folder, tmp_path / "store", progress=False)
    assert info.value.method == method


def test_quantizing_while_loading_is_refused(tmp_path: Path) -> None:
    from transformers import FineGrainedFP8Config

    folder = tmp_path / "model"
    tiny_llama().to(torch.bfloat16).save_pretrained(folder)
    with pytest.raises(UnsupportedQuantizationError, match="quantize='int8'") as info:
        AutoModelForCausalLM.from_pretrained(
            folder,
            device_map="tensorstream",
            tensorstream_config=tensorstream.Config(device="cpu", storage_path=tmp_path / "store"),
            quantization_config=FineGrainedFP8Config(),
        )
    assert info.value.method == "fp8" and not (tmp_path / "store").exists()


def test_an_fp8_layout_transformers_leaves_float8_is_refused_naming_the_tensor() -> None:
    model = torch.nn.Linear(4, 4)
    model.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(UnsupportedQuantizationError, match=r"cannot load this layout resident.*weight stays float8"):
        check_loaded(model, "fp8", "./qwen3-moe-fp8")


def test_offload_of_a_torchao_model_with_state_no_rule_records_is_refused(tmp_path: Path) -> None:
    """Weight-only torchao models offload (tests/test_torchao.py); dynamic activation quantization keeps a
    dataclass of settings on each weight, which a binding rule does not record: refused before anything is written."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = tiny_llama()
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(UnsupportedQuantizationError, match="Int8Tensor that tensorstream cannot store") as info:
        tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=tmp_path))
    assert info.value.method == "Int8Tensor" and not any(tmp_path.iterdir())


def test_inspect_names_the_quantization_and_the_bytes(
    fp8_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorstream.cli import main

    storage = tmp_path / "store"
    tensorstream.reshard(fp8_checkpoint, storage, progress=False)
    assert main(["inspect", str(only_store(storage).path)]) == 0
    out = capsys.readouterr().out
    assert "fp8 (fine-grained, 128x128 blocks): the store holds the checkpoint's float8 weights" in out
    assert "x the checkpoint's" in out
    assert main(["inspect", "--json", str(only_store(storage).path)]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"].startswith("fp8 (fine-grained, 128x128 blocks)")
