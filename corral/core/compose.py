"""How layers fit together: a handler maps a Request to a Response; a middleware wraps one.

A middleware is any callable ``(request, call_next) -> Awaitable[Response]``; plain ``async def``
functions work. ``build_stack`` composes a list once, outermost first, into a single handler.
"""

from __future__ import annotations

import functools
from asyncio.events import _get_running_loop as _running_loop  # C; None outside asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio

from corral.core.models import Request, Response

__all__ = ["Clock", "Handler", "Middleware", "build_stack", "current_time"]

Handler = Callable[[Request], Awaitable[Response]]

#: Returns the current time in seconds. Shells read it; policies receive ``now`` from them.
Clock = Callable[[], float]


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


@functools.cache
def _trio_clock() -> Callable[[], float]:
    try:
        import trio
    except ImportError:  # neither asyncio nor trio is running: let anyio say so
        return anyio.current_time
    return trio.current_time


class Middleware(Protocol):
    def __call__(self, request: Request, call_next: Handler) -> Awaitable[Response]: ...


def build_stack(middleware: Sequence[Middleware], transport: Handler) -> Handler:
    """Compose ``middleware`` (outermost first) around ``transport`` into one handler."""
    handler = transport
    for layer in reversed(middleware):
        handler = functools.partial(layer, call_next=handler)
    return handler
