"""Quickstart: stream a tiny local Llama with device_map="tensorstream" and check it against the resident model.

Run: ``python examples/quickstart.py`` (a few seconds; builds the model in a temporary folder).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tensorstream


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "tiny-llama"
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            vocab_size=512,
            initializer_range=0.2,
        )
        LlamaForCausalLM(config).save_pretrained(source)

        model = AutoModelForCausalLM.from_pretrained(
            source,
            device_map="tensorstream",
            tensorstream_config=tensorstream.Config(device="cpu", storage_path=Path(tmp) / "stores", budget_gb=0.002),
        )
        prompt = torch.tensor([[1, 42, 7, 99]])
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=12, do_sample=False)
        print("streamed:", out[0].tolist())
        print(tensorstream.stats(model))

        reference = AutoModelForCausalLM.from_pretrained(source)
        with torch.inference_mode():
            expected = reference.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(out, expected), "streamed output differs from the resident model"
        print("resident:", expected[0].tolist(), "(identical)")


if __name__ == "__main__":
    main()
