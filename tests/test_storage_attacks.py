"""The storage folder under attack or pressure (issue #11): planted links, a full disk at the lock file, and
``reshard --force`` beside a process that is loading the store.

Every test here backs a line of ``docs/guarantees.md``.
"""

from __future__ import annotations

import errno
import importlib
import os
from pathlib import Path
from typing import Any

import pytest

import tensorstream
from tensorstream.reshard import source_fingerprint
from tensorstream.store import MANIFEST_NAME, Store

reshard_module = importlib.import_module("tensorstream.reshard")


def _fingerprint(source: Path) -> str:
    from transformers import AutoConfig, LlamaForCausalLM

    return source_fingerprint(source, LlamaForCausalLM, None, AutoConfig.from_pretrained(source))


@pytest.mark.parametrize("planted", [".{}.lock", ".{}.partial"])
def test_a_link_planted_as_the_lock_or_staging_folder_is_refused_and_nothing_outside_is_touched(
    model_dirs: dict[str, Path], tmp_path: Path, planted: str
) -> None:
    source, storage = model_dirs["llama"], tmp_path / "stores"
    storage.mkdir()
    victim = tmp_path / "victim"
    if planted.endswith("lock"):
        victim.write_text("precious")
    else:
        victim.mkdir()
        (victim / "keep.txt").write_text("precious")
    link = storage / planted.format(_fingerprint(source))
    link.symlink_to(victim)
    with pytest.raises(tensorstream.FormatError, match="link"):
        tensorstream.reshard(source, storage, progress=False)
    if planted.endswith("lock"):
        assert victim.read_text() == "precious"
    else:
        assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert link.is_symlink()


def test_a_full_disk_while_writing_the_lock_file_is_a_storage_full_error(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.write

    def full(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(reshard_module.os, "write", full)
    with pytest.raises(tensorstream.StorageFullError, match="lock"):
        tensorstream.reshard(model_dirs["llama"], tmp_path / "stores", progress=False)


def test_a_file_size_limit_is_a_storage_full_error(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RLIMIT_FSIZE (with SIGXFSZ ignored) makes writes fail with EFBIG."""
    real = os.write

    def too_big(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.EFBIG, "File too large")
        return real(fd, data)

    monkeypatch.setattr(reshard_module.os, "write", too_big)
    with pytest.raises(tensorstream.StorageFullError):
        tensorstream.reshard(model_dirs["llama"], tmp_path / "stores", progress=False)


def test_force_swaps_the_store_atomically(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every step of ``reshard --force`` a complete store sits at the store's path: a process loading it then
    (1 load in 659 failed before) finds the old or the new store, never none."""
    storage = tmp_path / "stores"
    final = tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    gaps: list[str] = []
    real_replace, real_rmtree = os.replace, reshard_module.shutil.rmtree

    def check(what: str) -> None:
        if not (final / MANIFEST_NAME).is_file():
            gaps.append(what)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        check(f"after replace {Path(src).name} -> {Path(dst).name}")

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        check(f"before rmtree {Path(path).name}")
        real_rmtree(path, *args, **kwargs)
        check(f"after rmtree {Path(path).name}")

    monkeypatch.setattr(reshard_module.os, "replace", replace)
    monkeypatch.setattr(reshard_module.shutil, "rmtree", rmtree)
    assert tensorstream.reshard(model_dirs["llama"], storage, force=True, progress=False) == final
    monkeypatch.undo()
    assert not gaps, gaps
    Store.open(final, verify="checksum")
    assert sorted(p.name for p in storage.iterdir()) == sorted([final.name, f".{final.name}.lock"])
