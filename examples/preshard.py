"""Publish a preshard repo and stream it from the Hub cache, without resharding: offline, end to end.

Run: ``python examples/preshard.py`` (a few seconds; nothing is downloaded or uploaded).

With network access, publishing is one command (or `tensorstream.integrations.publish.push`)::

    tensorstream push ./tiny-llama me/tiny-llama-tensorstream

and any machine then streams the repo with ``from_pretrained("me/tiny-llama-tensorstream",
device_map="tensorstream")``, downloading only the manifest, the ``.ts`` files and the configs. This example
plays the Hub's part locally: it prepares the repo's files with `prepare_repo` (what ``push`` uploads), lays
them out in a Hugging Face cache folder exactly as a download would (``models--<org>--<name>/snapshots/<commit>/``
links to ``blobs/<sha256>``), and loads from there with ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tensorstream
from tensorstream.integrations.publish import prepare_repo, pull

REPO_ID = "me/tiny-llama-tensorstream"
COMMIT = "0" * 40


def as_hub_cache(repo: Path, cache: Path, repo_id: str) -> Path:
    """Lay out the files of ``repo`` as the Hub cache holds a downloaded snapshot; returns the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    for file in sorted(p for p in repo.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(repo)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(file.relative_to(repo).parts) + 1), "blobs", blob.name))
    return snapshot


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "tiny-llama"
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

        # Publisher: reshard once and prepare the repo (what `tensorstream push` uploads).
        repo = prepare_repo(source, work / "repo", storage_path=work / "publisher-stores", copy=True)
        print("preshard repo files:", sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()))
        print((repo / "README.md").read_text().split("---")[1].strip(), "\n")

        # The Hub's part: the repo as a download leaves it in the cache.
        cache = work / "hub-cache"
        snapshot = as_hub_cache(repo, cache, REPO_ID)
        assert pull(REPO_ID, cache_dir=cache, local_files_only=True) == snapshot  # `tensorstream pull` offline

        # Consumer: stream straight from the snapshot. No reshard: the storage path stays empty.
        stores = work / "consumer-stores"
        cfg = tensorstream.Config(device="cpu", storage_path=stores, budget_gb=0.004)
        model = AutoModelForCausalLM.from_pretrained(
            REPO_ID, device_map="tensorstream", tensorstream_config=cfg, cache_dir=cache, local_files_only=True
        )
        assert not stores.exists(), "a preshard repo is streamed in place, never resharded"
        prompt = torch.tensor([[1, 42, 7, 99]])
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=12, do_sample=False)
        print("streamed from the Hub cache:", out[0].tolist())
        print(tensorstream.stats(model))

        # Plain transformers loads the same repo (its model.safetensors.index.json names the .ts files).
        plain = AutoModelForCausalLM.from_pretrained(REPO_ID, cache_dir=cache, local_files_only=True)
        reference = AutoModelForCausalLM.from_pretrained(source)
        with torch.inference_mode():
            expected = reference.generate(prompt, max_new_tokens=12, do_sample=False)
            assert torch.equal(plain.generate(prompt, max_new_tokens=12, do_sample=False), expected)
        assert torch.equal(out, expected), "streamed output differs from the resident model"
        print("resident:", expected[0].tolist(), "(identical)")


if __name__ == "__main__":
    main()
