"""How layers fit together: a handler maps a Request to a Response; a middleware wraps one.

A middleware is any callable ``(request, call_next) -> Awaitable[Response]``; plain ``async def``
functions work. ``build_stack`` composes a list once, outermost first, into a single handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from corral.core._events import EventSink
from corral.core._models import Request, Response

__all__ = ["Clock", "Handler", "Middleware", "build_stack", "honours_deadline"]

Handler = Callable[[Request], Awaitable[Response]]
"""What a stack is and what a transport is: an async function from a request to its response."""

Clock = Callable[[], float]
"""Returns the current time in seconds (``corral._clock.current_time``, the loop's clock)."""


class Middleware(Protocol):
    """A layer of a stack: called with the request and the rest of the stack (``call_next``), it
    may change the request, wait, retry, or answer without calling on."""

    def __call__(self, request: Request, call_next: Handler) -> Awaitable[Response]:
        """Handle ``request``, calling ``call_next`` for the layers below (any number of times)."""


def honours_deadline(handler: object) -> bool:
    """Whether ``handler`` bounds every wait of a call by ``request.options.deadline`` itself,
    raising ``DeadlineExceeded`` when that is what ends it: a layer or transport says so with a
    ``honours_deadline = True`` attribute, and a bound stack holds it when every part below does.
    A ``Deadline`` above such a stack needs no cancel scope of its own."""
    return getattr(handler, "honours_deadline", False) is True


def build_stack(
    middleware: Sequence[Middleware], transport: Handler, *, events: EventSink | None = None
) -> Handler:
    """Compose ``middleware`` (outermost first) around ``transport`` into one handler.

    ``events``: the stack's one sink; every call through the handler reports its decisions
    there (unless the call already carries a sink of its own).
    """
    handler = transport
    for layer in reversed(middleware):
        handler = _bind(layer, handler)
    if events is None:
        return handler
    inner = handler

    def with_sink(request: Request) -> Awaitable[Response]:
        call = request.options.call
        if call.sink is None:
            call.sink = events
        return inner(request)

    if honours_deadline(inner):
        setattr(with_sink, "honours_deadline", True)  # noqa: B010 - a function's own attribute
    return with_sink


def _bind(layer: Middleware, call_next: Handler) -> Handler:
    """``layer`` with the rest of the stack bound: a plain function handing back the layer's
    awaitable (no coroutine of its own, and cheaper to call than a partial with a keyword)."""

    def handler(request: Request) -> Awaitable[Response]:
        return layer(request, call_next)

    if honours_deadline(layer) and honours_deadline(call_next):
        setattr(handler, "honours_deadline", True)  # noqa: B010 - a function's own attribute
    return handler
