"""The CUDA path on a real GPU: bit-exactness for both backends, device memory vs budget, stream sanitizer.

Every test here is marked ``cuda`` (or ``kvikio``): skipped on machines without them, and turned into failures
by ``TENSORSTREAM_REQUIRE_GPU=1`` so a GPU run cannot pass vacuously (``scripts/gpu_check.sh`` sets it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets

SANITIZED = """
import sys, torch, tensorstream
from transformers import AutoModelForCausalLM
source, storage, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
cfg = tensorstream.Config(device="cuda", storage_path=storage, budget_gb=budget, prefetch=2)
model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg)
ids = torch.randint(3, 250, (2, 9), device="cuda")
with torch.inference_mode():
    for _ in range(3):
        model(ids)
    model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
torch.cuda.synchronize()
print("sanitized run ok", tensorstream.stats(model))
"""


def inputs(batch: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(batch)
    ids = torch.randint(3, 250, (batch, 9))
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :3] = 0
        mask[1, :3] = 0
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}


def run_bit_exact(source: Path, storage: Path, backend: str, device: str = "cuda") -> tensorstream.StreamStats:
    reference = AutoModelForCausalLM.from_pretrained(source).to(device)
    tensorstream.reshard(source, storage, progress=False)
    cfg = tensorstream.Config(device=device, storage_path=storage, budget_gb=budgets(storage)["stream_all"],
                              backend=backend)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg)
    assert model._tensorstream_engine.plan.streamed
    with torch.inference_mode():
        for batch in (1, 3):
            data = {k: v.to(device) for k, v in inputs(batch).items()}
            assert torch.equal(model(**data).logits, reference(**data).logits)
            args = dict(data, max_new_tokens=20, do_sample=False, pad_token_id=0)
            assert torch.equal(model.generate(**args), reference.generate(**args))
    return tensorstream.stats(model)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_posix_backend_bit_identical(model_dirs: dict[str, Path], storage: Path, family: str) -> None:
    stats = run_bit_exact(model_dirs[family], storage, "posix")
    assert stats.backend.startswith("posix") and stats.sync_loads == 0


@pytest.mark.kvikio
def test_kvikio_backend_bit_identical(model_dirs: dict[str, Path], storage: Path) -> None:
    stats = run_bit_exact(model_dirs["llama"], storage, "kvikio")
    assert stats.backend.startswith("kvikio")


@pytest.mark.cuda
def test_device_index_and_local_rank(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    assert tensorstream.Config().device == torch.device("cuda", last)
    run_bit_exact(model_dirs["llama"], storage, "posix", device=f"cuda:{last}")
    with pytest.raises(tensorstream.ConfigError, match="does not exist"):
        cfg = tensorstream.Config(device=f"cuda:{last + 1}", storage_path=storage, budget_gb=1)
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg)


@pytest.mark.cuda
def test_weights_on_the_device_stay_within_the_budget(model_dirs: dict[str, Path], storage: Path) -> None:
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    budget = budgets(storage)["stream_all"]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cfg = tensorstream.Config(device="cuda", storage_path=storage, budget_gb=budget)
    model = AutoModelForCausalLM.from_pretrained(
        model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg
    )
    after_load = torch.cuda.max_memory_allocated() - before
    assert after_load <= budget * 1e9, (after_load, budget)
    with torch.inference_mode():
        model(**inputs(1))
    torch.cuda.synchronize()
    weights = model._tensorstream_engine.plan.device_bytes
    assert weights <= budget * 1e9
    # activations of this tiny model are far below 1 MB; everything else is the budgeted weights
    assert torch.cuda.max_memory_allocated() - before <= budget * 1e9 + 1e6


@pytest.mark.cuda
def test_host_cache_tier_bit_identical(model_dirs: dict[str, Path], storage: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).cuda()
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    cfg = tensorstream.Config(device="cuda", storage_path=storage, budget_gb=budgets(storage)["stream_all"],
                              host_cache_gb=1e-3)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg
    )
    assert model._tensorstream_engine.plan.cached
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(**inputs(3)).logits, reference(**inputs(3)).logits)
    assert tensorstream.stats(model).cache_loads > 0


@pytest.mark.cuda
def test_stream_sanitizer_finds_no_race(model_dirs: dict[str, Path], storage: Path, tmp_path: Path) -> None:
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    script = tmp_path / "sanitized.py"
    script.write_text(SANITIZED)
    env = dict(os.environ, TORCH_CUDA_SANITIZER="1")
    budget = str(budgets(storage)["stream_all"])
    result = subprocess.run([sys.executable, str(script), str(model_dirs["llama"]), str(storage), budget],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "CSAN" not in result.stderr and "data race" not in result.stderr.lower(), result.stderr[-4000:]
    assert "sanitized run ok" in result.stdout


@pytest.mark.cuda
def test_an_int4_store_is_refused_on_the_gpu(model_dirs: dict[str, Path], storage: Path) -> None:
    """Its weights are packed for the CPU's int4 kernel: a typed error that says to use int8."""
    from tensorstream.errors import ConfigError

    tensorstream.reshard(model_dirs["llama"], storage, progress=False, dtype="bf16", quantize="int4")
    budget = budgets(storage, 2)["stream_all"]
    cfg = tensorstream.Config(device="cuda", storage_path=storage, budget_gb=budget, dtype="bf16", quantize="int4")
    with pytest.raises(ConfigError, match="quantize='int8'"):
        model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], device_map="tensorstream",
                                                     tensorstream_config=cfg)  # fmt: skip
        with torch.inference_mode():
            model(**inputs(3))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["int8", "lossless"])
@pytest.mark.parametrize("layout", ["stream_all", "some_resident"])
def test_store_kinds_on_the_gpu_equal_their_detached_reference(
    model_dirs: dict[str, Path], storage: Path, kind: str, layout: str
) -> None:
    """Quantized blocks copied compact and rebuilt by their binding rule (lossless ones expanded in pinned staging)
    compute with exactly the weights ``detach`` gives; a lossless store also equals the GPU-resident bf16 model."""
    settings = {"compression": kind} if kind == "lossless" else {"quantize": kind}
    tensorstream.reshard(model_dirs["llama"], storage, progress=False, dtype="bf16", **settings)
    cfg = tensorstream.Config(device="cuda", storage_path=storage, budget_gb=budgets(storage, 2)[layout], dtype="bf16",
                              **settings)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg
    )
    assert model._tensorstream_engine.plan.streamed and model._tensorstream_engine.store.kind == kind
    data = inputs(3)
    with torch.inference_mode():
        logits = model(**data).logits
        tokens = model.generate(**data, max_new_tokens=12, do_sample=False, pad_token_id=0)
    reference = tensorstream.detach(model)
    with torch.inference_mode():
        assert torch.equal(reference(**data).logits, logits)
        assert torch.equal(reference.generate(**data, max_new_tokens=12, do_sample=False, pad_token_id=0), tokens)
    if kind == "lossless":
        resident = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16).cuda()
        with torch.inference_mode():
            assert torch.equal(resident(**data).logits, logits)


@pytest.mark.cuda
@pytest.mark.parametrize("cache", [0.0, None])
def test_moe_routed_experts_on_the_gpu_equal_resident(tmp_path: Path, cache: float | None) -> None:
    """A 64-expert, top-4 Qwen3-MoE streamed into the GPU with routed experts (slots mode: gathered on the device,
    with and without the device-side expert cache) equals the same checkpoint resident on the GPU."""
    from transformers import Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, moe_intermediate_size=128, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=64, num_experts_per_tok=4,
    )  # fmt: skip
    source = tmp_path / "moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    reference = AutoModelForCausalLM.from_pretrained(source).to("cuda")
    store = tensorstream.reshard(source, tmp_path / "stores", progress=False)
    largest = max(p.stat().st_size for p in (store / "blocks").iterdir())
    budget = ((store / "non_block.ts.safetensors").stat().st_size + 1.3 * largest) / 1e9 + (cache or 0.01)
    cfg = tensorstream.Config(
        device="cuda", storage_path=tmp_path / "stores", budget_gb=budget, backend="posix", expert_cache_gb=cache
    )
    model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg)
    assert model._tensorstream_engine.plan.routed
    with torch.inference_mode():
        for batch in (1, 3):
            data = {k: v.to("cuda") for k, v in inputs(batch).items()}
            assert torch.equal(model(**data).logits, reference(**data).logits)
            args = dict(data, max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(model.generate(**args), reference.generate(**args))
    stats = tensorstream.stats(model)
    assert stats.experts_routed > 0 and stats.expert_bytes_read > 0


@pytest.mark.cuda
def test_fp8_checkpoint_on_the_gpu_streams_bit_exact_with_the_printed_fix(tmp_path: Path) -> None:
    """A fine-grained FP8 checkpoint loaded for a GPU: where transformers keeps its FP8 layers (compute capability
    8.9 or more) the load is refused with the fix ``FineGrainedFP8Config(dequantize=True)``; with it, the store
    keeps the float8 bytes and the streamed model equals transformers' dequantizing load moved to the GPU."""
    from transformers import FineGrainedFP8Config, LlamaConfig

    from helpers.prequantized import FP8_CONFIG, fp8_convert, write_quantized

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    source = write_quantized(tmp_path / "fp8", AutoModelForCausalLM.from_config(config), fp8_convert, FP8_CONFIG)
    fix = FineGrainedFP8Config(dequantize=True)
    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=fix).to("cuda")
    layer = sum(p.numel() * p.element_size() for p in reference.model.layers[0].parameters())
    rest = sum(p.numel() * p.element_size() for n, p in reference.named_parameters() if ".layers." not in n)
    cfg = tensorstream.Config(device="cuda", storage_path=tmp_path / "stores", budget_gb=(rest + 2.5 * layer) / 1e9,
                              backend="posix")  # fmt: skip
    if torch.cuda.get_device_capability() >= (8, 9):
        with pytest.raises(tensorstream.UnsupportedQuantizationError, match=r"dequantize=True"):
            AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg)
    model = AutoModelForCausalLM.from_pretrained(
        source, device_map="tensorstream", tensorstream_config=cfg, quantization_config=fix
    )
    assert model._tensorstream_engine.plan.streamed and model._tensorstream_engine.store.kind == "fp8"
    with torch.inference_mode():
        for batch in (1, 3):
            data = inputs(batch)
            assert torch.equal(model(**data).logits, reference(**data).logits)
            args = dict(data, max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(model.generate(**args), reference.generate(**args))


@pytest.mark.cuda
def test_a_diffusers_model_streams_into_the_gpu_bit_exact(tmp_path: Path) -> None:
    """A tiny Flux transformer from its diffusers checkpoint, streamed into the GPU with a budget that streams its
    blocks, equals diffusers' own load moved to the GPU."""
    diffusers = pytest.importorskip("diffusers")
    from helpers.diffusers_models import inputs as step_inputs
    from helpers.diffusers_models import tiny_model

    tiny_model("flux").save_pretrained(tmp_path / "flux")
    reference = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "flux").to("cuda")
    blocks = [*reference.transformer_blocks, *reference.single_transformer_blocks]
    largest = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    total = sum(p.numel() * p.element_size() for p in reference.parameters())
    cfg = tensorstream.Config(device="cuda", storage_path=tmp_path / "stores",
                              budget_gb=(total - sum(sum(p.numel() * p.element_size() for p in b.parameters())
                                                     for b in blocks) + 2.5 * largest) / 1e9)  # fmt: skip
    model = diffusers.FluxTransformer2DModel.from_pretrained(
        tmp_path / "flux", device_map="tensorstream", tensorstream_config=cfg
    )
    data = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in step_inputs("flux").items()}
    with torch.inference_mode():
        expected = reference(**data)[0]
        for _ in range(2):
            assert torch.equal(model(**data)[0], expected)
    assert tensorstream.stats(model).streamed_blocks > 0
