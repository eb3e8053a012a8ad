"""Publishing preshard repos: `prepare_repo`, `push` and `pull` (the repo layout: `tensorstream.integrations.hub`).

`push` reshards a source (once, reusing an up-to-date store) and publishes it with ``HfApi.create_repo`` and
``HfApi.upload_folder``; the manifest goes up in a commit of its own, after every file it names, so a repo that has a
manifest is complete. `pull` pre-downloads a preshard repo into the Hub cache. This module builds on
`tensorstream.reshard` and the consuming side (`tensorstream.integrations.hub`), which never imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError, HubUnavailableError, StaleStoreError
from ..reshard import reshard
from ..store import MANIFEST_NAME, Store
from .hub import (
    CACHE_SNAPSHOT,
    TOKENIZER_FILES,
    TOKENIZER_GLOBS,
    PushResult,
    check_repo_id,
    download_manifest,
    download_store_files,
    hub_error_cause,
    hub_unreachable,
    is_preshard,
    reconnect_hint,
    resolve_source,
    store_files,
)

__all__ = ["model_card", "prepare_repo", "pull", "push"]

logger = logging.getLogger(__name__)


def prepare_repo(
    source: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    storage_path: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    model_class: type | str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    copy: bool = False,
    progress: bool = True,
    subfolder: str = "",
) -> Path:
    """Lay out the files of a preshard repo for ``source`` in ``folder`` (resharding first if needed).

    Args:
        source: a model folder or Hub id (resharded into ``storage_path``, or the up-to-date store reused), or a
            folder that already holds a store (a store folder or a preshard snapshot), published as it is.
        folder: where to write the repo's files; must be empty or not exist.
        storage_path: where stores live, as in `tensorstream.reshard`.
        dtype: convert floating-point weights when resharding, as in `tensorstream.reshard`.
        model_class: the transformers class whose tensors the store holds, as in `tensorstream.reshard`.
        tokenizer: a folder to take the tokenizer files from; defaults to the source folder.
        base_model: the Hub id named as ``base_model`` in the model card; defaults to ``source`` when it is a Hub
            id (or a Hub cache snapshot of one), else none.
        revision: the Hub revision of ``source``.
        cache_dir: the Hugging Face cache folder for ``source``.
        local_files_only: never reach the Hub for ``source``.
        token: the Hub token for ``source``.
        copy: copy the files instead of linking them (symbolic links, the default, cost no space).
        progress: show the reshard progress bar.
        subfolder: the folder of ``source`` that holds the model, e.g. ``"transformer"`` for a diffusers pipeline's
            transformer (a diffusers model publishes as a preshard repo of its own, loaded with its class's
            ``from_pretrained(repo_id, device_map="tensorstream")``).

    Returns:
        `Path`: ``folder``.

    Example:
        ```python
        >>> prepare_repo("./tiny-llama", "./tiny-llama-tensorstream", copy=True)
        >>> sorted(p.name for p in Path("./tiny-llama-tensorstream").iterdir())[:3]
        ['README.md', 'blocks', 'config.json']
        ```
    """
    out = Path(folder).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not an empty folder; prepare_repo writes a fresh repo folder: pass a new one.")
    src = resolve_source(
        source,
        cache_dir=cache_dir,
        revision=revision,
        local_files_only=local_files_only,
        token=token,
        subfolder=subfolder,
    )
    if is_preshard(src):
        if dtype is not None:
            raise ConfigError(f"{src} is already a store; it is published as it is, so dtype= cannot apply. Drop it.")
        store = Store.open(src, verify="header")
    else:
        store = Store.open(
            reshard(src, storage_path, dtype=dtype, model_class=model_class, progress=progress), verify="header"
        )
    base_model = base_model or _hub_id(source) or _hub_id(str(src)) or _hub_id(str(store.manifest.get("source", "")))
    base_model = base_model or _hub_id(str(store.manifest.get("folder", "")))
    out.mkdir(parents=True, exist_ok=True)
    place = shutil.copy2 if copy else _link
    for name in store_files(store):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        place(store.path / name, out / name)
    for file in _tokenizer_files(tokenizer, src, store):
        place(file, out / file.name)
    (out / "README.md").write_text(model_card(store, base_model=base_model), encoding="utf-8")
    return out


def push(
    source: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    model_class: type | str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    progress: bool = True,
    subfolder: str = "",
) -> PushResult:
    """Reshard ``source`` if needed and publish it as a preshard repo ``repo_id`` on the Hub.

    The repo is created if needed (``HfApi.create_repo(exist_ok=True)``). A first commit
    (``HfApi.upload_folder``) uploads the ``.ts`` files, configs, index, tokenizer files and model card and removes
    the manifest and block files of an earlier push; a second one adds ``tensorstream.json``, so a repo that has
    a manifest always has every file it names.

    Args:
        source: a model folder or Hub id, or a folder that already holds a store.
        repo_id: the repo to publish to, e.g. ``"org/model-tensorstream"``.
        private: create the repo private (ignored when it exists).
        token: a Hub token with write access; defaults to the one saved by ``hf auth login`` or ``HF_TOKEN``.
        commit_message: the first commit's message.
        storage_path: as in `prepare_repo`.
        dtype: as in `prepare_repo`.
        model_class: as in `prepare_repo`.
        tokenizer: as in `prepare_repo`.
        base_model: as in `prepare_repo`.
        revision: the Hub revision of ``source``.
        cache_dir: the Hugging Face cache folder for ``source``.
        local_files_only: never reach the Hub for ``source``.
        progress: show progress bars.
        subfolder: as in `prepare_repo` (``"transformer"``: a diffusers pipeline's transformer).

    Returns:
        `PushResult`: the repo id, the last commit's URL, and the files published.

    Example:
        ```python
        >>> result = push("meta-llama/Llama-3.1-8B", "me/Llama-3.1-8B-tensorstream", dtype="bf16")
        >>> result.commit_url
        'https://huggingface.co/me/Llama-3.1-8B-tensorstream/commit/...'
        ```
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="tensorstream-push-") as tmp:
        staged = prepare_repo(
            source,
            Path(tmp) / "repo",
            storage_path=storage_path,
            dtype=dtype,
            model_class=model_class,
            tokenizer=tokenizer,
            base_model=base_model,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            progress=progress,
            subfolder=subfolder,
        )
        files = sorted(_relative_files(staged))
        total = sum((staged / name).stat().st_size for name in files)
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        logger.info("tensorstream: publishing %d files (%.3f GB) to %s", len(files), total / 1e9, url)
        with _hub_progress_bars(progress):
            api.upload_folder(
                repo_id=url.repo_id,
                folder_path=staged,
                commit_message=commit_message or "Upload tensorstream store",
                ignore_patterns=[MANIFEST_NAME],
                delete_patterns=[MANIFEST_NAME, "blocks/*"],
            )
            commit = api.upload_file(
                path_or_fileobj=str(staged / MANIFEST_NAME),
                path_in_repo=MANIFEST_NAME,
                repo_id=url.repo_id,
                commit_message="Add tensorstream.json (the store is complete)",
            )
    return PushResult(repo_id=url.repo_id, commit_url=str(commit.commit_url), files=tuple(files), total_bytes=total)


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
) -> Path:
    """Download what streaming a preshard repo needs into the Hub cache; returns the snapshot folder.

    Raises:
        `StaleStoreError`: ``repo_id`` has no ``tensorstream.json`` (it is not a preshard repo) or the snapshot is
            incomplete. Errors of ``huggingface_hub`` (repo not found, no network) are raised as they are.

    Example:
        ```python
        >>> folder = pull("org/tiny-llama-tensorstream")
        >>> Store.open(folder).model_class
        'LlamaForCausalLM'
        ```
    """
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    check_repo_id(repo_id)
    offline = None if local_files_only else hub_unreachable()
    try:
        manifest = download_manifest(repo_id, revision, cache_dir, local_files_only or bool(offline), token, subfolder)
    except HFValidationError as err:
        raise ConfigError(f"repo_id={repo_id!r} is not a valid Hub repo id ({err}).") from None
    except LocalEntryNotFoundError as err:
        where = f"{MANIFEST_NAME} of {repo_id!r}" + (f" (in {subfolder!r})" if subfolder else "")
        if local_files_only:
            raise StaleStoreError(
                f"the local Hub cache has no {where}: the repo was never pulled here, or is not a tensorstream "
                f"preshard repo. Run `tensorstream pull {repo_id}` with network access first."
            ) from None
        raise HubUnavailableError(
            f"the Hugging Face Hub cannot be reached ({offline or hub_error_cause(err)}) and the local cache has no "
            f"{where}. "
            f"{reconnect_hint(offline)} and run `tensorstream pull {repo_id}` again."
        ) from None
    except EntryNotFoundError:
        where = f"in {subfolder!r}" if subfolder else "at its root"
        raise StaleStoreError(
            f"{repo_id!r} has no {MANIFEST_NAME} {where}{' in the local cache' if local_files_only else ''}: it is "
            "not a tensorstream preshard repo. Stream it with from_pretrained(..., device_map='tensorstream'), which "
            f"reshards it once, or publish one with `tensorstream push {repo_id} <namespace>/<name>-tensorstream`."
        ) from None
    folder = download_store_files(repo_id, manifest, cache_dir, local_files_only, token, subfolder)
    Store.open(folder, verify="header")
    return folder


def model_card(store: Store, *, base_model: str | None = None) -> str:
    """The ``README.md`` of a preshard repo: YAML front matter for the Hub, then how to use the repo.

    A diffusers model's card loads it with its own class (``FluxTransformer2DModel.from_pretrained``); a
    transformers model's with ``AutoModelForCausalLM`` (or its class, for a model of another kind).
    """
    from huggingface_hub import ModelCardData

    from .. import __version__

    diffusers = store.manifest.get("library") == "diffusers"
    causal = store.model_class.endswith("ForCausalLM")
    card = ModelCardData(
        library_name="tensorstream",
        tags=["tensorstream", "diffusers"] if diffusers else ["tensorstream"],
        base_model=base_model,
        pipeline_tag="text-generation" if causal else None,
    )
    dtypes = sorted({code for entry in store.entries() for code in entry.dtypes})
    title = f"{base_model} for tensorstream" if base_model else f"{store.model_class} for tensorstream"
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A model"
    cls = "AutoModelForCausalLM" if causal and not diffusers else store.model_class
    library = "diffusers" if diffusers else "transformers"
    if diffusers:
        plain = (
            "diffusers itself does not load the `.ts` files (it takes shard files at the repo root only): for a "
            "model fully in memory, load the original checkpoint."
        )
    else:
        plain = (
            'The repo also has a standard `model.safetensors.index.json`, so plain `from_pretrained("<this repo>")` '
            "loads it fully into memory."
        )
    return f"""---
{card.to_yaml()}
---

# {title}

{origin} resharded by [tensorstream](https://github.com/tensorstream/tensorstream) into one `.ts` file per
block, so that it streams block by block from fast storage into a GPU (or RAM) smaller than the model, without
resharding on the machine that runs it.

```python
import tensorstream
from {library} import {cls}

model = {cls}.from_pretrained(
    "<this repo>", device_map="tensorstream", tensorstream_config=tensorstream.Config(budget_gb=8)
)
```

Only the manifest, the `.ts` files and the configs are downloaded, and the model streams straight from the Hub
cache. `tensorstream pull <this repo>` downloads them ahead of time. {plain}

| | |
| --- | --- |
| model class | `{store.model_class}` |
| blocks | {len(store.blocks)} |
| size | {store.total_bytes / 1e9:.3f} GB |
| dtypes | {", ".join(dtypes)} |
| store format | {store.manifest.get("format_version")} (written by tensorstream {__version__}) |
"""


def _hub_id(text: str | os.PathLike[str]) -> str | None:
    """``text`` as a Hub repo id: itself when it is one (and not a local path), or the repo of a Hub cache path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    value = str(text)
    if not value:
        return None
    match = CACHE_SNAPSHOT.search(value)
    if match:
        return match.group("repo").replace("--", "/", 1)
    if Path(value).expanduser().exists() or value.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _tokenizer_files(tokenizer: str | os.PathLike[str] | None, src: Path, store: Store) -> list[Path]:
    candidates = [Path(tokenizer).expanduser()] if tokenizer else [src, Path(str(store.manifest.get("folder", "")))]
    for folder in candidates:
        if not str(folder) or not folder.is_dir():
            continue
        files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
        files += [p for pattern in TOKENIZER_GLOBS for p in sorted(folder.glob(pattern)) if p.is_file()]
        if files or tokenizer:
            return files
    return []


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's progress bars off while uploading when ``enabled`` is false (restored afterwards)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _link(src: Path, dst: Path) -> None:
    dst.symlink_to(src.resolve())


def _relative_files(folder: Path) -> Iterator[str]:
    for path in folder.rglob("*"):
        if path.is_file():
            yield path.relative_to(folder).as_posix()
