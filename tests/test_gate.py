"""The concurrency gate on asyncio and trio: FIFO hand-over, resizing, cancellation."""

from __future__ import annotations

import anyio
import pytest

from corral.middleware._concurrency import Gate

pytestmark = pytest.mark.anyio


async def test_fifo_hand_over_and_resize() -> None:
    gate = Gate(1)
    await gate.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await gate.acquire()
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
        gate.resize(2)  # one more slot: the first waiter gets it
        await anyio.wait_all_tasks_blocked()
        assert order == [0]
        gate.resize(3)
        await anyio.wait_all_tasks_blocked()
        assert order == [0, 1]
        gate.release()
    assert order == [0, 1, 2] and gate.used == 3


async def test_cancelled_waiter_takes_nothing() -> None:
    gate = Gate(1)
    await gate.acquire()
    scope = anyio.CancelScope()

    async def waiter() -> None:
        with scope:
            await gate.acquire()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()  # the waiter queues for the one taken slot
        scope.cancel()
    assert scope.cancelled_caught and gate.used == 1
    gate.release()
    assert gate.used == 0
    await gate.acquire()
    assert gate.used == 1


@pytest.mark.parametrize("cancel_first", [False, True])
async def test_a_cancelled_waiter_loses_no_slot(cancel_first: bool) -> None:
    """Released then cancelled: the slot was handed over, so ``first`` runs; cancelled then
    released: ``first`` left the queue, so the slot goes on to ``second``."""
    gate = Gate(1)
    await gate.acquire()
    got: list[str] = []

    async def first(scope: anyio.CancelScope) -> None:
        with scope:
            await gate.acquire()
            got.append("first")
            gate.release()

    async def second() -> None:
        await gate.acquire()
        got.append("second")
        gate.release()

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(first, scope)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        if cancel_first:
            scope.cancel()
            gate.release()
        else:
            gate.release()
            scope.cancel()
    assert got == (["second"] if cancel_first else ["first", "second"])
    assert gate.used == 0


async def test_a_loop_of_free_slots_still_honours_cancellation() -> None:
    """Taking a free slot never waits, yet a deadline or a cancelled scope stops the loop."""
    gate = Gate(1)
    done = 0
    with anyio.move_on_after(0.01):
        while done < 1_000_000:
            await gate.acquire()
            gate.release()
            done += 1
    assert done < 1_000_000  # stopped by the 10 ms deadline, not by the end of the loop
    done = 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        while done < 1_000:
            done += 1
            await gate.acquire()
            gate.release()
    assert scope.cancelled_caught and done <= 16 and gate.used == 0
