"""``pipeline("text-generation", ..., device_map="tensorstream")``: streaming under the transformers pipeline API.

Run: ``python examples/pipeline.py`` (a few seconds). It builds, in a temporary folder, a tiny random Llama and a
tiny word-level tokenizer trained on a few sentences (nothing is downloaded), then generates with a streaming
pipeline and checks the text against a pipeline over the fully resident model.

``pipeline`` passes ``device_map`` to ``from_pretrained`` and ``model_kwargs`` along with it, so the tensorstream
settings go in ``model_kwargs={"tensorstream_config": ...}`` (or in ``TENSORSTREAM_*`` variables).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, pipeline

import tensorstream

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "tensorstream streams the weights of a model block by block from fast storage",
    "a model larger than the memory of the device still runs , one block at a time",
]


def build(folder: Path) -> None:
    """A tiny word-level tokenizer (ids 0-3: <pad> <s> </s> <unk>) and a random Llama sized to its vocabulary."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        vocab_size=len(fast),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny-llama"
        build(folder)
        cfg = tensorstream.Config(device="cpu", storage_path=Path(tmp) / "stores", budget_gb=0.003)
        generator = pipeline(
            "text-generation",
            model=str(folder),
            device_map="tensorstream",
            model_kwargs={"tensorstream_config": cfg},
        )
        prompt = "the quick brown fox"
        text = generator(prompt, max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
        print(f"streamed: {prompt!r} -> {text!r}")
        print(tensorstream.stats(generator.model))

        resident = pipeline("text-generation", model=str(folder))
        expected = resident(prompt, max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert text == expected, f"streamed {text!r} differs from resident {expected!r}"
        print(f"resident: {prompt!r} -> {expected!r} (identical)")


if __name__ == "__main__":
    main()
