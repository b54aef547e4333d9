"""The one clock: the running event loop's.

Nothing in corral takes a clock parameter. Policies take ``now`` as an argument (pure, tested
with plain numbers); shells read ``current_time()`` and wait with ``anyio.sleep``/``sleep_until``
on the same loop, so trio's ``MockClock`` (tests, simulations) drives every reading and every
wait of a whole stack in virtual time. Kept out of ``corral.core``, which does no I/O and
imports no event loop.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

__all__ = ["current_time", "running_loop"]


def current_time() -> float:
    """The running event loop's clock: ``anyio.current_time()``, minus its backend lookup.

    anyio finds the backend through sniffio on every call; a stack reads the clock several
    times per request, so this asks asyncio for its loop (``None`` outside asyncio, without
    raising) and otherwise reads trio's clock, which honours trio's ``MockClock``.
    """
    loop = _running_loop()
    if loop is not None:
        return loop.time()
    return _trio_clock()()


def running_loop() -> AbstractEventLoop | None:
    """The running asyncio loop, or None (under trio, or outside any loop); never raises."""
    return _running_loop()


def _asyncio_not_loaded() -> AbstractEventLoop | None:
    """No asyncio loop can run before asyncio is imported, and importing it costs a trio program
    (and ``import corral``) ~20 ms: look for it, and once it is there use its C lookup."""
    events = sys.modules.get("asyncio.events")
    if events is None:
        return None
    global _running_loop
    _running_loop = events._get_running_loop  # C; None outside asyncio, without raising
    return _running_loop()


_running_loop: Callable[[], AbstractEventLoop | None] = _asyncio_not_loaded


@functools.cache
def _trio_clock() -> Callable[[], float]:
    try:
        import trio
    except ImportError:  # neither asyncio nor trio is running: let anyio say so
        return anyio.current_time
    return trio.current_time
