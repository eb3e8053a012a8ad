"""`tensorstream.offload`: stream a model that is already loaded in memory, then `detach` it back.

Run: ``python examples/offload.py`` (a few seconds; builds a tiny random Llama in a temporary folder).

``offload`` reshards the model from its in-memory weights (once: the store is reused for the same weights),
frees the RAM of the blocks it streams, and attaches the hooks; the model object stays the same. ``detach``
loads every block back and removes the hooks.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tensorstream


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        vocab_size=512,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()  # e.g. fine-tuned or modified in memory: no checkpoint needed
    reference = copy.deepcopy(model)
    prompt = torch.tensor([[1, 42, 7, 99]])
    with torch.inference_mode():
        expected = reference.generate(prompt, max_new_tokens=12, do_sample=False)

    with tempfile.TemporaryDirectory() as tmp:
        store_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        cfg = tensorstream.Config(device="cpu", storage_path=Path(tmp) / "stores", budget_gb=store_bytes / 2 / 1e9)
        model = tensorstream.offload(model, cfg)  # same object, now streaming
        meta = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta")
        print(f"offloaded: {meta / 1e6:.1f} of {store_bytes / 1e6:.1f} MB of weights freed from memory")
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=12, do_sample=False)
        print("streamed:", out[0].tolist())
        print(tensorstream.stats(model))
        assert torch.equal(out, expected), "streamed output differs from the resident model"

        model = tensorstream.detach(model)  # fully resident again
        assert not any(p.device.type == "meta" for p in model.parameters())
        with torch.inference_mode():
            again = model.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(again, expected)
        print("resident:", expected[0].tolist(), "(identical, before and after detach)")


if __name__ == "__main__":
    main()
