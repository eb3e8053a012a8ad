"""The measured tables of docs/diffusers.md: seconds per denoising step and load memory, and the UNet's units.

1. A random Flux transformer of ~330 MB (fp32, 7 double and 4 single blocks of width 512), one denoising step
   (a forward over 256 image and 32 text tokens) on the CPU, three ways: fully resident (diffusers' own load),
   tensorstream (``device_map="tensorstream"``, budget a quarter of the weights), and diffusers' group offloading to
   disk (``enable_group_offload(offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=...)``).
   Each row: seconds per step (median of 3 after a warm-up step, warm page cache), whether the output is
   ``torch.equal`` to the resident one, and the anonymous memory the load added (sampled every millisecond).
2. The tiny UNet2DCondition of the tests: its largest unit as a share of the model, and the bytes the first forward
   reads per streamed byte with the execution order traced at the first forward and without (learned as it runs).

Usage: python benchmarks/diffusers_table.py [--out benchmarks/results/diffusers-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))


def flux_inputs() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 256, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 32, 64, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(256, 3),
        "txt_ids": torch.zeros(32, 3),
        "return_dict": False,
    }


def step_seconds(model: Any) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = model(**flux_inputs())[0]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model(**flux_inputs())
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def load(fn: Any) -> tuple[Any, int]:
    from rss_probe import Sampler, anon_rss

    baseline = anon_rss()
    sampler = Sampler()
    model = fn()
    return model, sampler.close()["peak_anon_rss"] - baseline


def flux_rows(work: Path) -> list[dict[str, Any]]:
    from diffusers import FluxTransformer2DModel

    import tensorstream

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
    model.save_pretrained(work / "flux")
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    del model
    rows = []
    resident, grown = load(lambda: FluxTransformer2DModel.from_pretrained(work / "flux"))
    seconds, expected = step_seconds(resident)
    rows.append(
        {"way": "resident (diffusers)", "budget_gb": None, "s_per_step": seconds, "exact": True, "load_anon": grown}
    )
    del resident
    budget = size / 4
    config = tensorstream.Config(device="cpu", storage_path=work / "stores", budget_gb=budget / 1e9)
    tensorstream.reshard(work / "flux", work / "stores", progress=False)  # the load below measures the streaming setup

    def streamed() -> Any:
        return FluxTransformer2DModel.from_pretrained(
            work / "flux", device_map="tensorstream", tensorstream_config=config
        )

    model, grown = load(streamed)
    seconds, out = step_seconds(model)
    rows.append(
        {
            "way": "tensorstream",
            "budget_gb": budget / 1e9,
            "s_per_step": seconds,
            "exact": torch.equal(out, expected),
            "load_anon": grown,
        }
    )
    del model

    def grouped() -> Any:
        model = FluxTransformer2DModel.from_pretrained(work / "flux")
        model.enable_group_offload(
            onload_device=torch.device("cpu"),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            offload_to_disk_path=str(work / "groups"),
        )
        return model

    model, grown = load(grouped)
    seconds, out = step_seconds(model)
    rows.append(
        {
            "way": "diffusers group offload to disk (block_level, 1 block per group)",
            "budget_gb": None,
            "s_per_step": seconds,
            "exact": torch.equal(out, expected),
            "load_anon": grown,
        }
    )
    for row in rows:
        row["model_gb"] = size / 1e9
    return rows


def unet_rows(work: Path) -> dict[str, Any]:
    from diffusers_models import inputs, tiny_model, weight_bytes

    import tensorstream
    import tensorstream.integrations.diffusers as integration
    from tensorstream.plan import _repeated_blocks, find_units

    model = tiny_model("unet")
    model.save_pretrained(work / "unet")
    total = weight_bytes(model)
    before = max(weight_bytes(model.get_submodule(n)) for n in _repeated_blocks(model))
    after = max(weight_bytes(model.get_submodule(n)) for n, _ in find_units(model))
    reads = {}
    follow = integration.follow_order
    for traced in (True, False):
        integration.follow_order = follow if traced else (lambda *args: None)  # type: ignore[assignment]
        try:
            config = tensorstream.Config(device="cpu", storage_path=work / f"u{traced}", budget_gb=total * 0.5 / 1e9)
            streamed = type(model).from_pretrained(
                work / "unet", device_map="tensorstream", tensorstream_config=config
            )
            with torch.no_grad():
                streamed(**inputs("unet"))
            plan = streamed._tensorstream_engine.plan
            reads["traced" if traced else "learned"] = tensorstream.stats(streamed).bytes_read / plan.streamed_bytes
        finally:
            integration.follow_order = follow
    return {
        "largest_unit_share_before": before / total,
        "largest_unit_share": after / total,
        "first_forward_reads": reads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "diffusers-cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "torch_threads": torch.get_num_threads(),
            "flux": flux_rows(Path(tmp)),
            "unet": unet_rows(Path(tmp)),
        }
    args.out.write_text(json.dumps(results, indent=1))
    print("| way | budget | s / step | bit-exact | anonymous memory added by the load |")
    print("| --- | --- | --- | --- | --- |")
    for row in results["flux"]:
        budget = f"{row['budget_gb']:.3f} GB" if row["budget_gb"] else "-"
        print(
            f"| {row['way']} | {budget} | {row['s_per_step']:.3f} | {'yes' if row['exact'] else 'no'} | "
            f"{row['load_anon'] / 1e6:.0f} MB |"
        )
    unet = results["unet"]
    shares = f"{unet['largest_unit_share_before']:.0%} -> {unet['largest_unit_share']:.0%}"
    reads = unet["first_forward_reads"]
    print(
        f"\nUNet: largest unit {shares} of the model; first forward reads {reads['learned']:.2f}x -> "
        f"{reads['traced']:.2f}x the streamed bytes"
    )


if __name__ == "__main__":
    main()
