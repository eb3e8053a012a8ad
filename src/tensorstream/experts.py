"""Routed experts, a unit kind: a mixture-of-experts layer reads only the experts its router picks.

transformers (5.x) puts the experts of about 65 mixture-of-experts families behind one interface
(``transformers.integrations.moe.use_experts_implementation``): an experts module holds fused ``[E, ...]``
parameters (``gate_up_proj``, ``down_proj``, biases) and its ``forward(hidden_states, top_k_index, top_k_weights)``
runs after the router, so a pre-forward hook on it sees which experts the tokens need before any expert weight is
read. This module is the store and plan side of that unit kind; `tensorstream.expert_streamer` is the engine side.

* **Reshard** (`experts_record`, `add_checksums`): the fused expert tensors of a block are written last in its
  ``.ts`` file, so the rest of the block (attention, norms, router, shared experts) is one prefix of its data; the
  manifest names them, with a checksum of the prefix and of every expert's slice of every fused tensor
  (``"experts"``: block -> ``[{"module", "num_experts", "tensors", "prefix_checksum", "checksums"}]``). Expert ``e``'s
  slice of a fused tensor is one contiguous byte range of it.
* **Plan** (`routed_layouts`, `ExpertLayout`): a streamed block of a plain store takes a region for its prefix only.
  Blocks of encoded stores (expanded whole) and experts outside the interface (Llama 4's dense-over-all-experts
  forward, DBRX, JetMoE, Switch/NLLB-MoE, LongCat: `whole_block_reason`) stream whole blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import FormatError, StaleStoreError
from .format import TsHeader, data_checksum
from .store import BlockEntry, Store, repair_hint

__all__ = [
    "EXPERTS_KEY",
    "ExpertLayout",
    "ExpertTensor",
    "add_checksums",
    "align",
    "check_modules",
    "experts_modules",
    "experts_record",
    "routed_layouts",
    "whole_block_reason",
]


#: The manifest key naming each block's routed experts.
EXPERTS_KEY = "experts"
ALIGN = 64


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> experts module, for every module behind transformers' experts interface.

    Such a module was built by a class decorated with ``use_experts_implementation`` (it carries the decorator's
    layout flags), holds only fused parameters whose first dimension is ``num_experts``, and its forward takes
    ``(hidden_states, top_k_index, top_k_weights)``.
    """
    found = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "_is_expert_parallel") and hasattr(module, "is_concatenated")):
            continue
        count = getattr(module, "num_experts", None)
        params = list(module.named_parameters(recurse=False))
        if type(count) is not int or count < 1 or not params:
            continue
        if any(p.dim() < 2 or p.shape[0] != count for _, p in params):
            continue
        if any(next(child.parameters(), None) is not None for child in module.children()):
            continue  # a post-expert norm or other weights outside the fused tensors: not a plain experts module
        found[name] = module
    return found


def whole_block_reason(model: nn.Module) -> str | None:
    """Why a mixture-of-experts model's blocks stream whole, or None (not a mixture of experts, or routed)."""
    config: Any = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    counts = [
        getattr(text, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    ]
    if not any(isinstance(c, int) and c > 1 for c in counts):
        return None
    if experts_modules(model):
        return None
    return (
        f"{type(model).__name__}'s experts are not behind transformers' experts interface (use_experts_implementation:"
        " fused [E, ...] weights, forward(hidden_states, top_k_index, top_k_weights)), so the routing is not known "
        "before the expert weights are needed: its blocks stream whole"
    )


def experts_record(model: nn.Module, block: str, names: Sequence[str]) -> list[dict[str, Any]]:
    """The manifest record of ``block``'s routed experts: ``[{"module", "num_experts", "tensors"}]`` (tensors by their
    full names, as in ``names``, the block's stored tensors); empty when the block has none."""
    record = []
    prefix = f"{block}."
    for path, module in experts_modules(model).items():
        if not path.startswith(prefix):
            continue
        tensors = [f"{path}.{local}" for local, _ in module.named_parameters(recurse=False)]
        if all(t in names for t in tensors):
            record.append({"module": path, "num_experts": module.num_experts, "tensors": tensors})
    return record


def add_checksums(item: dict[str, Any], header: TsHeader) -> dict[str, Any]:
    """``item`` (from `experts_record`) with the checksums a routed read verifies: ``prefix_checksum`` of the block's
    data before its experts, and ``checksums[tensor][e]`` of expert ``e``'s slice of each fused tensor (read back
    from the written file ``header.path``)."""
    names = item["tensors"]
    prefix = max((info.end for name, info in header.tensors.items() if name not in set(names)), default=0)
    checksums: dict[str, list[str]] = {}
    with open(header.path, "rb") as f:
        f.seek(header.data_offset)
        head = f.read(prefix)
        for name in names:
            info = header.tensors[name]
            per_expert = info.nbytes // item["num_experts"]
            f.seek(header.data_offset + info.start)
            checksums[name] = [data_checksum(f.read(per_expert)) for _ in range(item["num_experts"])]
    return {**item, "prefix_checksum": data_checksum(head), "checksums": checksums}


@dataclass(frozen=True)
class ExpertTensor:
    """One fused ``[E, ...]`` tensor of an experts module, where it lies in the block's data."""

    attr: str  #: the parameter's name on the experts module
    start: int  #: data offset of expert 0
    per_expert: int  #: bytes of one expert's slice
    dtype: torch.dtype
    shape: tuple[int, ...]  #: the full shape, ``(E, ...)``
    checksums: tuple[str, ...]  #: of each expert's slice
    phase: int = 0  #: the address phase (mod 64) the resident model holds the tensor at


@dataclass(frozen=True)
class ExpertLayout:
    """The routed experts of one streamed block: the experts module, its fused tensors, and the prefix before them.

    ``prefix_bytes`` is where the block's other tensors end: a load of the block reads and holds only that much.
    """

    block: str
    module: str  #: path of the experts module
    num_experts: int
    tensors: tuple[ExpertTensor, ...]
    prefix_bytes: int
    prefix_checksum: str  #: of the block's data before its experts

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (its slice of every fused tensor)."""
        return sum(t.per_expert for t in self.tensors)

    @property
    def slot_bytes(self) -> int:
        """Bytes one expert takes in the expert cache (each tensor's slice 64-byte aligned)."""
        return sum(align(t.per_expert) for t in self.tensors)

    @property
    def all_bytes(self) -> int:
        """Bytes of every expert: the compact buffer's size when all of them are routed (a long prompt), each tensor
        at its phase."""
        return sum(align(t.per_expert * self.num_experts) + ALIGN for t in self.tensors)

    @property
    def gathers_exactly(self) -> bool:
        """Whether a compact ``[U, ...]`` gather puts every expert at the address phase the resident model holds it
        at: each expert's slice a multiple of 64 bytes (true at real sizes). Else only the mapped mode routes it."""
        return all(t.per_expert % ALIGN == 0 for t in self.tensors)


def align(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def routed_layouts(store: Store) -> dict[str, ExpertLayout]:
    """Block name -> `ExpertLayout` for the blocks whose experts are routed (a plain store's blocks only).

    The manifest's record is untrusted input: it is checked against the block's validated header (every tensor
    present, of shape ``(E, ...)``, stored after every other tensor of the block).

    Raises:
        `FormatError`: the record is malformed or does not match the file.
    """
    record = store.manifest.get(EXPERTS_KEY)
    if record is None or store.kind is not None:
        return {}
    entries = {entry.name: entry for entry in store.blocks}
    if not isinstance(record, dict) or not all(isinstance(k, str) and isinstance(v, list) for k, v in record.items()):
        raise FormatError(
            f"{store.path}: the manifest's {EXPERTS_KEY!r} is not an object of lists; {repair_hint(store.path)}"
        )
    layouts = {}
    for block, items in record.items():
        entry = entries.get(block)
        if entry is None:
            raise FormatError(
                f"{store.path}: the manifest names experts of {block!r}, not a block; {repair_hint(store.path)}"
            )
        if len(items) != 1:
            continue  # several experts modules in one block: the block streams whole
        layouts[block] = _layout(store, entry, store.header(entry), items[0])
    return layouts


def _layout(store: Store, entry: BlockEntry, header: TsHeader, item: Any) -> ExpertLayout:
    file = header.path

    def bad(what: str) -> FormatError:
        return FormatError(f"{file}: the manifest's experts record {what}; {repair_hint(store.path)}")

    if not isinstance(item, dict) or set(item) != {"module", "num_experts", "tensors", "prefix_checksum", "checksums"}:
        raise bad("is not {module, num_experts, tensors, prefix_checksum, checksums}")
    module, count, names, sums = item["module"], item["num_experts"], item["tensors"], item["checksums"]
    if not isinstance(module, str) or not module.startswith(f"{entry.name}.") or type(count) is not int or count < 1:
        raise bad(f"has a bad module {module!r} or expert count {count!r}")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n.startswith(f"{module}.") for n in names)
    ):
        raise bad("names tensors outside its module")
    if not isinstance(sums, dict) or set(sums) != set(names) or not isinstance(item["prefix_checksum"], str):
        raise bad("has no checksum for each of its tensors")
    tensors = []
    for name in names:
        info = header.tensors.get(name)
        if info is None or not info.shape or info.shape[0] != count or info.nbytes % count:
            raise bad(f"names {name!r}, which is not an [{count}, ...] tensor of the file")
        per = sums[name]
        if not isinstance(per, list) or len(per) != count or not all(isinstance(c, str) for c in per):
            raise bad(f"has no checksum for each expert of {name!r}")
        tensors.append(
            ExpertTensor(
                name[len(module) + 1 :],
                info.start,
                info.nbytes // count,
                info.torch_dtype,
                info.shape,
                tuple(per),
                info.phase,
            )
        )
    chosen = set(names)
    prefix = max((info.end for name, info in header.tensors.items() if name not in chosen), default=0)
    if any(t.start < prefix for t in tensors):
        raise bad("names tensors that are not stored after the block's other tensors")
    return ExpertLayout(entry.name, module, count, tuple(tensors), prefix, item["prefix_checksum"])


def check_modules(layouts: Mapping[str, ExpertLayout], modules: Mapping[str, nn.Module], store: Store) -> None:
    """`StaleStoreError` when a layout's module is not an experts module of the model with its fused tensors."""
    for block, layout in layouts.items():
        local = layout.module[len(block) + 1 :]
        try:
            module = modules[block].get_submodule(local)
        except AttributeError:
            module = None
        if module is None or getattr(module, "num_experts", None) != layout.num_experts:
            raise StaleStoreError(
                f"{store.path} names experts at {layout.module!r} ({layout.num_experts}), which this model lacks: "
                f"the store was built for a different model or transformers version; {repair_hint(store.path)}"
            )
