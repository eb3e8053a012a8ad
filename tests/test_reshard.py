from __future__ import annotations

import hashlib
import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tensorstream
from tensorstream.format import DATA_ALIGNMENT, FORMAT_VERSION, TENSOR_ALIGNMENT
from tensorstream.store import MANIFEST_NAME, Store

HELPERS = Path(__file__).parent / "helpers"


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def original_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def store_tensors(store: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in store.rglob("*.safetensors"):
        out.update(tensorstream.load_ts(file, verify_checksum=True))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_round_trip_every_tensor_equal(model_dirs: dict[str, Path], storage: Path, family: str) -> None:
    before = tree_digest(model_dirs[family])
    store = tensorstream.reshard(model_dirs[family], storage, progress=False)
    assert tree_digest(model_dirs[family]) == before  # the source is never modified
    original = original_tensors(model_dirs[family])
    stored = store_tensors(store)
    assert set(stored) == set(original)
    for name, tensor in original.items():
        assert torch.equal(stored[name], tensor), name


def test_store_layout_and_manifest(model_dirs: dict[str, Path], storage: Path) -> None:
    path = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    assert path.parent == storage and len(path.name) == 16
    store = Store.open(path)
    assert [b.name for b in store.blocks] == [f"model.layers.{i}" for i in range(6)]
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["model_class"] == "LlamaForCausalLM"
    assert manifest["fingerprint"] == path.name and manifest["total_bytes"] == store.total_bytes
    assert all(set(b) >= {"name", "file", "data_size", "checksum", "dtypes"} for b in manifest["blocks"])
    assert (path / "config.json").is_file() and (path / "model.safetensors.index.json").is_file()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.2.mlp.up_proj.weight"] == "blocks/model.layers.2.ts.safetensors"
    assert not [p for p in storage.iterdir() if p.name.endswith(".partial")]


def test_every_tensor_offset_keeps_the_source_phase(model_dirs: dict[str, Path], storage: Path) -> None:
    """Each tensor sits at the offset modulo 64 it has in the source file: where a resident CPU load maps it."""
    store = Store.open(tensorstream.reshard(model_dirs["gpt2"], storage, progress=False))
    source = tensorstream.read_ts_header(model_dirs["gpt2"] / "model.safetensors", require_ts=False)
    phases = {name: (source.data_offset + info.start) % TENSOR_ALIGNMENT for name, info in source.tensors.items()}
    assert any(phases.values())  # safetensors aligns its header to 8 bytes only
    for entry in store.entries():
        header = store.header(entry)
        assert header.data_offset % DATA_ALIGNMENT == 0
        for name, info in header.tensors.items():
            assert info.start % TENSOR_ALIGNMENT == info.phase == phases.get(name, 0), name


def test_second_call_does_nothing_and_says_so(
    model_dirs: dict[str, Path], storage: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    with caplog.at_level(logging.INFO, logger="tensorstream"):
        second = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == mtimes
    assert "up to date" in caplog.text


def test_changed_source_gets_a_new_store(model_dirs: dict[str, Path], storage: Path, tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], source)
    first = tensorstream.reshard(source, storage, progress=False)
    tensors = load_file(source / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    from safetensors.torch import save_file

    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    second = tensorstream.reshard(source, storage, progress=False)
    assert second != first
    assert torch.equal(store_tensors(second)["model.norm.weight"], tensors["model.norm.weight"])


def test_sharded_source(model_dirs: dict[str, Path], storage: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    store = tensorstream.reshard(tmp_path / "sharded", storage, progress=False)
    original = original_tensors(model_dirs["llama"])
    stored = store_tensors(store)
    assert set(stored) == set(original) and all(torch.equal(stored[k], v) for k, v in original.items())


def test_dtype_conversion(model_dirs: dict[str, Path], storage: Path) -> None:
    store = tensorstream.reshard(model_dirs["qwen2"], storage, dtype="bf16", progress=False)
    original = original_tensors(model_dirs["qwen2"])
    stored = store_tensors(store)
    for name, tensor in original.items():
        assert stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], tensor.to(torch.bfloat16))
    assert store != tensorstream.reshard(model_dirs["qwen2"], storage, progress=False)  # another fingerprint


def test_interrupted_reshard_resumes(
    model_dirs: dict[str, Path], storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reshard_module = importlib.import_module("tensorstream.reshard")

    real_save = reshard_module.save_to_ts
    written: list[str] = []

    def failing_save(tensors, path, metadata=None, *, block="", **layout):  # type: ignore[no-untyped-def]
        if len(written) == 3:
            raise KeyboardInterrupt  # as if the process were stopped after three files
        written.append(block)
        return real_save(tensors, path, metadata, block=block, **layout)

    monkeypatch.setattr(reshard_module, "save_to_ts", failing_save)
    with pytest.raises(KeyboardInterrupt):
        tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    (partial,) = [p for p in storage.iterdir() if p.name.endswith(".partial")]
    assert not (partial / MANIFEST_NAME).exists()
    assert not [p for p in storage.iterdir() if not p.name.startswith(".")]  # nothing a later run would trust
    kept = {p: p.stat().st_mtime_ns for p in partial.rglob("*.safetensors")}
    assert len(kept) == 3

    written.clear()
    monkeypatch.setattr(reshard_module, "save_to_ts", real_save)
    calls: list[str] = []
    monkeypatch.setattr(reshard_module, "save_to_ts", lambda *a, **k: calls.append(k["block"]) or real_save(*a, **k))
    store = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    assert len(calls) == 4  # only the 7 - 3 files not written before
    stored = store_tensors(store)
    original = original_tensors(model_dirs["llama"])
    assert set(stored) == set(original) and all(torch.equal(stored[k], v) for k, v in original.items())


def test_hub_cache_source(model_dirs: dict[str, Path], storage: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in model_dirs["llama"].iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    store = tensorstream.reshard("org/tiny-llama", storage, cache_dir=cache, local_files_only=True, progress=False)
    original = original_tensors(model_dirs["llama"])
    assert all(torch.equal(store_tensors(store)[k], v) for k, v in original.items())


def test_missing_source_is_a_clear_error(storage: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        tensorstream.reshard("org/does-not-exist", storage, cache_dir=tmp_path, local_files_only=True)


def test_reshard_peak_rss_is_bounded_by_about_one_block(tmp_path: Path) -> None:
    """A ~280 MB fp32 Llama: peak RSS during reshard stays near one block, not the model."""
    result = subprocess.run(
        [sys.executable, str(HELPERS / "rss_probe.py"), "reshard", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["model_bytes"] >= 200e6
    extra = figures["peak_rss"] - figures["baseline_rss"]
    # one block plus the non-block tensors gathered for their file, plus a fixed 64 MB for allocator slack
    bound = figures["largest_block_bytes"] + figures["non_block_bytes"] + 64e6
    assert extra <= bound, figures
    assert extra < 0.6 * figures["model_bytes"], figures


def test_a_tensor_the_checkpoint_lacks_and_init_draws_at_random_is_a_typed_error(
    model_dirs: dict[str, Path], storage: Path
) -> None:
    """A head the checkpoint lacks is random in a resident load too: named, never stored as if it were a weight.

    (A tensor transformers rebuilds deterministically, Marian's sinusoidal tables, is stored: test_architectures.)
    """
    import transformers

    with pytest.raises(tensorstream.UnsupportedModelError, match=r"score\.weight .*at random"):
        tensorstream.reshard(
            model_dirs["llama"], storage, model_class=transformers.LlamaForSequenceClassification, progress=False
        )
