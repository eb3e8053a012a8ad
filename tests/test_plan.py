from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tensorstream
from tensorstream import BudgetError, UnsupportedModelError
from tensorstream.plan import find_blocks, log_plan, make_plan

MB = 1 << 20


def blocks(n: int, size: int = 4 * MB) -> list[tuple[str, int]]:
    return [(f"layers.{i}", size) for i in range(n)]


def test_everything_fits() -> None:
    plan = make_plan(10 * MB, blocks(4), 10 * MB + 16 * MB, prefetch=2)
    assert plan.streamed == () and plan.num_slots == 0 and len(plan.resident) == 4
    assert plan.device_bytes <= plan.budget_bytes


def test_stream_everything_with_requested_depth() -> None:
    plan = make_plan(10 * MB, blocks(8), 10 * MB + 3 * 4 * MB, prefetch=2)
    assert plan.resident == () and len(plan.streamed) == 8 and plan.num_slots == 3 and plan.prefetch == 2


def test_resident_blocks_come_first_and_fill_the_budget() -> None:
    plan = make_plan(10 * MB, blocks(8), 10 * MB + 5 * 4 * MB + MB, prefetch=2)
    assert plan.resident == ("layers.0", "layers.1")
    assert plan.streamed == tuple(f"layers.{i}" for i in range(2, 8))
    assert plan.num_slots == 3
    assert plan.device_bytes <= plan.budget_bytes


def test_tight_budget_lowers_the_depth_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    plan = make_plan(10 * MB, blocks(8), 10 * MB + 2 * 4 * MB + MB, prefetch=5)
    assert plan.num_slots == 2 and plan.prefetch == 1 and plan.resident == ()


def test_prefetch_is_an_upper_bound() -> None:
    plan = make_plan(0, blocks(8), 7 * 4 * MB, prefetch=1)
    assert plan.num_slots == 2 and len(plan.resident) == 5


def test_prefetch_zero_needs_one_slot() -> None:
    plan = make_plan(10 * MB, blocks(4), 10 * MB + 4 * MB, prefetch=0)
    assert plan.num_slots == 1 and plan.prefetch == 0


def test_budget_error_names_the_minimum() -> None:
    with pytest.raises(BudgetError, match=r"at least 0\.014681 GB") as info:
        make_plan(10 * MB, blocks(4), 10 * MB + 4 * MB - 1, prefetch=2)
    assert info.value.minimum_bytes == 10 * MB + 4 * MB
    assert isinstance(info.value, MemoryError)
    plan = make_plan(10 * MB, blocks(4), info.value.minimum_bytes, prefetch=2)  # the minimum works
    assert plan.num_slots == 1 and plan.prefetch == 0  # the last resort: no read-ahead


def test_below_two_consecutive_blocks_streams_without_read_ahead(caplog: pytest.LogCaptureFixture) -> None:
    plan = make_plan(10 * MB, blocks(4), 10 * MB + 2 * 4 * MB - 1, prefetch=2)
    assert plan.num_slots == 1 and plan.arena_bytes == 4 * MB and plan.resident == ()
    assert make_plan(10 * MB, blocks(4), 10 * MB + 2 * 4 * MB, prefetch=2).num_slots == 2
    with caplog.at_level(logging.WARNING, logger="tensorstream"):
        log_plan(plan, requested_prefetch=2)
    advice = re.search(r"Raise budget_gb to at least ([0-9.]+) to read the next block", caplog.text)
    assert advice is not None, caplog.text  # said out loud, with a budget that works as printed
    assert make_plan(10 * MB, blocks(4), round(float(advice.group(1)) * 1e9), prefetch=2).num_slots >= 2


def test_uneven_blocks_stream_through_an_arena_of_the_largest_consecutive_ones() -> None:
    """Memory follows the blocks in flight: a 20 MB block next to 4 MB ones needs 24 MB, not 2 x 20 MB."""
    sizes = [("b0", 20 * MB), ("b1", 4 * MB), ("b2", 4 * MB), ("b3", 4 * MB)]
    plan = make_plan(0, sizes, 20 * MB + 4 * MB, prefetch=2)
    assert plan.resident == () and plan.num_slots == 2 and plan.arena_bytes == 24 * MB
    assert plan.slot_bytes == 20 * MB and plan.device_bytes <= plan.budget_bytes
    deeper = make_plan(0, sizes, 28 * MB, prefetch=2)  # the three largest consecutive: b3, b0, b1 (wrap-around)
    assert deeper.num_slots == 3 and deeper.arena_bytes == 28 * MB and deeper.resident == ()


def test_a_hybrid_stack_streams_below_two_of_its_largest_blocks() -> None:
    """Alternating large and small blocks (dense / MoE, attention / Mamba): the minimum is one of each."""
    sizes = [(f"layers.{i}", (9 if i % 2 else 1) * MB) for i in range(8)]
    plan = make_plan(MB, sizes, MB + 10 * MB, prefetch=4)
    assert plan.resident == () and plan.num_slots == 2 and plan.arena_bytes == 10 * MB
    assert make_plan(MB, sizes, MB + 10 * MB - 1, prefetch=4).num_slots == 1  # below: one at a time
    with pytest.raises(BudgetError) as info:
        make_plan(MB, sizes, MB + 9 * MB - 1, prefetch=4)
    assert info.value.minimum_bytes == MB + 9 * MB
    assert "largest block" in str(info.value)


def test_the_suggested_minimum_works_as_printed() -> None:
    """The budget_gb the error prints is never below the true minimum (it was rounded to nearest before)."""
    import random
    import re

    from tensorstream import Config

    rng = random.Random(0)
    for _ in range(300):
        non_block = rng.randint(0, 10**9)
        sizes = [(f"b{i}", rng.randint(1, 10**8)) for i in range(rng.randint(1, 12))]
        prefetch = rng.randint(0, 3)
        try:
            make_plan(non_block, sizes, non_block, prefetch=prefetch)
        except BudgetError as err:
            printed = re.search(r"to at least ([0-9.]+)\.$", str(err))
            assert printed is not None, str(err)
            assert Config(budget_gb=float(printed.group(1))).budget_bytes >= err.minimum_bytes  # type: ignore[operator]
            make_plan(non_block, sizes, Config(budget_gb=float(printed.group(1))).budget_bytes, prefetch=prefetch)  # type: ignore[arg-type]
            assert f"at least {printed.group(1)} GB" in str(err)


def test_a_huge_prefetch_costs_no_more_than_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """prefetch=10**7 plans as fast as prefetch=len(blocks): the depth is capped by the blocks (it took a minute)."""
    from tensorstream import plan as plan_module

    calls = []
    real = plan_module.arena_bytes
    monkeypatch.setattr(plan_module, "arena_bytes", lambda sizes, k: calls.append(k) or real(sizes, k))
    n = 40
    plan = make_plan(0, blocks(n), 3 * 4 * MB, prefetch=10**7)
    assert plan.num_slots == 3
    assert len(calls) <= n * n and max(calls) <= n


def _reference_plan(non_block: int, sizes: list[tuple[str, int]], budget: int, prefetch: int) -> tuple[Any, ...]:
    """The planner's rule by exhaustive search: the deepest read-ahead that fits, then the most residency."""
    from tensorstream.plan import arena_bytes

    names = [name for name, _ in sizes]
    size = dict(sizes)
    for wanted in range(min(prefetch + 1, len(names)), 0, -1):
        for keep in range(len(names) - 1, -1, -1):
            resident = non_block + sum(size[n] for n in names[:keep])
            streamed = names[keep:]
            slots = min(wanted, len(streamed))
            if resident + arena_bytes([size[n] for n in streamed], slots) <= budget:
                return tuple(names[:keep]), slots
    return None, 0


def test_the_bisected_plan_is_the_exhaustive_one() -> None:
    import random

    rng = random.Random(1)
    for _ in range(400):
        sizes = [(f"b{i}", rng.randint(1, 9) * MB) for i in range(rng.randint(1, 9))]
        non_block = rng.randint(0, 4) * MB
        total = non_block + sum(s for _, s in sizes)
        budget = rng.randint(non_block, total + MB)
        prefetch = rng.randint(0, 10)
        resident, slots = _reference_plan(non_block, sizes, budget, prefetch)
        if total <= budget:
            continue  # everything resident: no search
        if resident is None:
            with pytest.raises(BudgetError):
                make_plan(non_block, sizes, budget, prefetch)
            continue
        plan = make_plan(non_block, sizes, budget, prefetch)
        assert (plan.resident, plan.num_slots) == (resident, slots), (sizes, non_block, budget, prefetch)


@pytest.mark.parametrize("share", ["minimum", "half", "all but one byte"])
def test_a_huge_prefetch_plans_in_well_under_a_second(share: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """prefetch=10**7 on 400 blocks: bisection over the depth, n log n arenas (it took 19.6 s in a review, n * depth
    arenas); counted, so that the bound holds on a loaded machine too."""
    import math
    import time

    from tensorstream import plan as plan_module

    calls = []
    real = plan_module.arena_bytes
    monkeypatch.setattr(plan_module, "arena_bytes", lambda sizes, k: calls.append(k) or real(sizes, k))

    n = 400
    sizes = [(f"layers.{i}", (1 + i % 3) * MB) for i in range(n)]
    total = MB + sum(s for _, s in sizes)
    if share == "minimum":
        with pytest.raises(BudgetError) as info:
            make_plan(MB, sizes, 0, prefetch=10**7)
        budget = info.value.minimum_bytes
        assert budget is not None
    else:
        budget = total // 2 if share == "half" else total - 1
    calls.clear()
    start = time.perf_counter()
    plan = make_plan(MB, sizes, budget, prefetch=10**7)
    assert time.perf_counter() - start < 2  # about 0.1 s unloaded
    assert len(calls) <= 2 * n * (math.ceil(math.log2(n)) + 2)
    assert plan.device_bytes <= budget


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


class Net(nn.Module):
    _no_split_modules = ("Block",)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.ModuleList(Block() for _ in range(2))
        self.decoder = nn.ModuleList(Block() for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(4) for _ in range(5))


def test_find_blocks_prefers_no_split_modules_and_skips_nested_stacks() -> None:
    assert find_blocks(Net()) == ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "decoder.2"]


def test_find_blocks_without_hint_takes_outermost_stacks() -> None:
    net = Net()
    net._no_split_modules = ()  # type: ignore[misc]
    assert find_blocks(net)[:2] == ["encoder.0", "encoder.1"]
    assert "encoder.0.experts.0" not in find_blocks(net)


def test_model_without_blocks_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedModelError, match="ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_host_cache_tier_spreads_blocks_evenly() -> None:
    plan = make_plan(0, blocks(8), 2 * 4 * MB, prefetch=1, host_cache_bytes=2 * 4 * MB + MB)
    assert plan.cached == ("layers.0", "layers.4")
    assert plan.cached_bytes == 8 * MB and plan.storage_bytes == plan.streamed_bytes - 8 * MB
    assert "2 of them from pinned RAM" in plan.describe()
    none = make_plan(0, blocks(8), 2 * 4 * MB, prefetch=1, host_cache_bytes=MB)
    assert none.cached == ()


def test_lower_bound_from_bandwidths() -> None:
    plan = make_plan(0, blocks(8), 2 * 4 * MB, prefetch=1, host_cache_bytes=4 * 4 * MB)
    disk, h2d = 1.0, 10.0
    expected = 4 * 4 * MB / 1e9 / disk + 4 * 4 * MB / 1e9 / h2d
    assert plan.lower_bound_seconds(disk, h2d) == pytest.approx(expected)


def test_describe_names_the_non_block_parts_and_why_they_stay_resident(
    model_dirs: dict[str, Path], storage: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Large non-block parts are visible in the logged plan: each by name, size and the reason it is not streamed."""
    from helpers.models import budgets, streaming

    tensorstream.reshard(model_dirs["llama"], storage, progress=False)
    with caplog.at_level(logging.INFO, logger="tensorstream.plan"):
        model = streaming(model_dirs["llama"], storage, budget_gb=budgets(storage)["stream_all"])
    plan = model._tensorstream_engine.plan
    parts = {name: why for name, _, why in plan.non_block_parts}
    assert parts["model.embed_tokens"] == "holds the first parameter (model.device reads it)"
    assert "lm_head" in parts and "model.norm" in parts
    assert sum(size for _, size, _ in plan.non_block_parts) <= plan.non_block_bytes
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "not streamed: model.embed_tokens" in logged and "holds the first parameter" in logged


def test_describe_names_resident_module_units() -> None:
    plan = make_plan(
        10 * MB, [("head", 8 * MB), *blocks(4)], 10 * MB + 8 * MB + 3 * 4 * MB, 2, prefer_resident=["head"]
    )
    plan = dataclasses.replace(plan, units=("head",), non_block_parts=(("model.norm", 10 * MB, "tiny"),))
    text = plan.describe()
    assert "not streamed: model.norm 0.0105 GB, tiny" in text
    assert "module unit kept resident before blocks: head (0.00839 GB)" in text


def test_a_block_larger_than_all_the_others_streams_layer_by_layer() -> None:
    """CvT's last stage is most of the model: its own stack of layers (an nn.Sequential) is streamed instead."""

    class Stage(nn.Module):
        def __init__(self, width: int, depth: int) -> None:
            super().__init__()
            self.embedding = nn.Linear(width, width)
            self.cls_token = nn.Parameter(torch.zeros(width))
            self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))

    net = nn.Module()
    net.stem = nn.Linear(4, 4)
    net.stages = nn.ModuleList([Stage(4, 1), Stage(8, 1), Stage(32, 4)])
    # the stage's embedding, as large as a layer, is a module unit of its own; its cls_token is non-block
    assert find_blocks(net) == [
        "stages.0",
        "stages.1",
        "stages.2.embedding",
        *(f"stages.2.layers.{i}" for i in range(4)),
    ]
    even = nn.Module()
    even.stem = nn.Linear(4, 4)
    even.stages = nn.ModuleList([Stage(8, 2), Stage(8, 2)])  # no block is larger than the others together
    assert find_blocks(even) == ["stages.0", "stages.1"]
