"""Preshard repos on the Hugging Face Hub: publish a store once, stream it anywhere without resharding.

A *preshard repo* is a model repo whose root holds a tensorstream store (see ``docs/format.md``)::

    tensorstream.json                     the manifest; its presence is what marks a preshard repo
    non_block.ts.safetensors              weights outside the blocks
    blocks/<module path>.ts.safetensors   one file per block
    config.json, generation_config.json   the model's configs
    model.safetensors.index.json          a standard index: plain transformers loads the repo too
    tokenizer files                       copied from the source model, when it has them
    README.md                             a model card with ``library_name: tensorstream``

`push` reshards a source (once, reusing an up-to-date store) and publishes such a repo with ``HfApi.create_repo``
and ``HfApi.upload_folder``. The manifest goes up in a commit of its own, after every file it names, so a repo
that has a manifest is complete. On the consuming side, ``from_pretrained(repo_id, device_map="tensorstream")``
calls `download_preshard`, which fetches the manifest, then only the files the manifest names (not the tokenizer
or the model card), and streams straight from the Hub cache snapshot: no reshard, no copy. `pull` pre-downloads.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, FormatError, HubUnavailableError, StaleStoreError
from ..format import DTYPES
from ..reshard import reshard, resolve_model_class, resolve_source
from ..store import MANIFEST_NAME, Store, read_json, validate_manifest

__all__ = ["PushResult", "check_preshard", "download_preshard", "is_preshard", "prepare_repo", "pull", "push"]

logger = logging.getLogger(__name__)

#: Files of a store besides the ``.ts`` files the manifest names; the ones that exist are published and fetched.
STORE_EXTRA_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
#: Tokenizer (and chat template) files copied from the source model into a preshard repo.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKENIZER_GLOBS = ("*.tiktoken",)
_CACHE_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/[^/]+")


@dataclass(frozen=True)
class PushResult:
    """What `push` published.

    Attributes:
        repo_id: the repo written to (with its namespace, as the Hub resolved it).
        commit_url: the URL of the last commit (the one adding ``tensorstream.json``).
        files: the paths committed, relative to the repo root.
        total_bytes: their total size in bytes.
    """

    repo_id: str
    commit_url: str
    files: tuple[str, ...]
    total_bytes: int


def is_preshard(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a store at its root (a ``tensorstream.json`` manifest), as a preshard repo does."""
    return (Path(folder) / MANIFEST_NAME).is_file()


def store_files(store: Store) -> list[str]:
    """The files of ``store`` that a preshard repo carries, relative to the store: manifest, ``.ts`` files, configs."""
    files = [MANIFEST_NAME, *(entry.file for entry in store.entries())]
    files += [name for name in STORE_EXTRA_FILES if (store.path / name).is_file()]
    return files


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached now (offline mode, its host name does not resolve), or ``None``.

    Used to go straight to the local cache instead of retrying for half a minute. Behind a proxy (``HTTPS_PROXY``,
    ``ALL_PROXY``) or with a custom client factory (``huggingface_hub.set_client_factory``) the host name is not
    looked up here, and a lookup that takes longer than ``timeout`` seconds is
    left to huggingface_hub to decide.

    Example:
        ```python
        >>> hub_unreachable()  # with HF_HUB_OFFLINE=1
        'HF_HUB_OFFLINE is set'
        ```
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    if (is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:  # a custom HTTP client (set_client_factory: a proxy, certificates, a test double) decides reachability
        from huggingface_hub.utils import _http

        if getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is not getattr(_http, "default_client_factory", None):
            return None
    except ImportError:
        pass
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    failure: list[str] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
        except OSError as err:
            failure.append(f"{host} cannot be resolved: {err.strerror or err}")

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return failure[0] if failure else None


def _reconnect(offline: str | None) -> str:
    return (
        "Unset HF_HUB_OFFLINE, connect to the network"
        if offline and "HF_HUB_OFFLINE" in offline
        else "Connect to the network"
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_error_cause(err: BaseException) -> str:
    """The innermost cause of a huggingface_hub error, in one line."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def check_repo_id(repo_id: str) -> None:
    """`ConfigError` unless ``repo_id`` is a valid Hub repo id (``name`` or ``namespace/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"{repo_id!r} is not a valid Hub repo id: {str(err).splitlines()[0]}") from None


def download_preshard(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
) -> Path | None:
    """The snapshot folder of a preshard repo with the files streaming needs, or ``None`` for any other repo.

    Downloads ``tensorstream.json`` first; when the repo has one, downloads (``snapshot_download`` with exact
    ``allow_patterns``, progress bars on) only the files it names plus the configs and the index, at the same
    commit. Tokenizer files and the model card are not fetched. When the repo has no manifest, cannot be reached
    or is not a valid repo id, returns ``None`` and the caller treats ``repo_id`` as an ordinary checkpoint.

    Raises:
        `StaleStoreError`: the manifest was found but a file it names is missing from the snapshot (an offline
            cache that was only partly downloaded).

    Example:
        ```python
        >>> folder = download_preshard("org/tiny-llama-tensorstream", cache_dir="/tmp/hub", local_files_only=True)
        >>> sorted(p.name for p in folder.iterdir())[:3]
        ['blocks', 'config.json', 'generation_config.json']
        ```
    """
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    try:
        manifest = _download_manifest(repo_id, revision, cache_dir, local_files_only, token, subfolder)
    except (EntryNotFoundError, HFValidationError, HfHubHTTPError):
        return None
    return _download_store_files(repo_id, manifest, cache_dir, local_files_only, token, subfolder)


def _download_manifest(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
    subfolder: str,
) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            repo_id,
            MANIFEST_NAME,
            subfolder=subfolder.strip("/") or None,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=local_files_only,
            token=token,
        )
    )


def _download_store_files(
    repo_id: str,
    manifest_path: Path,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
    subfolder: str,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    manifest = _read_manifest(manifest_path, repo_id)
    prefix = f"{subfolder.strip('/')}/" if subfolder.strip("/") else ""
    snapshot = manifest_path.parents[prefix.count("/")]  # <cache>/models--org--name/snapshots/<commit>
    needed = [entry["file"] for entry in [manifest["non_block"], *manifest["blocks"]]]
    patterns = [glob.escape(prefix + name) for name in [MANIFEST_NAME, *needed, *STORE_EXTRA_FILES]]
    try:
        snapshot_download(
            repo_id,
            revision=snapshot.name,  # the commit the manifest came from: every file matches it
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=local_files_only,
            token=token,
            allow_patterns=patterns,
        )
    except LocalEntryNotFoundError:  # offline, and the cache knows the snapshot is incomplete: said below
        pass
    folder = snapshot / prefix if prefix else snapshot
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise StaleStoreError(
            f"the snapshot {folder} of the preshard repo {repo_id!r} lacks {len(missing)} file(s) its manifest names "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run `tensorstream pull {repo_id}` "
            "with network access to complete it."
        )
    logger.info("tensorstream: %s is a preshard repo; streaming from %s (no reshard)", repo_id, folder)
    return folder


def _read_manifest(path: Path, repo_id: str) -> dict[str, Any]:
    try:
        manifest = read_json(path)  # size cap, UTF-8, depth: FormatError naming the file
        validate_manifest(manifest, path)
    except FormatError as err:
        raise FormatError(
            f"{err} The preshard repo {repo_id!r} is damaged; ask its publisher to run `tensorstream push` again."
        ) from None
    return dict(manifest)


def check_preshard(
    folder: str | os.PathLike[str], cls: Any, hf_config: Any, dtype: torch.dtype | None, verify: str
) -> Store:
    """Open the store at the root of a preshard folder for ``cls``, checking the class and dtype it was built for.

    Args:
        folder: the snapshot (or local) folder holding ``tensorstream.json``.
        cls: the transformers class ``from_pretrained`` was called on (an Auto class is resolved with ``hf_config``).
        hf_config: the model's config.
        dtype: the dtype asked for (``from_pretrained(dtype=...)`` or ``Config.dtype``), or ``None``.
        verify: ``Config.verify``.

    Raises:
        `ConfigError`: the store holds another model class's tensors, or weights of another dtype than asked for.

    Example:
        ```python
        >>> store = check_preshard(folder, LlamaForCausalLM, config, None, "header")
        >>> store.model_class
        'LlamaForCausalLM'
        ```
    """
    store = Store.open(folder, verify=verify)
    wanted = resolve_model_class(hf_config, cls).__name__
    if store.model_class != wanted:
        raise ConfigError(
            f"{store.path} holds the tensors of {store.model_class}, not {wanted}: load it with "
            f"{store.model_class}.from_pretrained (or the matching Auto class), or reshard the original checkpoint "
            f"for {wanted}."
        )
    if dtype is not None:
        held = {DTYPES[code] for entry in store.entries() for code in entry.dtypes if code in DTYPES}
        floating = {d for d in held if d.is_floating_point}
        if floating and floating != {dtype}:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in floating))
            raise ConfigError(
                f"{store.path} holds {names} weights but dtype={str(dtype).removeprefix('torch.')} was asked for; a "
                "preshard store streams as it was published. Drop dtype= (and TENSORSTREAM_DTYPE), or load the "
                "original checkpoint, which is resharded in the dtype asked for."
            )
    return store


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
        source, cache_dir=cache_dir, revision=revision, local_files_only=local_files_only, token=token
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
        manifest = _download_manifest(
            repo_id, revision, cache_dir, local_files_only or bool(offline), token, subfolder
        )
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
            f"{_reconnect(offline)} and run `tensorstream pull {repo_id}` again."
        ) from None
    except EntryNotFoundError:
        where = f"in {subfolder!r}" if subfolder else "at its root"
        raise StaleStoreError(
            f"{repo_id!r} has no {MANIFEST_NAME} {where}{' in the local cache' if local_files_only else ''}: it is "
            "not a tensorstream preshard repo. Stream it with from_pretrained(..., device_map='tensorstream'), which "
            f"reshards it once, or publish one with `tensorstream push {repo_id} <namespace>/<name>-tensorstream`."
        ) from None
    folder = _download_store_files(repo_id, manifest, cache_dir, local_files_only, token, subfolder)
    Store.open(folder, verify="header")
    return folder


def model_card(store: Store, *, base_model: str | None = None) -> str:
    """The ``README.md`` of a preshard repo: YAML front matter for the Hub, then how to use the repo."""
    from huggingface_hub import ModelCardData

    from .. import __version__

    card = ModelCardData(
        library_name="tensorstream",
        tags=["tensorstream"],
        base_model=base_model,
        pipeline_tag="text-generation" if store.model_class.endswith("ForCausalLM") else None,
    )
    dtypes = sorted({code for entry in store.entries() for code in entry.dtypes})
    title = f"{base_model} for tensorstream" if base_model else f"{store.model_class} for tensorstream"
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A model"
    return f"""---
{card.to_yaml()}
---

# {title}

{origin} resharded by [tensorstream](https://github.com/tensorstream/tensorstream) into one `.ts` file per
block, so that it streams block by block from fast storage into a GPU (or RAM) smaller than the model, without
resharding on the machine that runs it.

```python
import tensorstream
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(
    "<this repo>", device_map="tensorstream", tensorstream_config=tensorstream.Config(budget_gb=8)
)
```

Only the manifest, the `.ts` files and the configs are downloaded, and the model streams straight from the Hub
cache. `tensorstream pull <this repo>` downloads them ahead of time. The repo also has a standard
`model.safetensors.index.json`, so plain `from_pretrained("<this repo>")` loads it fully into memory.

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
    match = _CACHE_SNAPSHOT.search(value)
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
        files += [p for pattern in _TOKENIZER_GLOBS for p in sorted(folder.glob(pattern)) if p.is_file()]
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
