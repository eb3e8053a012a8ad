"""The KV cache next to streamed weights: its size (`tensorstream.plan.kv_cache_bytes`) and transformers' offloaded
cache on a streamed model, at batch > 1, giving exactly the resident model's tokens.

transformers' offloaded cache (``cache_implementation="offloaded"``) keeps each layer's keys and values in host RAM
and brings them to the device for that layer, on a CUDA prefetch stream. transformers 5 runs it on CUDA only (it
calls ``torch.cuda.default_stream``), so the test that shows the cache really leaves the device is marked ``cuda``
(``scripts/gpu_check.sh`` runs it). On a CPU the offload target is the same memory; the CPU test runs the offloaded
cache's own code (offload after each layer's update, prefetch of the next layer) with the streams replaced by
in-order no-ops, which proves only that it composes with the streaming hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets
from tensorstream.plan import kv_cache_bytes


def inputs(batch: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A padded batch (the second sequence is left-padded), as a batch of prompts of different lengths is."""
    torch.manual_seed(batch)
    ids = torch.randint(3, 250, (batch, 9))
    mask = torch.ones_like(ids)
    ids[1, :3] = 0
    mask[1, :3] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def streamed(source: Path, storage: Path, device: str) -> Any:
    tensorstream.reshard(source, storage, progress=False)
    config = tensorstream.Config(device=device, storage_path=storage, budget_gb=budgets(storage)["stream_all"])
    model = AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=config)
    assert model._tensorstream_engine.plan.streamed
    return model


SETTINGS = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_cache_bytes_is_what_the_dynamic_cache_holds(model_dirs: dict[str, Path], family: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family])
    with torch.inference_mode():
        out = model.generate(**inputs(3), **SETTINGS, return_dict_in_generate=True)
    cache = out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == kv_cache_bytes(model.config, batch_size=3, sequence_length=cache.get_seq_length())
    # the rule on the Performance page: 2 * layers * KV heads * head dim * dtype bytes, per token and sequence
    text = model.config
    heads = getattr(text, "num_key_value_heads", text.num_attention_heads)
    per_token = 2 * text.num_hidden_layers * heads * (text.hidden_size // text.num_attention_heads) * 4
    assert kv_cache_bytes(model.config, batch_size=1, sequence_length=1) == per_token
    assert kv_cache_bytes(model.config, batch_size=1, sequence_length=1, dtype=torch.bfloat16) == per_token // 2


class _InOrderStream:
    """A CPU stand-in for a CUDA stream: CPU operations already run in order, so waiting on one is a no-op."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass

    def __enter__(self) -> _InOrderStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_offloaded_kv_cache_composes_with_streaming_at_batch_3_on_cpu(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "Stream", _InOrderStream)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: _InOrderStream())
    model = streamed(model_dirs["llama"], storage, "cpu")
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    settings = {**SETTINGS, "cache_implementation": "offloaded", "return_dict_in_generate": True}
    with torch.inference_mode():
        out = model.generate(**inputs(3), **settings)
        expected = reference.generate(**inputs(3), **settings)
        dynamic = model.generate(**inputs(3), **SETTINGS)
    assert out.past_key_values.offloading  # the offloaded cache ran, not a silent fallback to the dynamic one
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(out.sequences, dynamic)
    assert tensorstream.stats(model).sync_loads == 0


@pytest.mark.cuda
def test_offloaded_kv_cache_on_a_streamed_model_matches_resident_and_leaves_the_device(
    model_dirs: dict[str, Path], storage: Path
) -> None:
    """Weights streamed into the device while the KV cache lives in host RAM: resident tokens, cache on the CPU."""
    source = model_dirs["llama"]
    model = streamed(source, storage, "cuda")
    reference = AutoModelForCausalLM.from_pretrained(source).to("cuda")
    settings = {**SETTINGS, "cache_implementation": "offloaded", "return_dict_in_generate": True}
    with torch.inference_mode():
        for batch in (3, 8):
            out = model.generate(**inputs(batch, "cuda"), **settings)
            expected = reference.generate(**inputs(batch, "cuda"), **settings)
            dynamic = model.generate(**inputs(batch, "cuda"), **SETTINGS)
            torch.cuda.synchronize()
            assert torch.equal(out.sequences, expected.sequences)
            assert torch.equal(out.sequences, dynamic)
            cache = out.past_key_values
            assert cache.offloading
            # every layer but the one prefetched for the next step (layer 0, wrapping around) was moved off the GPU
            devices = [layer.keys.device.type for layer in cache.layers]
            assert devices.count("cpu") >= len(devices) - 1, devices
    assert tensorstream.stats(model).sync_loads == 0
