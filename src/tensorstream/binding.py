"""Parameter binding: how a block's bytes become the parameters its modules hold.

A streamed (or encoded resident) block is described by its *targets*: for every parameter, the submodule and
attribute that hold it, the meta placeholder it is restored to, and where its bytes lie in the block's data
(`block_targets`). `parameter` makes the one `torch.nn.Parameter` a target binds (a view at its place, with the
placeholder's ``requires_grad``), `bind_expanded` binds a whole block for good (`tensorstream.detach`, resident
blocks of an encoded store). The layout decisions live here too: where an encoded block's tensors sit on a device
(`device_codec`), how much memory one load of a block takes (`block_memory`), and which backend and mapping mode a
store is read with (`backend_name`, `expands_from_mapping`).

Everything that changes which tensors a streaming model's modules hold goes through this module (see
`tensorstream.engine` for the per-step binding, which uses `parameter`). Between forwards a streamed parameter is a
`StreamedParameter` placeholder (`install_placeholders`), and every change a user or a library makes to the model's
weights — PEFT adapters, ``load_state_dict``, assignment, in-place ops, merges — passes through `StateGuard`: exact
when the change can reach the blocks the next forward uses, `UnsupportedOperationError` at the call otherwise.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

from .backends import choose_backend
from .config import Config
from .encoding import BlockCodec, expands
from .errors import ConfigError, StaleStoreError, UnsupportedOperationError
from .format import aligned_empty, read_data, verify_buffer
from .store import BlockEntry, Store, repair_hint

__all__ = [
    "StateGuard",
    "StreamedParameter",
    "backend_name",
    "bind_expanded",
    "block_memory",
    "block_targets",
    "device_codec",
    "expands_from_mapping",
    "guard_of",
    "install_placeholders",
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
    Longformer, LED, FSMT's logits differ in the last bit otherwise). A ruled parameter is rebuilt by its binding rule
    from views of its parts (`tensorstream.rules`)."""
    _, _, placeholder, start, end, dtype, shape, phase, ruled = target
    if ruled is not None:
        return ruled.bind(data, realigned)
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
    """Whether the engine binds ``store``'s blocks as views of mappings of its files (a store whose blocks do not
    expand: plain or compact quantized; CPU, mmap)."""
    return not expands(store.kind) and config.execution_device.type == "cpu" and backend_name(config, store) == "mmap"


def expands_from_mapping(config: Config, store: Store) -> bool:
    """Whether the engine expands ``store``'s blocks straight from mappings of its files (encoded store, CPU, mmap)."""
    return expands(store.kind) and config.execution_device.type == "cpu" and backend_name(config, store) == "mmap"


def block_targets(name: str, module: nn.Module, codec: BlockCodec, tied: Mapping[str, str], store: Store) -> list[Any]:
    """(submodule, attribute, placeholder, start, end, dtype, shape, phase, ruled) for each parameter of block
    ``name``.

    ``phase`` is the shift a device copy removes (`tensorstream.format.aligned_runs`): the file's for a plain block,
    0 for an encoded one (its codec lays the tensors out for the device already). ``ruled`` is the parameter's
    `tensorstream.rules.RuledTensor` when a binding rule rebuilds it from parts (``start``/``end`` then span them),
    else None; its placeholder takes the recorded ``requires_grad``.
    """
    file = codec.header.path
    targets: list[Any] = []
    for local, param in module.named_parameters(remove_duplicate=False):
        full = f"{name}.{local}"
        ruled = codec.rules.get(tied.get(full, full))
        if ruled is not None:
            if getattr(ruled.rule, "reshapes", False) and ruled.rule.matches(param) and param.is_meta:
                # a built layer's placeholder before its load (bitsandbytes' Linear4bit: [out, in], loaded
                # [out * in / 2, 1]): the placeholder takes the stored shape, as the resident parameter has it
                param = nn.Parameter(torch.empty(ruled.shape, dtype=ruled.dtype, device="meta"), ruled.requires_grad)
                owner, _, attr = local.rpartition(".")
                module.get_submodule(owner)._parameters[attr] = param
            if tuple(param.shape) != ruled.shape or param.dtype != ruled.dtype:
                raise StaleStoreError(
                    f"{file}: {full!r} is {ruled.dtype}{list(ruled.shape)} in the store but the model expects "
                    f"{param.dtype}{list(param.shape)}; {repair_hint(store.path)}"
                )
            if param.requires_grad != ruled.requires_grad:
                param.requires_grad_(ruled.requires_grad)
            submodule_name, _, attr = local.rpartition(".")
            start, end = ruled.span
            targets.append(
                (module.get_submodule(submodule_name), attr, param, start, end, ruled.dtype, ruled.shape, 0, ruled)
            )
            continue
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
        targets.append((submodule, attr, param, info.start, info.end, info.torch_dtype, info.shape, phase, None))
    return targets


# -- the state of a streaming model's weights: placeholders and the one guard on changes ------------------------------

#: Tensor methods that only read a placeholder's metadata, or make a view or copy of it on meta: allowed.
_METADATA = frozenset(
    {
        "__deepcopy__", "__format__", "__hash__", "__len__", "__reduce_ex__", "__repr__", "__setstate__",
        "_has_compatible_shallow_copy_type", "_is_view", "clone", "contiguous", "data_ptr", "detach", "dim",
        "element_size", "flatten", "has_names", "is_complex", "is_contiguous", "is_floating_point", "is_pinned",
        "is_shared", "ndimension", "nelement", "numel", "requires_grad_", "reshape", "share_memory_", "size",
        "storage_offset", "stride", "t", "transpose", "untyped_storage", "view", "view_as",
    }
)  # fmt: skip


class StreamedParameter(nn.Parameter):
    """What a streamed parameter is between its block's forwards: a meta placeholder of the resident tensor.

    It has the resident tensor's shape, dtype and ``requires_grad``, and reports the execution device as its
    ``device`` (that is where the weight is when it is used, and where a library that adds layers next to it, such as
    PEFT, must put them). Its values exist only while its block runs, so anything that would read or change them
    outside that — an in-place op (``p.add_(1)``, ``p.data += d``, ``p.copy_(w)``), ``p.data = w``, or computing
    with it (``torch.cat([p, ...])``, ``p + lora``, ``p.to("cpu")``) — raises `UnsupportedOperationError` before
    anything changes. Shape and dtype queries, ``detach``, ``requires_grad_`` and views on meta are allowed.
    """

    _ts_name: str
    _ts_device: torch.device

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.__dict__.get("_ts_device", torch.device("meta"))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = getattr(getattr(func, "__self__", None), "__name__", "")  # a property's name for its getter/setter
        same = name == "__set__" and len(args) == 2 and args[1] is args[0]  # ``p.data = p`` (Module._apply)
        if name == "__get__" or (name == "__set__" and (owner != "data" or same)) or name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*args, **kwargs)
            if name == "__get__" and owner == "data":  # ``p.data`` is the placeholder too: ``p.data.add_`` refused
                return _alias(result, args[0])
            return result
        placeholder = next(a for a in _flat(args, kwargs) if isinstance(a, StreamedParameter))
        what = f"p.{owner} = ..." if name == "__set__" else f"{name}()"
        raise UnsupportedOperationError(
            f"{what} on {placeholder._describe()}{_caller()}: a streamed weight's values exist only while its block "
            "runs, so "
            "this would read or change nothing the model uses (the store is unchanged). To change or compute with "
            "weights, load the model resident (from_pretrained without device_map='tensorstream', or "
            "tensorstream.detach(model)), make the change, save_pretrained it, and stream the saved folder. The "
            "streaming model is unchanged."
        )

    def _describe(self) -> str:
        return f"the streamed parameter {self.__dict__.get('_ts_name', '?')!r}"


def _caller() -> str:
    """`` (called from module.function)`` for the first caller outside torch and tensorstream: names the library
    call that tried (``peft.tuners.lora.dora`` for DoRA's weight norm, ``diffusers...attention_processor``)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if not module.startswith(("torch", "tensorstream")):
            return f" (called from {module}.{frame.f_code.co_name})"
        frame = frame.f_back  # type: ignore[assignment]
    return ""


def _alias(tensor: torch.Tensor, like: StreamedParameter) -> StreamedParameter:
    alias = StreamedParameter(tensor, requires_grad=False)
    alias.__dict__.update(_ts_name=like.__dict__.get("_ts_name", "?"), _ts_device=like.device)
    return alias


def _flat(args: Any, kwargs: Mapping[str, Any]) -> list[Any]:
    flat: list[Any] = []
    for item in [*args, *kwargs.values()]:
        flat.extend(item if isinstance(item, list | tuple) else [item])
    return flat


def streamed_placeholder(param: torch.Tensor, name: str, device: torch.device) -> StreamedParameter:
    """The `StreamedParameter` for the meta ``param`` (its shape, dtype, ``requires_grad``), named for messages."""
    with torch._C.DisableTorchFunctionSubclass():
        data = param.detach() if param.is_meta else torch.empty_like(param, device="meta")
    placeholder = StreamedParameter(data, requires_grad=param.requires_grad)
    placeholder.__dict__.update(_ts_name=name, _ts_device=device)
    return placeholder


def install_placeholders(model: nn.Module, blocks: list[Any], device: torch.device) -> None:
    """Replace every streamed target's meta placeholder by a `StreamedParameter` (tied ones stay one object), in the
    targets and in the modules."""
    made: dict[int, StreamedParameter] = {}
    for block in blocks:
        names = {id(m): n for n, m in model.get_submodule(block.name).named_modules()}
        for i, (module, attr, placeholder, *rest) in enumerate(block.targets):
            if id(placeholder) not in made:
                local = ".".join(part for part in (names.get(id(module), ""), attr) if part)
                made[id(placeholder)] = streamed_placeholder(placeholder, f"{block.name}.{local}", device)
            new = made[id(placeholder)]
            block.targets[i] = (module, attr, new, *rest)
            if module._parameters.get(attr) is placeholder:
                module._parameters[attr] = new


class StateGuard:
    """Every change to a streaming model's weights passes here: it either reaches each block the next forward uses,
    or is refused with `UnsupportedOperationError` at the call, before anything changes.

    Installed by `tensorstream.stream.start_streaming` on a model (removed by `release`). It sees, through torch's
    global registration hooks and one ``load_state_dict`` pre-hook per module:

    - a parameter assigned or registered on a module (``m.weight = nn.Parameter(w)``, ``register_parameter``):
      refused where the engine binds a streamed weight; elsewhere an ordinary, resident change;
    - a submodule assigned (PEFT's injection of LoRA layers, diffusers' fused projections, ``unload``): a new
      module whose tensors are real becomes part of the model, resident (inside a streamed block it is a resident
      part of the block); one that would drop a module the engine binds, or hold a streamed placeholder the engine
      does not bind, is refused;
    - ``load_state_dict``: refused when it names a streamed parameter (checked for the whole state dict first);
    - a layer that wraps a base layer and merges into it (PEFT's tuner layers: ``merge``, ``merge_and_unload``,
      diffusers' ``fuse_lora``): its ``merge`` is refused when any such layer of the model wraps a streamed base
      layer (refused at the first layer, so resident layers are not merged either).

    In-place ops on a streamed placeholder are refused by `StreamedParameter` itself. New tensors left on meta
    (an adapter created empty and never loaded) are found at the next forward (`check`), before any block runs.
    """

    def __init__(self, model: nn.Module, blocks: list[Any], device: torch.device) -> None:
        self.model_name = type(model).__name__
        self._model = weakref.ref(model)
        #: module -> its qualified name in the model (kept for modules added later too)
        self.names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        #: the device map value of the execution device, as transformers' ``hf_device_map`` spells it
        self.device_value: Any = device.index if device.type == "cuda" and device.index is not None else str(device)
        #: streamed modules -> the attributes the engine binds on them
        self.targets: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
        #: every module inside a streamed block (modules added there later included)
        self.streamed: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        #: layers that wrap a base layer and can merge into it
        self.wrappers: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.handles: list[Any] = []
        self.dirty = True
        for block in blocks:
            for module, attr, *_ in block.targets:
                self.targets.setdefault(module, set()).add(attr)
            self.streamed.update(model.get_submodule(block.name).modules())
        self._adopt(model, "")
        _install_global_hooks()

    # -- the hooks ------------------------------------------------------------------------------------------------

    def on_parameter(self, module: nn.Module, name: str, param: torch.Tensor) -> None:
        if name in self.targets.get(module, ()):
            raise UnsupportedOperationError(
                f"assigning the parameter {name!r} of a {type(module).__name__} in a streamed block of this streaming "
                f"{self.model_name} (module.{name} = ... or register_parameter): the engine binds that attribute from "
                "the store before each forward, so the new tensor would never be used. Load the model resident "
                "(without device_map='tensorstream', or tensorstream.detach(model)), assign it there, save_pretrained "
                "it and stream the saved folder. The streaming model is unchanged."
            )
        self.dirty = True

    def on_module(self, parent: nn.Module, name: str, child: nn.Module | None) -> None:
        old = parent._modules.get(name)
        if old is not None and old is not child:
            kept = {id(m) for m in child.modules()} if child is not None else set()
            dropped = [m for m in old.modules() if m in self.targets and id(m) not in kept]
            if dropped:
                raise UnsupportedOperationError(
                    f"replacing the submodule {name!r} of a {type(parent).__name__} in this streaming "
                    f"{self.model_name} drops a {type(dropped[0]).__name__} whose weights stream from the store: the "
                    "replacement would run without them. Make this change on a resident model (without "
                    "device_map='tensorstream', or tensorstream.detach(model)), save_pretrained it and stream the "
                    "saved folder. The streaming model is unchanged."
                )
        if child is None:
            return
        for module in child.modules():
            if module in self.targets:
                continue
            for attr, tensor in module._parameters.items():
                if isinstance(tensor, StreamedParameter):
                    raise UnsupportedOperationError(
                        f"the new submodule {name!r} ({type(module).__name__}.{attr}) of a {type(parent).__name__} "
                        f"holds {tensor._describe()}, which the engine binds only in its own module: the new module "
                        "would run without its values. Make this change on a resident model (without "
                        "device_map='tensorstream', or tensorstream.detach(model)), save_pretrained it and stream the "
                        "saved folder. The streaming model is unchanged."
                    )
        parent_name = self.names.get(parent, "")
        self._adopt(child, f"{parent_name}.{name}" if parent_name else name, inside=parent in self.streamed)
        self.dirty = True

    def on_load(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
        for name, param in module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False):
            if isinstance(param, StreamedParameter) and name in state_dict:
                raise UnsupportedOperationError(
                    f"load_state_dict with {name!r}, a weight of this streaming {self.model_name} that streams from "
                    "its store: the store is unchanged, so the new values would not reach the blocks that stream. "
                    "Load the state dict into a resident model (without device_map='tensorstream', or "
                    "tensorstream.detach(model)), save_pretrained it and stream the saved folder; a state dict of "
                    "added weights only (a PEFT adapter) loads as it is. Nothing was loaded."
                )

    def check_merge(self, layer: nn.Module) -> None:
        for wrapper in list(self.wrappers):
            base = wrapper.get_base_layer() if hasattr(wrapper, "get_base_layer") else wrapper.base_layer  # type: ignore[operator]
            assert isinstance(base, nn.Module)
            if base in self.targets:
                raise UnsupportedOperationError(
                    f"merging the adapter of a {type(layer).__name__} of this streaming {self.model_name} "
                    "(merge, merge_adapter, merge_and_unload, fuse_lora): the base weights of its "
                    f"{type(base).__name__} layers stream from the store, which is unchanged. Keep the adapter "
                    "unmerged (it computes the same as a merged one up to rounding, and as the resident model "
                    "with the adapter unmerged exactly), or merge on a resident model and stream the result: "
                    "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)"
                    ".merge_and_unload(); model.save_pretrained(merged); then from_pretrained(merged, "
                    "device_map='tensorstream'). Nothing was merged."
                )

    def check(self) -> None:
        """Before a forward, after a change: refuse tensors left on meta (not placeholders) anywhere in the model."""
        if not self.dirty:
            return
        for module in list(self.wrappers) + list(self.streamed):
            for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is not None and tensor.is_meta and not isinstance(tensor, StreamedParameter):
                    raise UnsupportedOperationError(
                        f"{type(module).__name__}.{attr} of this streaming {self.model_name} is on the meta device: a "
                        "layer was added to a streamed block without its values (an adapter created empty and never "
                        "loaded?). Load the adapter's weights (load_adapter / PeftModel.from_pretrained), or add it "
                        "with low_cpu_mem_usage=False."
                    )
        self.dirty = False

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def _adopt(self, root: nn.Module, prefix: str, inside: bool = False) -> None:
        """Make ``root`` (named ``prefix``) and its submodules part of the guarded model. A module added inside a
        streamed block is resident: transformers' ``hf_device_map`` says so (its loaders, ``load_adapter``, would
        otherwise put its tensors where the block is, "disk", and leave the module's own tensors unloaded)."""
        device_map = getattr(self._model(), "hf_device_map", None)
        for local, module in root.named_modules(prefix=prefix, remove_duplicate=False):
            self.names.setdefault(module, local)
            if inside:
                self.streamed.add(module)
                holds = any(t is not None for t in module._parameters.values())
                if isinstance(device_map, dict) and module not in self.targets and local and holds:
                    device_map[local] = self.device_value
            if module in _GUARDS:
                continue
            _GUARDS[module] = self
            self.handles.append(module.register_load_state_dict_pre_hook(self.on_load))
            merge = getattr(type(module), "merge", None)
            if isinstance(getattr(module, "base_layer", None), nn.Module) and callable(merge):
                self.wrappers.add(module)
                module.merge = _GuardedMerge(module, self)

    def release(self, model: nn.Module) -> None:
        """Remove the guard (`tensorstream.detach`): the model is an ordinary resident model again."""
        for handle in self.handles:
            handle.remove()
        for module in model.modules():
            if _GUARDS.get(module) is self:
                del _GUARDS[module]
            if isinstance(module.__dict__.get("merge"), _GuardedMerge):
                del module.merge


class _GuardedMerge:
    """A wrapper layer's ``merge``: refused (by `StateGuard.check_merge`) while any wrapper wraps a streamed layer."""

    def __init__(self, layer: nn.Module, guard: StateGuard) -> None:
        self._layer = weakref.ref(layer)
        self._guard = guard

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self._layer()
        if layer is None:
            raise ReferenceError("the layer of this merge was deleted")
        self._guard.check_merge(layer)
        return type(layer).merge(layer, *args, **kwargs)  # type: ignore[attr-defined]


#: every module of every streaming model -> its guard
_GUARDS: weakref.WeakKeyDictionary[nn.Module, StateGuard] = weakref.WeakKeyDictionary()
_GLOBAL_HOOKS: list[Any] = []


def guard_of(module: nn.Module) -> StateGuard | None:
    """The guard of the streaming model ``module`` belongs to (None when it belongs to none)."""
    return _GUARDS.get(module)


def _install_global_hooks() -> None:
    """torch's process-wide registration hooks, installed once: a dictionary lookup for modules of no streaming
    model."""
    if _GLOBAL_HOOKS:
        return
    from torch.nn.modules.module import (
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    def on_parameter(module: nn.Module, name: str, param: torch.Tensor) -> None:
        guard = _GUARDS.get(module)
        if guard is not None:
            guard.on_parameter(module, name, param)

    def on_module(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        guard = _GUARDS.get(parent)
        if guard is not None:
            guard.on_module(parent, name, child)

    _GLOBAL_HOOKS.append(register_module_parameter_registration_hook(on_parameter))
    _GLOBAL_HOOKS.append(register_module_module_registration_hook(on_module))
