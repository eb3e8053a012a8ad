"""The engine's side of routed experts: `ExpertStreamer` supplies, when an experts module runs, exactly the
experts its router picked (the unit kind, its store layout and plan are in `tensorstream.experts`).

Two modes, chosen by the engine:

* *mapped* (CPU, ``backend="mmap"``): the fused tensors stay bound as views of the mapped file, as the whole block
  is; only the routed experts' byte ranges are made present (``MADV_WILLNEED`` then ``MADV_POPULATE_READ``, one
  range per run of consecutive experts per tensor, on the reader threads). The grouped, batched and eager experts
  implementations touch only the experts that have tokens, and the expert ranges are ``MADV_RANDOM``, so no fault
  read-ahead pulls neighbours in. The page cache is the expert cache; nothing drops it.
* *slots* (POSIX reads, CUDA): the routed experts, in ascending order, are gathered into one compact buffer per
  fused tensor, ``[U, ...]``: cache hits copied from the expert cache (per-expert slots in the budget, least
  recently used out first), misses read from the store straight into place (one read per run of consecutive
  experts per tensor, so a long prompt that routes to every expert reads each tensor whole). The module computes on
  the compact tensors with ``top_k_index`` renamed in order and ``num_experts = U``: the sort, the groups and every
  matrix product are the resident model's, so every bit is.

Prediction: while layer L's experts run, layer L+1's are guessed by applying its router weight (a resident copy,
``[E, hidden]``) to layer L's input and read ahead (mapped: made present; slots: into the cache). A wrong guess
costs bytes, never correctness (`tensorstream.StreamStats.prediction_accuracy`).

Every expert slice read is checked against its checksum the first time (``verify="header"``) or every time
(``verify="checksum"``).
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Any

import torch
from torch import nn

from .errors import CorruptFileError, StaleStoreError
from .experts import ALIGN, ExpertLayout, ExpertTensor, align
from .format import data_checksum
from .store import repair_hint

__all__ = ["ExpertStreamer"]


class _Layer:
    """One streamed experts module at run time."""

    def __init__(self, index: int, layout: ExpertLayout, module: nn.Module, block: Any, router: torch.Tensor | None):
        self.index = index
        self.layout = layout
        self.module = module
        self.block = block  #: the engine's `StreamedBlock` (file handle, header)
        self.router = router  #: a resident copy of the router weight ``[E, hidden]``, for prediction
        self.attrs = [t.attr for t in layout.tensors]
        self.next: _Layer | None = None  #: the routed layer expected to run next
        self.predicted: set[int] = set()
        self.top_k = 0

    @property
    def placeholders(self) -> dict[str, Any]:
        """The fused tensors' placeholders, as the block's targets hold them now (they may be replaced after the
        engine is built: `tensorstream.binding.install_placeholders`)."""
        held = {attr: placeholder for module, attr, placeholder, *_ in self.block.targets if module is self.module}
        return {attr: held[attr] for attr in self.attrs}


class ExpertStreamer:
    """Supplies the routed experts of every streamed experts module (see the module docstring).

    Args:
        engine: the engine (its backend, reader threads, stats, lock, device and mode).
        layers: ``(layout, experts module, streamed block)`` per routed block, in execution order.
        cache_bytes: the expert cache's share of the budget (slots mode; 0: no cache).
    """

    def __init__(self, engine: Any, layers: Sequence[tuple[ExpertLayout, nn.Module, Any]], cache_bytes: int) -> None:
        self._engine = weakref.ref(engine)  # the engine's finalizer closes this streamer: no reference cycle
        self.mapped = bool(engine.mapped)
        self.layers: list[_Layer] = []
        for i, (layout, module, block) in enumerate(layers):
            router = _router_weight(engine, layout, module, block)
            self.layers.append(_Layer(i, layout, module, block, router))
        for layer, following in zip(self.layers, self.layers[1:] + self.layers[:1], strict=True):
            layer.next = following if len(self.layers) > 1 else None
        self.by_module = {id(layer.module): layer for layer in self.layers}
        self.bound: _Layer | None = None
        self.work: torch.Tensor | None = None
        self.cache: torch.Tensor | None = None
        #: host memory that reads land in before their copy to the device (CUDA); None where reads land in place
        self.staging: torch.Tensor | None = None
        self.slots: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot, LRU first
        self.loading: dict[tuple[int, int], Future[Any]] = {}
        self.verified: set[tuple[int, str, int]] = set()  # (layer, tensor, expert) checked once (verify="header")
        self.free: list[int] = []
        self.slot_bytes = max((layer.layout.slot_bytes for layer in self.layers), default=0)
        device = engine.device
        if not self.mapped and self.layers:
            work = max(layer.layout.all_bytes for layer in self.layers)
            self.work = torch.empty(work, dtype=torch.uint8, device=device)
            count = cache_bytes // self.slot_bytes if self.slot_bytes else 0
            if count:
                self.cache = torch.empty(count * self.slot_bytes, dtype=torch.uint8, device=device)
                self.free = list(range(count))
            # reads land in host memory first off the CPU (pinned, so the copy to the device is asynchronous)
            self.staging = torch.empty(work, dtype=torch.uint8, pin_memory=True) if device.type == "cuda" else None
        if self.mapped:
            for layer in self.layers:
                for t in layer.layout.tensors:  # no fault read-ahead into neighbouring experts
                    _advise(engine, layer.block, t.start, t.per_expert * layer.layout.num_experts, "random")
        self.handles = [layer.module.register_forward_pre_hook(self._pre, with_kwargs=True) for layer in self.layers]
        self.handles += [layer.module.register_forward_hook(self._post) for layer in self.layers]

    @property
    def engine(self) -> Any:
        engine = self._engine()
        if engine is None:
            raise ReferenceError("the engine of these experts was closed")
        return engine

    @property
    def cache_slots(self) -> int:
        return 0 if self.cache is None else self.cache.numel() // self.slot_bytes

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.repair()

    # -- the hooks (model thread, under the engine's lock) --------------------------------------------------------

    def _pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        layer = self.by_module[id(module)]
        hidden, index, (args, kwargs) = _routing(module, args, kwargs)
        with self.engine.lock:
            if self.bound is not None:  # the previous experts forward raised before its post-hook
                self._unbind()
            ids = torch.unique(index).tolist()  # sorted
            ids = [e for e in ids if 0 <= e < layer.layout.num_experts]
            self._account(layer, ids, index.shape[-1])
            if self.mapped:
                reads = self._populate(layer, ids)
                self._predict(layer, hidden)  # queued behind this layer's reads
                _wait_all(reads)
                return args, kwargs
            self._gather(layer, ids)
            self._predict(layer, hidden)  # read ahead while this layer's experts compute
            remapped = _remap(index, ids, layer.layout.num_experts)
        return _with_index(module, args, kwargs, remapped)

    def _post(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.mapped:
            with self.engine.lock:
                if self.bound is not None and self.bound.module is module:
                    self._unbind()
        return output

    def repair(self) -> None:
        """Restore every experts module's placeholders (after an interrupted forward, or at close)."""
        if self.bound is not None:
            self._unbind()

    # -- accounting and prediction ------------------------------------------------------------------------------

    def _account(self, layer: _Layer, ids: list[int], top_k: int) -> None:
        stats = self.engine.stats
        with stats._lock:
            stats.experts_routed += len(ids)
            if layer.predicted:
                stats.experts_predicted_used += len(layer.predicted.intersection(ids))
                stats.experts_predicted += len(layer.predicted)
        layer.predicted = set()
        layer.top_k = top_k

    def _predict(self, layer: _Layer, hidden: torch.Tensor) -> None:
        """Guess the next routed layer's experts from this layer's input and start reading them."""
        following = layer.next
        if following is None or following.router is None or following.top_k == 0:
            return
        if not self.mapped and self.cache is None:
            return  # nowhere to put experts read ahead
        with torch.no_grad():
            flat = hidden.reshape(-1, hidden.shape[-1])
            logits = flat.to(following.router.dtype) @ following.router.T
            k = min(following.top_k, logits.shape[-1])
            guess = sorted(set(torch.topk(logits, k, dim=-1).indices.reshape(-1).tolist()))
        if len(guess) > following.layout.num_experts // 2:
            return  # a long prompt: the next layer reads its experts as whole runs anyway
        following.predicted = set(guess)
        if self.mapped:
            self._populate(following, guess)
        else:
            self._prefetch(following, guess)

    # -- mapped mode --------------------------------------------------------------------------------------------

    def _populate(self, layer: _Layer, ids: list[int]) -> list[Future[Any]]:
        """Make experts ``ids`` of ``layer`` present in the mapping, on the reader threads (one task per run per
        tensor); the futures of those tasks."""
        return [
            self.engine.executor.submit(self._populate_range, layer, t, first, count)
            for t in layer.layout.tensors
            for first, count in _runs(ids)
        ]

    def _populate_range(self, layer: _Layer, t: ExpertTensor, first: int, count: int) -> None:
        engine = self.engine
        block = layer.block
        start, length = t.start + first * t.per_expert, count * t.per_expert
        _advise(engine, block, start, length, "willneed")
        n = engine.backend.populate(block.handle, block.header.data_offset + start, length)
        if n < length:
            raise StaleStoreError(
                f"{engine.store.file(block.entry)}: file ended early; {repair_hint(engine.store.path)}"
            )
        with engine.stats._lock:
            engine.stats.expert_bytes_read += length
        for e in range(first, first + count):
            if self._must_verify(layer, t, e):
                data = engine.backend.data(
                    block.handle, block.header.data_offset + t.start + e * t.per_expert, t.per_expert
                )
                self._verify(layer, t, e, data)

    def _must_verify(self, layer: _Layer, t: ExpertTensor, e: int) -> bool:
        engine = self.engine
        return bool(
            engine.verify_checksum or (engine.verify_first_read and (layer.index, t.attr, e) not in self.verified)
        )

    def _verify(self, layer: _Layer, t: ExpertTensor, e: int, data: torch.Tensor | None) -> None:
        """`CorruptFileError` unless ``data`` (expert ``e``'s slice of ``t``, host memory) matches its checksum."""
        actual = None if data is None else data_checksum(data.numpy().data.cast("B"))
        if actual != t.checksums[e]:
            engine = self.engine
            raise CorruptFileError(
                f"{engine.store.file(layer.block.entry)}: expert {e} of {layer.layout.module}.{t.attr} does not match "
                f"its checksum {t.checksums[e]}; the file is damaged. {repair_hint(engine.store.path, sentence=True)}"
            )
        self.verified.add((layer.index, t.attr, e))

    # -- slots mode ---------------------------------------------------------------------------------------------

    def _gather(self, layer: _Layer, ids: list[int]) -> None:
        """Fill the compact buffer with ``ids`` in order (cache hits copied, misses read) and bind it."""
        assert self.work is not None
        offsets = self._sections(layer)
        hits, misses = [], []
        for j, e in enumerate(ids):
            key = (layer.index, e)
            future = self.loading.pop(key, None)
            if future is not None:
                future.result()  # read ahead; its slot is filled (or the read failed: read it again below)
            if key in self.slots and (future is None or future.exception() is None):
                self.slots.move_to_end(key)
                hits.append((j, self.slots[key]))
            else:
                self.slots.pop(key, None)
                misses.append((j, e))
        stats = self.engine.stats
        with stats._lock:
            stats.expert_hits += len(hits)
            stats.expert_misses += len(misses)
        for j, slot in hits:
            self._copy_from_slot(layer, offsets, j, slot)
        self._read_runs(layer, offsets, misses)
        for j, e in misses:  # keep what was read for the next tokens
            taken = self._take_slot(protect={(layer.index, i) for i in ids})
            if taken is None:
                break
            slot = taken
            self._copy_to_slot(layer, offsets, j, slot)
            self.slots[(layer.index, e)] = slot
        self._bind(layer, offsets, len(ids))

    def _sections(self, layer: _Layer) -> list[int]:
        """Where each fused tensor's compact ``[U, ...]`` starts in the buffer: at its resident address phase."""
        offsets, at = [], 0
        for t in layer.layout.tensors:
            offsets.append(at + t.phase)
            at += align(t.per_expert * layer.layout.num_experts) + ALIGN
        return offsets

    def _read_runs(self, layer: _Layer, offsets: list[int], misses: list[tuple[int, int]]) -> None:
        """Read the missed experts into their places in the compact buffer: one read per run per tensor."""
        if not misses:
            return
        assert self.work is not None
        target = self.staging if self.staging is not None else self.work
        futures = []
        runs: list[tuple[int, int, int]] = []  # (position, first expert, count)
        for j, e in misses:
            if runs and runs[-1][0] + runs[-1][2] == j and runs[-1][1] + runs[-1][2] == e:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((j, e, 1))
        for t, base in zip(layer.layout.tensors, offsets, strict=True):
            for j, e, count in runs:
                at = base + j * t.per_expert
                view = target[at : at + count * t.per_expert]
                futures.append(self.engine.executor.submit(self._read_range, layer, t, e, view))
        _wait_all(futures)
        if self.staging is not None:  # CUDA: one copy per run per tensor, in stream order before the compute
            for t, base in zip(layer.layout.tensors, offsets, strict=True):
                for j, _, count in runs:
                    at = base + j * t.per_expert
                    n = count * t.per_expert
                    self.work[at : at + n].copy_(self.staging[at : at + n], non_blocking=True)
            # the staging buffer is reused by the next layer's reads: wait for these copies first
            torch.cuda.current_stream(self.engine.device).synchronize()

    def _read_range(self, layer: _Layer, t: ExpertTensor, first: int, view: torch.Tensor) -> None:
        """Read experts ``first, first + 1, ...`` of ``t`` into the host tensor ``view`` (whole slices), verified."""
        engine = self.engine
        block = layer.block
        n = _pread(block, engine, t.start + first * t.per_expert, view)
        if n < view.numel():
            raise StaleStoreError(
                f"{engine.store.file(block.entry)}: file ended early; {repair_hint(engine.store.path)}"
            )
        with engine.stats._lock:
            engine.stats.expert_bytes_read += n
        for i in range(view.numel() // t.per_expert):
            if self._must_verify(layer, t, first + i):
                self._verify(layer, t, first + i, view[i * t.per_expert : (i + 1) * t.per_expert])

    def _prefetch(self, layer: _Layer, ids: list[int]) -> None:
        """Read the predicted experts of ``layer`` into cache slots on the reader threads."""
        assert self.cache is not None
        for e in ids:
            key = (layer.index, e)
            if key in self.slots or key in self.loading:
                continue
            slot = self._take_slot(protect=set())
            if slot is None:
                return
            self.slots[key] = slot
            # CUDA: the slot may still be read by copies queued on the compute stream: the reader waits for them
            done = None
            if self.staging is not None:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.engine.device))
            self.loading[key] = self.engine.executor.submit(self._read_slot, layer, e, slot, done)

    def _read_slot(self, layer: _Layer, e: int, slot: int, done: Any) -> None:
        """Read expert ``e`` of ``layer`` into cache slot ``slot`` (a reader thread; CUDA: through host memory and a
        copy on a stream of its own, after ``done``, the compute stream's event; finished before it returns)."""
        assert self.cache is not None
        at = slot * self.slot_bytes
        host = self.cache if self.staging is None else torch.empty(self.slot_bytes, dtype=torch.uint8)
        base = at if self.staging is None else 0
        for t in layer.layout.tensors:
            self._read_range(layer, t, e, host[base : base + t.per_expert])
            base += align(t.per_expert)
        if self.staging is not None:
            stream = torch.cuda.Stream(self.engine.device)
            stream.wait_event(done)
            with torch.cuda.stream(stream):
                self.cache[at : at + self.slot_bytes].copy_(host[: self.slot_bytes])
            stream.synchronize()

    def _take_slot(self, protect: set[tuple[int, int]]) -> int | None:
        if self.free:
            return self.free.pop()
        for key in self.slots:  # least recently used first
            if key not in protect and key not in self.loading:
                return self.slots.pop(key)
        return None

    def _copy_from_slot(self, layer: _Layer, offsets: list[int], j: int, slot: int) -> None:
        assert self.cache is not None and self.work is not None
        at = slot * self.slot_bytes
        for t, base in zip(layer.layout.tensors, offsets, strict=True):
            self.work[base + j * t.per_expert : base + (j + 1) * t.per_expert].copy_(
                self.cache[at : at + t.per_expert]
            )
            at += align(t.per_expert)

    def _copy_to_slot(self, layer: _Layer, offsets: list[int], j: int, slot: int) -> None:
        assert self.cache is not None and self.work is not None
        at = slot * self.slot_bytes
        for t, base in zip(layer.layout.tensors, offsets, strict=True):
            self.cache[at : at + t.per_expert].copy_(
                self.work[base + j * t.per_expert : base + (j + 1) * t.per_expert]
            )
            at += align(t.per_expert)

    def _bind(self, layer: _Layer, offsets: list[int], count: int) -> None:
        assert self.work is not None
        self.bound = layer
        placeholders = layer.placeholders
        for t, base in zip(layer.layout.tensors, offsets, strict=True):
            view = self.work[base : base + count * t.per_expert].view(t.dtype).view(count, *t.shape[1:])
            placeholder = placeholders[t.attr]
            grad = placeholder is not None and placeholder.requires_grad
            layer.module._parameters[t.attr] = nn.Parameter(view, requires_grad=grad)
        setattr(layer.module, "num_experts", count)  # noqa: B010  (the kernel's group count: the compact experts)

    def _unbind(self) -> None:
        layer = self.bound
        assert layer is not None
        for attr, placeholder in layer.placeholders.items():
            layer.module._parameters[attr] = placeholder
        setattr(layer.module, "num_experts", layer.layout.num_experts)  # noqa: B010
        self.bound = None


def _wait_all(futures: Sequence[Future[Any]]) -> None:
    """Wait for every read, then raise the first failure: a read still running must not land in a buffer that the
    next forward fills again."""
    wait(futures)
    for future in futures:
        future.result()


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive ids (``ids`` sorted)."""
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((e, 1))
    return runs


def _remap(index: torch.Tensor, ids: list[int], num_experts: int) -> torch.Tensor:
    """``index`` with expert ``ids[j]`` renamed ``j`` (ascending: the sort order of the experts is kept)."""
    table = torch.full((num_experts,), -1, dtype=index.dtype, device=index.device)
    table[torch.tensor(ids, dtype=torch.long, device=index.device)] = torch.arange(
        len(ids), dtype=index.dtype, device=index.device
    )
    return table[index.clamp(0, num_experts - 1)]


_PARAMS = ("hidden_states", "top_k_index", "top_k_weights")


def _routing(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, Any]]:
    """The experts forward's ``hidden_states`` and ``top_k_index``, wherever they were passed."""
    values = dict(zip(_PARAMS, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in _PARAMS})
    return values["hidden_states"], values["top_k_index"], (args, kwargs)


def _with_index(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if len(args) > 1:
        return (args[0], index, *args[2:]), kwargs
    return args, {**kwargs, "top_k_index": index}


def _router_weight(engine: Any, layout: ExpertLayout, module: nn.Module, block: Any) -> torch.Tensor | None:
    """A resident copy of the router weight of ``layout``'s layer (``[E, hidden]``, the 2-D parameter of a sibling of
    the experts module whose first dimension is the expert count), read once from the store; None if there is none."""
    parent_path = layout.module.rpartition(".")[0]
    hidden = None
    for t in layout.tensors:
        if len(t.shape) == 3:
            hidden = t.shape[2] if not getattr(module, "is_transposed", False) else t.shape[1]
            break
    candidates = [
        name
        for name, info in block.header.tensors.items()
        if name.startswith(f"{parent_path}.")
        and not name.startswith(f"{layout.module}.")
        and len(info.shape) == 2
        and info.shape[0] == layout.num_experts
        and (hidden is None or info.shape[1] == hidden)
        and info.torch_dtype.is_floating_point
    ]
    if len(candidates) != 1:
        return None
    info = block.header.tensors[candidates[0]]
    data = torch.empty(info.nbytes, dtype=torch.uint8)
    if _pread(block, engine, info.start, data) < info.nbytes:
        return None
    weight = data.view(info.torch_dtype).view(info.shape).float()
    return weight.to(engine.device)


def _pread(block: Any, engine: Any, start: int, view: torch.Tensor) -> int:
    """Read ``view.numel()`` bytes at data offset ``start`` of ``block``'s file into the host tensor ``view``."""
    path = engine.store.file(block.entry)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        buffer = view.numpy().data.cast("B")
        done = 0
        offset = block.header.data_offset + start
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n <= 0:
                break
            done += n
        return done
    finally:
        os.close(fd)


def _advise(engine: Any, block: Any, start: int, length: int, advice: str) -> None:
    handle = block.handle
    if not hasattr(handle, "advise"):
        return
    flag = {"random": mmap.MADV_RANDOM, "willneed": mmap.MADV_WILLNEED}[advice]
    try:
        handle.advise(flag, block.header.data_offset + start, length)
    except OSError:
        pass  # advice only
