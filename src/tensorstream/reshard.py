"""Checkpoint -> store: one pass, tensor by tensor, RAM bounded by about one block.

Two entry points share one writer:

* `reshard` takes a model folder or Hub id. The model is built by transformers itself with every weight
  mapped to ``"disk"``: nothing is read, and transformers' own conversions (renamed or fused tensors, dtype
  plan, tied weights) decide what the runtime modules hold. Each block's tensors are then read one at a time
  through the offload index transformers built and written to ``blocks/<module path>.ts``.
* `reshard_module` takes a model already in memory (used by `tensorstream.offload`).

Either way the store is written into ``<storage_path>/.<fingerprint>.partial/`` and renamed to
``<storage_path>/<fingerprint>/`` when complete (the manifest is written last). A killed reshard resumes from
the block files already written (each was renamed into place whole; the temporary files a kill leaves behind are
removed first); concurrent processes serialise on ``.<fingerprint>.lock`` and all reuse the store the first one
wrote. A full disk raises `StorageFullError` and removes the partial store. The source checkpoint is only ever
read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import stat
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import are_progress_bars_disabled
from torch import nn
from tqdm.auto import tqdm

from ._quiet import quiet_torchao
from .bnb import KEPT_METHODS
from .compact import COMPACT_KINDS, kind_identity, linear_weights, quantize_linears
from .config import default_storage_path, parse_dtype
from .ctensors import CT_KIND
from .encoding import ENCODING_KEY, PREQUANTIZED_KINDS, BlockCodec, encode_tensors, expands, store_kind
from .errors import (
    ConfigError,
    FormatError,
    LockTimeoutError,
    StaleStoreError,
    StorageFullError,
    TensorStreamError,
)
from .experts import EXPERTS_KEY, add_checksums, experts_record, whole_block_reason
from .format import FORMAT_VERSION, TENSOR_ALIGNMENT, TsHeader, read_ts_header, save_to_ts
from .gptq import GPTQ_METHODS
from .integrations.hub import resolve_model_class, resolve_source
from .plan import find_units, resident_parts
from .prequantized import (
    DEQUANTIZED_METHODS,
    RULED_METHODS,
    check_expansion,
    check_fp8_blocks,
    check_loaded,
    check_method,
    checkpoint_parts,
    quantization_details,
    quantization_identity,
    quantization_method,
    torchao_tensors,
)
from .rules import RULES_KEY, flatten_tensors, plain_parts, rule_for
from .store import MANIFEST_NAME, STORE_FORMAT, Store, repair_hint

__all__ = ["build_store", "reshard", "reshard_module", "resolve_source", "weight_conversions"]

logger = logging.getLogger(__name__)

#: Store files end in ``.ts.safetensors``: a .ts file, and a name transformers' loader recognises as safetensors.
TS_SUFFIX = ".ts.safetensors"
NON_BLOCK_FILE = f"non_block{TS_SUFFIX}"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SOURCE_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
_CONFIG_KEYS_IGNORED = {
    "_name_or_path",
    "transformers_version",
    "_diffusers_version",
    "_commit_hash",
    "dtype",
    "torch_dtype",
}
#: A Hub cache blob is named by its content hash: a sha256 (LFS files) or a git blob sha1.
_HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: What a store's layout holds beyond the format version (part of the fingerprint): 2 = converted tensors at the
#: resident phase (0) and routed experts stored last with their checksums (docs/moe.md).
LAYOUT_REVISION = 2
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file size limit (RLIMIT_FSIZE, quota)


def source_fingerprint(
    folder: Path,
    cls: type,
    dtype: torch.dtype | None,
    config: Any,
    kind: str | None = None,
    quantization_arg: Any = None,
    dequantize: str = "per_block",
) -> str:
    """A short hash of what decides the store's content: the weight files, the config, the class, dtype and kind,
    and a ``quantization_config`` passed to ``from_pretrained`` (``quantization_arg``, every field of it).

    ``config`` is a transformers config or, for a diffusers model, its config dict.

    Files are identified by name, size and, for Hub cache snapshots, their blob name (a content hash), else
    their modification time (a link's target's): a large checkpoint is never read to fingerprint it. A source
    changed since resharding therefore gets a new store; the old one is never used for it.
    """
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)  # a diffusers config: a dict
    config_dict = {k: v for k, v in values.items() if k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256()
    head = {"format_version": FORMAT_VERSION, "class": cls.__name__, "dtype": str(dtype), "config": config_dict}
    # stores written before tensors converted at load were given the resident model's address phase (0), and before
    # routed experts were stored last, get a new fingerprint: they are rebuilt once, never reused
    head["layout"] = LAYOUT_REVISION
    if kind is not None:  # a plain store keeps the fingerprint it always had
        head["encoding"] = kind_identity(kind)
    quantization = quantization_identity(config)
    if quantization is not None:  # every field, loading attributes (dequantize, run_compressed) included
        head["quantization"] = quantization
        if quantization_method(config) in DEQUANTIZED_METHODS:
            # FP8 stores written before fused experts were stored compact held them as bf16: rebuilt once
            head["compact_experts"] = 1
            if dequantize == "once":  # the bf16 weights transformers makes, not the compact bytes: another store
                head["dequantize"] = dequantize
    if quantization_arg is not None:
        head["quantization_arg"] = quantization_identity(quantization_arg)
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for file in sorted(folder.iterdir()):
        if not (file.suffix in _WEIGHT_SUFFIXES or file.name in _SOURCE_FILES) or not file.is_file():
            continue
        stat = file.stat()  # follows links: the target's size and modification time
        identity = _hub_blob(file) or str(stat.st_mtime_ns)
        digest.update(f"{file.name}\0{stat.st_size}\0{identity}\n".encode())
    return digest.hexdigest()[:16]


def _hub_blob(file: Path) -> str | None:
    """The blob name (a content hash) when ``file`` links into a Hub cache ``blobs/`` folder, else ``None``.

    Any other link (a local folder whose weights link elsewhere) is identified by its target's modification time,
    so rewriting the target changes the fingerprint.
    """
    if not file.is_symlink():
        return None
    target = Path(os.readlink(file))
    return target.name if target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name) else None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bar and offload warnings while tensorstream drives it."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    accelerate_logger = logging.getLogger("accelerate")
    accelerate_level = accelerate_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    accelerate_logger.setLevel(logging.ERROR)
    try:
        with quiet_torchao():  # transformers imports torchao's quantizer when it is installed: CUDA-only noise
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        accelerate_logger.setLevel(accelerate_level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def store_lock(root: Path, fingerprint: str, timeout: float | None = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``<root>/.<fingerprint>.lock``; other processes wait (and say so in the log)."""
    path = root / f".{fingerprint}.lock"
    fd = _open_own_file(path, os.O_RDWR | os.O_CREAT)
    try:
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not announced:
                # a warning, so it shows without logging set up: a silent wait looks like a hang
                logger.warning(
                    "tensorstream: another process is resharding into %s; waiting for it to finish%s",
                    root / fingerprint,
                    _holder(fd),
                )
                announced = True
            if timeout is not None and time.monotonic() - start > timeout:
                raise LockTimeoutError(
                    f"{path} was held by another process for over {timeout:.0f} s; if no reshard is running, "
                    "delete the lock file and retry."
                )
            time.sleep(0.05)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            raise _storage_full(root, f"the lock file {path.name}", err, None) from err
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(fd: int) -> str:
    """`` (pid N holds the lock)`` from the lock file the holder wrote its pid into, or ``""``."""
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid} holds the lock)" if pid.isdigit() else ""


def _open_own_file(path: Path, flags: int) -> int:
    """Open a file tensorstream owns in the storage folder, refusing a link or anything but a regular file there.

    A link planted as ``.<fingerprint>.lock`` would make reshard truncate and write the link's target.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FormatError(f"{path} is a symbolic link, which is never followed; delete it and retry.") from None
        if err.errno in _DISK_FULL:
            raise _storage_full(path.parent, f"the lock file {path.name}", err, None) from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{path} is not a regular file; tensorstream refuses to use it. Delete it and retry.")
    return fd


@contextlib.contextmanager
def staging_folder(root: Path, fingerprint: str, what: str, needed_bytes: int | None) -> Iterator[Path]:
    """``<root>/.<fingerprint>.partial``, ready to (re)write a store into; enter it holding the store lock.

    What an interrupted run left is cleaned first: its temporary files (complete block files stay, to be reused)
    and the previous store moved aside by an interrupted ``--force``. A full disk (``ENOSPC``, ``EDQUOT``) removes
    the whole partial store, to give the space back, and raises `StorageFullError`. The scratch offload folder
    is always removed, and the staging folder too while it is still empty.
    """
    _remove_trash(root, fingerprint)
    staging = root / f".{fingerprint}.partial"
    if staging.is_symlink() or (os.path.lexists(staging) and not staging.is_dir()):
        raise FormatError(
            f"{staging} is a symbolic link or not a folder; reshard would write (and delete) through it. "
            "Delete it and retry."
        )
    try:
        staging.mkdir(exist_ok=True)
        for tmp in staging.rglob(".*.tmp-*"):  # temporary files of save_to_ts and _write_json that a kill left
            tmp.unlink(missing_ok=True)
        yield staging
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise _storage_full(root, what, err, needed_bytes) from err
    finally:
        shutil.rmtree(staging / "_offload", ignore_errors=True)
        with contextlib.suppress(OSError):
            staging.rmdir()  # only succeeds while nothing was written


def _storage_full(root: Path, what: str, err: OSError, needed_bytes: int | None) -> StorageFullError:
    try:
        free = f"{shutil.disk_usage(root).free / 1e9:.3g} GB free"
    except OSError:
        free = "free space unknown"
    needs = f", about {needed_bytes / 1e9:.3g} GB needed" if needed_bytes else ""
    return StorageFullError(
        f"{root}: {os.strerror(err.errno or errno.ENOSPC)} while writing the store of {what} ({free}{needs}); the "
        "partial store was removed. Free some space or choose another storage_path (Config(storage_path=...) or "
        "TENSORSTREAM_STORAGE_PATH), then retry.",
        err.errno or errno.ENOSPC,
        str(err.filename) if err.filename else None,
    )


def reshard(
    source: str | os.PathLike[str],
    storage_path: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    compression: str | None = None,
    dequantize: str = "per_block",
    model_class: type | str | None = None,
    config: Any = None,
    force: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
    model_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Reshard a checkpoint into a store of per-block ``.ts`` files, once; later calls reuse it.

    Args:
        source (`str` or `os.PathLike`):
            A local model folder (``config.json`` plus safetensors shards, one file or many with
            ``model.safetensors.index.json``, or PyTorch ``.bin`` files) or a Hub repo id.
        storage_path (`str` or `os.PathLike`, *optional*):
            Where stores live; defaults to ``<HF hub cache>/tensorstream``.
        dtype (`str` or `torch.dtype`, *optional*):
            Convert floating-point weights (``"bf16"``, ``torch.float16``...). Defaults to the checkpoint's.
        quantize (`str`, *optional*):
            ``"int8"`` or ``"int4"``: store the blocks' weight matrices group-wise quantized (about 0.51x and
            0.28x the bytes of bf16; needs ``pip install 'tensorstream[quantize]'``). See docs/quantization.md.
        compression (`str`, *optional*):
            ``"lossless"``: store 16-bit weights as byte planes, the high one zstd-compressed (needs
            ``pip install 'tensorstream[compression]'``); expands to the exact original bytes.
        dequantize (`str`, defaults to ``"per_block"``):
            For a fine-grained FP8 or MXFP4 checkpoint: ``"per_block"`` stores its compact bytes, dequantized as
            each block loads; ``"once"`` stores the bf16 weights transformers dequantizes it to (about 1.9x the
            bytes, nothing to dequantize per pass). Ignored for other checkpoints. See docs/quantization.md.
        model_class (`type` or `str`, *optional*):
            The transformers class whose runtime tensors the store holds. Defaults to ``config.architectures[0]``.
        config (`PretrainedConfig`, *optional*): a config to build the model with instead of the folder's.
        force (`bool`, defaults to `False`): rebuild even if an up-to-date store exists.
        progress (`bool`, defaults to `True`): show a progress bar (blocks and GB/s).
        cache_dir (`str` or `os.PathLike`, *optional*): the Hugging Face cache folder, as in ``from_pretrained``.
        revision (`str`, *optional*): the Hub revision (branch, tag or commit), as in ``from_pretrained``.
        local_files_only (`bool`, defaults to `False`): never reach the Hub, as in ``from_pretrained``.
        token (`str` or `bool`, *optional*): the Hub token, as in ``from_pretrained``.
        subfolder (`str`, defaults to ``""``): the model's folder inside the repo, as in ``from_pretrained``.

    Returns:
        `Path`: the store folder, ``<storage_path>/<fingerprint>``.

    Notes:
        Peak RAM is about one block plus the largest non-block tensor: tensors are read one at a time through
        safetensors' memory map and each block is written before the next is read.

    Example:
        ```python
        >>> store = tensorstream.reshard("./my-llama", "/nvme/tensorstream", dtype="bf16")
        >>> sorted(p.name for p in store.iterdir())[:3]
        ['blocks', 'config.json', 'generation_config.json']
        ```
    """
    from transformers import AutoConfig

    folder = resolve_source(
        source,
        cache_dir=cache_dir,
        revision=revision,
        local_files_only=local_files_only,
        token=token,
        subfolder=subfolder,
    )
    from .integrations.diffusers_reshard import is_diffusers_model, reshard_diffusers

    if is_diffusers_model(folder, model_class):  # a diffusers model folder or class: its own loading rules
        return reshard_diffusers(
            folder,
            storage_path,
            source=source,
            dtype=dtype,
            kind=store_kind(quantize, compression),
            model_class=model_class,
            config=config,
            force=force,
            progress=progress,
        )
    if config is None:
        check_model_folder(folder, source)
        config = AutoConfig.from_pretrained(folder)
    cls = resolve_model_class(config, model_class)
    dtype = parse_dtype(dtype)
    kind = store_kind(quantize, compression)
    if dequantize not in ("per_block", "once"):
        raise ConfigError(f"dequantize={dequantize!r} is not one of 'per_block', 'once'.")
    # a typed refusal before anything is built or written
    quantization_arg = (model_kwargs or {}).get("quantization_config")
    method = quantization_method(config)
    if method is None and quantization_arg is not None:
        check_method(quantization_method(quantization_arg) or "unknown", str(source), on_the_fly=True)
    check_method(method, str(source))
    check_fp8_blocks(folder, config, str(source))
    once = dequantize == "once" and method in DEQUANTIZED_METHODS  # stored as the bf16 transformers makes of it
    fingerprint = source_fingerprint(
        folder, cls, dtype, config, kind, quantization_arg, "once" if once else "per_block"
    )
    root = Path(storage_path).expanduser() if storage_path else default_storage_path()
    build_config, ruled = config, None
    if method in RULED_METHODS:  # its tensors are stored as the checkpoint holds them, bound by binding rules
        if kind is not None:
            raise ConfigError(
                f"{source} is quantized with {method}: it streams its own quantized tensors, so quantize= and "
                "compression= do not apply. Drop them (or stream the unquantized original with them)."
            )
        from .integrations.transformers import _without_quantization

        # built without the quantization, the model's load converts nothing: the checkpoint's tensors are read as
        # transformers' loader rebuilds them (`torchao_tensors`), one at a time
        build_config, ruled = _without_quantization(config), torchao_tensors(folder)

    def write(staging: Path) -> None:
        if progress and not are_progress_bars_disabled():  # building the model takes a while before the bar
            print(
                f"tensorstream: resharding {source} into {root / fingerprint} (building the model first)",
                file=sys.stderr,
            )
        if method in KEPT_METHODS or method in GPTQ_METHODS or method == CT_KIND:  # from the checkpoint's tensors
            write_from_checkpoint(staging)
            return
        try:
            with quiet_transformers():
                model = cls.from_pretrained(
                    str(folder),
                    config=build_config,
                    device_map={"": "disk"},
                    offload_folder=str(staging / "_offload"),
                    dtype=dtype or "auto",
                    **dict(model_kwargs or {}),
                )
        except pickle.UnpicklingError as err:  # raised by torch.load(weights_only=True): nothing was run
            raise FormatError(
                f"{folder}: a PyTorch weight file holds pickled objects other than tensors. tensorstream "
                "unpickles only with torch.load(weights_only=True), which refused it (a checkpoint like this can "
                "run code when loaded). Convert it to safetensors where you trust it, and reshard that."
            ) from err
        check_loaded(model, method, str(source))
        loader = _offload_loader(model, folder)
        # an FP8 or MXFP4 checkpoint keeps its own compact bytes (unless another store kind was asked for)
        compact = checkpoint_parts(folder, model, config) if kind is None and not once else None

        def get_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
            quantized = ruled(name, tensor) if ruled is not None else None
            if quantized is not None:
                return quantized
            if tensor.device.type != "meta":
                return tensor.detach()
            try:
                return loader[name]
            except KeyError:  # not in the checkpoint (Marian's sinusoidal tables): as transformers builds it
                return initialised_tensor(model, name, tensor)

        source_info: dict[str, Any] = {
            "source": str(source),
            "folder": str(folder),
            "weight_conversions": weight_conversions(model),
        }
        if quantization_arg is not None:  # part of the fingerprint: a rebuild must pass it again (`repair_command`)
            source_info["quantization_arg"] = quantization_identity(quantization_arg)
        if once:  # part of the fingerprint too (`repair_command` passes it again)
            source_info["dequantize"] = "once"
        if method is not None:  # dequantized at load (`check_loaded`), or its tensors stored as they are (ruled):
            source_info["quantization"] = {  # either way the streamed model is built without it
                "method": method,
                "dequantized": ruled is None,
                "checkpoint_bytes": _checkpoint_bytes(folder),
                **quantization_details(config),
            }
            if compact is not None:  # filled in as the blocks are written (the manifest is written last)
                source_info["quantization"]["expanded"] = compact.expanded_summary
        _write_store(
            staging,
            model,
            get_tensor,
            fingerprint,
            cls.__name__,
            dtype,
            source_info,
            progress,
            compact.kind if compact is not None else kind,
            phase_of=_source_phases(loader, staging / "_offload"),
            parts_of=compact,
        )
        for name in ("generation_config.json",):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)

    def write_from_checkpoint(staging: Path) -> None:
        """bitsandbytes and GPTQ (their layers bind the checkpoint's tensors) and compressed-tensors (the checkpoint's
        compact tensors, decompressed as each block loads): transformers cannot disk-offload them, or (GPTQ) converts
        them at load, so the store is written from the checkpoint's files, block by block."""
        if dtype is not None or kind is not None:
            raise ConfigError(
                f"{source} is quantized with {method}: its store holds the checkpoint's own tensors, so no dtype or "
                "store kind applies. Drop dtype= (and Config quantize/compression, TENSORSTREAM_QUANTIZE, "
                "TENSORSTREAM_COMPRESSION) to stream it."
            )
        parts_of = None
        if method == CT_KIND:
            from .ctensors import checkpoint_source

            model, state, get_tensor, parts_of, phase_of = checkpoint_source(folder, cls, config, str(source))
        else:
            if method in GPTQ_METHODS:
                from .gptq import checkpoint_tensors
            else:
                from .bnb import checkpoint_tensors

            model, state, get_tensor, phase_of = checkpoint_tensors(folder, cls, config, str(method))
            model.config = config  # config.json keeps quantization_config: the streamed model is built with it
        checkpoint = {"method": method, "checkpoint_bytes": _checkpoint_bytes(folder)}
        source_info = {
            "source": str(source),
            "folder": str(folder),
            "weight_conversions": [],
            "quantization": {**checkpoint, "kept": True} if parts_of is None else {**checkpoint, "dequantized": True},
        }
        _write_store(
            staging, model, get_tensor, fingerprint, cls.__name__, None, source_info, progress,
            None if parts_of is None else CT_KIND, phase_of=phase_of, parts_of=parts_of, state=state,
        )  # fmt: skip
        if (folder / "generation_config.json").is_file():
            shutil.copyfile(folder / "generation_config.json", staging / "generation_config.json")

    return build_store(root, fingerprint, str(source), _checkpoint_bytes(folder), write, force=force)


def build_store(
    root: Path, fingerprint: str, source: str, needed_bytes: int | None, write: Callable[[Path], None], *, force: bool
) -> Path:
    """``<root>/<fingerprint>``, written by ``write(staging)`` unless an up-to-date store is there already.

    The one way a checkpoint becomes a store (transformers' and diffusers' loaders alike): under the store lock,
    into the staging folder (resumed after a kill, removed on a full disk), published atomically when ``write``
    returns.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / fingerprint
    if not force and _is_complete(final):
        logger.info("tensorstream: store %s is up to date with %s; nothing to reshard", final, source)
        _remove_trash(root, fingerprint)
        return final
    with store_lock(root, fingerprint):
        if not force and _is_complete(final):
            logger.info("tensorstream: store %s was written by another process; reusing it", final)
            return final
        with staging_folder(root, fingerprint, source, needed_bytes) as staging:
            write(staging)
            shutil.rmtree(staging / "_offload", ignore_errors=True)
            _publish(staging, final)
    return final


def reshard_module(
    model: nn.Module,
    storage_path: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    kind: str | None = None,
) -> Path:
    """Reshard a model already in memory (used by `tensorstream.offload`); reuses a store with the same content.

    The fingerprint hashes every tensor's bytes (crc32, several GB/s), so a model changed in memory gets a new
    store. Weights are converted to ``dtype`` when given; ``kind`` is the store kind (`tensorstream.encoding`).
    """
    from .integrations.diffusers_reshard import kept_in_fp32

    dtype = parse_dtype(dtype)
    keep = kept_in_fp32(model) if dtype is not None else None
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{LAYOUT_REVISION}\0{type(model).__name__}\0{dtype}\n".encode())
    if kind is not None:
        digest.update(f"encoding\0{kind_identity(kind)}\n".encode())
    if keep is not None:  # a diffusers model's modules kept in float32 under any dtype
        digest.update(f"fp32\0{sorted(keep.modules)}\n".encode())
    needed_bytes = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta":
            raise TensorStreamError(
                f"{type(model).__name__}.{name} is on the meta device: offload() needs a model with its weights "
                "loaded. Use from_pretrained(..., device_map='tensorstream') to stream straight from a checkpoint: "
                "it works on transformers models, on diffusers models (FluxTransformer2DModel.from_pretrained(...)) "
                "and on diffusers pipelines (DiffusionPipeline.from_pretrained(...))."
            )
        for part, value in plain_parts(name, tensor).items():  # a ruled tensor (torchao's) by its stored parts
            data = value.detach().to("cpu").contiguous().reshape(-1)
            crc = zlib.crc32(data.view(torch.uint8).numpy().data) if data.numel() else 0
            digest.update(f"{part}\0{value.dtype}\0{tuple(value.shape)}\0{crc}\n".encode())
            needed_bytes += _nbytes(data)
    fingerprint = digest.hexdigest()[:16]
    root = Path(storage_path).expanduser() if storage_path else default_storage_path()
    root.mkdir(parents=True, exist_ok=True)
    final = root / fingerprint
    if _is_complete(final):
        logger.info("tensorstream: store %s already holds this model; reusing it", final)
        return final
    with store_lock(root, fingerprint):
        if _is_complete(final):
            return final

        def get_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
            if rule_for(tensor) is not None:  # as it is: detach() drops a parameter class (bitsandbytes')
                return tensor
            tensor = tensor.detach()
            if dtype is None or not tensor.is_floating_point() or rule_for(tensor) is not None:
                return tensor
            return tensor.to(torch.float32 if keep is not None and keep(name) else dtype)

        def phase_of(name: str, tensor: torch.Tensor) -> int:  # where the model's own tensor sits
            original = state[name]
            if rule_for(original) is not None:  # stored as its parts, written anew
                return 0
            same = original.device.type == "cpu" and original.dtype == tensor.dtype
            return original.data_ptr() % TENSOR_ALIGNMENT if same else 0

        state = model.state_dict(keep_vars=True)
        source_info = {"source": f"in-memory {type(model).__name__}"}
        with staging_folder(root, fingerprint, source_info["source"], needed_bytes) as staging:
            _write_store(
                staging,
                model,
                get_tensor,
                fingerprint,
                type(model).__name__,
                dtype,
                source_info,
                progress,
                kind,
                phase_of=phase_of,
            )
            _publish(staging, final)
    return final


def _is_complete(store: Path) -> bool:
    """Whether ``store`` holds a complete, valid store; `StaleStoreError` when it exists but is damaged.

    A published store always has its manifest (the folder is renamed into place whole), so a store folder without
    one was damaged after the fact: it is reported, never silently rebuilt.
    """
    if not os.path.lexists(store):
        return False
    try:
        Store.open(store, verify="header")
    except (TensorStreamError, OSError) as err:
        hint = "" if "`tensorstream " in str(err) else f" {repair_hint(store, sentence=True)}"
        raise StaleStoreError(f"{store} exists but is damaged: {err}{hint}") from err
    return True


def weight_conversions(model: nn.Module) -> list[list[Any]]:
    """The load-time conversions transformers applied to the checkpoint (renamed or fused tensors), as JSON.

    A model built later from the store loads runtime names, so transformers records no conversion and its
    ``save_pretrained`` would write the runtime layout. The manifest keeps this description so that the
    streamed model can be given back the same conversions and save the checkpoint's own layout
    (`tensorstream.integrations.transformers`).
    """
    return [describe_conversion(c) for c in getattr(model, "_weight_conversions", None) or []]


def describe_conversion(conversion: Any) -> list[Any]:
    """A transformers ``WeightTransform`` as ``[class name, source patterns, target patterns, scope prefix]``."""
    return [
        type(conversion).__name__,
        list(conversion.source_patterns),
        list(conversion.target_patterns),
        getattr(conversion, "scope_prefix", None),
    ]


def initialised_tensor(model: nn.Module, name: str, placeholder: torch.Tensor) -> torch.Tensor:
    """The value transformers gives ``name``, a tensor the checkpoint lacks, when it builds the model resident.

    Some tensors are rebuilt at init and left out of the checkpoint (Marian's sinusoidal position tables, listed in
    ``_keys_to_ignore_on_save``): a resident ``from_pretrained`` initialises them with the model's own
    ``_init_weights``, while the disk-offloaded build the reshard reads from leaves them on the meta device. The
    owning module's init (that of the nearest `PreTrainedModel` around it) is run twice on a fresh CPU tensor,
    under two different seeds and from two different fillings: a value that comes out the same both times is what
    the resident model holds, and is stored.

    Raises:
        `UnsupportedModelError`: the tensor's init is random (or leaves it untouched), so no store can hold what a
            resident load would give; the message names the tensor.

    Example:
        ```python
        >>> initialised_tensor(marian, "model.encoder.embed_positions.weight", placeholder).shape
        torch.Size([512, 32])
        ```
    """
    from .errors import UnsupportedModelError

    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    owner: Any = model
    parts = module_path.split(".") if module_path else []
    for i in range(len(parts) + 1):  # the innermost sub-model's init handles its own modules (composite models)
        candidate = model.get_submodule(".".join(parts[:i]))
        if callable(getattr(candidate, "_init_weights", None)):
            owner = candidate
    is_parameter = attr in module._parameters
    values = []
    for seed, fill in ((0, 0.0), (1, 1.0)):
        fresh = torch.full(placeholder.shape, fill, dtype=placeholder.dtype)
        tensor = nn.Parameter(fresh, requires_grad=placeholder.requires_grad) if is_parameter else fresh
        slots: dict[str, Any] = module._parameters if is_parameter else module._buffers
        slots[attr] = tensor
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                owner._init_weights(module)
        except Exception as err:
            raise UnsupportedModelError(
                f"{name} is not in the checkpoint, and initialising it as transformers does failed ({err}); "
                "reshard a checkpoint that holds it (save_pretrained of the loaded model)."
            ) from err
        finally:
            slots[attr] = placeholder
        values.append(tensor.detach())
    if not torch.equal(values[0], values[1]):
        raise UnsupportedModelError(
            f"{name} is not in the checkpoint and transformers initialises it at random: a resident load would give "
            "other values each time, so no store can hold them. Use a checkpoint that holds it (save_pretrained of "
            "the model after loading it once), or load this model without device_map='tensorstream'."
        )
    return values[0]


def _source_phases(loader: Mapping[str, torch.Tensor], offload_folder: Path) -> Callable[[str, torch.Tensor], int]:
    """Where a resident CPU load puts each tensor, modulo 64: its address phase in the mapped source file.

    transformers binds a tensor it reads from a safetensors file of the checkpoint unchanged (same dtype, any name) as
    a view of the file's memory map, so its address modulo 64 is its offset in the file modulo 64; some CPU kernels
    give other bits for other alignments (``torch._grouped_mm``, oneDNN convolutions). A tensor transformers
    converted at load (experts fused into one ``[E, ...]`` tensor, a cast, a ``.bin`` file) is a fresh allocation,
    64-byte aligned: phase 0. The disk offload index names, for a converted tensor, the file transformers wrote it to
    in ``offload_folder``, never a file of the checkpoint: only the checkpoint's own files give a phase.
    """
    index = getattr(loader, "index", None) or {}
    headers: dict[str, TsHeader | None] = {}
    written = offload_folder.resolve()

    def phase_of(name: str, tensor: torch.Tensor) -> int:
        entry = index.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("safetensors_file"), str):
            return 0
        file = entry["safetensors_file"]
        if (
            Path(file).resolve().is_relative_to(written)
        ):  # written by transformers at load: converted, a fresh allocation
            return 0
        if file not in headers:
            try:
                headers[file] = read_ts_header(file, require_ts=False)
            except (TensorStreamError, OSError):
                headers[file] = None
        header = headers[file]
        info = None if header is None else header.tensors.get(entry.get("weight_name", name))
        if header is None or info is None or info.torch_dtype != tensor.dtype:
            return 0
        return (header.data_offset + info.start) % TENSOR_ALIGNMENT

    return phase_of


def _offload_loader(model: nn.Module, folder: Path) -> Mapping[str, torch.Tensor]:
    for module in model.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None:
            return getattr(weights_map, "dataset", weights_map)
    raise TensorStreamError(
        f"transformers built {type(model).__name__} from {folder} without a disk offload index; this transformers "
        "version loads disk-offloaded models differently than tensorstream expects. Please report it."
    )


def _owner_of(name: str, blocks: set[str]) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in blocks:
            return prefix
    return ""


def _write_store(
    staging: Path,
    model: nn.Module,
    get_tensor: Callable[[str, torch.Tensor], torch.Tensor],
    fingerprint: str,
    class_name: str,
    dtype: torch.dtype | None,
    source_info: dict[str, Any],
    progress: bool,
    kind: str | None = None,
    *,
    phase_of: Callable[[str, torch.Tensor], int] | None = None,
    parts_of: Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the store of ``model`` into ``staging``: the tensors of its ``state_dict`` (or ``state``, the same
    names with tied ones sharing one tensor), each read by ``get_tensor`` when its block is written."""
    units = find_units(model)
    blocks = [name for name, _ in units]
    block_set = set(blocks)
    linear = linear_weights(model, blocks) if kind in COMPACT_KINDS else set()
    owned: dict[str, dict[str, torch.Tensor]] = {name: {} for name in ["", *blocks]}
    seen: dict[tuple[str, int], str] = {}
    tied: dict[str, str] = {}
    for name, tensor in (model.state_dict(keep_vars=True) if state is None else state).items():
        owner = _owner_of(name, block_set)
        key = (owner, id(tensor))
        if key in seen:  # the same tensor under a second name (tied weights): stored once
            tied[name] = seen[key]
            continue
        seen[key] = name
        owned[owner][name] = tensor
    (staging / "blocks").mkdir(exist_ok=True)
    total = sum(_nbytes(t) for group in owned.values() for t in group.values())
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="tensorstream reshard",
        disable=not progress or are_progress_bars_disabled(),
        dynamic_ncols=True,
    )
    entries: list[dict[str, Any]] = []
    weight_map: dict[str, str] = {}
    experts: dict[str, list[dict[str, Any]]] = {}
    reused = 0
    encoded = 0
    with bar:
        for done, block in enumerate(["", *blocks]):
            rel = f"blocks/{block}{TS_SUFFIX}" if block else NON_BLOCK_FILE
            path = staging / rel
            # non-block weights stay as they are; every streamed unit is encoded (a head streamed on its own too:
            # at a small budget it is read every step like the blocks)
            encoding = kind if block and expands(kind) else None
            header = _reusable(path, block, encoding)
            nbytes = sum(_nbytes(t) for t in owned[block].values())
            routed = experts_record(model, block, list(owned[block])) if block and kind is None else []
            tail = [name for item in routed for name in item["tensors"]]
            if header is None:
                tensors = {name: get_tensor(name, t) for name, t in owned[block].items()}
                phases = {name: phase_of(name, t) for name, t in tensors.items()} if phase_of else {}
                phases = {n: p for n, p in phases.items() if 0 < p < TENSOR_ALIGNMENT and p % tensors[n].itemsize == 0}
                metadata: dict[str, str] | None = None
                if block and kind in COMPACT_KINDS:  # linear weights as torchao's quantized tensors
                    tensors, count = quantize_linears(tensors, kind, linear)
                    encoded += count
                # tensors a binding rule rebuilds (quantized tensor subclasses) are stored as their plain parts
                tensors, rules = flatten_tensors(tensors)
                if rules is not None:
                    metadata = {RULES_KEY: rules}
                    phases = {n: p for n, p in phases.items() if n in tensors}
                # a pre-quantized block is checked against what transformers made of it once it is written
                originals = tensors if encoding in PREQUANTIZED_KINDS else {}
                if encoding is not None:  # phases of the encoded tensors go into the encoding, the rest stay
                    tensors, meta = encode_tensors(tensors, encoding, phases=phases, parts_of=parts_of)
                    metadata = {**(metadata or {}), ENCODING_KEY: meta}
                    described = json.loads(meta)["tensors"]
                    encoded += len(described)
                    phases = {n: p for n, p in phases.items() if n not in described}
                header = save_to_ts(tensors, path, metadata, block=block, phases=phases, tail=tail)
                check_expansion(header, originals)
                del tensors, originals
                bar.update(nbytes)
            else:  # written by an interrupted run: not part of this run's throughput
                reused += 1
                bar.total -= nbytes
            done_text = f"block {done}/{len(blocks)}" if block else "non-block weights"
            bar.set_postfix_str(done_text + (f", {reused} reused" if reused else ""), refresh=True)
            entry = {
                "name": block,
                "file": rel,
                "data_size": header.data_size,
                "checksum": header.checksum,
                "dtypes": sorted({info.dtype for info in header.tensors.values()}),
            }
            if encoding is not None:
                entry["memory_size"] = BlockCodec(header).region_bytes
            entries.append(entry)
            weight_map.update(dict.fromkeys(header.tensors, rel))
            if routed:
                experts[block] = [add_checksums(item, header) for item in routed]
    if kind in ("int8", "int4", "lossless") and not encoded and not reused:
        what = "no 16-bit floating-point weight" if kind == "lossless" else "no weight matrix it can quantize"
        logger.warning(
            "tensorstream: the %s store of %s holds %s in its blocks: it is as large as a plain store. %s",
            kind,
            class_name,
            what,
            "Reshard with dtype='bf16' (or fp16) to compress it." if kind == "lossless" else "",
        )
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(staging / "config.json"))
    total_size = sum(entry["data_size"] for entry in entries)
    _write_json(
        staging / "model.safetensors.index.json", {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    )
    from . import __version__

    manifest = {
        "format": STORE_FORMAT,
        "format_version": FORMAT_VERSION,
        "tensorstream_version": __version__,
        "fingerprint": fingerprint,
        "model_class": class_name,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        **({} if kind is None else {"encoding": kind}),
        **source_info,
        "total_bytes": total_size,
        "tied": tied,
        "non_block": entries[0],
        "blocks": entries[1:],
        # large modules outside the repeated stacks, streamed as units of their own (kept resident first)
        "units": [name for name, unit in units if unit == "module"],
        # the largest parts outside the units, with why each is not streamed (shown by Plan.describe)
        "resident_parts": [list(part) for part in resident_parts(model, units)],
    }
    if experts:  # each block's routed experts (tensorstream.experts): stored last, with per-expert checksums
        manifest[EXPERTS_KEY] = experts
    reason = whole_block_reason(model)
    if reason:  # a mixture of experts outside transformers' experts interface: said by Plan.describe
        manifest["whole_block_experts"] = reason
    _write_json(staging / MANIFEST_NAME, manifest)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def check_model_folder(folder: Path, source: str | os.PathLike[str]) -> None:
    """`FormatError` naming what is missing when ``folder`` has no ``config.json`` or no weight files."""
    where = f"{folder}" if str(source) == str(folder) else f"{folder} (the files of {source!r})"
    if not (folder / "config.json").is_file():
        raise FormatError(
            f"{where} has no config.json: it is not a model folder. Pass the folder that holds config.json and the "
            "weights (what save_pretrained writes), or a Hub repo id."
        )
    if not any(f.suffix in _WEIGHT_SUFFIXES for f in folder.iterdir()):
        raise FormatError(
            f"{where} has a config.json but no weight files (*.safetensors or *.bin): pass the folder that holds "
            "the weights too (what save_pretrained writes)."
        )


def _checkpoint_bytes(folder: Path) -> int:
    """Bytes of the weight files in ``folder`` (safetensors when it has any): about what its store needs."""
    files = [f for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file()]
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    return sum(f.stat().st_size for f in safetensors or files)


def _reusable(path: Path, block: str, kind: str | None = None) -> TsHeader | None:
    """The header of a block file left by an interrupted reshard, if it is complete, for this block and kind."""
    if not path.is_file():
        return None
    try:
        header = read_ts_header(path)
        codec = BlockCodec(header)
    except (TensorStreamError, OSError):
        path.unlink(missing_ok=True)
        return None
    return header if header.block == block and codec.kind == kind else None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _publish(staging: Path, final: Path) -> None:
    """Rename the complete ``staging`` folder to ``final``.

    With ``--force`` over an existing store, the two are exchanged atomically (Linux ``renameat2``), so a process
    loading the store at that moment finds the old or the new one, never none; the old one is then deleted.
    Elsewhere the old store is moved aside first (a short window without a store).
    """
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        if _exchange(staging, final):
            os.replace(staging, trash)  # the old store, out of the staging path at once (never resumed from)
        else:
            os.replace(final, trash)
            os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(final.parent)


def _remove_trash(root: Path, fingerprint: str) -> None:
    """Delete old stores that a killed ``--force`` left moved aside."""
    for trash in root.glob(f".{fingerprint}.old-*"):
        shutil.rmtree(trash, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``; False where it is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
