"""Peak anonymous memory of ``from_pretrained(FOLDER, device_map="tensorstream")`` on a diffusers model (reshard
included), in a fresh process. Prints one JSON line.

Usage: python diffusers_probe.py FOLDER STORAGE DTYPE BUDGET_GB

Also reports whether ``import tensorstream`` left diffusers unimported and wrapped ``DiffusionPipeline`` once it
was. The model class comes from FOLDER's ``config.json``; DTYPE is ``keep`` or a dtype name (``bf16``: every block is
converted, so its tensors are fresh anonymous memory). The baseline is the anonymous RSS after importing torch,
diffusers and tensorstream; the peak is sampled every millisecond (`rss_probe.Sampler`).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


def main() -> None:
    folder, storage, dtype, budget_gb = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from rss_probe import Sampler, anon_rss

    import tensorstream

    lazy = "diffusers" not in sys.modules  # import tensorstream leaves diffusers alone
    import diffusers

    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    gc.collect()
    baseline = anon_rss()
    sampler = Sampler()
    config = tensorstream.Config(
        device="cpu", storage_path=storage, budget_gb=budget_gb, dtype=None if dtype == "keep" else dtype
    )
    model = cls.from_pretrained(folder, device_map="tensorstream", tensorstream_config=config)
    figures = sampler.close()
    engine = model._tensorstream_engine
    figures.update(
        baseline_anon_rss=baseline,
        streamed_blocks=len(engine.plan.streamed),
        largest_block_bytes=max(engine.plan.block_bytes.values()),
        store_bytes=engine.store.total_bytes,
        source_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        dtype=str(next(p for p in model.parameters() if p.is_floating_point()).dtype),
        diffusers_imported_lazily=lazy,
        pipelines_wrapped=bool(getattr(diffusers.DiffusionPipeline.from_pretrained.__func__, "__tensorstream__", 0)),
    )
    del torch
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
