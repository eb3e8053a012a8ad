"""Parameter sweeps with a fast representative subset: the rest is marked ``slow`` (``make test-slow`` runs it).

``make test`` deselects ``slow`` (pyproject's ``addopts``) so the default suite stays a few minutes on 2 cores; every
axis value still appears in at least one fast case, and CI runs the slow cases too (``.ci/run``).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from typing import Any

import pytest


def sweep(axes: Sequence[Sequence[Any]], fast: Collection[tuple[Any, ...]]) -> list[Any]:
    """Every combination of ``axes`` as a ``pytest.param`` (id ``a-b-c``); those not in ``fast`` are marked slow.

    An axis value that is a tuple fills several arguments (``fast`` names the flattened cases).

    Example:
        ```python
        @pytest.mark.parametrize(("layout", "kind"), sweep([["all", "some"], ["int8", "int4"]], {("all", "int8")}))
        ```
    """
    cases = [_flat(combo) for combo in itertools.product(*axes)]
    unknown = set(fast) - set(cases)
    assert not unknown, f"fast cases outside the sweep: {sorted(unknown)}"
    return [
        pytest.param(*case, id="-".join(map(str, case)), marks=() if case in fast else pytest.mark.slow)
        for case in cases
    ]


def _flat(combo: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(itertools.chain.from_iterable(v if isinstance(v, tuple) else (v,) for v in combo))
