"""Per-call deadlines: one absolute time, visible to every inner layer, enforced by a cancel scope.

Inner layers read ``request.options.deadline`` (Retry will not start a sleep that would end
after it); this shell cancels whatever is still running when it passes. A streamed body is
still arriving when the call returns its response, so the shell wraps it in a
``DeadlineStream``: the deadline bounds the whole call, body included. Times are on the event
loop's clock (``corral._clock.current_time``).
"""

from __future__ import annotations

import anyio
import attrs

from corral._clock import current_time
from corral._streams import DeadlineStream
from corral.core._compose import Handler
from corral.core._errors import DeadlineExceeded
from corral.core._models import Request, Response
from corral.middleware._checks import finite, optional

__all__ = ["Deadline", "DeadlineConfig"]


@attrs.frozen
class DeadlineConfig:
    """Seconds a call may take in all (None: only the call's own deadline, if it has one)."""

    timeout: float | None = attrs.field(default=None, validator=optional(finite(open_below=True)))


class Deadline:
    """Middleware: give each call at most ``timeout`` seconds in total (all retries included).

    ``timeout``: seconds, > 0; None leaves only the deadline a call brings (``.config``).
    """

    def __init__(self, timeout: float | None = None) -> None:
        self.config = DeadlineConfig(timeout)

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Give the call the earlier of its own deadline and ``timeout`` from now; past it the
        layers below are cancelled and ``DeadlineExceeded`` is raised."""
        now = current_time()
        timeout = self.config.timeout
        deadline = request.options.deadline
        if timeout is not None and (deadline is None or now + timeout < deadline):
            deadline = now + timeout
            request = request.with_deadline(deadline)
        elif deadline is None:
            return await call_next(request)
        if deadline <= now:
            raise DeadlineExceeded("the call's deadline had passed before it started")
        # One scope at an absolute time (no fail_after wrapper and its clock read); only its own
        # expiry is the deadline's, a TimeoutError from inside passes as it is.
        with anyio.CancelScope(deadline=deadline) as scope:
            response = await call_next(request)
        if scope.cancelled_caught:
            raise DeadlineExceeded(
                f"the call did not finish within its deadline ({deadline - now:.3g}s)"
            )
        if response.stream is None:
            return response
        return attrs.evolve(response, stream=DeadlineStream(response.stream, deadline))
