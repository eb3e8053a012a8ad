"""Store kinds (docs/quantization.md): quantized stores bit-exact to their own reference, lossless stores to the model.

A quantized store computes with other weights than the checkpoint's, by design; what must hold exactly is that
the stream, the blocks kept resident and ``tensorstream.detach`` all compute with the same weights (one expansion
function), and that those weights are what torchao's ``dequantize_affine`` gives for the stored values. A lossless
store must give back the checkpoint's exact bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.attacks import rewrite_header
from helpers.models import budgets, streaming
from helpers.sweep import sweep
from tensorstream.compact import as_packed, quantize_weight
from tensorstream.encoding import BlockCodec, encode_tensors, store_kind
from tensorstream.errors import (
    BackendUnavailableError,
    ConfigError,
    CorruptFileError,
    FormatError,
    StaleStoreError,
)
from tensorstream.format import FORMAT_VERSION, aligned_empty, read_data, read_ts_header, save_to_ts
from tensorstream.store import MANIFEST_NAME, Store

KINDS = ["int8", "int4", "lossless"]


def kind_config(kind: str) -> dict[str, str]:
    return {"compression": kind} if kind == "lossless" else {"quantize": kind}


def expand_file(path: Path) -> tuple[BlockCodec, torch.Tensor]:
    header = read_ts_header(path)
    codec = BlockCodec(header)
    buffer = aligned_empty(header.data_size)
    read_data(header.path, header, buffer)
    return codec, codec.expand(buffer)


def tensor(codec: BlockCodec, data: torch.Tensor, name: str) -> torch.Tensor:
    info = codec.tensors[name]
    return data[info.start : info.end].view(info.torch_dtype).view(info.shape)


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "attn.weight": torch.randn(96, 256, dtype=torch.bfloat16) * 0.02,
        "attn.bias": torch.randn(96, dtype=torch.bfloat16),
        "experts.weight": torch.randn(4, 48, 128, dtype=torch.float16),
        "fp32.weight": torch.randn(64, 192, dtype=torch.float32),
        "odd.weight": torch.randn(64, 100, dtype=torch.bfloat16),  # no group divides 100: kept as it is
        "steps": torch.arange(10),
    }


# -- the encoding itself ---------------------------------------------------------------------------------------------


def torchao_reference(model: nn.Module, kind: str, prefixes: tuple[str, ...]) -> nn.Module:
    """``model`` with the linear weights under ``prefixes`` quantized resident by torchao, as a ``kind`` store holds
    them: ``Int8WeightOnlyConfig`` (its tensors bound to the int8 kernel, `as_packed`) or
    ``PrototypeInt4WeightOnlyConfig(group_size=64)`` (tinygemm's CPU kernel)."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    starts = tuple(f"{p}." for p in prefixes)
    config = Int8WeightOnlyConfig() if kind == "int8" else PrototypeInt4WeightOnlyConfig(group_size=64)
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and f"{fqn}.".startswith(starts))
    if kind == "int8":
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(as_packed(module.weight), requires_grad=False)
    return model


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_weight_is_what_torchao_makes_of_it(weights: dict[str, torch.Tensor], kind: str) -> None:
    """The store holds torchao's quantized values and scales (int8 per output channel, int4 in groups of 64), and
    they compute what torchao's resident quantized linear computes, bit for bit."""
    weight = weights["attn.weight"]
    ours = quantize_weight(weight, kind)
    assert ours is not None and quantize_weight(weights["attn.bias"], kind) is None
    layer = nn.Linear(256, 96, bias=False, dtype=torch.bfloat16)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    expected = torchao_reference(nn.Sequential(layer), kind, ("0",))[0].weight
    assert type(ours) is type(expected)
    names, _ = ours.__tensor_flatten__()
    for name in names:
        assert torch.equal(getattr(ours, name), getattr(expected, name)), name
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(nn.functional.linear(x, ours), nn.functional.linear(x, expected))
    dense = nn.functional.linear(torch.eye(256, dtype=torch.bfloat16), ours).T  # the weight the kernel computes with
    error = ((dense.float() - weight.float()).norm() / weight.float().norm()).item()
    assert error < (0.02 if kind == "int8" else 0.15)


def test_lossless_gives_back_the_exact_bytes(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    weights["nan.weight"] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40] * 300, dtype=torch.bfloat16)
    stored, meta = encode_tensors(weights, "lossless")
    assert set(json.loads(meta)["tensors"]) == {"attn.weight", "experts.weight", "odd.weight", "nan.weight"}
    path = tmp_path / "b.ts"
    header = save_to_ts(stored, path, {"encoding": meta}, block="b")
    codec, data = expand_file(path)
    for name, original in weights.items():
        got = tensor(codec, data, name)
        assert torch.equal(got.reshape(-1).view(torch.uint8), original.reshape(-1).view(torch.uint8)), name
    assert header.data_size < codec.expanded_bytes  # the random bf16 weights' high bytes compress
    assert header.metadata["format_version"] == "2"


def test_store_kind_settings() -> None:
    assert store_kind(None, None) is None and store_kind("int4", None) == "int4"
    with pytest.raises(ConfigError, match="cannot be combined"):
        tensorstream.Config(quantize="int8", compression="lossless")
    with pytest.raises(ConfigError, match="not a scheme"):
        tensorstream.Config(quantize="int3")
    config = tensorstream.Config.from_env({"TENSORSTREAM_QUANTIZE": "int4", "TENSORSTREAM_COMPRESSION": "none"})
    assert (config.quantize, config.compression, config.kind) == ("int4", None, "int4")


def test_missing_codec_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch, weights: dict[str, Any]) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(BackendUnavailableError, match=r"tensorstream\[quantize\]"):
        quantize_weight(weights["attn.weight"], "int8")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(BackendUnavailableError, match=r"tensorstream\[compression\]"):
        encode_tensors(weights, "lossless")


# -- hostile files: a store is untrusted input ------------------------------------------------------------------------


def _encoded(tmp_path: Path, weights: dict[str, torch.Tensor], kind: str) -> Path:
    stored, meta = encode_tensors(weights, kind)
    path = tmp_path / f"{kind}.ts"
    save_to_ts(stored, path, {"encoding": meta}, block="b")
    return path


def _edit_encoding(path: Path, change: Any) -> None:
    def mutate(header: dict[str, Any]) -> None:
        meta = json.loads(header["__metadata__"]["encoding"])
        change(meta)
        header["__metadata__"]["encoding"] = json.dumps(meta)

    rewrite_header(path, mutate)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("lossless", lambda m: m.update(kind="int5"), "no known store kind"),
        ("lossless", lambda m: m.update(kind="int8"), "no known store kind"),  # the first int8 layout: not read
        ("lossless", lambda m: m["tensors"]["attn.weight"].update(shape=[96, 128]), "expected"),
        ("lossless", lambda m: m["tensors"].pop("attn.weight"), "belongs to no encoded tensor"),
        ("lossless", lambda m: m["tensors"].update(ghost=m["tensors"]["attn.weight"]), "is missing"),
        ("lossless", lambda m: m["tensors"]["attn.weight"].update(dtype="F32"), "16-bit"),
    ],
)
def test_inconsistent_encodings_are_format_errors(
    tmp_path: Path, weights: dict[str, torch.Tensor], kind: str, change: Any, message: str
) -> None:
    path = _encoded(tmp_path, weights, kind)
    _edit_encoding(path, change)
    with pytest.raises(FormatError, match=message) as caught:
        BlockCodec(read_ts_header(path))
    assert str(path) in str(caught.value)


def test_version_and_encoding_must_agree(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    path = _encoded(tmp_path, weights, "lossless")
    rewrite_header(path, lambda h: h["__metadata__"].update(format_version="1"))  # an old reader would misread it
    with pytest.raises(FormatError, match="does not match its encoding"):
        read_ts_header(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(rule="pickle"), "does not know"),
        (lambda r: r["meta"].update({"class": "os:system"}), "is invalid"),  # never imported
        (lambda r: r["meta"].update(stride="x"), "is invalid"),
        (lambda r: r.update(parts=["qdata", "ghost"]), "is missing"),
        (lambda r: r.update(shape=[-1]), "malformed"),
    ],
)
def test_inconsistent_rule_records_are_format_errors(tmp_path: Path, change: Any, message: str) -> None:
    """A store is untrusted input: a rule record names only registered rules, allowed classes and parts it holds."""
    from tensorstream.rules import flatten_tensors

    torch.manual_seed(0)
    weight = quantize_weight(torch.randn(64, 256, dtype=torch.bfloat16), "int8")
    assert weight is not None
    entries, rules = flatten_tensors({"w": weight})
    path = tmp_path / "b.ts"
    save_to_ts(entries, path, {"rules": rules or ""}, block="b")
    assert set(BlockCodec(read_ts_header(path)).rules) == {"w"}

    def mutate(header: dict[str, Any]) -> None:
        records = json.loads(header["__metadata__"]["rules"])
        change(records["w"])
        header["__metadata__"]["rules"] = json.dumps(records)

    rewrite_header(path, mutate)
    with pytest.raises(FormatError, match=message):
        BlockCodec(read_ts_header(path))


def test_a_zstd_frame_of_the_wrong_size_is_corrupt(tmp_path: Path) -> None:
    """A frame that expands to more (or fewer) values than its tensor has: an error, never a partial tensor."""
    import zstandard

    torch.manual_seed(0)
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    stored, meta = encode_tensors({"w": weight}, "lossless")
    frame = zstandard.ZstdCompressor().compress(bytes(64 * 64 + 1))  # one byte too many
    stored["w.__hi__"] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
    path = tmp_path / "b.ts"
    save_to_ts(stored, path, {"encoding": meta}, block="b")
    with pytest.raises(CorruptFileError, match="do not expand"):
        expand_file(path)


# -- streaming: the same weights everywhere ---------------------------------------------------------------------------


def _outputs(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        args = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        return model(ids).logits, model.generate(ids, **args)


#: layout-backend-kind-family; the fast cases cover every kind, layout, backend and family once or more.
STREAM_CASES = sweep(
    [[("stream_all", "posix"), ("some_resident", "posix"), ("stream_all", "mmap")], KINDS, ["llama", "gpt2"]],
    fast={
        ("stream_all", "posix", "int8", "llama"),
        ("some_resident", "posix", "int4", "gpt2"),
        ("stream_all", "mmap", "lossless", "gpt2"),
        ("stream_all", "mmap", "int4", "llama"),
    },
)


@pytest.mark.parametrize(("layout", "backend", "kind", "family"), STREAM_CASES)
def test_streamed_equals_its_detached_reference(
    model_dirs: dict[str, Path], storage: Path, family: str, kind: str, layout: str, backend: str
) -> None:
    """``backend="mmap"``: blocks expanded straight from mappings of their files, the arena without compact bytes."""
    source = model_dirs[family]  # float32 checkpoints, resharded to bf16 (what lossless compression is for)
    path = tensorstream.reshard(source, storage, progress=False, dtype="bf16", **kind_config(kind))
    budget = budgets(storage, 1)[layout]
    if backend == "mmap":  # the same number of blocks in flight takes less memory: no compact bytes
        store = Store.open(path)
        codec = store.codec(store.blocks[0])
        budget -= 2 * (codec.region_bytes - codec.mapped_region_bytes) / 1e9
    model = streaming(
        source, storage, budget_gb=budget, prefetch=1, backend=backend, dtype="bf16", **kind_config(kind)
    )
    engine = model._tensorstream_engine
    assert engine.store.kind == kind and engine.plan.streamed
    # a lossless block expands from the mapping; a quantized one is bound as views of it (no expansion)
    assert (engine.expand_mapped, engine.mapped) == (
        (kind == "lossless", kind != "lossless") if backend == "mmap" else (False, False)
    )
    assert bool(engine.plan.resident) == (layout == "some_resident") and engine.plan.num_slots == 2
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, tokens = _outputs(model, ids)
    again = _outputs(model, ids)  # every block read and expanded again: the same bits
    assert torch.equal(again[0], logits) and torch.equal(again[1], tokens)
    stats = tensorstream.stats(model)
    assert stats.bytes_read > 0
    reference = tensorstream.detach(model)
    ref_logits, ref_tokens = _outputs(reference, ids)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    with torch.inference_mode():
        original_logits = original(ids).logits
    if kind == "lossless":
        assert torch.equal(logits, original_logits)
        for name, param in original.state_dict().items():
            assert torch.equal(reference.state_dict()[name], param), name
    else:  # the original quantized resident by torchao (gpt2's Conv1D layers are not linear: nothing to quantize)
        units = tuple(entry.name for entry in engine.store.blocks)
        quantized = torchao_reference(original, kind, units)
        assert torch.equal(_outputs(quantized, ids)[0], logits) and torch.equal(_outputs(quantized, ids)[1], tokens)
        assert torch.equal(logits, original_logits) == (family == "gpt2")
        assert (logits.float() - original_logits.float()).abs().max() < (0.1 if kind == "int8" else 0.5)
        if family != "gpt2":  # detach gives the resident quantized model
            layer = next(
                m for m in reference.modules() if isinstance(m, nn.Linear) and type(m.weight) is not nn.Parameter
            )
            assert not layer.weight.requires_grad


@pytest.mark.parametrize("kind", ["int4", "lossless"])
def test_offload_builds_the_store_kind_and_keeps_the_reference(
    model_dirs: dict[str, Path], storage: Path, kind: str
) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"], dtype=torch.bfloat16)
    config = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=0.002, prefetch=1, **kind_config(kind))
    ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        original = model(ids).logits
    tensorstream.offload(model, config)
    assert model._tensorstream_engine.store.kind == kind
    with torch.inference_mode():
        streamed = model(ids).logits
    reference = tensorstream.detach(model)
    with torch.inference_mode():
        assert torch.equal(reference(ids).logits, streamed)
    assert torch.equal(streamed, original) == (kind == "lossless")


def test_an_int4_store_packed_for_another_cpu_is_refused(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4's packed layout depends on the CPU's vector width: bound elsewhere it would compute wrong numbers."""
    import tensorstream.rules

    tensorstream.reshard(model_dirs["qwen2"], storage, progress=False, quantize="int4")
    config = tensorstream.Config(
        device="cpu", storage_path=storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1, quantize="int4"
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dirs["qwen2"], device_map="tensorstream", tensorstream_config=config
    )
    assert model._tensorstream_engine.plan.streamed
    monkeypatch.setattr(tensorstream.rules, "int4_layout", lambda: "ANOTHER")
    with pytest.raises(StaleStoreError, match="packed for"):
        tensorstream.detach(model)  # binds every streamed block


def test_each_kind_is_its_own_store(model_dirs: dict[str, Path], storage: Path) -> None:
    plain = tensorstream.reshard(model_dirs["llama"], storage, progress=False, dtype="bf16")
    stores = {
        kind: tensorstream.reshard(model_dirs["llama"], storage, progress=False, dtype="bf16", **kind_config(kind))
        for kind in KINDS
    }
    assert len({plain, *stores.values()}) == 4
    manifest = json.loads((plain / MANIFEST_NAME).read_text())
    assert "encoding" not in manifest and manifest["format_version"] == FORMAT_VERSION
    for kind, path in stores.items():
        store = Store.open(path)
        assert store.kind == kind and store.non_block.memory_size == 0
        assert all(store.codec(entry).needs_binding for entry in store.blocks)
        assert sum(e.data_size for e in store.blocks) < sum(e.data_size for e in Store.open(plain).blocks)
        again = tensorstream.reshard(model_dirs["llama"], storage, progress=False, dtype="bf16", **kind_config(kind))
        assert again == path


def test_a_manifest_that_lies_about_the_kind_or_memory_is_refused(model_dirs: dict[str, Path], storage: Path) -> None:
    path = tensorstream.reshard(model_dirs["llama"], storage, progress=False, compression="lossless")
    manifest_path = path / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["blocks"][0]["memory_size"] = manifest["blocks"][0]["data_size"]  # would make the arena too small
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StaleStoreError, match="in memory"):
        Store.open(path)
    manifest["blocks"][0]["memory_size"] = 0
    manifest["encoding"] = "int8"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StaleStoreError, match=r"--quantize|--compression"):
        Store.open(path)


def test_a_preshard_store_of_another_kind_than_asked_is_a_config_error(
    model_dirs: dict[str, Path], storage: Path
) -> None:
    path = tensorstream.reshard(model_dirs["llama"], storage, progress=False, quantize="int8")
    config = tensorstream.Config(device="cpu", storage_path=storage, quantize="int4")
    with pytest.raises(ConfigError, match="int8 store"):
        AutoModelForCausalLM.from_pretrained(path, device_map="tensorstream", tensorstream_config=config)
    model = AutoModelForCausalLM.from_pretrained(  # without the setting, the store streams as it was published
        path, device_map="tensorstream", tensorstream_config=tensorstream.Config(device="cpu", budget_gb=0.002)
    )
    assert model._tensorstream_engine.store.kind == "int8"


def test_bench_measures_each_kind_beside_the_plain_store(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tensorstream.bench import format_table, run_bench

    result = run_bench(
        model_dirs["llama"], workdir=tmp_path, budget_fraction=0.7, device="cpu", batches=(1,), tokens=3, runs=1,
        caches=("warm",), max_threads=1, kinds=("int8", "lossless"),
        config=tensorstream.Config(storage_path=tmp_path / "stores", dtype="bf16"),
    )  # fmt: skip
    rows = {r["system"]: r for r in result["results"]}
    assert {"tensorstream", "ts int8", "ts lossless", "resident"} <= set(rows)
    assert rows["ts int8"]["bytes_per_step"] < rows["ts lossless"]["bytes_per_step"] < rows["tensorstream"][
        "bytes_per_step"]  # fmt: skip
    assert rows["ts lossless"]["same_as_resident"] is True and "same_as_resident" not in rows["ts int8"]
    kinds = {e["store"]: e for e in result["ratios"] if "store" in e}
    assert kinds["int8"]["bytes_per_step_over_plain"] < 0.55 and "warm_int8_no_worse_than_plain" in result["targets"]
    assert "int8 store, warm, batch 1: bytes/step / plain" in format_table(result)


def test_cli_reshard_and_inspect_name_the_kind(
    model_dirs: dict[str, Path], storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorstream.cli import main

    assert main(["reshard", str(model_dirs["llama"]), str(storage), "--quantize", "int4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "int4"
    assert main(["inspect", out["store"]]) == 0
    assert "int4 store" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # one kind per store
        main(["reshard", str(model_dirs["llama"]), "--quantize", "int8", "--compression", "lossless"])


def test_save_pretrained_of_a_quantized_stream_is_refused_naming_what_to_save(
    model_dirs: dict[str, Path], storage: Path, tmp_path: Path
) -> None:
    """Its weights are quantized tensor subclasses, which transformers writes only through its own quantizer."""
    from tensorstream.errors import UnsupportedOperationError

    model = streaming(
        model_dirs["llama"], storage, budget_gb=0.002, prefetch=1, backend="posix", dtype="bf16", quantize="int8"
    )
    with pytest.raises(UnsupportedOperationError, match="Save the source checkpoint"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    tensorstream.detach(model)
    assert "save_pretrained" not in model.__dict__  # the resident model's own method again


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules:UserWarning")
def test_save_pretrained_of_a_lossless_stream_writes_the_weights_it_computes_with(
    model_dirs: dict[str, Path], storage: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    model = streaming(
        model_dirs["llama"], storage, budget_gb=0.002, prefetch=1, backend="posix", dtype="bf16",
        compression="lossless",
    )  # fmt: skip
    model.save_pretrained(tmp_path / "saved")
    saved: dict[str, torch.Tensor] = {}
    for file in (tmp_path / "saved").glob("*.safetensors"):
        saved.update(load_file(file))
    reference = tensorstream.detach(model).state_dict()
    assert not any("__" in name for name in saved)
    for name, value in reference.items():
        if name in saved:
            assert torch.equal(saved[name], value), name
    assert any(name.endswith("mlp.up_proj.weight") for name in saved)


def test_a_lossless_store_keeps_the_address_phases_alignment_sensitive_kernels_see(
    storage: Path, tmp_path: Path
) -> None:
    """granitemoe's experts run ``torch._grouped_mm``, whose CPU bits depend on the weights' address modulo 64: the
    expanded tensors sit at the phases the resident (memory-mapped) model's do, so the logits stay identical."""
    import transformers

    config = transformers.AutoConfig.for_model(
        "granitemoe", hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    path = tensorstream.reshard(tmp_path / "m", storage, progress=False, compression="lossless")
    store = Store.open(path)
    phased = [i for e in store.blocks for i in store.codec(e).tensors.values() if i.phase]
    assert phased, "the checkpoint's tensors sit at non-zero phases: the test needs some"
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(3))
    for backend in ("posix", "mmap"):
        model = streaming(tmp_path / "m", storage, budget_gb=budgets(storage, 1)["stream_all"], prefetch=1,
                          backend=backend, compression="lossless")  # fmt: skip
        assert model._tensorstream_engine.plan.streamed
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, resident(ids).logits), backend
