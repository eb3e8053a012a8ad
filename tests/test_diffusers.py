"""diffusers models and pipelines with ``device_map="tensorstream"``: tiny random Flux, SD3, Wan, UNet2DCondition and
AutoencoderKL checkpoints (built from diffusers' config classes, saved with ``save_pretrained``), each compared
bit for bit with diffusers' own resident load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tensorstream
from helpers.diffusers_models import KINDS, inputs, save_flux_pipeline, tiny_model, weight_bytes
from tensorstream.plan import find_units

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers")
    folders = {}
    for kind in KINDS:
        tiny_model(kind).save_pretrained(root / kind)
        folders[kind] = root / kind
    return folders


def _class(folder: Path) -> Any:
    import diffusers

    return getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])


def _run(model: Any, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind, dtype))[0]


def _streaming(folder: Path, storage: Path, fraction: float = 0.5, **config: Any) -> Any:
    """The model streamed with ``fraction`` of its block bytes as budget (above the non-block weights)."""
    cls = _class(folder)
    kwargs = config.pop("kwargs", {})
    probe = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=1e-9, **config)
    try:
        cls.from_pretrained(folder, device_map="tensorstream", tensorstream_config=probe, **kwargs)
    except tensorstream.BudgetError as err:  # the store is written; its minimum sizes the budget
        minimum = err.minimum_bytes or 0
    from tensorstream.store import Store

    (store_path,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    store = Store.open(store_path)
    budget = max(minimum, store.non_block.data_size + fraction * sum(b.data_size for b in store.blocks))
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=budget / 1e9, **config)
    return cls.from_pretrained(folder, device_map="tensorstream", tensorstream_config=cfg, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_model_is_bit_identical_to_diffusers_resident_load(
    checkpoints: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    folder = checkpoints[kind]
    resident = _class(folder).from_pretrained(folder)
    expected = _run(resident, kind)
    model = _streaming(folder, tmp_path / "stores")
    for _ in range(2):  # the second pass runs in the order the first one learned
        assert torch.equal(_run(model, kind), expected)
    stats = tensorstream.stats(model)
    assert stats.streamed_blocks > 0 and stats.bytes_read > 0
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in resident.named_parameters()}
    assert model.config._name_or_path == str(folder)


def test_keep_in_fp32_modules_as_diffusers_own_bf16_load(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Wan keeps its time embedder, norms and modulation tables in float32 under torch_dtype=bf16: so do
    torch_dtype=, Config(dtype=) and offload(Config(dtype=))."""
    from diffusers import WanTransformer3DModel

    folder = checkpoints["wan"]
    reference = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    kept = {n for n, p in reference.named_parameters() if p.dtype == torch.float32}
    assert kept and any(n.startswith("blocks.") for n in kept)  # some of them inside the streamed blocks
    expected = _run(reference, "wan", torch.bfloat16)
    by_kwarg = _streaming(folder, tmp_path / "a", kwargs={"torch_dtype": torch.bfloat16})
    by_config = _streaming(folder, tmp_path / "b", dtype="bf16")
    loaded = WanTransformer3DModel.from_pretrained(folder)
    offloaded = tensorstream.offload(
        loaded, tensorstream.Config(device="cpu", storage_path=tmp_path / "c", dtype="bf16")
    )
    for model in (by_kwarg, by_config, offloaded):
        assert {n for n, p in model.named_parameters() if p.dtype == torch.float32} == kept
        assert torch.equal(_run(model, "wan", torch.bfloat16), expected)
    assert tensorstream.stats(by_kwarg).streamed_blocks > 0 and tensorstream.stats(by_config).streamed_blocks > 0


def test_unet_blocks_split_and_first_forward_reads_in_execution_order(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The widest up block (46 % of the tiny UNet) streams as its resnets and attentions; the first forward reads
    each streamed block once plus the read-ahead of the next step, with no synchronous load (order traced)."""
    folder = checkpoints["unet"]
    cls = _class(folder)
    skeleton = cls.from_pretrained(folder)
    units = find_units(skeleton)
    sizes = {name: weight_bytes(skeleton.get_submodule(name)) for name, _ in units}
    assert "up_blocks.0.resnets.0" in sizes and "up_blocks.0" not in sizes
    assert max(sizes.values()) < 0.12 * weight_bytes(skeleton)
    model = _streaming(folder, tmp_path / "stores", fraction=0.3)
    engine = model._tensorstream_engine
    _run(model, "unet")
    stats = tensorstream.stats(model)
    assert stats.sync_loads == 0, stats
    assert stats.bytes_read <= engine.plan.streamed_bytes + engine.plan.arena_bytes, stats


def test_flux_pipeline_is_bit_identical_to_the_resident_pipeline(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    folder = save_flux_pipeline(tmp_path)
    call = {
        "prompt": "a cat",
        "num_inference_steps": 2,
        "height": 16,
        "width": 16,
        "max_sequence_length": 16,
        "output_type": "pt",
    }
    resident = DiffusionPipeline.from_pretrained(folder)
    expected = resident(**call, generator=torch.Generator().manual_seed(0)).images
    config = tensorstream.Config(device="cpu", storage_path=tmp_path / "stores", budget_gb=0.0008)
    pipe = DiffusionPipeline.from_pretrained(folder, device_map="tensorstream", tensorstream_config=config)
    streamed = {name for name, c in pipe.components.items() if hasattr(c, "_tensorstream_engine")}
    assert streamed == {"transformer", "text_encoder_2", "vae"}  # the CLIP encoder is below 1/8 of the largest
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, expected)
    assert all(tensorstream.stats(pipe.components[name]).streamed_blocks > 0 for name in streamed)
    plans = [pipe.components[name]._tensorstream_engine.plan for name in streamed]
    assert sum(p.budget_bytes for p in plans) <= config.budget_bytes  # one budget, shared

    roomy = tensorstream.Config(device="cpu", storage_path=tmp_path / "stores", budget_gb=0.002)
    only = DiffusionPipeline.from_pretrained(
        folder, device_map="tensorstream", tensorstream_config=roomy, tensorstream_components=["transformer"]
    )
    assert [n for n, c in only.components.items() if hasattr(c, "_tensorstream_engine")] == ["transformer"]
    with pytest.raises(tensorstream.ConfigError, match="not a model component"):
        DiffusionPipeline.from_pretrained(
            folder, device_map="tensorstream", tensorstream_config=config, tensorstream_components=["tokenizer"]
        )


def test_cli_reshard_inspect_verify_and_cache_on_a_diffusers_model(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorstream.cli import main

    storage = tmp_path / "stores"
    assert main(["reshard", str(checkpoints["unet"]), str(storage), "--json"]) == 0
    store = json.loads(capsys.readouterr().out)["store"]
    assert main(["inspect", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_class"] == "UNet2DConditionModel"
    assert main(["verify", store]) == 0
    assert "files ok" in capsys.readouterr().out
    assert main(["cache", "ls", str(storage)]) == 0
    assert "UNet2DConditionModel" in capsys.readouterr().out
    # from_pretrained reuses the store the CLI wrote
    model = _class(checkpoints["unet"]).from_pretrained(
        checkpoints["unet"],
        device_map="tensorstream",
        tensorstream_config=tensorstream.Config(device="cpu", storage_path=storage),
    )
    assert str(model._tensorstream_engine.store.path) == store
    # a store folder (what a preshard repo holds) loads as it is, without the checkpoint
    direct = _class(checkpoints["unet"]).from_pretrained(store, device_map="tensorstream")
    assert str(direct._tensorstream_engine.store.path) == store
    assert torch.equal(_run(direct, "unet"), _run(model, "unet"))
    assert main(["cache", "ls", str(storage), "--json"]) == 0
    (entry,) = [e for e in json.loads(capsys.readouterr().out)["entries"] if e["kind"] == "store"]
    assert entry["source"] == str(checkpoints["unet"]) and entry["model_class"] == "UNet2DConditionModel"
    assert main(["cache", "rm", entry["fingerprint"], "--storage-path", str(storage)]) == 0
    assert not Path(store).exists() and "removed 2 entries" in capsys.readouterr().out  # the store and its lock


def test_misuse_is_a_clear_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cls = _class(checkpoints["flux"])
    with pytest.raises(tensorstream.ConfigError, match="only used with device_map='tensorstream'"):
        cls.from_pretrained(checkpoints["flux"], tensorstream_config=tensorstream.Config())
    with pytest.raises(tensorstream.ConfigError, match="max_memory"):
        cls.from_pretrained(checkpoints["flux"], device_map="tensorstream", max_memory={"cpu": "1GB"})
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = tiny_model("flux")
    with pytest.raises(tensorstream.TensorStreamError, match="diffusers models"):
        tensorstream.offload(empty, tensorstream.Config(device="cpu", storage_path=tmp_path))


@pytest.mark.slow
def test_peak_anonymous_memory_while_loading_is_about_one_block(tmp_path: Path) -> None:
    """A ~330 MB fp32 Flux transformer loaded (resharded to bf16: every block converted) in a fresh process: the
    anonymous memory it takes stays near two of its ~37 MB blocks, far below the model. The same process checks
    that ``import tensorstream`` does not import diffusers, and wraps its classes once they are imported."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=7,
        num_single_layers=4,
        attention_head_dim=128,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(32, 48, 48),
    )
    model.save_pretrained(tmp_path / "flux")
    size = weight_bytes(model)
    del model
    result = subprocess.run(
        [
            sys.executable,
            str(HELPERS / "diffusers_probe.py"),
            str(tmp_path / "flux"),
            str(tmp_path / "s"),
            "bf16",
            "0.1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert size >= 300e6 and figures["source_bytes"] >= 300e6, figures
    assert figures["dtype"] == "torch.bfloat16" and figures["streamed_blocks"] > 0, figures
    assert figures["diffusers_imported_lazily"] and figures["pipelines_wrapped"], figures
    growth = figures["peak_anon_rss"] - figures["baseline_anon_rss"]
    # one fp32 block read and its bf16 copy, the resident bf16 weights and the budget's arena, plus overhead
    assert growth <= 0.1e9 + 3 * figures["largest_block_bytes"] * 2 + 64e6, figures
    assert growth < size / 3, figures


def test_bench_diffusion_row(checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tensorstream bench`` on a diffusers model folder: seconds per denoising step resident, streamed (cold and
    warm) and with diffusers' group offload to disk; the streamed rows are bit-identical and read each streamed
    block once per step (timings are not asserted)."""
    from tensorstream.cli import main

    out = tmp_path / "bench.json"
    argv = [
        "bench", str(checkpoints["flux"]), "--device", "cpu", "--budget-fraction", "0.8", "--runs", "2",
        "--compare", "diffusers", "--workdir", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["kind"] == "diffusion" and result["model"]["class"] == "FluxTransformer2DModel"
    rows = {(r["system"], r["cache"]): r for r in result["results"]}
    group = "diffusers group offload"
    assert set(rows) == {("resident", "warm"), *((s, c) for s in ("tensorstream", group) for c in ("cold", "warm"))}
    streamed = result["budget"]["streamed_bytes_per_step"]
    assert result["budget"]["streamed_blocks"] > 0 and streamed > 0
    for cache in ("cold", "warm"):
        row = rows[("tensorstream", cache)]
        assert row["bit_identical"] is True and row["max_abs_diff"] == 0 and row["s_per_step"] > 0
        assert row["bytes_read_per_step"] == streamed  # each streamed block once per step, read-ahead included
        assert rows[(group, cache)]["bytes_read_per_step"] > 0  # the group files it loaded
        assert isinstance(rows[(group, cache)]["bit_identical"], bool)
    resident = rows[("resident", "warm")]
    assert resident["bit_identical"] is None and resident["bytes_read_per_step"] == 0
    ratio = next(r for r in result["ratios"] if (r["system"], r["cache"]) == ("tensorstream", "warm"))
    assert ratio["read_over_streamed"] == 1.0 and ratio["s_per_step_over_group_offload"] > 0
    assert "| tensorstream | warm | 1 |" in table and f"wrote {out}" in table

    argv = ["bench", "--diffusers", "--compare", "accelerate", "--workdir", str(tmp_path / "work")]
    assert main(argv) == 1
    assert "--compare accelerate measures causal language models" in capsys.readouterr().err
    from tensorstream.bench import run_bench

    with pytest.raises(tensorstream.ConfigError, match="measured per denoising step"):
        run_bench(checkpoints["flux"], workdir=tmp_path / "work", device="cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_bench_step_inputs_run_each_model_class(kind: str) -> None:
    """The bench has a denoising step for each class it names (from the config alone); others are a ConfigError."""
    from tensorstream.integrations.diffusers_bench import step_inputs

    model = tiny_model(kind)
    with torch.no_grad():
        out = model(**step_inputs(type(model).__name__, model.config, 2, torch.float32))[0]
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    with pytest.raises(tensorstream.ConfigError, match="no denoising-step inputs for PriorTransformer"):
        step_inputs("PriorTransformer", {}, 1, torch.float32)
