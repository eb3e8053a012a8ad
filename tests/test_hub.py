"""Preshard repos: push through huggingface_hub's real HfApi (HTTP faked at its client), consume from the Hub cache.

Nothing reaches the network: uploads and online downloads go to `FakeHub` through the client factory of
``huggingface_hub``; the offline tests build a cache folder in the standard layout and pass ``local_files_only``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForCausalLM

import tensorstream
from helpers.hub import FakeHub, FakeRepo, fake_hub_client, folder_files, make_hub_cache
from helpers.tokenizer import save_tokenizer
from tensorstream.cli import main
from tensorstream.integrations.publish import prepare_repo, pull, push
from tensorstream.store import Store

# huggingface_hub's LFS upload passes the file as data= (httpx's requests-compatible spelling); not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

STORE_FILES = {
    "tensorstream.json",
    "non_block.ts.safetensors",
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    *(f"blocks/model.layers.{i}.ts.safetensors" for i in range(6)),
}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
PROMPT = torch.tensor([[1, 17, 42, 99, 3, 250]])


def resident_logits(source: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.inference_mode():
        return model(PROMPT).logits


def streamed(source: str | Path, storage: Path, **kwargs: object) -> torch.nn.Module:
    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=0.0005)
    return AutoModelForCausalLM.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg, **kwargs)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROMPT).logits


@pytest.fixture(scope="module")
def source(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a tokenizer next to it."""
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    shutil.copytree(model_dirs["llama"], folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def preshard_store(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tensorstream.reshard(source, tmp_path_factory.mktemp("stores"), progress=False)


def cache_of_store(cache: Path, repo_id: str, store: Path) -> Path:
    files = {name: path for name, path in folder_files(store).items()}
    return make_hub_cache(cache, repo_id, files)


# -- consuming a preshard repo from an offline Hub cache ------------------------------------------------------


def test_offline_preshard_repo_streams_in_place(source: Path, preshard_store: Path, tmp_path: Path) -> None:
    cache, storage = tmp_path / "hub", tmp_path / "stores"
    snapshot = cache_of_store(cache, "org/tiny-llama-tensorstream", preshard_store)
    model = streamed("org/tiny-llama-tensorstream", storage, cache_dir=cache, local_files_only=True)
    engine = model._tensorstream_engine  # type: ignore[attr-defined]
    assert engine.store.path == snapshot.resolve()
    assert not storage.exists() or not any(storage.iterdir()), "a preshard repo must not be resharded"
    assert torch.equal(logits(model), resident_logits(source))
    assert tensorstream.stats(model).streamed_blocks > 0 and tensorstream.stats(model).bytes_read > 0
    assert model.config._name_or_path == "org/tiny-llama-tensorstream"


def test_a_local_store_folder_streams_in_place(source: Path, preshard_store: Path, tmp_path: Path) -> None:
    model = streamed(preshard_store, tmp_path / "stores")
    assert not (tmp_path / "stores").exists()
    assert torch.equal(logits(model), resident_logits(source))


def test_wrong_class_or_dtype_for_a_preshard_store(preshard_store: Path, tmp_path: Path) -> None:
    cfg = tensorstream.Config(device="cpu", storage_path=tmp_path, budget_gb=0.0005)
    with pytest.raises(tensorstream.ConfigError, match="LlamaForCausalLM, not LlamaModel"):
        AutoModel.from_pretrained(preshard_store, device_map="tensorstream", tensorstream_config=cfg)
    with pytest.raises(tensorstream.ConfigError, match="holds float32 weights but dtype=bfloat16"):
        AutoModelForCausalLM.from_pretrained(
            preshard_store, device_map="tensorstream", tensorstream_config=cfg, dtype=torch.bfloat16
        )


def test_incomplete_offline_snapshot_says_to_pull(preshard_store: Path, tmp_path: Path) -> None:
    files = folder_files(preshard_store)
    del files["blocks/model.layers.3.ts.safetensors"]
    make_hub_cache(tmp_path / "hub", "org/partial", files)
    with pytest.raises(tensorstream.StaleStoreError, match="tensorstream pull org/partial"):
        streamed("org/partial", tmp_path / "stores", cache_dir=tmp_path / "hub", local_files_only=True)


def test_pull_offline(preshard_store: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "hub"
    snapshot = cache_of_store(cache, "org/tiny-llama-tensorstream", preshard_store)
    assert pull("org/tiny-llama-tensorstream", cache_dir=cache, local_files_only=True) == snapshot
    args = ["pull", "org/tiny-llama-tensorstream", "--cache-dir", str(cache), "--local-files-only", "--json"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["folder"] == str(snapshot) and info["blocks"] == 6
    assert main(["inspect", info["folder"]]) == 0
    assert "recorded" in capsys.readouterr().out

    make_hub_cache(cache, "org/tiny-llama", folder_files(source))  # an ordinary checkpoint
    assert main(["pull", "org/tiny-llama", "--cache-dir", str(cache), "--local-files-only"]) == 1
    assert "not a tensorstream preshard repo" in capsys.readouterr().err


# -- publishing, through HfApi with a fake Hub behind its HTTP client -----------------------------------------


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    import huggingface_hub.constants as constants

    saved = constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE
    # The LFS protocol is HTTP all the way, so the fake Hub serves it; xet uploads go through hf_xet's own
    # (Rust) client, which no Python-level fake reaches.
    constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE = True, False
    try:
        with fake_hub_client(FakeHub(user="me")) as fake:
            yield fake
    finally:
        constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE = saved


@pytest.fixture(scope="module")
def pushed(hub: FakeHub, source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``org/tiny-llama`` (from a Hub cache) pushed as ``me/tiny-llama-tensorstream``, private."""
    cache = tmp_path_factory.mktemp("hub-cache")
    make_hub_cache(cache, "org/tiny-llama", folder_files(source))
    storage = tmp_path_factory.mktemp("push-stores")
    result = push(
        "org/tiny-llama",
        "tiny-llama-tensorstream",  # no namespace: the Hub puts it under the user's
        private=True,
        token="hf_fake_token",
        storage_path=storage,
        cache_dir=cache,
        local_files_only=True,
        progress=False,
    )
    (store,) = [p for p in storage.iterdir() if not p.name.startswith(".")]
    return {"result": result, "store": store}


def test_push_creates_the_repo_and_commits_the_store_last_the_manifest(
    hub: FakeHub, pushed: dict[str, object]
) -> None:
    result = pushed["result"]
    store = Path(pushed["store"])  # type: ignore[arg-type]
    assert hub.created == [
        {"name": "tiny-llama-tensorstream", "organization": None, "visibility": "private", "type": "model"}
    ]
    repo = hub.repos["me/tiny-llama-tensorstream"]
    assert repo.private
    assert set(repo.files) == {".gitattributes", "README.md", *STORE_FILES, *TOKENIZER_FILES}
    for name in STORE_FILES:
        assert repo.files[name] == (store / name).read_bytes(), name
    assert {n for n in repo.lfs} == {n for n in STORE_FILES if n.endswith(".safetensors")}
    # two commits after the initial one: everything but the manifest, then the manifest alone
    upload, manifest = repo.commits[1:]
    assert {op["value"]["path"] for op in upload["operations"] if op["key"] != "deletedFile"} == (
        {"README.md", *STORE_FILES, *TOKENIZER_FILES} - {"tensorstream.json"}
    )
    assert [op["value"]["path"] for op in manifest["operations"]] == ["tensorstream.json"]
    assert result.repo_id == "me/tiny-llama-tensorstream"  # type: ignore[attr-defined]
    assert result.commit_url.startswith("https://huggingface.co/me/tiny-llama-tensorstream/commit/")  # type: ignore[attr-defined]
    assert set(hub.authorizations) == {"Bearer hf_fake_token"}


def test_push_writes_a_model_card(hub: FakeHub, pushed: dict[str, object]) -> None:
    card = hub.repos["me/tiny-llama-tensorstream"].files["README.md"].decode()
    assert hub.yaml_checked and set(hub.yaml_checked) == {card}  # the Hub was asked to validate its metadata
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "tensorstream" and front["tags"] == ["tensorstream"]
    assert front["base_model"] == "org/tiny-llama" and front["pipeline_tag"] == "text-generation"
    assert 'device_map="tensorstream"' in card and "LlamaForCausalLM" in card


def test_stream_a_pushed_repo_downloads_only_what_it_needs(
    hub: FakeHub, pushed: dict[str, object], source: Path, tmp_path: Path
) -> None:
    hub.requests.clear()
    model = streamed("me/tiny-llama-tensorstream", tmp_path / "stores", cache_dir=tmp_path / "hub")
    assert sorted(hub.downloads()) == sorted(STORE_FILES)  # no README.md, no tokenizer files
    assert not (tmp_path / "stores").exists(), "a preshard repo must not be resharded"
    assert torch.equal(logits(model), resident_logits(source))
    # a second load is served from the cache: the manifest is checked, nothing is downloaded again
    hub.requests.clear()
    streamed("me/tiny-llama-tensorstream", tmp_path / "stores", cache_dir=tmp_path / "hub")
    assert hub.downloads() == []


def test_plain_transformers_loads_a_pushed_repo(
    hub: FakeHub, pushed: dict[str, object], source: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained("me/tiny-llama-tensorstream", cache_dir=tmp_path / "hub")
    with torch.inference_mode():
        assert torch.equal(model(PROMPT).logits, resident_logits(source))


def test_pull_then_offline_load(
    hub: FakeHub, pushed: dict[str, object], source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "hub"
    assert main(["pull", "me/tiny-llama-tensorstream", "--cache-dir", str(cache), "--json"]) == 0
    folder = Path(json.loads(capsys.readouterr().out)["folder"])
    assert set(folder_files(folder)) == STORE_FILES
    hub.requests.clear()
    model = streamed("me/tiny-llama-tensorstream", tmp_path / "stores", cache_dir=cache, local_files_only=True)
    assert hub.requests == []
    assert torch.equal(logits(model), resident_logits(source))


def test_push_again_removes_the_old_manifest_first(hub: FakeHub, pushed: dict[str, object], source: Path) -> None:
    store = Path(pushed["store"])  # type: ignore[arg-type]
    before = len(hub.repos["me/tiny-llama-tensorstream"].commits)
    push(store, "me/tiny-llama-tensorstream", token="hf_fake_token", tokenizer=source, progress=False)
    repo = hub.repos["me/tiny-llama-tensorstream"]
    upload, manifest = repo.commits[before:]
    assert {"key": "deletedFile", "value": {"path": "tensorstream.json"}} in upload["operations"]
    assert [op["value"]["path"] for op in manifest["operations"]] == ["tensorstream.json"]
    assert set(repo.files) == {".gitattributes", "README.md", *STORE_FILES, *TOKENIZER_FILES}
    assert hub.created[-1]["name"] == "tiny-llama-tensorstream"  # create_repo(exist_ok=True) on an existing repo


def test_push_errors_exit_3(hub: FakeHub, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.refuse["/api/repos/create"] = 401
    try:
        args = ["push", str(source), "me/refused", "--storage-path", str(tmp_path), "--token", "bad", "--json"]
        assert main(args) == 3
    finally:
        hub.refuse.clear()
    assert "error: the Hugging Face Hub" in capsys.readouterr().err


def test_push_dry_run_reaches_no_hub(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["push", str(source), "me/dry", "--storage-path", str(tmp_path), "--dry-run", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["files"]) == {"README.md", *STORE_FILES, *TOKENIZER_FILES}
    assert "library_name: tensorstream" in result["model_card"] and "base_model" not in result["model_card"]


def test_prepare_repo_copies_or_links(source: Path, tmp_path: Path) -> None:
    linked = prepare_repo(source, tmp_path / "linked", storage_path=tmp_path / "stores", progress=False)
    copied = prepare_repo(source, tmp_path / "copied", storage_path=tmp_path / "stores", copy=True, progress=False)
    assert (linked / "non_block.ts.safetensors").is_symlink()
    assert not (copied / "non_block.ts.safetensors").is_symlink()
    assert set(folder_files(linked)) == set(folder_files(copied)) == {"README.md", *STORE_FILES, *TOKENIZER_FILES}
    Store.open(copied, verify="checksum")
    with pytest.raises(tensorstream.ConfigError, match="not an empty folder"):
        prepare_repo(source, copied)


def test_an_ordinary_hub_repo_is_still_resharded(hub: FakeHub, source: Path, tmp_path: Path) -> None:
    """The manifest probe answers 404 for an ordinary checkpoint, which is then downloaded and resharded."""
    hub.repos["org/plain"] = FakeRepo(files={name: path.read_bytes() for name, path in folder_files(source).items()})
    hub.repos["org/plain"].lfs.add("model.safetensors")
    hub.requests.clear()
    model = streamed("org/plain", tmp_path / "stores", cache_dir=tmp_path / "hub")
    assert any(m == "HEAD" and p.endswith("/tensorstream.json") for m, p in hub.requests)  # the probe, 404
    assert "model.safetensors" in hub.downloads()
    assert len([p for p in (tmp_path / "stores").iterdir() if not p.name.startswith(".")]) == 1
    assert torch.equal(logits(model), resident_logits(source))


# -- a diffusers model as a preshard repo ---------------------------------------------------------------------

FLUX_REPO_FILES = {
    "tensorstream.json",
    "non_block.ts.safetensors",
    "config.json",
    "model.safetensors.index.json",
    *(
        f"blocks/{stack}.{i}.ts.safetensors"
        for stack in ("transformer_blocks", "single_transformer_blocks")
        for i in (0, 1)
    ),
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Flux transformer of tests/test_diffusers.py, saved with ``save_pretrained``."""
    from helpers.diffusers_models import tiny_model

    folder = tmp_path_factory.mktemp("flux") / "tiny-flux"
    tiny_model("flux").save_pretrained(folder)
    return folder


def flux_output(model: torch.nn.Module) -> torch.Tensor:
    from helpers.diffusers_models import inputs

    with torch.no_grad():
        return model(**inputs("flux"))[0]


def streamed_flux(source: str | Path, storage: Path, **kwargs: object) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    cfg = tensorstream.Config(device="cpu", storage_path=storage, budget_gb=0.0004)
    return FluxTransformer2DModel.from_pretrained(source, device_map="tensorstream", tensorstream_config=cfg, **kwargs)


def resident_flux(folder: Path) -> torch.Tensor:
    from diffusers import FluxTransformer2DModel

    return flux_output(FluxTransformer2DModel.from_pretrained(folder))


def test_offline_preshard_repo_of_a_diffusers_model_streams_in_place(flux: Path, tmp_path: Path) -> None:
    """A Flux transformer's preshard repo in the Hub cache, at the root and as a pipeline's ``transformer``
    subfolder (``from_pretrained(repo, subfolder="transformer")``, as diffusers users load it): streamed in place,
    bit-identical to diffusers' resident load of the checkpoint."""
    repo = prepare_repo(flux, tmp_path / "repo", storage_path=tmp_path / "stores", copy=True, progress=False)
    assert set(folder_files(repo)) == {"README.md", *FLUX_REPO_FILES}
    files = folder_files(repo)
    snapshot = make_hub_cache(tmp_path / "hub", "org/tiny-flux-tensorstream", files)
    make_hub_cache(tmp_path / "hub", "org/tiny-flux-pipeline", {f"transformer/{n}": p for n, p in files.items()})
    expected = resident_flux(flux)
    for repo_id, kwargs in (
        ("org/tiny-flux-tensorstream", {}),
        ("org/tiny-flux-pipeline", {"subfolder": "transformer"}),
    ):
        model = streamed_flux(repo_id, tmp_path / "s", cache_dir=tmp_path / "hub", local_files_only=True, **kwargs)
        assert torch.equal(flux_output(model), expected)
        assert tensorstream.stats(model).streamed_blocks > 0 and tensorstream.stats(model).bytes_read > 0
        assert model.config._name_or_path == repo_id
    assert model._tensorstream_engine.store.path.parent.name == snapshot.name  # the snapshot's transformer folder
    assert not (tmp_path / "s").exists(), "a preshard repo must not be resharded"


def test_push_a_diffusers_model_and_stream_it_from_the_hub(
    hub: FakeHub, flux: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    push(flux, "me/tiny-flux-tensorstream", token="hf_fake_token", storage_path=tmp_path / "stores", progress=False)
    repo = hub.repos["me/tiny-flux-tensorstream"]
    assert set(repo.files) == {".gitattributes", "README.md", *FLUX_REPO_FILES}
    card = repo.files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["tensorstream", "diffusers"] and "pipeline_tag" not in front
    assert "from diffusers import FluxTransformer2DModel" in card and "AutoModelForCausalLM" not in card
    hub.requests.clear()
    model = streamed_flux("me/tiny-flux-tensorstream", tmp_path / "s", cache_dir=tmp_path / "hub")
    assert sorted(hub.downloads()) == sorted(FLUX_REPO_FILES)  # no README.md
    assert torch.equal(flux_output(model), resident_flux(flux))
    assert not (tmp_path / "s").exists()
    # pulled, then streamed offline
    assert main(["pull", "me/tiny-flux-tensorstream", "--cache-dir", str(tmp_path / "hub2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == 4
    hub.requests.clear()
    model = streamed_flux(
        "me/tiny-flux-tensorstream", tmp_path / "s", cache_dir=tmp_path / "hub2", local_files_only=True
    )
    assert hub.requests == [] and torch.equal(flux_output(model), resident_flux(flux))


def test_push_dry_run_of_a_diffusers_model(flux: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["push", str(flux), "me/dry-flux", "--storage-path", str(tmp_path), "--dry-run", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["files"]) == {"README.md", *FLUX_REPO_FILES}
    assert "FluxTransformer2DModel.from_pretrained(" in result["model_card"]


def test_preshard_pipeline_repo_streams_its_store_components(tmp_path: Path) -> None:
    """A Flux pipeline repo whose transformer and T5 encoder folders are stores: ``DiffusionPipeline.from_pretrained(
    repo, device_map="tensorstream")`` from the offline Hub cache streams them in place (no reshard; they stream
    even where the default choice would not), and the images equal the resident pipeline's."""
    from diffusers import DiffusionPipeline

    from helpers.diffusers_models import save_flux_pipeline

    folder = save_flux_pipeline(tmp_path)
    call = {"prompt": "a cat", "num_inference_steps": 2, "height": 16, "width": 16, "max_sequence_length": 16}
    expected = DiffusionPipeline.from_pretrained(folder)(
        **call, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    files = folder_files(folder)
    for name in ("transformer", "text_encoder_2"):
        store = tensorstream.reshard(folder / name, tmp_path / "stores", progress=False)
        files = {n: p for n, p in files.items() if not n.startswith(f"{name}/")}
        files.update({f"{name}/{n}": p for n, p in folder_files(store).items()})
    snapshot = make_hub_cache(tmp_path / "hub", "org/tiny-flux-pipeline-tensorstream", files)
    config = tensorstream.Config(device="cpu", storage_path=tmp_path / "s", budget_gb=0.0008)
    pipe = DiffusionPipeline.from_pretrained(
        "org/tiny-flux-pipeline-tensorstream",
        device_map="tensorstream",
        tensorstream_config=config,
        tensorstream_components=["vae"],
        cache_dir=tmp_path / "hub",
        local_files_only=True,
    )
    engines = {
        name: c._tensorstream_engine for name, c in pipe.components.items() if hasattr(c, "_tensorstream_engine")
    }
    assert set(engines) == {"vae", "transformer", "text_encoder_2"}
    for name in ("transformer", "text_encoder_2"):
        assert engines[name].store.path == (snapshot / name).resolve()
    assert torch.equal(pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0)).images, expected)
    assert len([p for p in (tmp_path / "s").iterdir() if not p.name.startswith(".")]) == 1  # the VAE alone
