"""Hostile and damaged stores (issue #11): every tensor the model runs with comes from the store's listed files,
checked against the manifest; nothing outside the store is read; a damaged block is caught on its first read.

Every test here backs a line of ``docs/guarantees.md``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import tensorstream
from helpers.attacks import edit_json, rewrite_header, within
from tensorstream.format import read_ts_header
from tensorstream.store import INDEX_NAME, MANIFEST_NAME

NON_BLOCK = "non_block.ts.safetensors"
BLOCK = "blocks/model.layers.{}.ts.safetensors"


def ids() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(3, 250, (1, 5))


@pytest.fixture(scope="module")
def pristine(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tensorstream.reshard(model_dirs["llama"], tmp_path_factory.mktemp("hostile"), progress=False)


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the Llama's store used as a preshard folder (streamed in place)."""
    dest = tmp_path / "repo"
    shutil.copytree(pristine, dest)
    return dest


@pytest.fixture(scope="module")
def reference(model_dirs: dict[str, Path]) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dirs["llama"])


def open_store(store: Path, budget: str = "some_resident", cls: Any = AutoModelForCausalLM, **config: Any) -> Any:
    cfg = tensorstream.Config(
        device="cpu",
        storage_path=store.parent / "unused",
        budget_gb=_budget(store, budget),
        prefetch=1,
        **config,
    )
    return within(120, lambda: cls.from_pretrained(store, device_map="tensorstream", tensorstream_config=cfg))


def _budget(store: Path, which: str) -> float:
    from tensorstream.store import Store

    opened = Store.open(store, verify="off")
    non_block, blocks = opened.non_block.data_size, [b.data_size for b in opened.blocks]
    slot = -(-max(blocks) // 4096) * 4096
    return {
        "stream_all": (non_block + 2 * slot) / 1e9,
        "some_resident": (non_block + blocks[0] + 2 * slot) / 1e9,
    }[which]


def _rename(store: Path, file: str, old: str, new: str) -> None:
    assert len(old) == len(new)

    def rename(header: dict[str, Any]) -> None:  # consistently: the tensor and its recorded phase (format 2)
        header[new] = header.pop(old)
        meta = header.get("__metadata__", {})
        if "phases" in meta:
            meta["phases"] = meta["phases"].replace(json.dumps(old), json.dumps(new))

    rewrite_header(store / file, rename)
    edit_json(store / INDEX_NAME, lambda i: i["weight_map"].__setitem__(new, i["weight_map"].pop(old)))


# -- 2, 3. every resident tensor comes from the store -----------------------------------------------------------------


def test_a_streamed_model_from_a_store_folder_is_exact(store: Path, reference: torch.nn.Module) -> None:
    for budget in ("stream_all", "some_resident"):
        model = open_store(store, budget)
        assert torch.equal(within(60, lambda model=model: model(ids()).logits), reference(ids()).logits)


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        (NON_BLOCK, "lm_head.weight", "lm_head.weighX"),
        (NON_BLOCK, "model.norm.weight", "model.norm.weighX"),
        (BLOCK.format(0), "model.layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.weighX"),
    ],
)
@pytest.mark.parametrize("verify", ["header", "checksum"])
def test_a_resident_tensor_missing_from_the_store_is_refused_not_initialised_at_random(
    store: Path, file: str, old: str, new: str, verify: str
) -> None:
    _rename(store, file, old, new)
    with pytest.raises(tensorstream.StaleStoreError, match=old.replace(".", r"\.")):
        open_store(store, "some_resident", verify=verify)


def test_a_config_with_more_layers_than_the_store_is_refused(store: Path) -> None:
    edit_json(store / "config.json", lambda c: c.__setitem__("num_hidden_layers", 7))
    with pytest.raises(tensorstream.StaleStoreError, match=r"model\.layers\.6"):
        open_store(store)


def test_a_config_with_fewer_layers_than_the_store_is_refused(store: Path) -> None:
    edit_json(store / "config.json", lambda c: c.__setitem__("num_hidden_layers", 4))
    with pytest.raises(tensorstream.StaleStoreError, match=r"model\.layers\.[45]"):
        open_store(store)


def test_a_resident_dtype_mismatch_is_refused_like_a_streamed_one(store: Path) -> None:
    """F32 relabelled I32 in the non-block file (manifest edited to match): was silently cast by transformers."""
    rewrite_header(store / NON_BLOCK, lambda h: h["model.norm.weight"].__setitem__("dtype", "I32"))

    def relabel(manifest: dict[str, Any]) -> None:
        manifest["non_block"]["dtypes"] = ["F32", "I32"]

    edit_json(store / MANIFEST_NAME, relabel)
    with pytest.raises(tensorstream.StaleStoreError, match=r"model\.norm\.weight.*I32"):
        open_store(store)


# -- 8, 9. nothing outside the listed files is read -------------------------------------------------------------------


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_transformers_weights_in_the_config_is_never_followed(
    store: Path, tmp_path: Path, reference: torch.nn.Module
) -> None:
    """The index it names lives outside the store and is a FIFO: opening it would hang the load."""
    evil = _fifo(tmp_path / "evil.index.json")
    edit_json(store / "config.json", lambda c: c.__setitem__("transformers_weights", str(evil)))
    model = open_store(store)
    assert torch.equal(within(60, lambda: model(ids()).logits), reference(ids()).logits)


def test_a_pytorch_bin_index_in_a_store_without_a_safetensors_index_is_never_read(
    store: Path, tmp_path: Path, reference: torch.nn.Module
) -> None:
    outside = _fifo(tmp_path / "shard.bin")
    (store / INDEX_NAME).unlink()
    index = {"weight_map": {"lm_head.weight": str(outside)}}
    (store / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model = open_store(store)
    assert torch.equal(within(60, lambda: model(ids()).logits), reference(ids()).logits)


@pytest.mark.parametrize("cls", [AutoModelForCausalLM, LlamaForCausalLM])
@pytest.mark.parametrize("attack", ["nesting bomb", "fifo", "link out", "huge"])
def test_a_hostile_config_json_is_refused_before_any_parser_reads_it(
    store: Path, tmp_path: Path, attack: str, cls: Any
) -> None:
    config = store / "config.json"
    config.unlink()
    if attack == "nesting bomb":
        config.write_text('{"model_type": "llama", "x": ' + "[" * 100000 + "]" * 100000 + "}")
    elif attack == "fifo":
        _fifo(config)
    elif attack == "link out":
        config.symlink_to(_fifo(tmp_path / "outside.json"))  # read before the check: a hang
    else:
        with open(config, "wb") as f:
            f.truncate(64 << 20)
    with pytest.raises(tensorstream.FormatError, match=r"config\.json"):
        open_store(store, cls=cls)


@pytest.mark.parametrize("name", ["config.json", MANIFEST_NAME])
@pytest.mark.parametrize("attack", ["nesting bomb", "fifo", "link out"])
def test_a_store_json_that_is_a_fifo_or_a_nesting_bomb_is_a_format_error_and_nothing_outside_is_opened(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, attack: str
) -> None:
    """A FIFO (in the store, or linked from outside it) is refused without blocking and without opening anything
    outside the store; JSON nested 100000 deep is a `FormatError` naming the file (not a `RecursionError`)."""
    import builtins
    import io

    budget = _budget(store, "some_resident")
    target = store / name
    target.unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    if attack == "nesting bomb":
        head = '{"model_type": "llama"' if name == "config.json" else '{"format": "tensorstream-store"'
        target.write_text(head + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    elif attack == "fifo":
        _fifo(target)
    else:
        target.symlink_to(_fifo(outside / name))
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    def py_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str | os.PathLike):
            opened.append(os.path.realpath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(io, "open", py_open)
    cfg = tensorstream.Config(device="cpu", storage_path=tmp_path / "unused", budget_gb=budget, prefetch=1)
    with pytest.raises(tensorstream.TensorStreamError, match=name.replace(".", r"\.")) as info:
        within(
            60, lambda: AutoModelForCausalLM.from_pretrained(store, device_map="tensorstream", tensorstream_config=cfg)
        )
    assert isinstance(info.value, tensorstream.FormatError | tensorstream.StaleStoreError), info.value
    if attack == "nesting bomb":
        assert isinstance(info.value, tensorstream.FormatError) and "nested deeper" in str(info.value)
    assert not [path for path in opened if path.startswith(str(outside))]


# -- 6, 7. damaged or replaced blocks ---------------------------------------------------------------------------------


def _damage_data(path: Path) -> None:
    """Flip one data bit in place, keeping the file's size and modification time (silent media damage)."""
    header = read_ts_header(path)
    info = path.stat()
    with open(path, "r+b") as f:
        f.seek(header.data_offset + header.data_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def test_a_damaged_block_is_caught_on_its_first_read_under_the_default_verify(store: Path) -> None:
    model = open_store(store, "stream_all")  # verify="header", the default
    _damage_data(store / BLOCK.format(3))
    with pytest.raises(tensorstream.CorruptFileError, match=r"model\.layers\.3"):
        within(60, lambda: model(ids()))


def test_verify_off_skips_the_first_read_check(store: Path) -> None:
    model = open_store(store, "stream_all", verify="off")
    _damage_data(store / BLOCK.format(3))
    within(60, lambda: model(ids()))  # the documented limit of verify="off": no check at all


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
@pytest.mark.parametrize("operation", ["detach", "save_pretrained"])
def test_detach_and_save_pretrained_check_the_checksum(store: Path, tmp_path: Path, operation: str) -> None:
    model = open_store(store, "stream_all", verify="checksum")
    _damage_data(store / BLOCK.format(4))
    with pytest.raises(tensorstream.CorruptFileError, match=r"model\.layers\.4"):
        if operation == "detach":
            tensorstream.detach(model)
        else:
            model.save_pretrained(tmp_path / "saved")
    if operation == "detach":  # refused before anything changed: still streaming
        assert tensorstream.stats(model) is not None


@pytest.mark.parametrize("replacement", ["another block", "fifo"])
def test_detach_refuses_a_block_file_replaced_after_loading(
    store: Path, reference: torch.nn.Module, replacement: str
) -> None:
    """detach() used to re-open by path against the cached header: it loaded the wrong layer, or hung on a FIFO."""
    model = open_store(store, "stream_all")
    target = store / BLOCK.format(2)
    target.unlink()
    if replacement == "fifo":
        _fifo(target)
    else:
        shutil.copy(store / BLOCK.format(1), target)
    with pytest.raises(tensorstream.StaleStoreError, match=r"model\.layers\.2"):
        within(60, lambda: tensorstream.detach(model))


def test_detach_gives_the_resident_model(store: Path, reference: torch.nn.Module) -> None:
    model = tensorstream.detach(open_store(store, "stream_all", verify="checksum"))
    assert torch.equal(within(60, lambda: model(ids()).logits), reference(ids()).logits)


# -- 13. headers safetensors would refuse -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        lambda h: h.__setitem__("model.norm.weighZ", {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}),
        lambda h: h.__setitem__("\ud800", {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}),
    ],
    ids=["a 2**70 dimension", "a lone surrogate name"],
)
def test_a_header_safetensors_would_refuse_is_a_format_error(store: Path, attack: Callable[[Any], None]) -> None:
    """tensorstream used to accept these and transformers' loader then failed with safetensors' own error."""
    rewrite_header(store / NON_BLOCK, attack)
    with pytest.raises(tensorstream.FormatError, match="non_block"):
        read_ts_header(store / NON_BLOCK)
