"""PEFT adapters and merges on a streaming model (issue 19): bit-identical to the same calls on the resident model and
repeatable, or refused with `UnsupportedOperationError` at the call, the model still usable.

A tiny Llama with a budget that streams 5 of its 6 blocks; adapters saved from the resident model in the test. Every
test here backs a line of ``docs/guarantees.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets, streaming

peft = pytest.importorskip("peft")
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adapters")
    base = model_dirs["llama"]
    adapters = {}
    for name, seed in (("one", 1), ("two", 2)):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False),
        )
        model.save_pretrained(root / name)
        adapters[name] = root / name
    storage = root / "stores"
    tensorstream.reshard(base, storage, progress=False)
    return {"base": base, "storage": storage, "budget": budgets(storage, 1)["some_resident"], **adapters}


def stream(setup: dict[str, Any]) -> Any:
    model = streaming(setup["base"], setup["storage"], budget_gb=setup["budget"], prefetch=1)
    plan = model._tensorstream_engine.plan
    assert len(plan.streamed) == 5 and len(plan.resident) == 1
    return model


def resident(setup: dict[str, Any]) -> Any:
    return AutoModelForCausalLM.from_pretrained(setup["base"])


def ids() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randint(3, 250, (2, 9))


def logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids()).logits


def same(streamed: Any, reference: Any, generate: bool = False) -> None:
    """Bit-identical to the resident model, twice in a row (no state left over between forwards)."""
    first, expected = logits(streamed), logits(reference)
    assert torch.equal(first, expected), (first - expected).abs().max()
    assert torch.equal(logits(streamed), first)
    if generate:
        args = dict(input_ids=ids(), max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            assert torch.equal(streamed.generate(**args), reference.generate(**args))


def test_load_adapter_is_bit_identical_and_repeatable(setup: dict[str, Any]) -> None:
    model, reference = stream(setup), resident(setup)
    model.load_adapter(setup["one"])
    reference.load_adapter(setup["one"])
    same(model, reference, generate=True)
    lora = model.model.layers[3].self_attn.q_proj.lora_A["default"].weight
    assert lora.device.type == "cpu" and not lora.is_meta  # resident on the execution device
    assert model.model.layers[3].self_attn.q_proj.base_layer.weight.is_meta  # the base weight still streams
    assert not torch.equal(logits(model), logits(resident(setup)))  # the adapter changes the output


def test_peft_model_from_pretrained_is_bit_identical(setup: dict[str, Any]) -> None:
    model = PeftModel.from_pretrained(stream(setup), setup["one"])
    reference = PeftModel.from_pretrained(resident(setup), setup["one"])
    same(model, reference)


def test_a_new_adapter_is_bit_identical(setup: dict[str, Any]) -> None:
    """get_peft_model: freshly initialised adapters (random A and B) draw the same random numbers as on the resident
    model. (transformers' own ``add_adapter`` needs peft >= 0.22; diffusers' is tested on Flux below.)"""
    models = []
    for build in (stream, resident):
        model = build(setup)
        torch.manual_seed(11)
        models.append(get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)))
    same(*models)


def test_several_adapters_switched_disabled_and_deleted_stay_bit_identical(setup: dict[str, Any]) -> None:
    """PeftModel's adapter management (transformers' own set_adapter / enable_adapters need peft >= 0.22)."""
    model = PeftModel.from_pretrained(stream(setup), setup["one"])
    reference = PeftModel.from_pretrained(resident(setup), setup["one"])
    steps: list[Callable[[Any], Any]] = [
        lambda m: m.load_adapter(setup["two"], adapter_name="two"),
        lambda m: m.set_adapter("two"),
        lambda m: m.base_model.disable_adapter_layers(),
        lambda m: m.base_model.enable_adapter_layers(),
        lambda m: m.set_adapter("default"),
        lambda m: m.delete_adapter("two"),
    ]
    seen = [logits(model)]
    for call in steps:
        call(model)
        call(reference)
        seen.append(logits(model))
        assert torch.equal(seen[-1], logits(reference))
    assert torch.equal(logits(model), seen[-1])
    assert not torch.equal(seen[2], seen[1]) and not torch.equal(seen[3], seen[2])  # the switches change outputs
    with model.disable_adapter():
        same(model, resident(setup))


@pytest.mark.parametrize("tuner", ["loha", "lokr", "ia3"])
def test_other_tuners_that_wrap_a_base_layer_are_bit_identical(setup: dict[str, Any], tuner: str) -> None:
    configs = {
        "loha": lambda: LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
        "lokr": lambda: LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
        "ia3": lambda: IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
    }
    models = []
    for build in (stream, resident):
        torch.manual_seed(5)
        models.append(get_peft_model(build(setup), configs[tuner]()))
    same(*models)


def test_dora_is_refused_naming_the_tuner_and_the_model_stays_usable(setup: dict[str, Any]) -> None:
    """DoRA's magnitude is computed from the base weights when the adapter is created: outside a forward, where a
    streamed weight has no values. Refused at the call; the model keeps streaming the base weights."""
    model = stream(setup)
    with pytest.raises(tensorstream.UnsupportedOperationError, match=r"dora") as info:
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "resident" in str(info.value)
    for layer in model.model.layers[1:]:  # streamed blocks: untouched
        assert type(layer.self_attn.q_proj).__name__ == "Linear" and layer.self_attn.q_proj.weight.is_meta
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids()).logits).all()


@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter"])
def test_merging_into_streamed_weights_is_refused_and_nothing_is_merged(setup: dict[str, Any], call: str) -> None:
    model = PeftModel.from_pretrained(stream(setup), setup["one"])
    reference = PeftModel.from_pretrained(resident(setup), setup["one"])
    with pytest.raises(tensorstream.UnsupportedOperationError, match=r"merge") as info:
        getattr(model, call)()
    assert "save_pretrained" in str(info.value)
    same(model, reference)  # the resident block's layer was not merged either: refused before the first layer


def test_the_printed_fix_for_merging_works(setup: dict[str, Any], tmp_path: Path) -> None:
    """Merge on the resident model, save, stream the merged folder: bit-identical to the merged resident model."""
    merged = PeftModel.from_pretrained(resident(setup), setup["one"]).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    model = streaming(tmp_path / "merged", tmp_path / "stores", budget_gb=setup["budget"], prefetch=1)
    assert model._tensorstream_engine.plan.streamed
    same(model, merged)


def test_unload_restores_the_streaming_base_model(setup: dict[str, Any]) -> None:
    model = PeftModel.from_pretrained(stream(setup), setup["one"]).unload()
    same(model, resident(setup))


# -- diffusers: Flux transformer --------------------------------------------------------------------------------------


WEIGHTS = "pytorch_lora_weights.safetensors"


def _flux() -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def _flux_out(model: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=torch.randn(1, 16, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([1.0]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )
    with torch.inference_mode():
        return model(**kwargs)[0]


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("flux-lora")
    model = _flux()
    torch.manual_seed(4)
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "proj_out"], init_lora_weights=False))
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(root, transformer_lora_layers=get_peft_model_state_dict(model))
    return root


def _flux_streaming(tmp_path: Path) -> Any:
    from tensorstream.reshard import reshard_module
    from tensorstream.store import Store

    store = Store.open(reshard_module(_flux(), tmp_path / "stores"))
    slot = max(-(-entry.data_size // 4096) * 4096 for entry in store.blocks)
    config = tensorstream.Config(
        device="cpu", storage_path=tmp_path / "stores", budget_gb=(store.non_block.data_size + 2 * slot) / 1e9
    )
    model = tensorstream.offload(_flux(), config)
    assert len(model._tensorstream_engine.plan.streamed) == 4
    return model


def test_flux_load_lora_adapter_is_bit_identical_and_repeatable(flux_lora: Path, tmp_path: Path) -> None:
    model, reference = _flux_streaming(tmp_path), _flux()
    for m in (model, reference):
        m.load_lora_adapter(flux_lora, weight_name=WEIGHTS, prefix="transformer", adapter_name="style")
    first = _flux_out(model)
    assert torch.equal(first, _flux_out(reference)) and torch.equal(_flux_out(model), first)
    assert not torch.equal(first, _flux_out(_flux()))


def test_flux_add_adapter_is_bit_identical(tmp_path: Path) -> None:
    model, reference = _flux_streaming(tmp_path), _flux()
    for m in (model, reference):
        torch.manual_seed(9)
        m.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False))
    assert torch.equal(_flux_out(model), _flux_out(reference))


@pytest.mark.parametrize("call", ["fuse_lora", "fuse_qkv_projections"])
def test_flux_fusions_are_refused_and_the_model_is_unchanged(flux_lora: Path, tmp_path: Path, call: str) -> None:
    model, reference = _flux_streaming(tmp_path), _flux()
    for m in (model, reference):
        m.load_lora_adapter(flux_lora, weight_name=WEIGHTS, prefix="transformer", adapter_name="style")
    with pytest.raises(tensorstream.UnsupportedOperationError):
        getattr(model, call)()
    assert torch.equal(_flux_out(model), _flux_out(reference))
