"""What tensorstream says about a pre-quantized checkpoint: the method and bytes it streams (``Plan.describe``,
``tensorstream inspect``, ``tensorstream.stats``), fixes that work when run as printed (no loop), and typed refusals
for GPTQ/AWQ from every entry point (docs/quantization.md, "Pre-quantized checkpoints")."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, LlamaConfig, LlamaForCausalLM

import tensorstream
from helpers.models import budgets, streaming
from helpers.prequantized import FP8_CONFIG, GPTQ_CONFIG, fp8_convert, gptq_convert, tiny_llama, write_quantized
from tensorstream.cli import EXIT_ERROR, EXIT_OK, main
from tensorstream.errors import StaleStoreError, UnsupportedQuantizationError
from tensorstream.prequantized import describe_quantization

IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_quantized(tmp_path_factory.mktemp("fp8"), tiny_llama(), fp8_convert, FP8_CONFIG)


def stores(storage: Path) -> list[Path]:
    return sorted(p for p in storage.iterdir() if not p.name.startswith("."))


def resident_logits(folder: Path, **kwargs: object) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with torch.no_grad():
        return model(IDS).logits


def damage(store: Path) -> None:
    """Cut a block file short (as a full disk or a bad copy would)."""
    block = next((store / "blocks").iterdir())
    block.write_bytes(block.read_bytes()[:100])


def printed_fix(err: BaseException) -> str:
    """The command in backquotes in ``err``'s message."""
    commands = re.findall(r"`(tensorstream [^`]+)`", str(err))
    assert len(commands) == 1, str(err)
    return commands[0]


def run_printed(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Run a printed ``tensorstream ...`` command literally (the console script's own entry point)."""
    argv = shlex.split(command)
    assert argv[0] == "tensorstream"
    assert main(argv[1:]) == EXIT_OK, capsys.readouterr().err
    capsys.readouterr()


# -- tell the user what is streamed -----------------------------------------------------------------------------------


def test_plan_inspect_and_stats_name_the_method_and_the_bytes_per_token(
    fp8_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    storage = tmp_path / "store"
    tensorstream.reshard(fp8_checkpoint, storage, progress=False)
    with caplog.at_level("INFO", logger="tensorstream"):
        model = streaming(fp8_checkpoint, storage, budget_gb=budgets(storage, prefetch=1)["stream_all"], prefetch=1)
    (store,) = stores(storage)
    manifest = json.loads((store / "tensorstream.json").read_text())
    text = describe_quantization(manifest)
    assert text is not None
    assert text.startswith("fp8 (fine-grained, 128x128 blocks): the store holds the checkpoint's float8 weights")
    assert "dequantized per block on the CPU as transformers does" in text
    assert "GB per token with every block streamed" in text and "x the checkpoint's" in text
    assert "larger, since" not in text  # about the checkpoint's own size
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tensorstream plan:")]
    assert plan and "fp8 (fine-grained, 128x128 blocks)" in plan[-1]
    assert "read per pass" in plan[-1] and "once expanded" in plan[-1]  # compact bytes read, bf16 in memory
    with torch.no_grad():
        model(IDS)
        tensorstream.stats(model).reset()  # the steady state: without the reads that filled the pipeline first
        model(IDS)
    stats = tensorstream.stats(model)
    assert stats.quantization == text and "fp8 (fine-grained, 128x128 blocks)" in str(stats)
    total = sum(e["data_size"] for e in manifest["blocks"])
    largest = max(e["data_size"] for e in manifest["blocks"])
    # every block once per pass, plus the read-ahead of the next pass into the free slots, which lands before or
    # after the reset and the reading of the stats as the threads run; fewer when a block is still in its slot from
    # the pass before. Each load reads a block's compact bytes (no more), in flight or done:
    assert 0 < stats.bytes_per_pass <= total + stats.num_slots * largest
    assert stats.bytes_read <= largest * (stats.blocks_loaded + stats.num_slots)
    assert stats.as_dict()["quantization"] == text
    assert main(["inspect", str(store)]) == EXIT_OK
    assert text in capsys.readouterr().out


def test_a_store_larger_than_its_checkpoint_says_why() -> None:
    manifest = {
        "encoding": "fp8",
        "total_bytes": 3_000_000,
        "quantization": {
            "method": "fp8",
            "weight_block_size": [128, 128],
            "checkpoint_bytes": 2_000_000,
            "expanded": {"tensors": 2, "bytes": 1_000_000, "examples": ["model.layers.0.mlp.experts.down_proj"]},
        },
    }
    text = describe_quantization(manifest)
    assert text is not None and "1.50x the checkpoint's" in text
    assert "larger, since 2 tensors (0.001 GB) are stored as the bf16 transformers makes of them" in text
    assert "model.layers.0.mlp.experts.down_proj" in text
    info = {k: v for k, v in manifest["quantization"].items() if k != "expanded"}  # type: ignore[union-attr]
    plain = describe_quantization({**manifest, "encoding": None, "quantization": info})
    assert plain is not None and "larger, since the store holds the dequantized weights" in plain
    assert describe_quantization({"total_bytes": 1}) is None


# -- fixes that work as printed -------------------------------------------------------------------------------------


def test_the_fix_for_a_store_built_with_a_quantization_config_rebuilds_that_store(
    fp8_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "store"
    kwargs = {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    expected = resident_logits(fp8_checkpoint, **kwargs)
    config = tensorstream.Config(device="cpu", storage_path=storage)
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        fp8_checkpoint, device_map="tensorstream", tensorstream_config=config, **kwargs
    )
    load()
    (store,) = stores(storage)
    damage(store)
    with pytest.raises(StaleStoreError) as info:
        load()
    command = printed_fix(info.value)
    # `tensorstream reshard --force` cannot pass the quantization_config, so it would write another store and
    # leave this one damaged: the fix removes it, and the next load rebuilds it
    assert command.startswith("tensorstream cache rm") and "quantization_config" in str(info.value)
    run_printed(command, capsys)
    model = load()
    assert stores(storage) == [store]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


def test_the_fix_for_a_damaged_fp8_moe_store_rebuilds_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.prequantized import fp8_moe_convert, tiny_qwen3_moe

    folder = write_quantized(tmp_path / "moe", tiny_qwen3_moe(experts=8, top_k=4), fp8_moe_convert, FP8_CONFIG)
    expected = resident_logits(folder)
    storage = tmp_path / "store"
    streaming(folder, storage)
    (store,) = stores(storage)
    damage(store)
    with pytest.raises(StaleStoreError) as info:
        streaming(folder, storage)
    command = printed_fix(info.value)
    assert command.startswith("tensorstream reshard --force")
    run_printed(command, capsys)
    model = streaming(folder, storage)
    assert stores(storage) == [store]  # the same store, rebuilt: no loop
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


# -- GPTQ and AWQ: typed refusals from every entry point --------------------------------------------------------------

AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}


@pytest.fixture(scope="module", params=["gptq", "awq"])
def int4_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Refused where gptqmodel is not installed (with it, both stream: tests/test_gptq.py)."""
    from tensorstream.gptq import gptq_available

    if gptq_available(request.param):
        pytest.skip(f"gptqmodel is installed: {request.param} checkpoints stream (tests/test_gptq.py)")
    config = GPTQ_CONFIG if request.param == "gptq" else AWQ_CONFIG
    return write_quantized(tmp_path_factory.mktemp(request.param), tiny_llama(), gptq_convert, config)


def method_of(folder: Path) -> str:
    return str(json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"])


def test_gptq_and_awq_are_refused_by_from_pretrained_with_a_working_fix(int4_checkpoint: Path, tmp_path: Path) -> None:
    method = method_of(int4_checkpoint)
    with pytest.raises(UnsupportedQuantizationError) as info:
        streaming(int4_checkpoint, tmp_path / "store")
    message = str(info.value)
    assert info.value.method == method and f"quantized with {method}," in message
    assert "qzeros" in message  # the reason names the tensors gptqmodel's layers load
    assert "pip install gptqmodel" in message and "quantize='int4'" in message
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_gptq_and_awq_are_refused_by_the_reshard_command(
    int4_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    method = method_of(int4_checkpoint)
    assert main(["reshard", str(int4_checkpoint), str(tmp_path / "store")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: {int4_checkpoint} is quantized with {method},") and "Traceback" not in err
    assert "--quantize int4" in err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_models_are_refused_by_offload(tmp_path: Path, method: str) -> None:
    model = tiny_llama()
    model.config.quantization_config = GPTQ_CONFIG if method == "gptq" else AWQ_CONFIG
    model.hf_quantizer = object()  # as transformers marks a model it loaded through gptqmodel
    with pytest.raises(UnsupportedQuantizationError) as info:
        tensorstream.offload(model, tensorstream.Config(device="cpu", storage_path=tmp_path))
    assert info.value.method == method and f"this LlamaForCausalLM is quantized with {method}," in str(info.value)
    assert "keep it resident (without tensorstream.offload)" in str(info.value)
    assert not any(tmp_path.iterdir())


# -- FP8 weights that are not whole 128x128 blocks: transformers' own load fails or misplaces scales -----------------


def fp8_partial_convert(name: str, tensor: torch.Tensor, block: int = 128) -> dict[str, torch.Tensor]:
    """Block linears as fine-grained FP8 with a ceil-sized scale grid (the last blocks partial), as DeepSeek-V3's
    ``kv_a_proj_with_mqa`` (``[576, 7168]``, ``[5, 56]`` scales) is published."""
    if not (".layers." in name and name.endswith("proj.weight")):
        return {name: tensor}
    rows, cols = tensor.shape
    grid = (-(-rows // block), -(-cols // block))
    padded = torch.zeros(grid[0] * block, grid[1] * block)
    padded[:rows, :cols] = tensor.float()
    blocks = padded.reshape(grid[0], block, grid[1], block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(padded.shape)[:rows, :cols]
    return {name: q.contiguous(), name.replace(".weight", ".weight_scale_inv"): scale}


@pytest.mark.parametrize("intermediate", [320, 192], ids=["grid_does_not_divide", "grid_divides_wrongly"])
def test_fp8_weights_of_partial_blocks_are_refused_naming_the_tensor(tmp_path: Path, intermediate: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=128,
            intermediate_size=intermediate,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=128,
            vocab_size=96,
            max_position_embeddings=64,
        )
    )
    folder = write_quantized(tmp_path / "fp8", model, fp8_partial_convert, FP8_CONFIG)
    if intermediate == 320:  # transformers' own resident load fails: 320 rows over 3 scale rows
        with pytest.raises(RuntimeError, match="conversion of the weights"):
            AutoModelForCausalLM.from_pretrained(folder)
    storage = tmp_path / "store"
    with pytest.raises(UnsupportedQuantizationError, match=r"mlp\.\w+_proj\.weight is \[") as info:
        streaming(folder, storage)
    assert info.value.method == "fp8" and "not a whole number of the checkpoint's 128x128 blocks" in str(info.value)
    assert main(["reshard", str(folder), str(storage)]) == EXIT_ERROR
    assert not storage.exists() or not any(storage.iterdir())
