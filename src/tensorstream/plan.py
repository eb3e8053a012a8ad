"""Which modules are blocks, and what stays resident under the budget.

Blocks are found from the model's structure, not from names: the outermost ``torch.nn.ModuleList`` containers
whose children all hold parameters and are all of one class, preferring those whose classes are all listed in
transformers' ``_no_split_modules`` (which may mix classes: a hybrid stack of attention and Mamba layers). A list
of lists (Funnel's ``encoder.blocks``) is never called itself: the lists inside it are the stacks. Large modules
outside the stacks that run as a whole (an untied head, a vision tower, the stages of a model with no repeated
stack) are units of their own (`find_units`). A block larger than all the others together (CvT's last stage, 95 % of
the model) or than twice the median block (a UNet's widest up block) is replaced by the stacks of layers inside it
(`_split_oversized`), so that a budget above the non-block
weights plus the two largest consecutive units streams any model with weights.
The structural order is registration order (encoder blocks before decoder blocks); the engine then learns the
order blocks actually run in (see `tensorstream.engine`).

The planner splits the budget (resident weights plus streaming slots) as follows:

1. all non-block weights are resident;
2. if every block also fits, nothing streams;
3. otherwise an arena for ``prefetch + 1`` blocks in flight (one computing, ``prefetch`` loading), as large as
   the ``prefetch + 1`` largest *consecutive* streamed blocks (in execution order, wrapping around: each block
   takes a region of its own size, see `tensorstream.slots`), and as many of the first blocks in execution order
   as still fit stay resident;
4. when even that does not fit, the planner lowers the depth, down to two blocks in flight, keeping as many
   blocks resident as fit next to them;
5. below the non-block weights plus the two largest consecutive blocks, a last resort: one block in flight, read
   when it is needed (no read-ahead; logged).

A budget below the non-block weights plus the largest block raises `BudgetError` naming the minimum, rounded up
so that the suggested ``budget_gb`` works as printed.

With a host cache (``host_cache_gb``, CUDA only), a fixed set of streamed blocks, spread evenly over the
execution order so that storage reads keep flowing between them, is kept in pinned RAM: chosen once, never
evicted, so a per-step scan over a model larger than RAM cannot thrash it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BudgetError, UnsupportedModelError

__all__ = ["Plan", "auto_budget_bytes", "find_blocks", "kv_cache_bytes", "make_plan", "resident_parts"]

logger = logging.getLogger(__name__)
SLOT_ALIGNMENT = 4096
AUTO_BUDGET_FRACTION = 0.8


def find_blocks(model: nn.Module) -> list[str]:
    """Module paths of the units ``model`` streams (see `find_units`), in structural order.

    Raises:
        `UnsupportedModelError`: the model has no module that can stream (no weights outside its first module).

    Example:
        ```python
        >>> find_blocks(LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, ...)))
        ['model.layers.0', 'model.layers.1']
        ```
    """
    return [name for name, _ in find_units(model)]


def find_units(model: nn.Module) -> list[tuple[str, str]]:
    """``(module path, kind)`` of every unit ``model`` can stream, in structural (registration) order.

    ``kind`` is ``"block"`` for a block of a repeated stack (found as described in the module docstring) and
    ``"module"`` for a large module outside the stacks that runs as a whole: an untied output head, a vision tower,
    the parts of a model without a repeated stack (ALBERT's shared layer group, SwiftFormer's mixed stages). A
    module unit is at least as large as the largest block (without blocks: between a sixteenth and a quarter of
    the model, descending into larger modules),
    is called as a module (not a ``ModuleList``/``ModuleDict`` container), shares no weight with a module outside
    it (tied weights stay tied), and does not hold the model's first parameter (``model.device`` reads it). The
    planner keeps module units resident before blocks, so they stream only when the budget needs it.

    Raises:
        `UnsupportedModelError`: nothing can stream.
    """
    blocks = _split_oversized(model, _repeated_blocks(model))
    sizes = _module_bytes(model)
    threshold, largest = _unit_bounds(blocks, sizes)
    modules = set(_module_units(model, set(blocks), sizes, threshold, largest))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    units = sorted([*((b, "block") for b in blocks), *((m, "module") for m in modules)], key=lambda u: order[u[0]])
    if not units:
        no_split = sorted(getattr(model, "_no_split_modules", None) or [])
        raise UnsupportedModelError(
            f"{type(model).__name__} has no repeated blocks to stream and no other module that can stream on its own: "
            "tensorstream looks for a torch.nn.ModuleList of modules that all hold parameters and are of one class "
            f"(or all of _no_split_modules={no_split}, which are preferred), else for large modules that run as a "
            "whole and share no weights, apart from the one that holds the first parameter. Load this model without "
            "device_map='tensorstream'."
        )
    return units


def _unit_bounds(blocks: Collection[str], sizes: dict[str, int]) -> tuple[int, int]:
    """(smallest, largest) size of a module unit: see `find_units`."""
    total = sizes.get("", 0)
    if blocks:  # beside a stack: large modules, whole (an untied head)
        return max(sizes.get(name, 0) for name in blocks), total
    # no stack: modules between a sixteenth and a quarter of the model, so that several stream in turn
    return max(total // 16, 1), max(total // 4, 1)


def resident_parts(model: nn.Module, units: Sequence[tuple[str, str]], limit: int = 8) -> list[tuple[str, int, str]]:
    """``(module path, bytes, why)`` of the largest parts of ``model`` outside its units, largest first.

    These are the non-block weights: always resident, never streamed. A part is the outermost module (or tensor)
    that holds no unit; the reason says why it is not a unit of its own, so that a large one (an untied head, a
    vision tower without a repeated stack) is visible in the plan (`Plan.describe`).

    Example:
        ```python
        >>> resident_parts(llama, find_units(llama))[:2]
        [('model.embed_tokens', 131072, 'holds the first parameter (model.device reads it)'),
         ('lm_head', 131072, 'shares a weight with a module outside it (tied)')]
        ```
    """
    names = {name for name, _ in units}
    holders = {".".join(name.split(".")[:i]) for name in names for i in range(len(name.split(".")))}
    sizes = _module_bytes(model)
    threshold, _ = _unit_bounds([name for name, kind in units if kind == "block"], sizes)
    modules = dict(model.named_modules())
    owners = _parameter_owners(model)
    first = next(model.parameters(), None)
    groups: dict[str, dict[int, int]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        path = name.split(".")
        prefixes = [".".join(path[:i]) for i in range(1, len(path) + 1)]
        if any(prefix in names for prefix in prefixes):
            continue  # inside a unit: streamed (or resident as a unit)
        part = next(prefix for prefix in prefixes if prefix not in holders)
        groups.setdefault(part, {})[id(tensor)] = tensor.numel() * tensor.element_size()

    def why(part: str, size: int) -> str:
        module = modules.get(part)
        if module is None:
            holder = part.rpartition(".")[0]
            return f"held directly by {holder or 'the model'}, which runs around its units"
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            return "a container, never called as a whole"
        prefix = part + "."
        for param in module.parameters():
            if param is first:
                return "holds the first parameter (model.device reads it)"
            if any(owner != part and not owner.startswith(prefix) for owner in owners.get(id(param), ())):
                return "shares a weight with a module outside it (tied)"
        if size < threshold:
            return "outside the repeated blocks, smaller than the largest unit"
        return "outside the repeated blocks, not a module that runs as a whole"

    parts = sorted(((part, sum(tensors.values())) for part, tensors in groups.items()), key=lambda p: -p[1])
    return [(part, size, why(part, size)) for part, size in parts[:limit] if size]


def _split_oversized(model: nn.Module, blocks: list[str]) -> list[str]:
    """``blocks`` with each oversized block replaced by the repeated layers inside it.

    A block is oversized when it is larger than all the others together (CvT's last stage, 95 % of the model) or
    more than twice the median block (a UNet's widest up block, 46 % of the model, next to blocks a tenth of its
    size): it would set the smallest budget that streams. Inside it, the outermost stacks of layers of one class
    (``ModuleList`` or ``nn.Sequential`` containers, whose children are called each in turn: a UNet block's
    ``resnets`` and ``attentions``) stream instead, layer by layer; what the block holds outside those stacks
    (CvT's ``cls_token``, a UNet block's upsampler) becomes non-block weights. A block with no such stack stays
    whole. Repeated until no block is split further. Blocks of one size (a decoder's layers) are never split.

    Example:
        ```python
        >>> _split_oversized(cvt, ["cvt.encoder.stages.0", "cvt.encoder.stages.1", "cvt.encoder.stages.2"])[2:4]
        ['cvt.encoder.stages.2.layers.0', 'cvt.encoder.stages.2.layers.1']
        ```
    """
    modules = dict(model.named_modules())
    while True:
        sizes = {name: _bytes(modules[name]) for name in blocks}
        total = sum(sizes.values())
        median = sorted(sizes.values())[len(sizes) // 2] if sizes else 0
        for i, name in enumerate(blocks):
            if sizes[name] * 2 <= total and sizes[name] <= 2 * median:
                continue
            inner = _repeated_blocks(modules[name], sequential=True)
            if inner:
                blocks = [*blocks[:i], *(f"{name}.{layer}" for layer in inner), *blocks[i + 1 :]]
                break
        else:
            return blocks


def _repeated_blocks(model: nn.Module, *, sequential: bool = False) -> list[str]:
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    stacks = (nn.ModuleList, nn.Sequential) if sequential else (nn.ModuleList,)
    candidates: list[tuple[str, nn.ModuleList | nn.Sequential, bool]] = []
    for name, module in model.named_modules():
        if not isinstance(module, stacks) or len(module) == 0:
            continue
        children = list(module)
        if any(isinstance(child, nn.ModuleList | nn.ModuleDict) for child in children):
            continue  # containers are never called, so a hook on them never fires: look at the lists inside
        classes = {type(child).__name__ for child in children}
        # all children of one class, or all of _no_split_modules classes (a hybrid stack: Jamba's attention and
        # Mamba decoder layers alternate in one list)
        preferred = classes <= no_split
        if len(classes) > 1 and not preferred:
            continue
        if any(next(child.parameters(), None) is None for child in children):
            continue
        if preferred or len(children) >= 2:
            candidates.append((name, module, preferred))
    if any(preferred for _, _, preferred in candidates):
        # other stacks (a vision or audio tower's layers next to the decoder's) stay when their blocks are of the
        # decoder blocks' order of size; small ones (a list of norms) do not
        largest = max(_bytes(child) for _, module, preferred in candidates if preferred for child in module)
        candidates = [c for c in candidates if c[2] or min(_bytes(child) for child in c[1]) * 4 >= largest]
    chosen: list[str] = []
    for name, _, _ in candidates:
        if any(name.startswith(outer + ".") for outer in chosen):
            continue  # nested inside a stack already chosen (e.g. experts inside a decoder layer)
        chosen.append(name)
    lists = dict(model.named_modules())
    return [f"{prefix}.{i}" if prefix else str(i) for prefix in chosen for i in range(len(lists[prefix]))]


def _parameter_owners(model: nn.Module) -> dict[int, set[str]]:
    """id(parameter) -> the paths of every module that holds it directly (several for a tied parameter)."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), set()).add(name)
    return owners


def _bytes(module: nn.Module) -> int:
    return sum({id(p): p.numel() * p.element_size() for p in module.parameters()}.values())


def _module_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the parameters under every module (each tensor counted once per module)."""
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        seen = {id(p): p.numel() * p.element_size() for p in module.parameters()}
        sizes[name] = sum(seen.values())
    return sizes


def _module_units(
    model: nn.Module, blocks: set[str], sizes: dict[str, int], threshold: int, largest: int
) -> list[str]:
    """Large modules outside the blocks that can stream as units of their own (see `find_units`)."""
    holders = {".".join(name.split(".")[:i]) for name in blocks for i in range(len(name.split(".")))}
    owners = _parameter_owners(model)
    first = next(model.parameters(), None)
    # weights save_pretrained leaves out (Marian's sinusoidal positions, rebuilt at init) are never in a store
    unsaved = [re.compile(pattern) for pattern in getattr(model, "_keys_to_ignore_on_save", None) or []]
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    units: list[str] = []

    def eligible(name: str, module: nn.Module) -> bool:
        if isinstance(module, nn.ModuleList | nn.ModuleDict) or sizes.get(name, 0) == 0:
            return False
        prefix = name + "."
        for param in module.parameters():
            if param is first or any(pattern.search(names[id(param)]) for pattern in unsaved):
                return False
            if any(owner != name and not owner.startswith(prefix) for owner in owners[id(param)]):
                return False  # tied to a module outside
        return True

    def visit(name: str, module: nn.Module) -> None:
        if name in blocks or sizes.get(name, 0) < threshold:
            return
        children = list(module.named_children())
        whole = sizes.get(name, 0) <= largest or not children  # a single large leaf cannot be split further
        if name and name not in holders and whole and eligible(name, module):
            units.append(name)
            return
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return units


@dataclass(frozen=True)
class Plan:
    """The split of the budget between resident weights and the streaming arena.

    Attributes:
        budget_bytes: the budget the plan was made for.
        non_block_bytes: weights outside the blocks (always resident).
        resident: blocks kept on the device, in execution order.
        streamed: blocks read from the store at every step, in execution order.
        slot_bytes: the largest streamed block, rounded up to 4096 (the largest region of the arena).
        num_slots: blocks in flight at most (one computing, ``num_slots - 1`` read ahead).
        block_bytes: every block's size.
        cached: streamed blocks served from the pinned host cache tier instead of storage.
        arena_bytes: the streaming memory: enough for the ``num_slots`` largest consecutive streamed blocks (in
            execution order, wrapping around), each in a region of its own size.
        routed: streamed blocks whose experts are routed (`tensorstream.experts`): a load reads the block without
            its experts (``stream_bytes``), and each forward reads only the experts its router picks.
        stream_bytes: what one load of each routed block holds (the rest of ``block_bytes`` is its experts).
        expert_mode: ``"mapped"`` (the page cache is the expert cache) or ``"slots"`` (a compact buffer of
            ``expert_work_bytes`` and an expert cache of ``expert_cache_bytes``, both in the budget).
        whole_block_reason: why a mixture-of-experts model streams whole blocks (empty when it does not).
        read_bytes: bytes a load of each block reads from the store, where that differs from ``block_bytes`` (a
            quantized store's compact file, expanded into a larger region).
        quantization: what a store of a pre-quantized checkpoint streams
            (`tensorstream.prequantized.describe_quantization`; empty for any other store).
    """

    budget_bytes: int
    non_block_bytes: int
    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    slot_bytes: int
    num_slots: int
    block_bytes: dict[str, int]
    cached: tuple[str, ...] = ()
    arena_bytes: int = 0
    #: large modules outside the repeated stacks that are units of their own (kept resident before blocks).
    units: tuple[str, ...] = ()
    #: ``(module path, bytes, why)`` of the largest non-block parts (see `resident_parts`), for `describe`.
    non_block_parts: tuple[tuple[str, int, str], ...] = ()
    routed: tuple[str, ...] = ()
    stream_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    expert_mode: str = ""
    expert_work_bytes: int = 0
    expert_cache_bytes: int = 0
    expert_slot_bytes: int = 0
    whole_block_reason: str = ""
    read_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    quantization: str = ""

    @property
    def prefetch(self) -> int:
        """Blocks read ahead of the one computing (at most: fewer while the arena has no room for the next)."""
        return max(self.num_slots - 1, 0)

    @property
    def resident_bytes(self) -> int:
        return self.non_block_bytes + sum(self.block_bytes[name] for name in self.resident)

    @property
    def device_bytes(self) -> int:
        """Peak weight bytes on the device: resident weights, the arena, the experts' buffer and cache (never above
        the budget)."""
        return self.resident_bytes + self.arena_bytes + self.expert_work_bytes + self.expert_cache_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes moved to the device per full pass over the model (from storage or the host cache)."""
        return sum(self.block_bytes[name] for name in self.streamed)

    @property
    def cached_bytes(self) -> int:
        """Bytes per pass that come from the pinned host cache tier."""
        return sum(self.block_bytes[name] for name in self.cached)

    @property
    def storage_bytes(self) -> int:
        """Bytes per pass read from storage."""
        return self.streamed_bytes - self.cached_bytes

    def lower_bound_seconds(self, disk_gb_per_s: float, h2d_gb_per_s: float | None = None) -> float:
        """Seconds per full pass that the I/O alone needs: storage bytes / disk speed + cached bytes / copy speed.

        Example:
            ```python
            >>> plan.lower_bound_seconds(disk_gb_per_s=6.5, h2d_gb_per_s=25.0)
            0.41
            ```
        """
        seconds = self.storage_bytes / (disk_gb_per_s * 1e9)
        if self.cached and h2d_gb_per_s:
            seconds += self.cached_bytes / (h2d_gb_per_s * 1e9)
        return seconds

    def describe(self) -> str:
        """One line: what stays resident and why (the largest non-block parts by name), what streams, and how.

        Example:
            ```python
            >>> print(plan.describe())
            budget 5 GB: non-block 1.05 GB resident (not streamed: lm_head 0.525 GB, shares a weight with a module
            outside it (tied); model.embed_tokens 0.525 GB, holds the first parameter (model.device reads it)),
            2/32 blocks resident (0.4 GB), 30 streamed (6 GB per pass) through an arena of 0.6 GB (...)
            ```
        """
        parts = "; ".join(f"{name} {format_gb(size)}, {why}" for name, size, why in self.non_block_parts)
        head = f"budget {format_gb(self.budget_bytes)}: non-block {format_gb(self.non_block_bytes)} resident"
        head += f" (not streamed: {parts})" if parts else ""
        kept = [name for name in self.resident if name in set(self.units)]
        if kept:
            head += f", module unit{'s' * (len(kept) > 1)} kept resident before blocks: " + ", ".join(
                f"{name} ({format_gb(self.block_bytes[name])})" for name in kept
            )
        total = len(self.resident) + len(self.streamed)
        if self.quantization:
            head = f"{self.quantization}; {head}"
        if not self.streamed:
            return f"{head}, all {total} blocks resident, nothing streamed"
        if self.whole_block_reason:
            head += f"; {self.whole_block_reason}"
        cached = (
            f", {len(self.cached)} of them from pinned RAM ({format_gb(self.cached_bytes)})" if self.cached else ""
        )
        read = sum(self.read_bytes.get(name, self.block_bytes[name]) for name in self.streamed)
        per_pass = f"{format_gb(self.streamed_bytes)} per pass"
        if read != self.streamed_bytes:  # an encoded store: compact bytes read, expanded in memory
            per_pass = f"{format_gb(read)} read per pass, {format_gb(self.streamed_bytes)} once expanded"
        return (
            f"{head}, {len(self.resident)}/{total} blocks resident "
            f"({format_gb(self.resident_bytes - self.non_block_bytes)}), {len(self.streamed)} streamed "
            f"({per_pass}) through an arena of {format_gb(self.arena_bytes)} "
            f"(up to {self.num_slots} block{'s' * (self.num_slots > 1)} in flight, "
            f"largest {format_gb(self.slot_bytes)}; prefetch {self.prefetch}){cached}{self._describe_experts()}"
        )

    def _describe_experts(self) -> str:
        if not self.routed:
            return ""
        experts = sum(self.block_bytes[name] - self.stream_bytes[name] for name in self.routed)
        text = (
            f"; {len(self.routed)} streamed blocks read only their routed experts ({format_gb(experts)} of experts "
            "per pass, read as the router picks them)"
        )
        if self.expert_mode == "mapped":
            return text + ", mapped: the page cache is the expert cache"
        slots = self.expert_cache_bytes // self.expert_slot_bytes if self.expert_slot_bytes else 0
        return (
            text + f", gathered in a buffer of {format_gb(self.expert_work_bytes)}, expert cache "
            f"{format_gb(self.expert_cache_bytes)} ({slots} experts)"
        )


def format_gb(nbytes: float) -> str:
    """``nbytes`` in GB (10^9 bytes) with enough digits to be useful for tiny and huge sizes alike."""
    gb = nbytes / 1e9
    return f"{gb:.2f} GB" if gb >= 10 else f"{gb:.3g} GB"


def gb_rounded_up(nbytes: int) -> str:
    """``nbytes`` in GB, rounded *up* to the kB: a ``budget_gb`` that holds ``nbytes`` when written as printed.

    Example:
        ```python
        >>> gb_rounded_up(1_234_567_891)
        '1.234568'
        ```
    """
    kb = -(-nbytes // 1000)
    text = f"{kb // 10**6}.{kb % 10**6:06d}".rstrip("0").rstrip(".")
    return text


def _aligned(nbytes: int) -> int:
    return -(-nbytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


def arena_bytes(sizes: Sequence[int], in_flight: int) -> int:
    """Bytes for ``in_flight`` consecutive blocks of ``sizes`` (execution order, wrapping around), each aligned.

    Example:
        ```python
        >>> arena_bytes([4096, 8192, 4096, 12288], 2)   # the largest consecutive pair: 12288 + 4096 (wrap-around)
        16384
        ```
    """
    n = len(sizes)
    k = min(in_flight, n)
    if k == 0:
        return 0
    aligned = [_aligned(size) for size in sizes]
    window = sum(aligned[:k])
    best = window
    if k < n:
        for i in range(1, n):  # the window starting at block i (cyclic)
            window += aligned[(i + k - 1) % n] - aligned[i - 1]
            best = max(best, window)
    return best


def make_plan(
    non_block_bytes: int,
    blocks: Sequence[tuple[str, int]],
    budget_bytes: int,
    prefetch: int,
    *,
    host_cache_bytes: int = 0,
    prefer_resident: Collection[str] = (),
    stream_sizes: Mapping[str, int] | None = None,
) -> Plan:
    """Split ``budget_bytes`` between resident weights and the streaming arena (see the module docstring).

    Args:
        non_block_bytes: bytes of the weights outside the blocks.
        blocks: ``(name, bytes)`` of every block in execution order.
        budget_bytes: the weights budget on the execution device.
        prefetch: upper bound on blocks read ahead.
        host_cache_bytes: pinned host RAM for the cache tier (0: none).
        prefer_resident: blocks kept resident before the others (module units, see `find_units`: they stream
            only when the budget needs it).
        stream_sizes: bytes one load of a block takes when it streams, where that is less than its size (a block
            whose routed experts are read apart, see `tensorstream.experts`).

    Raises:
        `BudgetError`: the budget cannot hold the non-block weights plus the largest block; the message names
            the minimum, rounded up.

    Example:
        ```python
        >>> p = make_plan(100, [("b0", 4096), ("b1", 4096), ("b2", 4096)], budget_bytes=100 + 3 * 4096, prefetch=2)
        >>> p.resident, p.streamed, p.num_slots, p.arena_bytes
        ((), ('b0', 'b1', 'b2'), 3, 12288)
        ```
    """
    sizes = dict(blocks)
    loads = {**sizes, **(stream_sizes or {})}  # what a streamed block takes in the arena
    order = [name for name, _ in blocks]
    if non_block_bytes + sum(sizes.values()) <= budget_bytes:
        return Plan(budget_bytes, non_block_bytes, tuple(order), (), 0, 0, sizes)
    # one block in flight (no read-ahead) is the last resort below two consecutive blocks: slower, but it streams
    min_slots = 1
    # residency order: preferred units, then the blocks in execution order; the first ``keep`` stay resident
    preferred = set(prefer_resident)
    names = [name for name in order if name in preferred] + [name for name in order if name not in preferred]
    resident_prefix = [non_block_bytes]
    for name in names:
        resident_prefix.append(resident_prefix[-1] + sizes[name])
    position = {name: i for i, name in enumerate(order)}

    def in_order(chosen: Sequence[str]) -> list[str]:
        return sorted(chosen, key=position.__getitem__)

    deepest = min(prefetch + 1, len(names))  # more blocks in flight than blocks is meaningless

    def fits(keep: int, wanted: int) -> bool:
        streamed = [loads[name] for name in in_order(names[keep:])]
        return resident_prefix[keep] + arena_bytes(streamed, min(wanted, len(streamed))) <= budget_bytes

    # the deepest read-ahead that fits, then the most residency at that depth. For a given residency the arena
    # grows with the depth, so the deepest depth that fits is found by bisection: n log n arenas, not n * depth
    best: tuple[int, int] | None = None  # (depth, keep)
    for keep in range(len(names) - 1, -1, -1):
        if resident_prefix[keep] > budget_bytes or not fits(keep, min_slots):
            continue
        low, high = min_slots, deepest  # fits(keep, low) holds
        if best is not None:
            if best[0] >= deepest or not fits(keep, best[0] + 1):
                continue  # no deeper than the depth already found with more residency
            low = best[0] + 1
        while low < high:
            mid = (low + high + 1) // 2
            if fits(keep, mid):
                low = mid
            else:
                high = mid - 1
        best = (low, keep)
    if best is not None:
        wanted, keep = best
        streamed = in_order(names[keep:])
        num_slots = min(wanted, len(streamed))
        arena = arena_bytes([loads[name] for name in streamed], num_slots)
        cached = _spread(streamed, sizes, host_cache_bytes)
        slot = _aligned(max(loads[name] for name in streamed))
        return Plan(
            budget_bytes,
            non_block_bytes,
            tuple(in_order(names[:keep])),
            tuple(streamed),
            slot,
            num_slots,
            sizes,
            cached,
            arena,
        )
    slots = min(min_slots, len(names))
    minimum, keep = min(
        (resident_prefix[k] + arena_bytes([loads[n] for n in in_order(names[k:])], slots), -k)
        for k in range(len(names))
    )
    arena = minimum - resident_prefix[-keep]
    what = "largest block"
    resident = f" and {-keep} resident block{'s' * (-keep > 1)}" if keep else ""
    suggested = gb_rounded_up(minimum)
    raise BudgetError(
        f"budget_gb={budget_bytes / 1e9:.6g} is too small for this model: it needs at least {suggested} GB "
        f"(non-block weights {format_gb(non_block_bytes)}{resident} plus the {what} streaming through "
        f"{format_gb(arena)}). Raise budget_gb (or TENSORSTREAM_BUDGET_GB) to at least {suggested}.",
        minimum,
        round(float(suggested) * 1e9),
    )


def _spread(streamed: Sequence[str], sizes: dict[str, int], capacity: int) -> tuple[str, ...]:
    """The most streamed blocks that fit in ``capacity`` bytes, spread evenly over the execution order."""
    n = len(streamed)
    for count in range(n, 0, -1):
        chosen = sorted({int(i * n / count) for i in range(count)})
        if sum(sizes[streamed[i]] for i in chosen) <= capacity:
            return tuple(streamed[i] for i in chosen)
    return ()


def auto_budget_bytes(device: torch.device) -> int:
    """80% of the memory free on ``device``: free VRAM on CUDA, available RAM (cgroup limit respected) on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * AUTO_BUDGET_FRACTION)
    available = _meminfo_available()
    cgroup = _cgroup_available()
    if cgroup is not None:
        available = min(available, cgroup)
    return int(available * AUTO_BUDGET_FRACTION)


def kv_cache_bytes(config: Any, *, batch_size: int, sequence_length: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of the key/value cache a decoder holds for ``batch_size`` sequences of ``sequence_length`` tokens.

    Per token and sequence: ``2 (keys and values) * layers * key/value heads * head dim * dtype bytes``. The
    budget (``budget_gb``) covers weights only: the KV cache, like the activations, lives next to it on the
    device, so ``budget + kv_cache_bytes(...)`` must fit in device memory, or the cache must move to host RAM
    (transformers' ``cache_implementation="offloaded"``, see the Performance page).

    Args:
        config: a transformers model config (``model.config``); the text config of a multimodal model is used.
        batch_size: sequences decoded together.
        sequence_length: prompt plus generated tokens per sequence.
        dtype: the cache's dtype (default: the config's ``dtype``, else float32); the cache takes the dtype of
            the model's activations.

    Returns:
        The size in bytes, for full attention in every layer: an upper bound for models whose sliding-window
        layers keep only the window. Other cache layouts (latent attention, linear attention) differ.

    Example:
        ```python
        >>> from transformers import AutoConfig
        >>> config = AutoConfig.from_pretrained("meta-llama/Llama-3.1-8B")  # 32 layers, 8 KV heads of 128
        >>> kv_cache_bytes(config, batch_size=16, sequence_length=8192, dtype=torch.bfloat16) / 1e9
        17.179869184
        ```
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    if dtype is None:
        dtype = getattr(text, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    per_token = 2 * int(text.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize
    return per_token * batch_size * sequence_length


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_available() -> int | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:
            return None
        return max(int(limit_text) - usage, 0)
    return None


def log_plan(plan: Plan, requested_prefetch: int) -> None:
    logger.info("tensorstream plan: %s", plan.describe())
    if plan.streamed and plan.num_slots == 1 and requested_prefetch > 0 and len(plan.streamed) > 1:
        # the last-resort plan: correct, but every streamed block waits for its own read. Said out loud, since a
        # budget a little too small would otherwise look like a slow disk.
        names = list(plan.block_bytes)
        needed = plan.non_block_bytes + arena_bytes([plan.block_bytes[name] for name in names], 2)
        logger.warning(
            "tensorstream: budget_gb=%.6g holds only one streamed block at a time: no read-ahead, so every block "
            "waits for its read. Raise budget_gb to at least %s to read the next block while one computes.",
            plan.budget_bytes / 1e9,
            gb_rounded_up(needed),
        )
    if plan.streamed and plan.prefetch < min(requested_prefetch, len(plan.streamed) - 1):
        logger.info(
            "tensorstream: budget allows prefetch depth %d (asked for %d); raise budget_gb for deeper read-ahead",
            plan.prefetch,
            requested_prefetch,
        )
