"""Parameter binding: how a block's bytes become the parameters its modules hold.

A streamed (or encoded resident) block is described by its *targets*: for every parameter, the submodule and
attribute that hold it, the meta placeholder it is restored to, and where its bytes lie in the block's data
(`block_targets`). `parameter` makes the one `torch.nn.Parameter` a target binds (a view at its place, with the
placeholder's ``requires_grad``), `bind_expanded` binds a whole block for good (`tensorstream.detach`, resident
blocks of an encoded store). The layout decisions live here too: where an encoded block's tensors sit on a device
(`device_codec`), how much memory one load of a block takes (`block_memory`), and which backend and mapping mode a
store is read with (`backend_name`, `expands_from_mapping`).

Everything that changes which tensors a streaming model's modules hold goes through this module (see
`tensorstream.engine` for the per-step binding, which uses `parameter`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

from .backends import choose_backend
from .config import Config
from .encoding import BlockCodec
from .errors import ConfigError, StaleStoreError
from .format import aligned_empty, read_data, verify_buffer
from .store import BlockEntry, Store, repair_hint

__all__ = [
    "backend_name",
    "bind_expanded",
    "block_memory",
    "block_targets",
    "device_codec",
    "expands_from_mapping",
    "load_resident_blocks",
    "maps_store",
    "parameter",
]


def load_resident_blocks(
    store: Store, names: Collection[str], modules: Mapping[str, nn.Module], device: torch.device, verify: str
) -> None:
    """Read and expand the encoded blocks ``names`` that stay resident, and bind them for good.

    transformers loads a plain store's resident blocks itself (views of the ``.ts`` files); an encoded block has to
    be expanded, with the same `BlockCodec.decode` the streamed blocks use, so that resident and streamed blocks
    compute with the weights `tensorstream.detach` gives.

    Raises:
        `CorruptFileError`: a block's data does not match its checksum (unless ``verify="off"``).
    """
    entries = {entry.name: entry for entry in store.blocks}
    tied = store.manifest.get("tied", {})
    for name in names:
        entry = entries[name]
        codec = device_codec(store, entry, device)
        targets = block_targets(name, modules[name], codec, tied, store)
        buffer = aligned_empty(codec.header.data_size)
        read_data(store.file(entry), codec.header, buffer)
        if verify != "off":
            verify_buffer(codec.header, buffer)
        bind_expanded(targets, codec.expand(buffer.to(device)))


def bind_expanded(targets: list[Any], data: torch.Tensor, realigned: bool = False) -> None:
    """Bind every target parameter to a view of ``data`` (a block's bytes as `Engine.read_block` gives them, each
    tensor moved down by its phase when ``realigned``); tied tensors stay tied."""
    made: dict[tuple[int, int], nn.Parameter] = {}
    for target in targets:
        module, attr, _, start, end, *_ = target
        if (start, end) not in made:
            made[(start, end)] = parameter(data, target, realigned)
        module._parameters[attr] = made[(start, end)]


def parameter(data: torch.Tensor, target: tuple[Any, ...], realigned: bool) -> nn.Parameter:
    """The parameter a target binds: a view of ``data`` at its place (moved down by its phase when ``realigned``),
    exactly as the resident model holds it (a parameter that requires grad makes some models take other kernels:
    Longformer, LED, FSMT's logits differ in the last bit otherwise)."""
    _, _, placeholder, start, end, dtype, shape, phase = target
    shift = phase if realigned else 0
    view = data[start - shift : end - shift].view(dtype).view(shape)
    return nn.Parameter(view, requires_grad=placeholder.requires_grad)


def backend_name(config: Config, store: Store) -> str:
    """The backend the engine uses for ``store`` under ``config`` (``"auto"`` resolved where it can be, cheaply).

    A lossless store's blocks are expanded on the CPU (zstd), so on CUDA they are read into host memory: ``"auto"``
    is the POSIX backend and ``"kvikio"`` (reads into GPU memory) a `ConfigError`.
    """
    device = config.execution_device
    backend = choose_backend(config.backend, device, direct_io=config.direct_io)
    if store.kind == "lossless" and device.type == "cuda" and backend in ("auto", "kvikio"):
        if backend == "kvikio":
            raise ConfigError(
                "backend='kvikio' reads straight into GPU memory, but a lossless store's blocks are expanded on the "
                "CPU (zstd); use backend='posix' (or 'auto') with this store."
            )
        backend = "posix"
    return backend


def device_codec(store: Store, entry: BlockEntry, device: torch.device) -> BlockCodec:
    """``entry``'s codec, laying an encoded block out for ``device``: each tensor at its source address phase on the
    CPU (as the memory-mapped resident model holds it), 64-byte aligned elsewhere (as a device copy is). Both
    layouts take the same bytes, so the plan made from `Store.codec` holds either."""
    codec = store.codec(entry)
    if device.type == "cpu" or not codec.encoded:
        return codec
    return BlockCodec(codec.header, phased=False)


def block_memory(codec: BlockCodec, expand_mapped: bool) -> int:
    """Bytes one load of the block takes in the arena: its data for a plain block, else its region (see
    `BlockCodec`), without the compact bytes when they are expanded straight from a mapping."""
    if not codec.encoded:
        return codec.header.data_size
    return codec.mapped_region_bytes if expand_mapped else codec.region_bytes


def maps_store(config: Config, store: Store) -> bool:
    """Whether the engine binds ``store``'s blocks as views of mappings of its files (plain store, CPU, mmap)."""
    return store.kind is None and config.execution_device.type == "cpu" and backend_name(config, store) == "mmap"


def expands_from_mapping(config: Config, store: Store) -> bool:
    """Whether the engine expands ``store``'s blocks straight from mappings of its files (encoded store, CPU, mmap)."""
    return store.kind is not None and config.execution_device.type == "cpu" and backend_name(config, store) == "mmap"


def block_targets(name: str, module: nn.Module, codec: BlockCodec, tied: Mapping[str, str], store: Store) -> list[Any]:
    """(submodule, attribute, placeholder, start, end, dtype, shape, phase) for each parameter of block ``name``.

    ``phase`` is the shift a device copy removes (`tensorstream.format.aligned_runs`): the file's for a plain block,
    0 for an encoded one (its codec lays the tensors out for the device already).
    """
    file = codec.header.path
    targets = []
    for local, param in module.named_parameters(remove_duplicate=False):
        full = f"{name}.{local}"
        info = codec.tensors.get(tied.get(full, full))
        if info is None:
            raise StaleStoreError(
                f"{file} has no tensor {full!r}, which the model needs: the store was built for a different model "
                f"or transformers version; {repair_hint(store.path)}"
            )
        if tuple(param.shape) != info.shape or param.dtype != info.torch_dtype:
            raise StaleStoreError(
                f"{file}: {full!r} is {info.dtype}{list(info.shape)} in the store but the model expects "
                f"{param.dtype}{list(param.shape)}; {repair_hint(store.path)}"
            )
        submodule_name, _, attr = local.rpartition(".")
        submodule = module.get_submodule(submodule_name)
        phase = 0 if codec.encoded else info.phase
        targets.append((submodule, attr, param, info.start, info.end, info.torch_dtype, info.shape, phase))
    return targets
