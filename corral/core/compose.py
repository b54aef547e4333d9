"""How layers fit together: a handler maps a Request to a Response; a middleware wraps one.

A middleware is any callable ``(request, call_next) -> Awaitable[Response]``; plain ``async def``
functions work. ``build_stack`` composes a list once, outermost first, into a single handler.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio

from corral.core.models import Request, Response

__all__ = ["Clock", "Handler", "Middleware", "build_stack", "current_time"]

Handler = Callable[[Request], Awaitable[Response]]

#: Returns the current time in seconds. Shells read it; policies receive ``now`` from them.
Clock = Callable[[], float]


def current_time() -> float:
    """The running event loop's clock: ``anyio.current_time()``, minus its lookup on asyncio.

    anyio finds the backend through sniffio on every call (~2 µs); a stack reads the clock
    several times per request, so on asyncio this reads the loop directly. Under trio (and so
    trio's ``MockClock``) it defers to anyio.
    """
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return anyio.current_time()


class Middleware(Protocol):
    def __call__(self, request: Request, call_next: Handler) -> Awaitable[Response]: ...


def build_stack(middleware: Sequence[Middleware], transport: Handler) -> Handler:
    """Compose ``middleware`` (outermost first) around ``transport`` into one handler."""
    handler = transport
    for layer in reversed(middleware):
        handler = functools.partial(layer, call_next=handler)
    return handler
