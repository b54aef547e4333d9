"""Concurrency limits: a fixed cap, or an adaptive one (AIMD) that backs off under overload.

Policy: ``AIMDPolicy`` reads each attempt's classified outcome. An overload (``is_overload``:
a 429, a 503, a timeout) multiplies the limit by ``decrease``, at most once per ``cooldown``
seconds; an answer from the server that is no overload (a success, a 400) grows it by
``1/limit`` while calls are using the whole limit (about +1 per round trip); any other failure
(a refused connection, a malformed body) says nothing about load and changes nothing. It
answers ``LimitChanged(old, new, reason)`` when the whole-number limit moves, else
``Unchanged``, and always stays within [minimum, maximum].

Shell: ``ConcurrencyLimit`` holds a slot while the attempt is on the wire (until a streamed body
is finished or closed), through a ``Gate`` whose size follows the policy; a change of the limit
emits ``ConcurrencyChanged``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, TypeGuard

import anyio.lowlevel
import attrs

from corral._clock import current_time
from corral._gate import Gate
from corral._pacing import DEFAULT_EVERY
from corral.core import _events as events
from corral.core._compose import Handler
from corral.core._errors import (
    APIError,
    APITimeoutError,
    CorralError,
    DeadlineExceeded,
    InvalidInput,
    RateLimitError,
    ServerError,
)
from corral.core._models import ByteStream, Request, Response
from corral.middleware._checks import at_least, between, finite, never

__all__ = [
    "AIMDPolicy",
    "ConcurrencyConfig",
    "ConcurrencyLimit",
    "Gate",
    "LimitChanged",
    "Unchanged",
    "is_overload",
]


@attrs.frozen
class LimitChanged:
    """The whole-number limit moved from ``old`` to ``new``; ``reason`` says why."""

    old: int
    new: int
    reason: str


@attrs.frozen
class Unchanged:
    """The limit (as a whole number) stays."""


UNCHANGED = Unchanged()


def is_overload(outcome: CorralError | None) -> TypeGuard[CorralError]:
    """The backend says it is overloaded: a 429, a 503, or an attempt that timed out."""
    return isinstance(outcome, (RateLimitError, APITimeoutError)) or (
        isinstance(outcome, ServerError) and outcome.status == 503
    )


@attrs.frozen
class ConcurrencyConfig:
    """What ``ConcurrencyLimit`` enforces; validated when built (``InvalidInput`` names the
    field). ``limit`` is the cap, or the starting limit when ``adaptive``."""

    limit: int = attrs.field(default=64, validator=at_least(1))
    adaptive: bool = False
    minimum: int = attrs.field(default=1, validator=at_least(1))
    maximum: int = attrs.field(default=256, validator=at_least(1))
    decrease: float = attrs.field(default=0.5, validator=between(0, 1))
    cooldown: float = attrs.field(default=1.0, validator=finite())

    def __attrs_post_init__(self) -> None:
        if self.adaptive and not self.minimum <= self.limit <= self.maximum:
            raise InvalidInput(
                f"ConcurrencyConfig.limit must be within [minimum={self.minimum}, "
                f"maximum={self.maximum}] when adaptive, got {self.limit}"
            )


@attrs.define(eq=False)
class AIMDPolicy:
    """The adaptive limit's state (equal only to itself; the bounds are the frozen ``config``).
    Pure: time is ``now``."""

    config: ConcurrencyConfig
    limit: float = attrs.field(init=False)
    _last_decrease: float = attrs.field(init=False, default=-math.inf)

    def __attrs_post_init__(self) -> None:
        self.limit = float(self.config.limit)

    def observe(
        self, now: float, outcome: CorralError | None, in_flight: int
    ) -> LimitChanged | Unchanged:
        """An attempt ended with ``outcome`` (None: success) while ``in_flight`` were out."""
        old = int(self.limit)
        c = self.config
        if is_overload(outcome):
            if now - self._last_decrease < c.cooldown:
                return UNCHANGED
            self._last_decrease = now
            self.limit = max(c.minimum, self.limit * c.decrease)
            reason = f"overload: {outcome.kind}"
        elif outcome is None or isinstance(outcome, APIError):
            if in_flight < old:
                return UNCHANGED
            self.limit = min(c.maximum, self.limit + 1.0 / self.limit)
            reason = "saturated"
        else:
            return UNCHANGED  # no answer from the server: nothing learnt about its load
        new = int(self.limit)
        return UNCHANGED if new == old else LimitChanged(old, new, reason)


async def _acquire(gate: Gate, deadline: float | None) -> None:
    """A slot, waiting no later than the call's ``deadline`` (a scope only for a real wait)."""
    if deadline is None:
        await gate.acquire()
        return
    if gate.try_acquire():
        return
    with anyio.CancelScope(deadline=deadline) as scope:
        await gate.acquire()
    if scope.cancelled_caught:
        raise DeadlineExceeded("the call's deadline passed while it waited for a slot")


class ConcurrencyLimit:
    """Middleware: at most ``limit`` attempts on the wire, or an adaptive limit.

    Args:
        limit: the cap (or, with ``adaptive=True``, the starting limit).
        adaptive: adapt the limit by AIMD between ``minimum`` and ``maximum``: multiply it by
            ``decrease`` on an overload (at most once per ``cooldown`` seconds), grow it by
            about one per round trip while calls use all of it.

    Raises ``InvalidInput`` naming the field for a bad value. ``config`` is the frozen
    configuration, ``policy`` the adaptive state (None when fixed).
    """

    #: A wait for a slot ends at the call's deadline (``core._compose``).
    honours_deadline = True

    def __init__(
        self,
        limit: int = 64,
        *,
        adaptive: bool = False,
        minimum: int = 1,
        maximum: int = 256,
        decrease: float = 0.5,
        cooldown: float = 1.0,
    ) -> None:
        self.config = ConcurrencyConfig(
            limit=limit,
            adaptive=adaptive,
            minimum=minimum,
            maximum=maximum,
            decrease=decrease,
            cooldown=cooldown,
        )
        self.policy = AIMDPolicy(self.config) if adaptive else None
        self._gate = Gate(limit)
        self._left = DEFAULT_EVERY

    @property
    def in_flight(self) -> int:
        """Attempts on the wire now, for progress lines and tests."""
        return self._gate.used

    @property
    def limit(self) -> int:
        """The current limit; with AIMD it moves with the provider's overload signals."""
        return self._gate.limit

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Hold a slot for the attempt while it is on the wire (a stream until its end), waiting
        for one if all are taken."""
        gate = self._gate
        # A free slot is taken in line: no awaitable to build and await for it. Every
        # DEFAULT_EVERY calls (or when the slots are all taken) the gate's acquire runs, after a
        # checkpoint: a loop of calls that never suspend below still honours cancellation.
        left = self._left - 1
        if left and gate.try_acquire():
            self._left = left
        else:
            if not left:
                self._left = DEFAULT_EVERY
                await anyio.lowlevel.checkpoint()  # before taking anything: no slot to leak
            await _acquire(gate, request.options.deadline)
        try:
            response = await call_next(request)
        except CorralError as exc:
            if self.policy is not None:
                self._observe(request, exc)
            gate.release()
            raise
        except BaseException:
            gate.release()
            raise
        if self.policy is not None:
            self._observe(request, response.error())
        if response.stream is None:
            gate.release()
            return response
        return attrs.evolve(response, stream=_SlotStream(response.stream, gate))

    def _observe(self, request: Request, outcome: CorralError | None) -> None:
        assert self.policy is not None
        now = current_time()
        match self.policy.observe(now, outcome, self._gate.used):
            case Unchanged():
                pass
            case LimitChanged(old=old, new=new, reason=reason):
                self._gate.resize(new)
                request.options.call.emit(
                    events.ConcurrencyChanged, now, old=old, new=new, reason=reason
                )
            case other:
                never(other)


class _SlotStream:
    """Frees the concurrency slot when the body is finished or closed."""

    def __init__(self, inner: ByteStream, gate: Gate) -> None:
        self._inner, self._gate = inner, gate
        self._released = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        finally:
            self._release()

    def bound_waits(self, **limit: Any) -> bool:
        """Pass a time limit on the waits for pieces down (corral._streams): no wait here."""
        offer = getattr(self._inner, "bound_waits", None)
        return offer is not None and bool(offer(**limit))

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._gate.release()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()
