from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tensorstream
from tensorstream import FormatError, load_ts, read_ts_header, save_to_ts
from tensorstream.format import (
    DATA_ALIGNMENT,
    FORMAT_VERSION,
    PAD_PREFIX,
    TENSOR_ALIGNMENT,
    aligned_runs,
    read_data,
    tensor_views,
    verify_buffer,
)

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b": torch.arange(7, dtype=torch.int16),
    "c": torch.randn(4, 4).to(torch.bfloat16),
    "d": torch.tensor([True, False, True]),
    "e": torch.randn(16, 16).half(),
    "scalar": torch.tensor(3.5, dtype=torch.float64),
    "empty": torch.empty(0, 4),
}


def test_round_trip_every_dtype(tmp_path: Path) -> None:
    tensors = dict(TENSORS)
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            tensors[name] = torch.randn(8, 8).to(getattr(torch, name))
    header = tensorstream.save_to_ts(tensors, tmp_path / "x.ts", {"note": "hi"}, block="m.0")
    loaded = tensorstream.load_ts(tmp_path / "x.ts", verify_checksum=True)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    assert header.metadata["note"] == "hi" and header.block == "m.0"
    assert tensorstream.read_ts_header(tmp_path / "x.ts") == header


def test_is_a_valid_safetensors_file(tmp_path: Path) -> None:
    tensorstream.save_to_ts(TENSORS, tmp_path / "x.ts")
    with safe_open(tmp_path / "x.ts", framework="pt") as f:
        for name, tensor in TENSORS.items():
            assert torch.equal(f.get_tensor(name), tensor)
        assert f.metadata()["format"] == "tensorstream"
    everything = load_file(tmp_path / "x.ts")
    assert {k for k in everything if not k.startswith(PAD_PREFIX)} == set(TENSORS)


def test_alignment(tmp_path: Path) -> None:
    header = tensorstream.save_to_ts(TENSORS, tmp_path / "x.ts")
    assert header.data_offset % DATA_ALIGNMENT == 0
    for info in header.tensors.values():
        assert info.start % TENSOR_ALIGNMENT == 0
    assert (tmp_path / "x.ts").stat().st_size == header.data_offset + header.data_size


def test_aligned_sizes_need_no_filler(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(64, 64), "b": torch.randn(64), "odd": torch.randn(3)}
    tensorstream.save_to_ts(tensors, tmp_path / "x.ts")
    with safe_open(tmp_path / "x.ts", framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith(PAD_PREFIX)]  # noqa: SIM118


def test_views_share_one_buffer(tmp_path: Path) -> None:
    header = tensorstream.save_to_ts(TENSORS, tmp_path / "x.ts")
    from tensorstream.format import aligned_empty

    buffer = aligned_empty(header.data_size)
    assert buffer.data_ptr() % DATA_ALIGNMENT == 0
    read_data(header.path, header, buffer)
    verify_buffer(header, buffer)
    views = tensor_views(buffer, header)
    assert all(v.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for v in views.values())


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "x.ts"
    path.write_bytes(b"old")
    with pytest.raises(tensorstream.FormatError):
        tensorstream.save_to_ts({"meta": torch.empty(2, device="meta")}, path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ts"]


@pytest.mark.parametrize(
    ("tensors", "metadata", "match"),
    [
        ({"x": torch.ones(1, device="meta")}, None, "meta device"),
        ({"": torch.ones(1)}, None, "not a valid tensor name"),
        ({f"{PAD_PREFIX}1": torch.ones(1)}, None, "not a valid tensor name"),
        ({"x": [1, 2]}, None, "not a torch.Tensor"),
        ({"x": torch.ones(1)}, {"checksum": "x"}, "reserved"),
        ({"x": torch.ones(1)}, {"n": 1}, "strings only"),
    ],
)
def test_save_rejects_bad_input(tmp_path: Path, tensors: dict, metadata: dict | None, match: str) -> None:
    with pytest.raises(tensorstream.FormatError, match=match):
        tensorstream.save_to_ts(tensors, tmp_path / "x.ts", metadata)


def _rewrite_header(path: Path, mutate) -> None:  # type: ignore[no-untyped-def]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    text = json.dumps(header).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda h: h["a.weight"].update(dtype="F99"), tensorstream.FormatError, "unknown dtype"),
        (lambda h: h["a.weight"].update(shape=[4, 5]), tensorstream.FormatError, "needs 80 bytes"),
        (lambda h: h["a.weight"].update(data_offsets=[0, 10**12]), tensorstream.FormatError, "needs 60 bytes"),
        (lambda h: h["a.weight"].update(data_offsets=[-4, 56]), tensorstream.FormatError, "invalid data_offsets"),
        (lambda h: h["__metadata__"].update(format_version="99"), tensorstream.FormatError, "newer tensorstream"),
        (lambda h: h["__metadata__"].update(format="other"), tensorstream.FormatError, "not a tensorstream"),
        (
            lambda h: h.update(extra={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
            tensorstream.FormatError,
            "overlaps",
        ),
    ],
)
def test_header_validation(tmp_path: Path, mutate, error, match) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.ts"
    tensorstream.save_to_ts(TENSORS, path)
    _rewrite_header(path, mutate)
    with pytest.raises(error, match=match):
        tensorstream.read_ts_header(path)


def test_truncated_and_flipped_files(tmp_path: Path) -> None:
    path = tmp_path / "x.ts"
    header = tensorstream.save_to_ts(TENSORS, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(tensorstream.CorruptFileError, match="truncated"):
        tensorstream.read_ts_header(path)
    flipped = bytearray(raw)
    flipped[header.data_offset + 3] ^= 0x40
    path.write_bytes(bytes(flipped))
    tensorstream.load_ts(path)  # without verification the damage is not seen...
    with pytest.raises(tensorstream.CorruptFileError, match="checksum"):
        tensorstream.load_ts(path, verify_checksum=True)  # ...with it, it is


def test_oversized_header_is_rejected_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.ts"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(tensorstream.FormatError, match="exceeds"):
        tensorstream.read_ts_header(path)


def test_plain_safetensors_is_not_a_ts_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.ones(3)}, tmp_path / "x.safetensors")
    with pytest.raises(tensorstream.FormatError):
        tensorstream.read_ts_header(tmp_path / "x.safetensors")
    assert tensorstream.read_ts_header(tmp_path / "x.safetensors", require_ts=False).tensors["x"].shape == (3,)


def test_phases_place_each_tensor_where_the_source_had_it_modulo_64(tmp_path: Path) -> None:
    """Format 2: a tensor's offset modulo 64 is its recorded phase, and any safetensors reader still opens the file."""
    tensors = {"a": torch.arange(16.0), "b": torch.arange(6.0), "c": torch.ones(16, dtype=torch.float64)}
    header = save_to_ts(tensors, tmp_path / "p.ts", phases={"a": 8, "b": 4})
    parsed = read_ts_header(tmp_path / "p.ts")
    assert parsed.metadata["format_version"] == str(FORMAT_VERSION) and parsed.data_offset % 4096 == 0
    assert {name: info.start % 64 for name, info in parsed.tensors.items()} == {"a": 8, "b": 4, "c": 0}
    assert {name: info.phase for name, info in parsed.tensors.items()} == {"a": 8, "b": 4, "c": 0}
    assert parsed.tensors == header.tensors
    loaded = load_file(tmp_path / "p.ts")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    # a device copy moves each run down by its phase: every tensor 64-byte aligned, none overlapping
    places = []
    for start, end, shift in aligned_runs(parsed):
        assert (start - shift) % 64 == 0
        places.append((start - shift, end - shift))
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(places))


@pytest.mark.parametrize(
    "phases",
    ['{"a":3}', '{"zz":8}', '{"a":64}', "[8]", '{"a":8,"b":"x"}'],
)
def test_bad_phases_are_refused(tmp_path: Path, phases: str) -> None:
    from helpers.attacks import rewrite_header

    save_to_ts({"a": torch.arange(16.0), "b": torch.arange(16.0)}, tmp_path / "p.ts", phases={"a": 8})
    rewrite_header(tmp_path / "p.ts", lambda h: h["__metadata__"].__setitem__("phases", phases))
    with pytest.raises(FormatError, match="phase"):
        read_ts_header(tmp_path / "p.ts")


def test_a_tensor_off_its_phase_is_refused(tmp_path: Path) -> None:
    from helpers.attacks import rewrite_header

    save_to_ts({"a": torch.arange(16.0), "b": torch.arange(16.0)}, tmp_path / "p.ts", phases={"a": 8})
    rewrite_header(tmp_path / "p.ts", lambda h: h["__metadata__"].pop("phases"))  # a now sits off its phase 0
    with pytest.raises(FormatError, match="phase 0 modulo 64"):
        read_ts_header(tmp_path / "p.ts")


def test_format_1_files_still_read(tmp_path: Path) -> None:
    from helpers.attacks import rewrite_header

    save_to_ts({"a": torch.arange(16.0)}, tmp_path / "v1.ts")
    rewrite_header(tmp_path / "v1.ts", lambda h: h["__metadata__"].__setitem__("format_version", "1"))
    header = read_ts_header(tmp_path / "v1.ts")
    assert header.tensors["a"].phase == 0 and torch.equal(load_ts(tmp_path / "v1.ts")["a"], torch.arange(16.0))


def test_device_copies_put_every_tensor_at_a_64_byte_aligned_place(tmp_path: Path) -> None:
    """Off the CPU the pool moves each run down by its phase (as a device-resident model holds tensors aligned)."""
    from tensorstream.slots import GenericSlots

    tensors = {"a": torch.arange(16.0), "b": torch.arange(6.0), "c": torch.ones(16, dtype=torch.float64)}
    header = save_to_ts(tensors, tmp_path / "p.ts", phases={"a": 8, "b": 4})
    host = load_ts(tmp_path / "p.ts")  # views at the file's phases
    assert host["a"].data_ptr() % 64 == 8
    pool = GenericSlots(torch.device("cpu"), header.data_size)  # the generic device pool, run on the CPU
    region = pool.allocate(header.data_size)
    assert region is not None
    buffer = torch.empty(header.data_size, dtype=torch.uint8)
    read_data(header.path, header, buffer)
    pool.finish_read(region, header.data_size, source=buffer, runs=aligned_runs(header))
    pool.before_compute(region)
    device = pool.device_buffer(region)
    for name, info in header.tensors.items():
        view = device[info.start - info.phase : info.end - info.phase].view(info.torch_dtype).view(info.shape)
        assert view.data_ptr() % 64 == 0 and torch.equal(view, tensors[name]), name
    assert all(torch.equal(tensor_views(buffer, header)[k], v) for k, v in tensors.items())
