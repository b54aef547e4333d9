"""``Client.map`` runs its calls on a fixed pool of workers (issue 15), not a task per item."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from corral._mapping import MapRun
from corral.core._wire import ChatCompletion

pytestmark = pytest.mark.anyio
MARK: ContextVar[bool] = ContextVar("MARK", default=False)


def bodies(n: int) -> list[dict[str, Any]]:
    return [{"i": i} for i in range(n)]


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_thousand_items_run_on_at_most_concurrency_tasks(ordered: bool) -> None:
    tasks = 0  # each new task starts from a copy of its parent's context, where MARK is unset

    async def call(body: Mapping[str, Any]) -> ChatCompletion:
        nonlocal tasks
        if not MARK.get():
            MARK.set(True)
            tasks += 1
        await anyio.lowlevel.checkpoint()
        return None  # type: ignore[return-value]  # the pool never looks at it

    async with MapRun(call, bodies(1000), 8, ordered) as results:
        indices = [r.index async for r in results]
    assert sorted(indices) == list(range(1000))
    assert ordered is False or indices == list(range(1000))
    assert 1 <= tasks <= 8


async def test_ordered_runs_at_most_concurrency_ahead_of_the_oldest() -> None:
    started: list[int] = []
    gate = anyio.Event()

    async def call(body: Mapping[str, Any]) -> ChatCompletion:
        started.append(body["i"])
        if body["i"] == 0:
            await gate.wait()
        return None  # type: ignore[return-value]

    async with MapRun(call, iter(bodies(50)), 4, True) as results:
        with anyio.fail_after(10):
            await anyio.wait_all_tasks_blocked()
        assert sorted(started) == [0, 1, 2, 3]  # 1..3 done, held until 0 is handed out
        gate.set()
        indices = [r.index async for r in results]
    assert indices == list(range(50))


async def test_fewer_items_than_workers_and_none() -> None:
    async def call(body: Mapping[str, Any]) -> ChatCompletion:
        return None  # type: ignore[return-value]

    for n in (0, 3):
        async with MapRun(call, bodies(n), 64, False) as results:
            assert sorted([r.index async for r in results]) == list(range(n))
