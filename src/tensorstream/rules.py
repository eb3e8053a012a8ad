"""Binding rules: parameters made of several stored parts, rebuilt from views of the slot.

A plain parameter is one tensor, and the engine binds a view of the block's bytes as it is. A quantized parameter
is more: torchao's ``Int8Tensor`` is ``qdata`` and ``scale`` plus attributes (``block_size``, ``dtype``), its
``Int4OpaqueTensor`` is packed nibbles and packed scales and zero points, bitsandbytes' ``Params4bit`` carries a
``QuantState``. A *binding rule* is the one mechanism that carries such a parameter through a store:

* when a block is written (`tensorstream.reshard`), `flatten_tensors` gives every tensor a registered rule
  recognises to that rule, which *flattens* it into plain named parts and a JSON-able ``meta``; the parts are stored
  as ordinary entries ``name.__part__`` and the rule's record in the file's ``__metadata__["rules"]``. What is
  flattened is the tensor the resident-loaded model holds, after every load-time conversion;
* when the block is bound (`tensorstream.binding.parameter`: a streamed load, a resident block, `tensorstream.detach`),
  the rule *rebuilds* the identical parameter from views of the parts in the slot: same class, dtype, shape,
  ``requires_grad`` and attributes. No load-time conversion runs a second time: the store holds its result.

The records are read with the header (`parse_rules`, by `tensorstream.encoding.BlockCodec`), checked as untrusted
input, and attached to each parameter's binding target (`RuledTensor`). The engine has no per-format branch: a rule
is found by the name its record gives.

The generic rule, ``"subclass"`` (`SubclassRule`), serves torch tensor subclasses through their own
``__tensor_flatten__`` / ``__tensor_unflatten__`` (torchao's tensors, tensorstream's own `tensorstream.compact`
ones); the class is recorded by its import path, and only classes of the modules in `ALLOWED_MODULES` are imported.

Writing a rule (for a parameter class with attributes, such as bitsandbytes')::

    import torch
    from torch import nn
    from tensorstream.rules import BindingRule, register_rule

    class Int8ParamsRule(BindingRule):
        name = "bnb-int8"                                    # recorded per parameter; never rename it

        def matches(self, tensor):
            return type(tensor).__name__ == "Int8Params"

        def flatten(self, tensor):                            # -> (parts, meta): plain tensors, JSON-able values
            return {"data": tensor.data, "SCB": tensor.SCB}, {"has_fp16_weights": tensor.has_fp16_weights}

        def rebuild(self, parts, meta, requires_grad):        # parts: views of the slot, never copied
            import bitsandbytes as bnb
            param = bnb.nn.Int8Params(parts["data"], requires_grad=requires_grad, **meta)
            param.CB, param.SCB = parts["data"], parts["SCB"]
            return param

    register_rule(Int8ParamsRule())

A family of rules lives in a module of its own (``tensorstream/rules_<family>.py``) that calls `register_rule` when it
is imported, with its optional dependency imported lazily inside the methods; add the module's name to
`RULE_MODULES` so that it is imported before any tensor is flattened or any record is parsed.

``rebuild`` must return the parameter exactly as the resident-loaded model holds it (a `torch.nn.Parameter` or a
subclass of it), built from the views it is given: the engine binds it for the block's forward and drops it after.
``check(meta, device)`` (optional) refuses, with a typed error naming the fix, a parameter that cannot be bound on
``device``; it runs when the engine or `tensorstream.detach` binds the block there.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, FormatError, StaleStoreError, UnsupportedQuantizationError
from .format import DTYPE_CODES, DTYPES, TensorInfo

__all__ = [
    "ALLOWED_MODULES",
    "RULES_KEY",
    "RULE_MODULES",
    "BindingRule",
    "RuledTensor",
    "SubclassRule",
    "flatten",
    "flatten_tensors",
    "parse_rules",
    "part_name",
    "plain_parts",
    "register_rule",
    "rule_for",
]

#: The ``__metadata__`` key of a ``.ts`` file's rule records.
RULES_KEY = "rules"
#: Modules whose tensor subclasses `SubclassRule` rebuilds (a store is untrusted input: nothing else is imported).
ALLOWED_MODULES = ("torchao.", "tensorstream.")


def part_name(name: str, part: str) -> str:
    """The entry holding part ``part`` of the ruled tensor ``name``."""
    return f"{name}.__{part}__"


class BindingRule:
    """How one kind of parameter is flattened into plain parts at reshard and rebuilt from views at bind time."""

    #: the name recorded per parameter in the store (never renamed: stores written with it must keep loading)
    name: str = ""

    def matches(self, tensor: torch.Tensor) -> bool:
        """Whether this rule flattens ``tensor`` (a parameter or buffer of the resident-loaded model)."""
        raise NotImplementedError

    def flatten(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``tensor``'s plain parts (name -> tensor) and its other state (JSON-able, `encode_value` for dtypes)."""
        raise NotImplementedError

    def rebuild(self, parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any], requires_grad: bool) -> nn.Parameter:
        """The parameter the resident model holds, from views of its parts (same class, attributes, dtype, shape)."""
        raise NotImplementedError

    def check(self, meta: Mapping[str, Any], device: torch.device) -> None:
        """Raise a typed error when the parameter cannot be bound on ``device`` (default: it can)."""

    def validate(self, meta: Mapping[str, Any]) -> None:
        """Raise `ValueError` when a record's ``meta`` (read from a store: untrusted) is not one this rule wrote."""


_RULES: dict[str, BindingRule] = {}
#: Modules of rule families, imported (once) before a tensor is flattened or a record parsed: each registers its rules.
RULE_MODULES: list[str] = []
_IMPORTED: set[str] = set()


def _load_rule_modules() -> None:
    for module in RULE_MODULES:
        if module not in _IMPORTED:
            importlib.import_module(module)
            _IMPORTED.add(module)


def register_rule(rule: BindingRule) -> BindingRule:
    """Add ``rule`` to the registry (by its name); rules registered later are tried first by `rule_for`."""
    if not rule.name:
        raise ValueError(f"{type(rule).__name__} has no name")
    _RULES.pop(rule.name, None)
    _RULES[rule.name] = rule
    return rule


def rule_for(tensor: torch.Tensor) -> BindingRule | None:
    """The registered rule that flattens ``tensor``, or None for a tensor that is stored as it is."""
    _load_rule_modules()
    for rule in reversed(list(_RULES.values())):
        if rule.matches(tensor):
            return rule
    return None


# -- JSON values: what a rule's meta may hold ------------------------------------------------------------------------


def encode_value(value: Any) -> Any:
    """``value`` as JSON: None, bools, numbers, strings, lists, string-keyed dicts, `torch.dtype`, `torch.Size`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: encode_value(v) for k, v in value.items()}
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):  # a str Enum (packing formats)
        return value.value
    raise TypeError(f"{type(value).__name__} {value!r}")


def decode_value(value: Any) -> Any:
    """The value `encode_value` recorded (dtypes and sizes rebuilt; anything else as JSON gives it)."""
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__dtype__"}:
            dtype = getattr(torch, str(value["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {value['__dtype__']!r}")
            return dtype
        if set(value) == {"__size__"}:
            return torch.Size([int(v) for v in value["__size__"]])
        return {k: decode_value(v) for k, v in value.items()}
    return value


# -- the generic rule: torch tensor subclasses ------------------------------------------------------------------------


def _import_class(path: str) -> type:
    module_name, _, qualname = path.partition(":")
    if not module_name.startswith(ALLOWED_MODULES) or not qualname:
        raise ValueError(f"{path!r} is not a tensor class of {ALLOWED_MODULES}")
    from ._quiet import quiet_torchao

    with quiet_torchao():  # torchao's import reports its CUDA-only extensions missing
        target: Any = importlib.import_module(module_name)
    for attr in qualname.split("."):
        target = getattr(target, attr)
    if not (isinstance(target, type) and issubclass(target, torch.Tensor) and hasattr(target, "__tensor_unflatten__")):
        raise ValueError(f"{path!r} is not a tensor subclass with __tensor_unflatten__")
    return target


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def int4_layout() -> str:
    """The packed layout ``_convert_weight_to_int4pack_for_cpu`` writes on this machine: it depends on the CPU's
    vector width (64 columns per block with AVX-512, 32 with AVX2, a plain order without)."""
    return str(torch.backends.cpu.get_cpu_capability())


#: Classes whose data is laid out for the CPU's int4 kernel, the layout depending on the machine (`int4_layout`).
_CPU_PACKED = ("Int4OpaqueTensor",)


class SubclassRule(BindingRule):
    """Torch tensor subclasses (torchao's quantized tensors), through ``__tensor_flatten__``/``__tensor_unflatten__``.

    The record's meta holds the class's import path (``module:qualname``, a module of `ALLOWED_MODULES`) and the
    flatten context; the rebuilt tensor gets the recorded shape and strides and is wrapped as the resident model's
    parameter is (``nn.Parameter(t, requires_grad=...)``).
    """

    name = "subclass"

    def matches(self, tensor: torch.Tensor) -> bool:
        cls = type(tensor)
        return (
            cls not in (torch.Tensor, nn.Parameter)
            and hasattr(cls, "__tensor_flatten__")
            and hasattr(cls, "__tensor_unflatten__")
            and cls.__module__.startswith(ALLOWED_MODULES)
        )

    def flatten(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        names, ctx = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        parts = {name: getattr(tensor, name) for name in names}
        for name, part in parts.items():
            if type(part) not in (torch.Tensor, nn.Parameter):
                raise TypeError(f"its part {name!r} is a {type(part).__name__}, not a plain tensor")
        meta = {"class": class_path(type(tensor)), "ctx": encode_value(ctx), "stride": list(tensor.stride())}
        if type(tensor).__qualname__ in _CPU_PACKED:
            meta["cpu_layout"] = int4_layout()
        return parts, meta

    def rebuild(self, parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any], requires_grad: bool) -> nn.Parameter:
        cls = _import_class(str(meta["class"]))
        ctx = decode_value(meta["ctx"])
        first = next(iter(parts.values()))
        shape = torch.Size(meta["shape"])
        stride = tuple(meta["stride"])
        tensor = cls.__tensor_unflatten__(dict(parts), ctx, shape, stride)  # type: ignore[attr-defined]
        if tuple(tensor.shape) != tuple(shape) or tensor.device != first.device:
            raise ValueError(f"rebuilt as {list(tensor.shape)} on {tensor.device}, expected {list(shape)}")
        return nn.Parameter(tensor, requires_grad=requires_grad)

    def validate(self, meta: Mapping[str, Any]) -> None:
        _import_class(str(meta.get("class")))
        stride = meta.get("stride")
        if not isinstance(stride, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in stride):
            raise ValueError(f"stride {stride!r} is not a list of integers")
        decode_value(meta.get("ctx"))

    def check(self, meta: Mapping[str, Any], device: torch.device) -> None:
        layout = meta.get("cpu_layout")
        if layout is None:
            return
        if device.type != "cpu":
            raise ConfigError(
                f"{str(meta['class']).rpartition(':')[2]} is packed for the CPU's int4 kernel "
                f"(_weight_int4pack_mm_for_cpu) and cannot compute on {device}: stream this model on the CPU, or "
                "use quantize='int8' (or the plain store) on this device."
            )
        if layout != int4_layout():
            raise StaleStoreError(
                f"this store's int4 weights are packed for {layout} CPUs, and this machine's int4 kernel reads the "
                f"{int4_layout()} layout: rebuild the store here (`tensorstream reshard --force` on the source, or "
                "delete the store and load again)."
            )


register_rule(SubclassRule())


# -- writing ----------------------------------------------------------------------------------------------------------


def flatten(name: str, tensor: torch.Tensor) -> tuple[BindingRule, dict[str, torch.Tensor], dict[str, Any]] | None:
    """``tensor``'s rule, parts and meta (None for a tensor stored as it is).

    Raises:
        `UnsupportedQuantizationError`: its rule cannot flatten it (state it cannot record), naming the tensor.
    """
    rule = rule_for(tensor)
    if rule is None:
        return None
    try:
        parts, meta = rule.flatten(tensor)
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise UnsupportedQuantizationError(
            f"{name!r} is a {type(tensor).__name__} that tensorstream cannot store ({err}): binding rule "
            f"{rule.name!r} records plain tensors and JSON values only. Load the model without this quantization "
            "(or with a weight-only one, such as torchao's Int8WeightOnlyConfig) to stream it.",
            type(tensor).__name__,
        ) from None
    return rule, parts, meta


def flatten_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Split every tensor a rule recognises into its parts: (entries to write, ``__metadata__["rules"]`` or None).

    Raises:
        `UnsupportedQuantizationError`: a rule cannot flatten a tensor (state it cannot record), naming it.
    """
    entries: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        flat = flatten(name, tensor)
        if flat is None:
            entries[name] = tensor
            continue
        rule, parts, meta = flat
        records[name] = {
            "rule": rule.name,
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "requires_grad": bool(tensor.requires_grad),
            "parts": list(parts),
            "meta": {**meta, "shape": list(tensor.shape)},
        }
        for part, value in parts.items():
            entries[part_name(name, part)] = value.detach()
    if not records:
        return entries, None
    return entries, json.dumps(records, separators=(",", ":"))


def plain_parts(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: tensor}``, or the entries a rule flattens ``tensor`` into (to hash or size what a store holds)."""
    rule = rule_for(tensor)
    if rule is None:
        return {name: tensor}
    return {part_name(name, part): value for part, value in rule.flatten(tensor)[0].items()}


# -- reading and binding ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuledTensor:
    """One ruled parameter of a block: its rule, record and parts (`TensorInfo`s where the block binds them)."""

    name: str
    rule: BindingRule
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool
    parts: dict[str, TensorInfo]
    meta: dict[str, Any]

    @property
    def span(self) -> tuple[int, int]:
        """The bytes its parts cover (the key tied parameters share)."""
        return min(p.start for p in self.parts.values()), max(p.end for p in self.parts.values())

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def bind(self, data: torch.Tensor, realigned: bool) -> nn.Parameter:
        """The parameter, rebuilt from views of ``data`` (the block's bytes; each part moved down by its phase when
        ``realigned``)."""
        views = {}
        for part, info in self.parts.items():
            shift = info.phase if realigned else 0
            views[part] = data[info.start - shift : info.end - shift].view(info.torch_dtype).view(info.shape)
        self.rule.check(self.meta, data.device)
        return self.rule.rebuild(views, self.meta, self.requires_grad)


def parse_rules(raw: str | None, tensors: Mapping[str, TensorInfo], path: Any) -> dict[str, RuledTensor]:
    """The rule records of a ``.ts`` file (its ``__metadata__["rules"]``), their parts found in ``tensors``.

    Raises:
        `FormatError`: a record is malformed, names an unknown rule or a part the file lacks.
    """
    if raw is None:
        return {}
    _load_rule_modules()

    def fail(what: str) -> FormatError:
        return FormatError(f"{path}: {what}; the file is damaged or was written by another tensorstream version.")

    try:
        records = json.loads(raw)
    except (ValueError, RecursionError):
        raise fail("__metadata__['rules'] is not valid JSON") from None
    if not isinstance(records, dict):
        raise fail("__metadata__['rules'] is not an object")
    ruled: dict[str, RuledTensor] = {}
    for name, record in records.items():
        if not isinstance(record, dict):
            raise fail(f"the rule record of {name!r} is not an object")
        rule = _RULES.get(record.get("rule"))  # type: ignore[arg-type]
        dtype, shape, parts, meta = record.get("dtype"), record.get("shape"), record.get("parts"), record.get("meta")
        if rule is None:
            raise fail(f"{name!r} is bound by rule {record.get('rule')!r}, which this tensorstream does not know")
        if (
            dtype not in DTYPES
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
            or not isinstance(parts, list)
            or not parts
            or not isinstance(meta, dict)
        ):
            raise fail(f"the rule record of {name!r} is malformed")
        try:
            rule.validate({**meta, "shape": shape})
        except (ValueError, TypeError, ImportError, AttributeError) as err:
            raise fail(f"the rule record of {name!r} is invalid ({err})") from None
        infos = {}
        for part in parts:
            info = tensors.get(part_name(name, str(part)))
            if info is None:
                raise fail(f"{part_name(name, str(part))!r} is missing")
            infos[str(part)] = info
        ruled[name] = RuledTensor(
            name, rule, DTYPES[dtype], tuple(shape), bool(record.get("requires_grad")), infos, meta
        )
    return ruled
