"""Reliability and security (issue #7): damaged and untrusted stores, failing readers, wrong configuration,
Ctrl-C during ``generate``, and a source checkpoint that no operation ever changes.

Every test here backs a line of ``docs/guarantees.md``.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import random
import re
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import tensorstream
from helpers.attacks import edit_json, rewrite_header
from helpers.models import budgets, streaming
from tensorstream.cli import main as cli
from tensorstream.format import FORMAT_VERSION, read_ts_header
from tensorstream.store import INDEX_NAME, MANIFEST_NAME, Store

NON_BLOCK = "non_block.ts.safetensors"
BLOCK = "blocks/model.layers.{}.ts.safetensors"


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links followed), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def ids() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(3, 250, (1, 5))


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread; fail if it has not returned or raised after ``seconds`` (a hang)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with torch.inference_mode():
                box["value"] = fn()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in box:
        raise box["error"]
    return box["value"]


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


@pytest.fixture(scope="module")
def pristine(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama's store, resharded once for this module; tests damage copies of it."""
    return tensorstream.reshard(model_dirs["llama"], tmp_path_factory.mktemp("pristine"), progress=False)


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the Llama's store at ``tmp_path/stores/<fingerprint>``, where reshard finds it."""
    dest = tmp_path / "stores" / pristine.name
    shutil.copytree(pristine, dest)
    return dest


@pytest.fixture(scope="module")
def reference(model_dirs: dict[str, Path]) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dirs["llama"])


# -- 1. damaged stores ---------------------------------------------------------------------------------------------


def test_a_flipped_data_byte_in_any_file_is_caught_by_checksum_and_by_tensorstream_verify(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = Store.open(store).entries()
    for entry in entries:
        file = store / entry.file
        raw = file.read_bytes()
        header = read_ts_header(file)
        flip_bit(file, header.data_offset + header.data_size // 2, 3)
        opened = Store.open(store, verify="header")  # headers still match: only the data changed
        with pytest.raises(tensorstream.CorruptFileError, match=re.escape(entry.file)) as info:
            opened.verify_checksums([opened.non_block, *opened.blocks])
        assert "tensorstream reshard" in str(info.value)
        assert cli(["verify", str(store)]) == 1
        out = capsys.readouterr().out
        assert f"DAMAGED {entry.file}" in out and f"{len(entries) - 1}/{len(entries)} files ok" in out
        file.write_bytes(raw)
    assert cli(["verify", str(store)]) == 0


@pytest.mark.parametrize("damaged", [NON_BLOCK, BLOCK.format(0)])
def test_checksum_mode_checks_the_resident_weights_when_the_model_is_loaded(
    model_dirs: dict[str, Path], store: Path, damaged: str
) -> None:
    """Resident weights are read once, by transformers' loader; verify="checksum" checks them before that."""
    header = read_ts_header(store / damaged)
    flip_bit(store / damaged, header.data_offset + 7)
    budget = budgets(store.parent, 1)["some_resident"]  # model.layers.0 stays resident
    with pytest.raises(tensorstream.CorruptFileError, match=re.escape(damaged)):
        streaming(model_dirs["llama"], store.parent, budget_gb=budget, prefetch=1, verify="checksum")


def test_every_single_bit_flip_in_a_ts_file_is_reported(store: Path) -> None:
    """Header (length prefix, JSON, padding) and data: no one-bit change goes unnoticed by `tensorstream verify`."""
    name = BLOCK.format(2)
    file = store / name
    raw = file.read_bytes()
    header = read_ts_header(file)
    json_end = 8 + len(raw[8 : header.data_offset].rstrip(b" "))
    rng = random.Random(0)
    positions = [
        *range(json_end),  # every byte of the length prefix and the JSON
        *rng.sample(range(json_end, header.data_offset), 64),  # padding
        *rng.sample(range(header.data_offset, len(raw)), 256),  # data
    ]
    missed = []
    for position in positions:
        bit = rng.randrange(8)
        damaged = bytearray(raw)
        damaged[position] ^= 1 << bit
        file.write_bytes(damaged)
        try:
            opened = Store.open(store, verify="off")
            opened.verify_checksums([e for e in opened.entries() if e.file == name])
        except tensorstream.TensorStreamError:
            continue
        missed.append((position, bit))
    assert not missed, f"{len(missed)} of {len(positions)} flips went unnoticed: {missed[:10]}"
    assert len(positions) > 1000


def _truncate(path: Path, size: int) -> None:
    os.truncate(path, size if size >= 0 else path.stat().st_size + size)


DAMAGES: dict[str, tuple[Callable[[Path], None], type[Exception], str, str]] = {
    # name: (damage, error, file the message names, text the message holds)
    "truncated data": (
        lambda s: _truncate(s / BLOCK.format(2), -100),
        tensorstream.CorruptFileError,
        "2",
        "truncated",
    ),
    "truncated header": (lambda s: _truncate(s / BLOCK.format(2), 100), tensorstream.CorruptFileError, "2", "past"),
    "empty file": (lambda s: _truncate(s / BLOCK.format(2), 0), tensorstream.CorruptFileError, "2", "too short"),
    "garbage header": (
        lambda s: (s / BLOCK.format(2)).write_bytes(
            (s / BLOCK.format(2)).read_bytes()[:8] + random.Random(1).randbytes(4088) + b"\0" * 70000
        ),
        tensorstream.FormatError,
        "2",
        "not valid UTF-8 JSON",
    ),
    "oversized header": (
        lambda s: (s / BLOCK.format(2)).write_bytes(struct.pack("<Q", 2**62) + b"{}"),
        tensorstream.FormatError,
        "2",
        "exceeds",
    ),
    "missing block": (lambda s: (s / BLOCK.format(2)).unlink(), tensorstream.StaleStoreError, "2", "missing"),
    "block replaced by another": (
        lambda s: shutil.copyfile(s / BLOCK.format(3), s / BLOCK.format(2)),
        tensorstream.StaleStoreError,
        "2",
        "checksum, block name",
    ),
    "newer .ts format": (
        lambda s: rewrite_header(
            s / BLOCK.format(2), lambda h: h["__metadata__"].update(format_version=str(FORMAT_VERSION + 1))
        ),
        tensorstream.FormatError,
        "2",
        "pip install -U tensorstream",
    ),
    "newer manifest": (
        lambda s: edit_json(s / MANIFEST_NAME, lambda m: m.update(format_version=FORMAT_VERSION + 1)),
        tensorstream.FormatError,
        MANIFEST_NAME,
        "pip install -U tensorstream",
    ),
    "missing manifest": (
        lambda s: (s / MANIFEST_NAME).unlink(),
        tensorstream.StaleStoreError,
        "",
        "tensorstream reshard",
    ),
    "truncated manifest": (
        lambda s: _truncate(s / MANIFEST_NAME, 200),
        tensorstream.FormatError,
        MANIFEST_NAME,
        "not valid UTF-8 JSON",
    ),
    "manifest of another size": (
        lambda s: edit_json(
            s / MANIFEST_NAME, lambda m: m["blocks"][2].update(data_size=m["blocks"][2]["data_size"] + 64)
        ),
        tensorstream.FormatError,
        MANIFEST_NAME,
        "total_bytes",
    ),
    "index of another store": (
        lambda s: edit_json(
            s / INDEX_NAME, lambda i: i["weight_map"].update({"model.layers.2.mlp.up_proj.weight": BLOCK.format(3)})
        ),
        tensorstream.StaleStoreError,
        "2",
        "tensor names",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_store_is_a_typed_error_naming_the_file_and_the_fix(
    model_dirs: dict[str, Path], store: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    apply, error, names, says = DAMAGES[damage]
    source = model_dirs["llama"]
    before = tree_digest(source)
    apply(store)
    with pytest.raises(error) as info:
        Store.open(store)
    message = str(info.value)
    assert says in message and (names in message if not names.isdigit() else f"model.layers.{names}" in message)
    # a manifest that cannot be read does not say how the store was built: remove it and load again (store.repair_hint)
    assert any(
        fix in message for fix in ("tensorstream reshard", "tensorstream cache rm", "pip install -U tensorstream")
    )
    # Loading the model finds the damage before any output, and says how to repair it; it never reshards silently.
    with pytest.raises(
        tensorstream.TensorStreamError, match=r"tensorstream reshard|tensorstream cache rm|pip install -U"
    ):
        streaming(source, store.parent, budget_gb=1)
    assert cli(["verify", str(store)]) == 1
    capsys.readouterr()
    assert tree_digest(source) == before


def test_a_changed_source_gets_a_new_store_and_the_old_one_is_never_used(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    source, storage = tmp_path / "model", tmp_path / "stores"
    shutil.copytree(model_dirs["llama"], source)
    budget = 1.0
    first = streaming(source, storage, budget_gb=budget)
    tensors = load_file(source / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    second = streaming(source, storage, budget_gb=budget)
    assert len([p for p in storage.iterdir() if not p.name.startswith(".")]) == 2
    changed = AutoModelForCausalLM.from_pretrained(source)
    with torch.inference_mode():
        assert torch.equal(second(ids()).logits, changed(ids()).logits)
        assert not torch.equal(first(ids()).logits, second(ids()).logits)


def test_weights_linked_from_elsewhere_are_fingerprinted_by_their_target(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A folder whose weights are links (not a Hub cache): rewriting the target in place gives a new store."""
    from safetensors.torch import load_file, save_file

    elsewhere, source, storage = tmp_path / "ckpt", tmp_path / "model", tmp_path / "stores"
    elsewhere.mkdir()
    source.mkdir()
    shutil.copyfile(model_dirs["llama"] / "model.safetensors", elsewhere / "model.safetensors")
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(model_dirs["llama"] / name, source / name)
    (source / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    first = tensorstream.reshard(source, storage, progress=False)
    tensors = load_file(elsewhere / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1  # same size, new content
    save_file(tensors, elsewhere / "model.safetensors", metadata={"format": "pt"})
    stat = (elsewhere / "model.safetensors").stat()
    os.utime(elsewhere / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = tensorstream.reshard(source, storage, progress=False)
    assert second != first
    stored = tensorstream.load_ts(second / NON_BLOCK)["model.norm.weight"]
    assert torch.equal(stored, tensors["model.norm.weight"])


def test_a_store_whose_folder_is_not_named_after_its_fingerprint_is_refused(
    model_dirs: dict[str, Path], store: Path, tmp_path: Path
) -> None:
    renamed = store.with_name("0123456789abcdef")
    store.rename(renamed)
    with pytest.raises(tensorstream.StaleStoreError, match="fingerprint"):
        Store.open(renamed)
    named = renamed.rename(store.with_name("my-llama-store"))  # a name that is not a fingerprint: a user's copy
    assert Store.open(named).fingerprint == store.name
    # Another model's store sitting where the Llama's belongs is refused, not streamed.
    qwen = tensorstream.reshard(model_dirs["qwen2"], tmp_path / "qwen", progress=False)
    shutil.copytree(qwen, store)
    with pytest.raises(tensorstream.StaleStoreError, match=f"{qwen.name}.*{store.name}|{store.name}.*{qwen.name}"):
        tensorstream.reshard(model_dirs["llama"], store.parent, progress=False)


# -- failures inside the background readers ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["posix", "mmap"])
def test_a_block_file_truncated_while_streaming_is_an_error_not_zeros_or_a_crash(
    model_dirs: dict[str, Path], store: Path, reference: torch.nn.Module, backend: str
) -> None:
    """The mmap backend would die of SIGBUS reading past the new end of the file; it reports a short read."""
    model = streaming(
        model_dirs["llama"],
        store.parent,
        budget_gb=budgets(store.parent, 1)["stream_all"],
        prefetch=1,
        backend=backend,
    )
    assert torch.equal(within(60, lambda: model(ids()).logits), reference(ids()).logits)
    header = read_ts_header(store / BLOCK.format(4))
    _truncate(store / BLOCK.format(4), header.data_offset + 100)
    with pytest.raises(tensorstream.CorruptFileError, match=r"model\.layers\.4.*tensorstream reshard"):
        within(60, lambda: model(ids()))


@pytest.mark.parametrize(
    "failure",
    [
        lambda *a: (_ for _ in ()).throw(RuntimeError("the driver said no")),
        lambda *a: (_ for _ in ()).throw(MemoryError()),
        lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")),
        lambda *a: 0,  # a read that silently returns nothing
    ],
    ids=["RuntimeError", "MemoryError", "EIO", "short read"],
)
def test_a_failing_reader_reaches_the_forward_as_a_typed_error_never_a_hang(
    model_dirs: dict[str, Path], store: Path, reference: torch.nn.Module, failure: Callable[..., int]
) -> None:
    model = streaming(
        model_dirs["llama"],
        store.parent,
        budget_gb=budgets(store.parent, 1)["stream_all"],
        prefetch=1,
        backend="posix",
    )
    engine = model._tensorstream_engine
    within(60, lambda: model(ids()))
    real = engine.backend.read_into
    engine.backend.read_into = failure
    for _ in range(2):  # and again: a failed engine does not hang on its next call either
        with pytest.raises((tensorstream.StreamingError, tensorstream.CorruptFileError)):
            within(60, lambda: model(ids()))
    engine.backend.read_into = real
    assert torch.equal(within(60, lambda: model(ids()).logits), reference(ids()).logits)


# -- 3. untrusted stores -------------------------------------------------------------------------------------------

ESCAPES = [
    "../outside.ts.safetensors",
    "/etc/outside.ts.safetensors",
    "blocks/../../outside.ts.safetensors",
    "./non_block.ts.safetensors",
    "blocks//model.layers.0.ts.safetensors",
    "blocks\\model.layers.0.ts.safetensors",
    "blocks/model.layers.0.ts.safetensors\x00",
    "",
    "non_block.ts",
]


@pytest.mark.parametrize("name", ESCAPES)
def test_a_manifest_naming_a_path_outside_the_store_is_refused(store: Path, name: str) -> None:
    (store.parent / "outside.ts.safetensors").write_bytes((store / BLOCK.format(1)).read_bytes())
    edit_json(store / MANIFEST_NAME, lambda m: m["blocks"][1].update(file=name))
    with pytest.raises(tensorstream.FormatError, match="refusing to read it"):
        Store.open(store, verify="off")


@pytest.mark.parametrize("name", [*ESCAPES, "blocks/model.layers.9.ts.safetensors", 7])
def test_an_index_naming_a_path_outside_the_store_is_refused(store: Path, name: Any) -> None:
    """The index is what transformers' loader follows: it may only name the manifest's files."""
    edit_json(store / INDEX_NAME, lambda i: i["weight_map"].update({"model.layers.1.mlp.up_proj.weight": name}))
    with pytest.raises(tensorstream.FormatError, match=r"refusing to read it|does not list"):
        Store.open(store, verify="off")


def _outside_copy(store: Path, rel: str) -> Path:
    outside = store.parent / "elsewhere" / Path(rel).name
    outside.parent.mkdir(exist_ok=True)
    shutil.copyfile(store / rel, outside)
    return outside


def _link_out(store: Path, rel: str, target: Path | str | None = None) -> None:
    """Replace ``store/rel`` by a symbolic link to ``target`` (default: a copy of it outside the store)."""
    target = _outside_copy(store, rel) if target is None else target
    (store / rel).unlink()
    (store / rel).symlink_to(target)


def _link_out_folder(store: Path, rel: str) -> None:
    outside = store.parent / "elsewhere-folder"
    shutil.move(str(store / rel), outside)
    (store / rel).symlink_to(outside, target_is_directory=True)


def _relative_link_out(store: Path) -> None:
    _outside_copy(store, BLOCK.format(1))  # <storage>/elsewhere/..., two levels above blocks/
    _link_out(store, BLOCK.format(1), Path("../../elsewhere/model.layers.1.ts.safetensors"))


LINKS: dict[str, Callable[[Path], None]] = {
    "block file": lambda s: _link_out(s, BLOCK.format(1)),
    "relative link": _relative_link_out,
    "dangling link": lambda s: _link_out(s, BLOCK.format(1), "/nonexistent/model.layers.1.ts.safetensors"),
    "manifest": lambda s: _link_out(s, MANIFEST_NAME),
    "index": lambda s: _link_out(s, INDEX_NAME),
    "config": lambda s: _link_out(s, "config.json"),
    "blocks folder": lambda s: _link_out_folder(s, "blocks"),
}


@pytest.mark.parametrize("link", list(LINKS))
def test_a_symlink_out_of_the_store_is_refused(model_dirs: dict[str, Path], store: Path, link: str) -> None:
    LINKS[link](store)
    with pytest.raises(tensorstream.FormatError, match="symbolic link"):
        Store.open(store, verify="off")
    with pytest.raises(tensorstream.TensorStreamError, match="symbolic link"):  # as a local store folder
        streaming(store, store.parent / "unused", budget_gb=1)


def test_links_inside_the_store_and_into_a_hub_cache_repo_are_allowed(store: Path, tmp_path: Path) -> None:
    hidden = store / "data" / "layer1"
    hidden.parent.mkdir()
    shutil.move(str(store / BLOCK.format(1)), hidden)
    (store / BLOCK.format(1)).symlink_to(Path("../data/layer1"))
    assert Store.open(store, verify="checksum").verify_checksums(Store.open(store).entries()) is None

    # A Hub cache snapshot: every file links into the repo's blobs/ folder.
    repo = tmp_path / "hub" / "models--org--preshard"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in store.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = file.relative_to(store)
        if rel.parts[0] == "data":
            rel = Path(BLOCK.format(1))
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(Path(*[".."] * (len(rel.parts) + 1), "blobs", blob.name))
    Store.open(snapshot).verify_checksums(Store.open(snapshot).entries())
    (snapshot / "config.json").unlink()  # but not out of the repo's cache folder
    (snapshot / "config.json").symlink_to(store / "config.json")
    with pytest.raises(tensorstream.FormatError, match="symbolic link"):
        Store.open(snapshot)


HEADER_ATTACKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "offsets beyond the file": (
        lambda h: h["model.layers.1.mlp.up_proj.weight"].update(
            data_offsets=[10**12, 10**12 + _span(h["model.layers.1.mlp.up_proj.weight"])]
        ),
        "hole",
    ),
    "overlapping offsets": (
        lambda h: h["model.layers.1.mlp.up_proj.weight"].update(
            data_offsets=[0, _span(h["model.layers.1.mlp.up_proj.weight"])]
        ),
        "overlaps",
    ),
    "negative offset": (
        lambda h: h["model.layers.1.input_layernorm.weight"].update(data_offsets=[-256, 0]),
        "invalid data_offsets",
    ),
    "shape against byte count": (lambda h: h["model.layers.1.mlp.up_proj.weight"].update(shape=[128, 65]), "needs"),
    "unknown dtype": (lambda h: h["model.layers.1.mlp.up_proj.weight"].update(dtype="F128"), "unknown dtype"),
    "huge shape": (lambda h: h["model.layers.1.mlp.up_proj.weight"].update(shape=[2**62, 2**62]), "needs"),
    "extra entry past the end": (
        lambda h: h.update(x={"dtype": "U8", "shape": [64], "data_offsets": [10**9, 10**9 + 64]}),
        "hole",
    ),
}


def _span(entry: dict[str, Any]) -> int:
    return int(entry["data_offsets"][1] - entry["data_offsets"][0])


@pytest.mark.parametrize("attack", list(HEADER_ATTACKS))
def test_a_hostile_ts_header_is_refused_before_anything_is_read(store: Path, attack: str) -> None:
    mutate, says = HEADER_ATTACKS[attack]
    rewrite_header(store / BLOCK.format(1), mutate)
    with pytest.raises(tensorstream.FormatError, match=says):
        Store.open(store)
    opened = Store.open(store, verify="off")  # and the lazy path (verify="off") checks it before any read
    with pytest.raises(tensorstream.FormatError, match=says):
        opened.header(opened.blocks[1])


def test_hostile_manifest_fields_are_refused(store: Path) -> None:
    cases: list[tuple[Callable[[dict[str, Any]], None], str]] = [
        (lambda m: m.update(tied=["lm_head.weight"]), "tied"),
        (lambda m: m.update(tied={"lm_head.weight": 3}), "tied"),
        (lambda m: m["blocks"][1].update(name=m["blocks"][0]["name"]), "named once"),
        (lambda m: m["blocks"][1].update(file=m["blocks"][0]["file"]), "reuses"),
        (lambda m: m["non_block"].update(name="model.layers.0"), "must be ''"),
        (lambda m: m["blocks"][1].update(data_size=-1), "data_size"),
        (lambda m: m["blocks"][1].update(dtypes="F32"), "dtypes"),
        (lambda m: m.update(format_version=True), "format_version"),
        (lambda m: m.update(blocks=[]), "non-empty list"),
    ]
    original = (store / MANIFEST_NAME).read_text()
    for mutate, says in cases:
        edit_json(store / MANIFEST_NAME, mutate)
        with pytest.raises(tensorstream.FormatError, match=says):
            Store.open(store, verify="off")
        (store / MANIFEST_NAME).write_text(original)


def test_an_unlisted_weight_file_in_the_store_is_refused(store: Path) -> None:
    """transformers prefers model.safetensors over the index: an unlisted one would bypass every check."""
    shutil.copyfile(store / NON_BLOCK, store / "model.safetensors")
    with pytest.raises(tensorstream.FormatError, match="does not list"):
        Store.open(store)


def test_nothing_is_unpickled_except_by_torch_load_weights_only() -> None:
    source_dir = Path(tensorstream.__file__).parent
    for file in source_dir.rglob("*.py"):
        text = file.read_text()
        assert not re.search(r"pickle\.loads?\(|Unpickler|allow_pickle\s*=\s*True|marshal\.loads?", text), file
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), (file, call.group(0))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "the-payload-ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    source = tmp_path / "model"
    source.mkdir()
    shutil.copyfile(model_dirs["llama"] / "config.json", source / "config.json")
    from safetensors.torch import load_file

    state: dict[str, Any] = dict(load_file(model_dirs["llama"] / "model.safetensors"))
    state["payload"] = Payload()
    torch.save(state, source / "pytorch_model.bin")
    before = tree_digest(source)
    with pytest.raises(tensorstream.FormatError, match=r"weights_only=True"):
        tensorstream.reshard(source, tmp_path / "stores", progress=False)
    assert not marker.exists()
    assert tree_digest(source) == before
    assert not [p for p in (tmp_path / "stores").iterdir() if not p.name.endswith(".lock")]


# -- 6. wrong configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error", "says"),
    [
        ({"budget_gb": 1e-6}, tensorstream.BudgetError, r"budget_gb=1e-06 is too small.*at least"),
        ({"device": "cuda:7"}, tensorstream.ConfigError, "cuda:7"),
        ({"backend": "kvikio"}, tensorstream.BackendUnavailableError, "backend='kvikio'"),
        ({"backend": "mmap", "direct_io": True}, tensorstream.BackendUnavailableError, "direct_io"),
        ({"budget_gb": "lots"}, tensorstream.ConfigError, "budget_gb"),
        ({"verify": "sometimes"}, tensorstream.ConfigError, "verify"),
    ],
    ids=["budget too small", "no such device", "kvikio on cpu", "mmap with O_DIRECT", "bad budget", "bad verify"],
)
def test_wrong_configuration_is_a_clear_error(
    model_dirs: dict[str, Path], pristine: Path, config: dict[str, Any], error: type[Exception], says: str
) -> None:
    config = {"device": "cpu", "budget_gb": 1.0, "storage_path": pristine.parent, **config}
    with pytest.raises(error, match=says):
        cfg = tensorstream.Config(**config)
        AutoModelForCausalLM.from_pretrained(model_dirs["llama"], device_map="tensorstream", tensorstream_config=cfg)


@pytest.mark.parametrize("text", ["[1, 2]", '"budget_gb"', "[" * 100_000, "{"])
def test_a_malformed_config_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "ts.json").write_text(text)
    with pytest.raises(tensorstream.ConfigError, match="TENSORSTREAM_CONFIG_FILE"):
        tensorstream.Config.from_env({"TENSORSTREAM_CONFIG_FILE": str(tmp_path / "ts.json")})


def test_kvikio_without_kvikio_installed_says_how_to_install_it() -> None:
    from tensorstream.backends import get_backend

    if importlib.util.find_spec("kvikio") is not None:
        pytest.skip("kvikio is installed here")
    with pytest.raises(tensorstream.BackendUnavailableError, match=r"pip install 'tensorstream\[gds-cu12\]'"):
        get_backend("kvikio", torch.device("cuda", 0))


def test_direct_io_on_a_filesystem_without_o_direct_is_a_clear_error(
    model_dirs: dict[str, Path], pristine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(tensorstream.BackendUnavailableError, match=r"O_DIRECT.*direct_io"):
        streaming(
            model_dirs["llama"], pristine.parent, budget_gb=budgets(pristine.parent)["stream_all"], direct_io=True
        )


def test_an_unsupported_model_is_a_clear_error_and_leaves_no_partial_store(tmp_path: Path) -> None:
    from transformers import PretrainedConfig, PreTrainedModel

    class NoBlocksConfig(PretrainedConfig):
        model_type = "tensorstream-test-no-blocks"

    class NoBlocks(PreTrainedModel):
        config_class = NoBlocksConfig

        def __init__(self, config: NoBlocksConfig) -> None:
            super().__init__(config)
            self.proj = torch.nn.Linear(8, 8)
            self.post_init()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    NoBlocks(NoBlocksConfig()).save_pretrained(tmp_path / "model")
    storage = tmp_path / "stores"
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=1)
    with pytest.raises(tensorstream.UnsupportedModelError, match=r"no repeated blocks.*without device_map"):
        NoBlocks.from_pretrained(tmp_path / "model", device_map="tensorstream", tensorstream_config=cfg)
    assert [p.suffix for p in storage.iterdir()] == [".lock"]  # no store, no staging folder


# -- 5. nothing lost -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.05, 0.25, 0.6])
def test_ctrl_c_during_generate_leaves_the_model_usable(
    model_dirs: dict[str, Path], pristine: Path, reference: torch.nn.Module, delay: float
) -> None:
    """A real SIGINT, delivered while generate waits for slow reads, at three different moments."""
    model = streaming(
        model_dirs["llama"], pristine.parent, budget_gb=budgets(pristine.parent, 1)["stream_all"], prefetch=1,
        backend="posix",
    )  # fmt: skip
    engine = model._tensorstream_engine
    real = engine.backend.read_into

    def slow(*args: Any) -> int:
        time.sleep(0.01)
        return real(*args)

    engine.backend.read_into = slow
    args = {"input_ids": ids(), "max_new_tokens": 40, "do_sample": False, "pad_token_id": 0}
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
    # Python's own handler, whatever this process inherited: a test run started in the background by a
    # non-interactive shell (`make test &`) inherits SIGINT ignored, and Python then installs no handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt), torch.inference_mode():
            model.generate(**args)  # 40 tokens x 6 blocks x 10 ms: seconds, far longer than the delay
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 2.4  # it was the signal that ended generate, not the last token
    engine.backend.read_into = real
    args["max_new_tokens"] = 6
    out = within(60, lambda: model.generate(**args))
    with torch.inference_mode():
        assert torch.equal(out, reference.generate(**args))


@pytest.mark.parametrize("where", ["queuing a read", "draining the pipeline"])
def test_an_interrupt_at_the_worst_moment_in_the_engine_never_hangs_the_next_call(
    model_dirs: dict[str, Path], pristine: Path, reference: torch.nn.Module, where: str
) -> None:
    """KeyboardInterrupt injected where the engine changes state: between queuing a block's reads (the load would
    wait forever for reads never queued), and while a miss drains the pipeline (the slot would be lost)."""
    model = streaming(
        model_dirs["llama"], pristine.parent, budget_gb=budgets(pristine.parent, 1)["stream_all"], prefetch=1
    )
    engine = model._tensorstream_engine
    within(60, lambda: model(ids()))
    if where == "queuing a read":
        real_submit = engine.executor.submit

        def submit(*args: Any, **kwargs: Any) -> Any:
            engine.executor.submit = real_submit
            raise KeyboardInterrupt

        engine.executor.submit = submit
        run: Callable[[], Any] = lambda: model(ids())  # noqa: E731
    else:
        first = next(iter(engine.pipeline.values()))
        first.done.wait()

        def interrupted_wait(*args: Any, **kwargs: Any) -> bool:
            del first.done.wait
            raise KeyboardInterrupt

        first.done.wait = interrupted_wait  # type: ignore[method-assign]
        hidden = torch.randn(1, 5, 64)
        embeddings = model.model.rotary_emb(hidden, torch.arange(5)[None])
        run = lambda: model.model.layers[3](hidden, position_embeddings=embeddings)  # noqa: E731  (a miss)
    with pytest.raises(KeyboardInterrupt):
        within(60, run)
    for _ in range(3):  # no hang, no lost slot: the next calls run, and give the exact output
        assert torch.equal(within(60, lambda: model(ids()).logits), reference(ids()).logits)
    # no lost memory: the arena's regions in flight are exactly the pipeline's
    assert sorted(id(r) for r in engine.slots.live) == sorted(id(load.slot) for load in engine.pipeline.values())


def test_the_source_is_byte_identical_after_every_operation(
    model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, storage = model_dirs["llama"], tmp_path / "stores"
    before = tree_digest(source)
    mtimes = {p: p.stat().st_mtime_ns for p in source.iterdir()}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("reshard", lambda: tensorstream.reshard(source, storage, progress=False)),
        ("reshard --force", lambda: tensorstream.reshard(source, storage, progress=False, force=True)),
        ("reshard --dtype bf16", lambda: tensorstream.reshard(source, storage, progress=False, dtype="bf16")),
        ("cli reshard", lambda: cli(["reshard", str(source), str(storage), "--json"])),
        ("cli inspect", lambda: cli(["inspect", str(tensorstream.reshard(source, storage, progress=False))])),
        ("cli verify", lambda: cli(["verify", str(tensorstream.reshard(source, storage, progress=False))])),
    ]
    for name, step in steps:
        step()
        assert tree_digest(source) == before, name
    model = streaming(source, storage, budget_gb=budgets_for(storage), prefetch=1)
    with torch.inference_mode():
        model.generate(ids(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tree_digest(source) == before, "generate"
    tensorstream.detach(model)
    assert tree_digest(source) == before, "detach"
    assert {p: p.stat().st_mtime_ns for p in source.iterdir()} == mtimes  # nothing written there, not even a touch
    capsys.readouterr()


def budgets_for(storage: Path) -> float:
    stores = [Store.open(p) for p in storage.iterdir() if not p.name.startswith(".")]
    store = next(s for s in stores if s.manifest["dtype"] is None)
    slot = -(-max(b.data_size for b in store.blocks) // 4096) * 4096
    return (store.non_block.data_size + 2 * slot) / 1e9
