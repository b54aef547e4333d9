"""Per-call deadlines: one absolute time, visible to every inner layer, enforced by a cancel scope.

Inner layers read ``request.options.deadline`` (Retry will not start a sleep that would end
after it); this shell cancels whatever is still running when it passes. A streamed body is
still arriving when the call returns its response, so the shell wraps it in a
``DeadlineStream``: the deadline bounds the whole call, body included. Times are on the event
loop's clock (``corral._clock.current_time``).

When every layer below and the transport bound their own waits by the call's deadline
(``honours_deadline``: ``Retry``, ``CircuitBreaker``, ``RateLimit``, ``ConcurrencyLimit`` and
``H11Transport`` do), the shell passes the deadline down and enters no scope at all.

Otherwise most of a cancel scope's cost is its timer (one ``call_at`` and its cancellation per
call on asyncio), and almost every call ends long before a deadline of minutes. So on asyncio
the calls that take the layer's own timeout share one timer (``_Watch``): their deadlines come
in the order the calls start, the timer waits for the oldest call still running, and when it
fires it cancels every call past its deadline and waits for the next. A call that brings an
earlier deadline of its own, and every call under trio (whose deadlines are cheap), gets a
scope with its deadline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import attrs

from corral._clock import current_time, running_loop
from corral._scopes import new_scope
from corral._streams import DeadlineStream
from corral.core._compose import Handler, honours_deadline
from corral.core._errors import DeadlineExceeded
from corral.core._models import Request, Response
from corral.middleware._checks import finite, optional

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop, TimerHandle

__all__ = ["Deadline", "DeadlineConfig"]


@attrs.frozen
class DeadlineConfig:
    """Seconds a call may take in all (None: only the call's own deadline, if it has one)."""

    timeout: float | None = attrs.field(default=None, validator=optional(finite(open_below=True)))


class _Watch:
    """The calls running under one ``Deadline`` on one asyncio loop, by deadline (= by start),
    and one timer at the deadline of the oldest."""

    __slots__ = ("loop", "scopes", "timer")

    def __init__(self, loop: AbstractEventLoop) -> None:
        self.loop = loop
        self.scopes: dict[anyio.CancelScope, float] = {}  # insertion order is deadline order
        self.timer: TimerHandle | None = None

    def add(self, scope: anyio.CancelScope, deadline: float) -> None:
        self.scopes[scope] = deadline
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self.timer = None
        now = self.loop.time()
        scopes = self.scopes
        while scopes:
            scope = next(iter(scopes))
            deadline = scopes[scope]
            if deadline > now:  # the oldest call still running: wait for it
                self.timer = self.loop.call_at(deadline, self._expire)
                return
            del scopes[scope]
            scope.cancel()


class Deadline:
    """Middleware: give each call at most ``timeout`` seconds in total (all retries included).

    ``timeout``: seconds, > 0; None leaves only the deadline a call brings (``.config``).
    """

    def __init__(self, timeout: float | None = None) -> None:
        self.config = DeadlineConfig(timeout)
        self._watch: _Watch | None = None

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Give the call the earlier of its own deadline and ``timeout`` from now; past it the
        layers below are cancelled (or end their own waits) and ``DeadlineExceeded`` is raised."""
        now = current_time()
        timeout = self.config.timeout
        deadline = request.options.deadline
        own = timeout is not None and (deadline is None or now + timeout < deadline)
        if own:
            assert timeout is not None
            deadline = now + timeout
            request = request.with_deadline(deadline)
        elif deadline is None:
            return await call_next(request)
        assert deadline is not None
        if deadline <= now:
            raise DeadlineExceeded("the call's deadline had passed before it started")
        if honours_deadline(call_next):  # the layers below end their own waits at it
            response = await call_next(request)
        else:
            response = await self._scoped(request, call_next, deadline, now, own)
        if response.stream is None:
            return response
        return attrs.evolve(response, stream=DeadlineStream(response.stream, deadline))

    async def _scoped(
        self, request: Request, call_next: Handler, deadline: float, now: float, own: bool
    ) -> Response:
        """``call_next`` under a cancel scope that ends at ``deadline``."""
        loop = running_loop() if own else None
        if loop is None:  # trio, or a call that brought an earlier deadline of its own
            with new_scope(deadline) as scope:
                response = await call_next(request)
        else:
            watch = self._watch
            if watch is None or watch.loop is not loop:
                watch = self._watch = _Watch(loop)
            with new_scope() as scope:
                watch.add(scope, deadline)
                try:
                    response = await call_next(request)
                finally:
                    watch.scopes.pop(scope, None)
        # Only the scope's own expiry is the deadline's: a TimeoutError from inside passes.
        if scope.cancelled_caught:
            raise DeadlineExceeded(
                f"the call did not finish within its deadline ({deadline - now:.3g}s)"
            )
        return response
