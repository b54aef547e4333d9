"""Stream wrappers that layers put around a response body they pass on, and how their time
limits reach the one layer that waits.

A streamed answer passes through several wrappers (the transport's body, a concurrency slot,
the call's deadline, the call's parse) to ``stream_chat``, and three of them bound the wait for
the next piece: the transport's read timeout, the call's deadline and the caller's idle
timeout. A cancel scope around each wait in each layer costs more than the piece itself when
events come one per read. So a layer that bounds waits first offers its limit downwards
(``bound_waits``): a wrapper that never waits itself passes the offer on, and the transport's
body, which does the waiting, takes every limit into the one timer of its read. A layer whose
offer is refused (a wrapper in between that waits, or does not pass it on) keeps its own scope.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable

import anyio

from corral._clock import current_time
from corral.core._errors import CorralError, DeadlineExceeded
from corral.core._models import ByteStream

__all__ = ["DeadlineStream", "WaitBounds", "bound_waits"]

#: What a limit raises when it passes.
ErrorFactory = Callable[[], CorralError]


def bound_waits(
    stream: object,
    *,
    deadline: float | None = None,
    idle: float | None = None,
    error: ErrorFactory,
) -> bool:
    """Offer ``stream`` a limit on every wait for its next piece: none past ``deadline`` (on the
    loop's clock) and none longer than ``idle`` seconds, else ``error()`` is raised. True when
    it took the limit; False when the caller must time its waits itself."""
    offer = getattr(stream, "bound_waits", None)
    return offer is not None and bool(offer(deadline=deadline, idle=idle, error=error))


class WaitBounds:
    """The limits a waiting layer took: the earliest deadline and the shortest idle time, each
    with its error."""

    __slots__ = ("deadline", "deadline_error", "idle", "idle_error")

    def __init__(self, idle: float | None, idle_error: ErrorFactory) -> None:
        self.deadline, self.deadline_error = math.inf, idle_error
        self.idle = math.inf if idle is None else idle
        self.idle_error = idle_error

    def add(self, deadline: float | None, idle: float | None, error: ErrorFactory) -> bool:
        if deadline is not None and deadline < self.deadline:
            self.deadline, self.deadline_error = deadline, error
        if idle is not None and idle < self.idle:
            self.idle, self.idle_error = idle, error
        return True

    def end(self, now: float) -> float:
        """When a wait starting ``now`` must end."""
        return min(self.deadline, now + self.idle)

    def error(self, now: float) -> CorralError:
        """The error of the limit that ends a wait started ``now``."""
        return (self.deadline_error if self.deadline <= now + self.idle else self.idle_error)()


class DeadlineStream:
    """Passes a stream through but ends it with ``DeadlineExceeded`` at the call's deadline.

    The deadline bounds the whole call, body included: a server trickling a stream must not
    outlive it. ``deadline`` is on the loop's clock. The stream below takes it if it can
    (``bound_waits``); otherwise the wait for each piece is a cancel scope, which then also
    carries any idle limit offered from above.
    """

    def __init__(self, inner: ByteStream, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline
        self._idle: float | None = None
        self._idle_error: ErrorFactory = self._expired

    def bound_waits(
        self, *, deadline: float | None = None, idle: float | None = None, error: ErrorFactory
    ) -> bool:
        """Pass the limit down, or carry it in this stream's own scopes."""
        if not bound_waits(self._inner, deadline=deadline, idle=idle, error=error):
            if deadline is not None and deadline < self._deadline:
                return False  # rare (an earlier deadline below this one's): the caller times it
            if idle is not None and (self._idle is None or idle < self._idle):
                self._idle, self._idle_error = idle, error
        return True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        pieces = aiter(self._inner)
        deadline = self._deadline
        taken = bound_waits(self._inner, deadline=deadline, error=self._expired)
        try:
            while True:
                now = current_time()
                if now >= deadline:  # pieces that need no wait end at the deadline too
                    raise self._expired()
                if taken:
                    try:
                        chunk = await anext(pieces)
                    except StopAsyncIteration:
                        return
                    yield chunk
                    continue
                end = deadline if self._idle is None else min(deadline, now + self._idle)
                with anyio.CancelScope(deadline=end) as scope:
                    try:
                        chunk = await anext(pieces)
                    except StopAsyncIteration:
                        return
                if scope.cancelled_caught:
                    raise (self._expired() if end >= deadline else self._idle_error())
                yield chunk
        finally:
            await self._inner.aclose()

    def _expired(self) -> DeadlineExceeded:
        return DeadlineExceeded("the call's deadline passed while its body was still arriving")

    async def aclose(self) -> None:
        await self._inner.aclose()
