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
import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import are_progress_bars_disabled
from torch import nn
from tqdm.auto import tqdm

from . import staging as store_writes  # its write_json by attribute: tests interrupt it there
from ._quiet import quiet_torchao
from .bnb import KEPT_METHODS
from .compact import COMPACT_KINDS, kind_identity, linear_weights, quantize_linears
from .config import check_dequantize, default_storage_path, parse_dtype
from .ctensors import CT_KIND
from .encoding import ENCODING_KEY, PREQUANTIZED_KINDS, BlockCodec, encode_tensors, expands, store_kind
from .errors import (
    ConfigError,
    FormatError,
    StaleStoreError,
    TensorStreamError,
)
from .experts import EXPERTS_KEY, add_checksums, experts_record, whole_block_reason
from .fingerprint import LAYOUT_REVISION, WEIGHT_SUFFIXES, source_fingerprint
from .format import FORMAT_VERSION, TENSOR_ALIGNMENT, TsHeader, read_ts_header, save_to_ts
from .gptq import GPTQ_METHODS
from .integrations.hub import resolve_model_class, resolve_source
from .loaded_tensors import initialised_tensor, offload_loader, source_phases, weight_conversions
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
from .staging import publish, remove_trash, staging_folder, store_lock
from .store import MANIFEST_NAME, STORE_FORMAT, Store, repair_hint

__all__ = ["build_store", "reshard", "reshard_module", "resolve_source", "weight_conversions"]

logger = logging.getLogger(__name__)

#: Store files end in ``.ts.safetensors``: a .ts file, and a name transformers' loader recognises as safetensors.
TS_SUFFIX = ".ts.safetensors"
NON_BLOCK_FILE = f"non_block{TS_SUFFIX}"


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
    check_dequantize(dequantize)
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
        loader = offload_loader(model, folder)
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
            phase_of=source_phases(loader, staging / "_offload"),
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
        remove_trash(root, fingerprint)
        return final
    with store_lock(root, fingerprint):
        if not force and _is_complete(final):
            logger.info("tensorstream: store %s was written by another process; reusing it", final)
            return final
        with staging_folder(root, fingerprint, source, needed_bytes) as staging:
            write(staging)
            shutil.rmtree(staging / "_offload", ignore_errors=True)
            publish(staging, final)
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
            publish(staging, final)
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
    store_writes.write_json(
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
    store_writes.write_json(staging / MANIFEST_NAME, manifest)


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
    if not any(f.suffix in WEIGHT_SUFFIXES for f in folder.iterdir()):
        raise FormatError(
            f"{where} has a config.json but no weight files (*.safetensors or *.bin): pass the folder that holds "
            "the weights too (what save_pretrained writes)."
        )


def _checkpoint_bytes(folder: Path) -> int:
    """Bytes of the weight files in ``folder`` (safetensors when it has any): about what its store needs."""
    files = [f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
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
