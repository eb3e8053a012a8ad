"""Fuzzing the parsers of untrusted input (issue #7, item 2): ``.ts`` headers, manifests and indexes.

hypothesis generates thousands of inputs per target: random bytes, generated JSON shaped like a header or a
manifest, and mutations of valid files (bit flips, overwritten, inserted and deleted bytes, truncation, edited
JSON fields). Whatever the input, only `TensorStreamError` subclasses may come out, and whatever is accepted
must be self-consistent (offsets inside the file, paths inside the store). Each target's example count is
checked and printed (``pytest -s`` shows them); the whole file runs in well under 30 s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import torch

import tensorstream
from tensorstream.format import DATA_ALIGNMENT, DTYPES, load_ts, parse_ts_header, read_ts_header
from tensorstream.store import INDEX_NAME, MANIFEST_NAME, Store, check_relative_path, validate_manifest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: Examples per target; TENSORSTREAM_FUZZ_SCALE multiplies them (e.g. 20 for a nightly run).
SCALE = float(os.environ.get("TENSORSTREAM_FUZZ_SCALE", "1"))
#: Seed of the plain random mutation storms (hypothesis picks its own and prints it on failure).
SEED = int(os.environ.get("TENSORSTREAM_FUZZ_SEED", "0"))
EXAMPLES = {
    "ts header: random bytes": 1500,
    "ts header: generated JSON": 600,
    "ts header: consistent, one field changed": 800,
    "ts file: mutated (hypothesis)": 1000,
    "ts file: mutation storm": 10_000,
    "manifest: generated and edited JSON": 600,
    "manifest: mutation storm": 5000,
    f"Store.open: mutated {MANIFEST_NAME}": 400,
    f"Store.open: mutated {INDEX_NAME}": 400,
    "store paths": 1000,
}
#: Examples run per target in this session (checked by each test, printed at its end).
COUNTS: Counter[str] = Counter()
COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,  # nothing written to .hypothesis/; a failure prints the input and how to reproduce it
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
ALLOWED = (tensorstream.TensorStreamError,)
WHERE = Path("/fuzz/x.ts")


def examples(name: str) -> int:
    return max(int(EXAMPLES[name] * SCALE), 1)


def run(name: str, test: Callable[[], None]) -> None:
    """Run ``test`` (hypothesis, or a plain loop) and check that it ran (nearly) ``examples(name)`` examples."""
    test()
    print(f"\nfuzz {name}: {COUNTS[name]} examples")
    assert COUNTS[name] >= examples(name) * 0.9, COUNTS[name]


# -- strategies ----------------------------------------------------------------------------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 5000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6,
)
dtype_code = st.sampled_from(sorted(DTYPES)) | st.sampled_from(["F99", "", "f32", "BF16 ", "U8\x00"]) | json_leaf
dimension = st.integers(0, 70) | st.integers(-(2**70), 2**70) | json_leaf
offset = st.integers(0, 70000) | st.integers(-(2**70), 2**70) | json_leaf
entry = (
    st.fixed_dictionaries(
        {
            "dtype": dtype_code,
            "shape": st.lists(dimension, max_size=4) | json_value,
            "data_offsets": st.lists(offset, min_size=2, max_size=2) | st.lists(offset, max_size=3) | json_value,
        },
        optional={"extra": json_value},
    )
    | json_value
)
metadata = (
    st.fixed_dictionaries(
        {},
        optional={
            "format": st.sampled_from(["tensorstream", "other"]) | json_leaf,
            "format_version": st.sampled_from(["1", "2", "0", "01", "\u00b2", "\u0661", "-1", " 1", "1.0"])
            | json_leaf,
            "block": st.text(max_size=10) | json_leaf,
            "checksum": st.text(max_size=14) | json_leaf,
        },
    )
    | json_value
)
header_dict = st.builds(
    lambda entries, meta: entries if meta is None else {"__metadata__": meta, **entries},
    st.dictionaries(st.text(max_size=12), entry, max_size=4),
    st.none() | metadata,
)


@st.composite
def consistent_header(draw: st.DrawFn) -> tuple[bytes, int]:
    """A header whose offsets are consistent (so parsing gets far), then sometimes one field changed."""
    names = draw(st.lists(st.text(min_size=1, max_size=10), unique=True, max_size=5))
    header: dict[str, Any] = {}
    cursor = 0
    for name in names:
        code = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 9), max_size=3))
        nbytes = torch.empty((), dtype=DTYPES[code]).element_size()
        for dim in shape:
            nbytes *= dim
        pad = draw(st.sampled_from([0, -cursor % 64, draw(st.integers(0, 70))]))
        if pad:
            header[f"__tensorstream_pad__.{len(header)}"] = {
                "dtype": "U8",
                "shape": [pad],
                "data_offsets": [cursor, cursor + pad],
            }
            cursor += pad
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    header["__metadata__"] = {"format": "tensorstream", "format_version": "1", "block": "", "checksum": "crc32:0"}
    if draw(st.booleans()) and names:  # one field changed to anything
        target = header[draw(st.sampled_from(names))]
        target[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_value)
    raw = json.dumps(header).encode()
    if draw(st.booleans()):
        raw += b" " * (-(8 + len(raw)) % DATA_ALIGNMENT)
    size = 8 + len(raw) + cursor + draw(st.sampled_from([0, 0, 0, -1, 1, draw(st.integers(-(2**40), 2**40))]))
    return raw, size


def _flip(data: bytearray, draw: st.DrawFn) -> None:
    if data:
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))


def _set(data: bytearray, draw: st.DrawFn) -> None:
    if data:
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))


def _truncate(data: bytearray, draw: st.DrawFn) -> None:
    del data[draw(st.integers(0, len(data))) :]


def _append(data: bytearray, draw: st.DrawFn) -> None:
    data += draw(st.binary(max_size=64))


def _insert(data: bytearray, draw: st.DrawFn) -> None:
    at = draw(st.integers(0, len(data)))
    data[at:at] = draw(st.binary(min_size=1, max_size=16))


def _delete(data: bytearray, draw: st.DrawFn) -> None:
    at = draw(st.integers(0, len(data)))
    del data[at : at + draw(st.integers(1, 16))]


def _overwrite(data: bytearray, draw: st.DrawFn) -> None:
    at = draw(st.integers(0, len(data)))
    chunk = draw(st.binary(min_size=1, max_size=32))
    data[at : at + len(chunk)] = chunk


def _length_prefix(data: bytearray, draw: st.DrawFn) -> None:
    value = draw(st.integers(0, 2**64 - 1) | st.integers(0, 70000))
    data[:8] = struct.pack("<Q", value)


BYTE_MUTATIONS = [_flip, _flip, _set, _truncate, _append, _insert, _delete, _overwrite]


@st.composite
def mutated(draw: st.DrawFn, original: bytes, extra: tuple[Callable[[bytearray, st.DrawFn], None], ...] = ()) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        draw(st.sampled_from([*BYTE_MUTATIONS, *extra]))(data, draw)
    return bytes(data)


@st.composite
def edited_json(draw: st.DrawFn, original: Any) -> Any:
    """``original`` with one to three leaves or members replaced, deleted or added (paths included)."""
    data = json.loads(json.dumps(original))
    escapes = st.sampled_from(
        ["../x.ts.safetensors", "/etc/passwd", "blocks/../../x.safetensors", "a//b.safetensors", ".", "", "\x00"]
    )
    for _ in range(draw(st.integers(1, 3))):
        node = data
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if not isinstance(child, dict | list) or draw(st.integers(0, 3)) == 0:
                action = draw(st.sampled_from(["replace", "escape", "delete", "add"]))
                if action == "delete":
                    del node[key]
                elif action == "add" and isinstance(node, dict):
                    node[draw(st.text(max_size=8))] = draw(json_value)
                else:
                    node[key] = draw(escapes if action == "escape" else json_value)
                break
            node = child
    return data


# -- .ts headers ---------------------------------------------------------------------------------------------------


def _parse(raw: bytes, file_size: int) -> None:
    try:
        header = parse_ts_header(raw, path=WHERE, file_size=file_size)
    except ALLOWED:
        return
    # Accepted: everything it claims lies inside the file.
    assert header.data_offset == 8 + len(raw) and header.data_offset % DATA_ALIGNMENT == 0
    assert header.file_size == file_size
    for info in header.tensors.values():
        assert 0 <= info.start <= info.end <= header.data_size
        assert info.start % 64 == 0 and info.dtype in DTYPES


def test_fuzz_ts_header_random_bytes() -> None:
    name = "ts header: random bytes"

    @settings(max_examples=examples(name), **COMMON)
    @given(st.binary(max_size=512) | st.binary(max_size=8).map(lambda b: b"{" + b), st.integers(0, 2**64))
    def fuzz(raw: bytes, file_size: int) -> None:
        COUNTS[name] += 1
        _parse(raw, file_size)

    run(name, fuzz)


def test_fuzz_ts_header_generated_json() -> None:
    name = "ts header: generated JSON"

    @settings(max_examples=examples(name), **COMMON)
    @given(header_dict, st.integers(0, 2**40) | st.integers(4096, 5000), st.booleans())
    def fuzz(header: dict[str, Any], file_size: int, pad: bool) -> None:
        COUNTS[name] += 1
        raw = json.dumps(header).encode()
        if pad:
            raw += b" " * (-(8 + len(raw)) % DATA_ALIGNMENT)
        _parse(raw, file_size)

    run(name, fuzz)


def test_fuzz_ts_header_consistent_then_changed() -> None:
    name = "ts header: consistent, one field changed"

    @settings(max_examples=examples(name), **COMMON)
    @given(consistent_header())
    def fuzz(case: tuple[bytes, int]) -> None:
        COUNTS[name] += 1
        _parse(*case)

    run(name, fuzz)


def test_fuzz_deeply_nested_json_is_a_format_error() -> None:
    for raw in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(tensorstream.FormatError):
            parse_ts_header(raw, path=WHERE, file_size=10**6)
    COUNTS["ts header: deep nesting"] += 3


@pytest.fixture(scope="module")
def valid_ts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("fuzz-ts")
    tensors = {
        "w": torch.randn(8, 8),
        "b": torch.arange(5, dtype=torch.int16),
        "h": torch.randn(3, 3).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
    }
    tensorstream.save_to_ts(tensors, folder / "valid.ts", {"note": "fuzz"}, block="model.layers.0")
    return folder / "case.ts", (folder / "valid.ts").read_bytes()


def _read_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and read it as a .ts file (header, then every tensor with its checksum)."""
    path.write_bytes(data)
    try:
        header = read_ts_header(path)
        tensors = load_ts(path, verify_checksum=True)
    except ALLOWED:
        return
    assert header.file_size == len(data)  # accepted: consistent with the file and with itself
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {n: i.shape for n, i in header.tensors.items()}


def test_fuzz_mutated_ts_files(valid_ts: tuple[Path, bytes]) -> None:
    name = "ts file: mutated (hypothesis)"
    path, original = valid_ts
    header_end = 8 + struct.unpack("<Q", original[:8])[0]

    def _in_header(data: bytearray, draw: st.DrawFn) -> None:  # most interesting bytes are in the JSON
        if len(data) > 8:
            at = draw(st.integers(8, min(header_end, len(data)) - 1))
            data[at] = draw(st.sampled_from(b'{}[]",:0123456789-e. ') | st.integers(0, 255))

    @settings(max_examples=examples(name), **COMMON)
    @given(mutated(original, (_in_header, _in_header, _length_prefix)))
    def fuzz(data: bytes) -> None:
        COUNTS[name] += 1
        _read_file(path, data)

    run(name, fuzz)


def _storm_mutation(rng: random.Random, data: bytearray, hot: int) -> None:
    """One random byte-level change; ``hot`` bytes at the start (prefix and JSON) get most of them."""
    kind = rng.randrange(8)
    at = rng.randrange(hot) if rng.random() < 0.8 and hot else rng.randrange(len(data) + 1)
    if kind <= 2 and at < len(data):
        data[at] ^= 1 << rng.randrange(8)
    elif kind == 3 and at < len(data):
        data[at] = rng.choice(b'{}[]",:0123456789-e. \x00\xff')
    elif kind == 4:
        del data[at:]
    elif kind == 5:
        data[at:at] = rng.randbytes(rng.randrange(1, 16))
    elif kind == 6:
        del data[at : at + rng.randrange(1, 16)]
    else:
        data[:8] = struct.pack(
            "<Q", rng.choice([rng.randrange(2**64), rng.randrange(70000), max(hot - 8 + rng.randrange(-9, 9), 0)])
        )


def test_fuzz_ts_file_mutation_storm(valid_ts: tuple[Path, bytes]) -> None:
    """Plain seeded random mutations, cheaper per case than hypothesis: many more of them."""
    name = "ts file: mutation storm"
    path, original = valid_ts
    hot = 8 + len(original[8:].split(b" ", 1)[0]) + 8
    rng = random.Random(SEED)
    for _ in range(examples(name)):
        data = bytearray(original)
        for _ in range(rng.randrange(1, 4)):
            _storm_mutation(rng, data, min(hot, len(data)))
        COUNTS[name] += 1
        _read_file(path, bytes(data))
    run(name, lambda: None)


# -- manifests, indexes and stores ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_store(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tensorstream.reshard(model_dirs["llama"], tmp_path_factory.mktemp("fuzz-store"), progress=False)


def _inside(root: Path, file: str) -> bool:
    return os.path.normpath(root / file).startswith(f"{root}{os.sep}")


def _validate(candidate: Any, store: Path) -> None:
    try:
        validate_manifest(candidate, store / MANIFEST_NAME)
    except ALLOWED:
        return
    opened = Store(store, candidate)  # accepted: it builds, and names only files inside the store
    assert all(_inside(store, entry.file) for entry in opened.entries())


def test_fuzz_generated_manifests(valid_store: Path) -> None:
    name = "manifest: generated and edited JSON"
    manifest = json.loads((valid_store / MANIFEST_NAME).read_text())

    @settings(max_examples=examples(name), **COMMON)
    @given(json_value | edited_json(manifest) | edited_json(manifest).flatmap(edited_json))
    def fuzz(candidate: Any) -> None:
        COUNTS[name] += 1
        _validate(candidate, valid_store)

    run(name, fuzz)


def test_fuzz_manifest_mutation_storm(valid_store: Path) -> None:
    name = "manifest: mutation storm"
    original = (valid_store / MANIFEST_NAME).read_bytes()
    rng = random.Random(SEED)
    for _ in range(examples(name)):
        data = bytearray(original)
        for _ in range(rng.randrange(1, 4)):
            _storm_mutation(rng, data, 0)
        COUNTS[name] += 1
        try:
            candidate = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue  # not JSON: Store.open's reader turns this into FormatError (tested below)
        _validate(candidate, valid_store)
    run(name, lambda: None)


@pytest.mark.parametrize("target", [MANIFEST_NAME, INDEX_NAME])
def test_fuzz_store_open_with_mutated_manifest_or_index(
    valid_store: Path, tmp_path_factory: pytest.TempPathFactory, target: str
) -> None:
    store = tmp_path_factory.mktemp("fuzz-open") / valid_store.name
    shutil.copytree(valid_store, store)
    original = (store / target).read_bytes()
    name = f"Store.open: mutated {target}"

    @settings(max_examples=examples(name), **COMMON)
    @given(
        mutated(original)
        | edited_json(json.loads(original)).map(lambda data: json.dumps(data).encode())
        | st.binary(max_size=256)
    )
    def fuzz(data: bytes) -> None:
        COUNTS[name] += 1
        (store / target).write_bytes(data)
        try:
            opened = Store.open(store, verify="header")
        except ALLOWED:
            return
        for entry in opened.entries():
            assert _inside(store, entry.file) and (store / entry.file).resolve().is_relative_to(store)

    run(name, fuzz)


def test_fuzz_relative_paths_never_leave_the_store() -> None:
    name = "store paths"
    part = st.sampled_from(["..", ".", "", "blocks", "a.safetensors", "x.ts.safetensors", "~", "\\", "/"]) | st.text(
        max_size=6
    )

    @settings(max_examples=examples(name), **COMMON)
    @given(st.lists(part, max_size=5).map("/".join) | st.text(max_size=20) | json_leaf)
    def fuzz(file: Any) -> None:
        COUNTS[name] += 1
        try:
            check_relative_path(file, Path("/store/tensorstream.json"), "fuzz")
        except ALLOWED:
            return
        assert isinstance(file, str) and _inside(Path("/store"), file)
        assert PurePosixPath(file).parts[0] not in ("..", "/") and file.endswith(".safetensors")

    run(name, fuzz)


def test_fuzz_totals() -> None:
    """Runs last in this file (pytest keeps file order): the total, for docs/guarantees.md and the CI log."""
    total = sum(COUNTS.values())
    print(f"\nfuzz total: {total} examples over {len(COUNTS)} targets")
    if set(EXAMPLES) <= set(COUNTS):  # the whole file ran (not a -k selection)
        assert total >= 0.9 * sum(examples(name) for name in EXAMPLES)
