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

import glob
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, FormatError, HubUnavailableError, StaleStoreError, TensorStreamError
from ..format import DTYPES
from ..store import MANIFEST_NAME, Store, read_json, validate_manifest

__all__ = [
    "PushResult",
    "check_preshard",
    "download_preshard",
    "is_preshard",
    "resolve_model_class",
    "resolve_source",
]

logger = logging.getLogger(__name__)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]

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
TOKENIZER_GLOBS = ("*.tiktoken",)
CACHE_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/[^/]+")


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
    return os.path.lexists(Path(folder) / MANIFEST_NAME)  # a FIFO or link too: `Store.open` refuses those, typed


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


def reconnect_hint(offline: str | None) -> str:
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
        manifest = download_manifest(repo_id, revision, cache_dir, local_files_only, token, subfolder)
    except (EntryNotFoundError, HFValidationError, HfHubHTTPError):
        return None
    return download_store_files(repo_id, manifest, cache_dir, local_files_only, token, subfolder)


def download_manifest(
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


def download_store_files(
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


def resolve_source(
    source: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
) -> Path:
    """The local folder holding ``source``: the folder itself, or the Hub snapshot (downloaded if needed).

    For a preshard repo (one with ``tensorstream.json`` at its root) only the files streaming needs are downloaded.

    Raises:
        `FileNotFoundError`: ``source`` is neither a folder nor a repo available from the Hub or its cache.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        folder = (path / subfolder) if subfolder else path
        return folder.resolve()
    if path.exists():
        raise FormatError(f"{path} is a file; pass the model folder that holds config.json and the weights.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        check_repo_id(str(source))
    except ConfigError:
        raise FileNotFoundError(
            f"{source!r} is neither a local folder nor a valid Hub repo id (namespace/name); check the path."
        ) from None
    offline = None if local_files_only else hub_unreachable()  # offline: the cache at once, no retries
    online = not local_files_only
    local_files_only = local_files_only or offline is not None
    preshard = download_preshard(  # a preshard repo: only the manifest, the .ts files and the configs
        str(source),
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        subfolder=subfolder,
    )
    if preshard is not None:
        return preshard

    def download(patterns: list[str]) -> Path:
        try:
            snapshot = snapshot_download(
                str(source),
                revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                local_files_only=local_files_only,
                token=token,
                allow_patterns=[f"{subfolder}/{p}" if subfolder else p for p in patterns],
            )
        except LocalEntryNotFoundError as err:
            if online:  # offline mode, or a network error that huggingface_hub turned into this one
                raise HubUnavailableError(
                    f"{source!r} is not a local folder, the Hugging Face Hub cannot be reached "
                    f"({offline or hub_error_cause(err)}) and the "
                    "local Hub cache does not hold it. Connect to the network and retry, or pass a local folder."
                ) from None
            raise FileNotFoundError(
                f"{source!r} is not a local folder and could not be found on the Hub or in its cache ({err})."
            ) from None
        except HFValidationError as err:
            raise FileNotFoundError(
                f"{source!r} is not a local folder and could not be found on the Hub or in its cache ({err})."
            ) from None
        return Path(snapshot) / subfolder if subfolder else Path(snapshot)

    folder = download(_HUB_PATTERNS)
    if not any(f.suffix == ".safetensors" for f in folder.iterdir()):
        # A repo with only PyTorch .bin weights: fetch those too (loaded later with weights_only=True).
        folder = download([*_HUB_PATTERNS, "*.bin"])
    return folder


def resolve_model_class(config: Any, model_class: type | str | None) -> Any:
    """The concrete transformers class to build: ``model_class``, else ``config.architectures[0]``."""
    import transformers

    if isinstance(model_class, type):
        if hasattr(model_class, "_model_mapping"):  # an Auto class: resolve to the concrete one
            return model_class._model_mapping[type(config)]
        return model_class
    name = model_class or next(iter(getattr(config, "architectures", None) or []), None)
    if name:
        cls = getattr(transformers, name, None)
        if cls is None:
            raise TensorStreamError(f"model_class={name!r} is not a class of transformers {transformers.__version__}.")
        return resolve_model_class(config, cls)
    return resolve_model_class(config, transformers.AutoModel)
