"""The mmap backend on its own: populate, zero-copy views, eviction, a shrunk file, the pre-5.14 fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tensorstream.backends.mmap as mmap_backend
from tensorstream.backends.mmap import MmapBackend


@pytest.fixture
def file(tmp_path: Path) -> Path:
    path = tmp_path / "block.bin"
    torch.manual_seed(0)
    path.write_bytes(torch.randint(0, 256, (3 * 4096 + 100,), dtype=torch.uint8).numpy().tobytes())
    return path


def expected(path: Path, offset: int, length: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()[offset : offset + length]), dtype=torch.uint8)


@pytest.mark.parametrize("populate_read", [True, False], ids=["MADV_POPULATE_READ", "WILLNEED + touch fallback"])
def test_populate_and_views_are_the_file_bytes(
    file: Path, monkeypatch: pytest.MonkeyPatch, populate_read: bool
) -> None:
    if not populate_read:
        monkeypatch.setattr(mmap_backend, "_populate_read_works", False)
    backend = MmapBackend()
    handle = backend.open(file)
    try:
        assert backend.populate(handle, 4096, 2 * 4096 + 100) == 2 * 4096 + 100
        view = backend.data(handle, 4096, 2 * 4096 + 100)
        assert view is not None and torch.equal(view, expected(file, 4096, 2 * 4096 + 100))
        assert view.data_ptr() == handle.address + 4096  # a view of the mapping, not a copy
        backend.evict(handle, 4096, 2 * 4096 + 100)  # dropped from the page tables; still the same bytes
        assert torch.equal(view, expected(file, 4096, 2 * 4096 + 100))
        del view
    finally:
        backend.close(handle)


def test_a_shrunk_file_is_a_short_populate_and_no_view(file: Path) -> None:
    backend = MmapBackend()
    handle = backend.open(file)
    try:
        os.truncate(file, 4096 + 10)
        assert backend.populate(handle, 4096, 2 * 4096) == 10  # the engine raises CorruptFileError
        assert backend.data(handle, 4096, 2 * 4096) is None  # never a view that would SIGBUS
        buffer = bytearray(2 * 4096)
        assert backend.read_into(handle, 4096, memoryview(buffer)) == 10  # the copy path (non-CPU devices)
    finally:
        backend.close(handle)


def test_close_with_a_view_still_alive_does_not_raise(file: Path) -> None:
    backend = MmapBackend()
    handle = backend.open(file)
    view = backend.data(handle, 0, 4096)
    backend.close(handle)  # the mapping goes when the view does
    assert view is not None and torch.equal(view, expected(file, 0, 4096))
