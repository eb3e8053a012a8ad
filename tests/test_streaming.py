"""Bit-exactness of from_pretrained(..., device_map="tensorstream") against the fully resident model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.models import budgets, streaming
from helpers.sweep import sweep

HELPERS = Path(__file__).parent / "helpers"
FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {name: AutoModelForCausalLM.from_pretrained(model_dirs[name]) for name in FAMILIES}


def inputs(batch: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(batch)
    ids = torch.randint(3, 250, (batch, 9))
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :3] = 0  # left padding on one row
        mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


#: prefetch-budget-family; the fast cases cover every prefetch depth, budget and family (all of Llama's budgets).
CASES = sweep(
    [[0, 1, 3], ["stream_all", "some_resident", "all_resident"], FAMILIES],
    fast={
        (0, "stream_all", "llama"),
        (1, "stream_all", "llama"),
        (3, "stream_all", "llama"),
        (1, "some_resident", "llama"),
        (1, "all_resident", "llama"),
        (1, "stream_all", "qwen2"),
        (3, "some_resident", "qwen2"),
        (0, "some_resident", "gpt2"),
        (1, "stream_all", "gpt2"),
    },
)


@pytest.mark.parametrize(("prefetch", "budget", "family"), CASES)
def test_logits_and_generation_bit_identical(
    model_dirs: dict[str, Path],
    references: dict[str, torch.nn.Module],
    storage: Path,
    family: str,
    budget: str,
    prefetch: int,
) -> None:
    tensorstream.reshard(model_dirs[family], storage, progress=False)
    model = streaming(model_dirs[family], storage, budget_gb=budgets(storage, prefetch)[budget], prefetch=prefetch)
    plan = model._tensorstream_engine.plan
    if budget == "stream_all":
        assert plan.resident == () and len(plan.streamed) == 6
    elif budget == "some_resident":
        assert plan.resident and plan.streamed
    else:
        assert plan.streamed == ()
    reference = references[family]
    with torch.inference_mode():
        for batch in (1, 3):
            assert torch.equal(model(**inputs(batch)).logits, reference(**inputs(batch)).logits)
        for batch in (1, 3):
            args = dict(inputs(batch), max_new_tokens=20, do_sample=False, pad_token_id=0)
            assert torch.equal(model.generate(**args), reference.generate(**args))
    stats = tensorstream.stats(model)
    if plan.streamed:
        assert stats.blocks_run > 0 and stats.bytes_read > 0
        if prefetch == 0:
            assert stats.prefetch_hits == 0 and stats.sync_loads == stats.blocks_run
        else:
            assert stats.sync_loads == 0 and stats.prefetch_hits + stats.sync_loads <= stats.blocks_run
    else:
        assert stats.bytes_read == 0


def test_streamed_weights_stay_on_meta_between_forwards(model_dirs: dict[str, Path], storage: Path) -> None:
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    model = streaming(model_dirs["llama"], storage, budget_gb=budgets(storage)["stream_all"])
    with torch.inference_mode():
        model(**inputs(1))
    for i in range(6):
        assert all(p.is_meta for p in model.model.layers[i].parameters())  # placeholders (device: where used)
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert model.device.type == "cpu"


def test_second_load_reuses_the_store(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    streaming(model_dirs["gpt2"], storage, budget_gb=1)
    reshard_module = importlib.import_module("tensorstream.reshard")
    monkeypatch.setattr(reshard_module, "save_to_ts", lambda *a, **k: pytest.fail("resharded twice"))
    model = streaming(model_dirs["gpt2"], storage, budget_gb=1)
    assert model.config.name_or_path == str(model_dirs["gpt2"])


def test_streams_from_the_store_not_the_source(model_dirs: dict[str, Path], storage: Path, tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    tensorstream.reshard(source, storage, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(source)
    model = streaming(source, storage, budget_gb=budgets(storage)["stream_all"])
    (source / "model.safetensors").unlink()  # the checkpoint may be gone once resharded
    with torch.inference_mode():
        assert torch.equal(model(**inputs(1)).logits, reference(**inputs(1)).logits)


def test_dtype_argument_reshards_in_that_dtype(model_dirs: dict[str, Path], storage: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16)
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=4e-4)
    model = AutoModelForCausalLM.from_pretrained(
        model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg, dtype=torch.bfloat16
    )
    assert model._tensorstream_engine.plan.streamed
    with torch.inference_mode():
        assert torch.equal(model(**inputs(1)).logits, reference(**inputs(1)).logits)


def test_concrete_class_and_config_from_env(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import GPT2LMHeadModel

    monkeypatch.setenv("TENSORSTREAM_STORAGE_PATH", str(storage))
    monkeypatch.setenv("TENSORSTREAM_DEVICE", "cpu")
    monkeypatch.setenv("TENSORSTREAM_BUDGET_GB", "0.0008")
    model = GPT2LMHeadModel.from_pretrained(model_dirs["gpt2"], device_map="tensorstream")
    assert model._tensorstream_engine.plan.streamed
    reference = GPT2LMHeadModel.from_pretrained(model_dirs["gpt2"])
    with torch.inference_mode():
        assert torch.equal(model(**inputs(3)).logits, reference(**inputs(3)).logits)


def test_budget_too_small(model_dirs: dict[str, Path], storage: Path) -> None:
    with pytest.raises(tensorstream.BudgetError, match="at least"):
        streaming(model_dirs["llama"], storage, budget_gb=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_memory": {"cpu": "1GB"}}, "budget_gb"), ({"offload_folder": "/tmp/x"}, "storage_path")],
)
def test_conflicting_from_pretrained_arguments(
    model_dirs: dict[str, Path], storage: Path, kwargs: dict, match: str
) -> None:
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=1)
    with pytest.raises(tensorstream.ConfigError, match=match):
        AutoModelForCausalLM.from_pretrained(
            model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg, **kwargs
        )


def test_tensorstream_config_without_the_device_map_is_an_error(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(tensorstream.ConfigError, match="device_map='tensorstream'"):
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"], tensorstream_config=tensorstream.Config())


def test_other_device_maps_are_untouched(model_dirs: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], device_map="cpu")
    assert not hasattr(model, "_tensorstream_engine")


def test_torch_threads_are_left_alone(model_dirs: dict[str, Path], storage: Path) -> None:
    threads = torch.get_num_threads()
    model = streaming(model_dirs["llama"], storage, budget_gb=budgets_for(model_dirs, storage))
    with torch.inference_mode():
        model(**inputs(1))
    assert torch.get_num_threads() == threads


def budgets_for(model_dirs: dict[str, Path], storage: Path) -> float:
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    return budgets(storage)["stream_all"]


@pytest.mark.parametrize("backend", ["posix", "mmap"])
def test_streaming_peak_rss_stays_within_the_budget(tmp_path: Path, backend: str) -> None:
    """A ~280 MB fp32 Llama streamed with a budget of 45% of it: peak RSS above the baseline <= budget + 64 MB.

    With ``mmap`` (zero-copy) the weights are the page cache's pages, mapped: file-backed RSS, which the kernel
    reclaims under pressure; the budget bounds the anonymous part (sampled: the kernel keeps no peak of it).
    """
    result = subprocess.run(
        [sys.executable, str(HELPERS / "rss_probe.py"), "stream", str(tmp_path), "0.45", "llama", backend],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["streamed_blocks"] > 0 and figures["backend"] == backend
    assert figures["peak_anon_rss"] - figures["baseline_anon_rss"] <= figures["budget_bytes"] + 64e6, figures
    if backend == "posix":  # nothing is mapped: the kernel's exact peak of the whole RSS
        assert figures["peak_rss"] - figures["baseline_rss"] <= figures["budget_bytes"] + 64e6, figures


@pytest.mark.parametrize(("backend", "direct_io"), [("mmap", None), ("posix", True), ("posix", False)])
def test_backends_are_bit_identical(
    model_dirs: dict[str, Path],
    references: dict[str, torch.nn.Module],
    storage: Path,
    backend: str,
    direct_io: bool | None,
) -> None:
    from tensorstream.backends.posix import direct_io_supported

    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    if direct_io and not direct_io_supported(storage):
        with pytest.raises(tensorstream.BackendUnavailableError, match="O_DIRECT"):
            streaming(model_dirs["llama"], storage, budget_gb=budgets(storage)["stream_all"], direct_io=True)
        return
    model = streaming(
        model_dirs["llama"], storage, budget_gb=budgets(storage)["stream_all"], backend=backend, direct_io=direct_io
    )
    assert model._tensorstream_engine.backend.name == ("posix+O_DIRECT" if direct_io else backend)
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(**inputs(3)).logits, references["llama"](**inputs(3)).logits)


def test_host_cache_on_cpu_warns_and_is_ignored(model_dirs: dict[str, Path], storage: Path) -> None:
    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    with pytest.warns(UserWarning, match="host_cache_gb=1.0 is ignored on cpu"):
        model = streaming(model_dirs["llama"], storage, budget_gb=budgets(storage)["stream_all"], host_cache_gb=1)
    assert model._tensorstream_engine.plan.cached == ()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(model_dirs: dict[str, Path], storage: Path) -> None:
    cfg = tensorstream.Config(device="cuda:1", storage_path=storage, budget_gb=1)
    with pytest.raises(tensorstream.ConfigError, match="no usable CUDA device"):
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg)


def test_infinite_config_values_load_as_transformers_loads_them(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """transformers writes ``inf`` as ``{"__float__": "Infinity"}`` (NemotronH's ``time_step_limit``); the config
    tensorstream builds must hold the float, as ``from_pretrained`` without tensorstream does (the registry sweep
    found NemotronH refused by its strict config validation otherwise)."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    model.config.step_limit = [0.0, float("inf")]
    model.save_pretrained(tmp_path / "m")
    assert "__float__" in (tmp_path / "m" / "config.json").read_text()
    streamed = streaming(tmp_path / "m", tmp_path / "stores", budget_gb=0.002, prefetch=1)
    assert streamed.config.step_limit == [0.0, float("inf")]
