"""Per-call deadlines: one absolute time, visible to every inner layer, enforced by a cancel scope.

Inner layers read ``request.options.deadline`` (Retry will not start a sleep that would end
after it); this shell cancels whatever is still running when it passes. A streamed body is
still arriving when the call returns its response, so the shell wraps it in a
``DeadlineStream``: the deadline bounds the whole call, body included.
"""

from __future__ import annotations

import anyio
import attrs

from corral.core.compose import Clock, Handler
from corral.core.errors import DeadlineExceeded
from corral.core.models import Request, Response
from corral.streams import DeadlineStream

__all__ = ["Deadline", "effective_deadline"]


def effective_deadline(now: float, timeout: float | None, existing: float | None) -> float | None:
    """The earlier of the call's own deadline and ``now + timeout``."""
    candidates = [
        d for d in (existing, None if timeout is None else now + timeout) if d is not None
    ]
    return min(candidates) if candidates else None


class Deadline:
    """Middleware: give each call at most ``timeout`` seconds in total (all retries included)."""

    def __init__(self, timeout: float | None = None, *, clock: Clock = anyio.current_time) -> None:
        self.timeout = timeout
        self._clock = clock

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        now = self._clock()
        deadline = effective_deadline(now, self.timeout, request.options.deadline)
        if deadline is None:
            return await call_next(request)
        if deadline <= now:
            raise DeadlineExceeded("the call's deadline had passed before it started")
        request = request.with_deadline(deadline)
        try:
            with anyio.fail_after(deadline - now):
                response = await call_next(request)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the call did not finish within its deadline ({deadline - now:.3g}s)"
            ) from None
        if response.stream is None:
            return response
        return attrs.evolve(response, stream=DeadlineStream(response.stream, deadline, self._clock))
