"""Concurrency limits: a fixed cap, or an adaptive one (AIMD) that backs off under overload.

Policy: ``AIMDPolicy`` grows the limit by ``1/limit`` per success while calls are using the whole
limit (about +1 per round trip) and multiplies it by ``decrease`` on a 429/503 or timeout, at most
once per ``cooldown`` seconds; it always stays within [minimum, maximum].

Shell: ``ConcurrencyLimit`` holds a slot while the attempt is on the wire (until a streamed body
is finished or closed), through a ``Gate`` whose size follows the policy.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import attrs

from corral.clock import current_time
from corral.core.compose import Clock, Handler
from corral.core.errors import TimeoutError_
from corral.core.models import ByteStream, Request, Response
from corral.gate import Gate

__all__ = ["AIMDPolicy", "ConcurrencyLimit", "Gate"]

_OVERLOAD = frozenset({429, 503})


@attrs.define
class AIMDPolicy:
    minimum: int = 1
    maximum: int = 256
    limit: float = 16.0
    decrease: float = 0.5
    cooldown: float = 1.0
    _last_decrease: float = -math.inf

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum or not 0 < self.decrease < 1:
            raise ValueError("need 1 <= minimum <= maximum and 0 < decrease < 1")
        self.limit = min(max(self.limit, self.minimum), self.maximum)

    def on_success(self, in_flight: int) -> None:
        if in_flight >= int(self.limit):
            self.limit = min(self.maximum, self.limit + 1.0 / self.limit)

    def on_overload(self, now: float) -> None:
        if now - self._last_decrease >= self.cooldown:
            self._last_decrease = now
            self.limit = max(self.minimum, self.limit * self.decrease)


class ConcurrencyLimit:
    """Middleware: at most ``limit`` attempts on the wire, or an adaptive limit via ``adaptive``."""

    def __init__(
        self, limit: int = 64, *, adaptive: AIMDPolicy | None = None, clock: Clock = current_time
    ) -> None:
        self.policy = adaptive
        start = int(adaptive.limit) if adaptive is not None else limit
        if start < 1:
            raise ValueError(f"limit must be >= 1, got {start}")
        self._gate = Gate(start)
        self._clock = clock

    @property
    def in_flight(self) -> int:
        return self._gate.used

    @property
    def limit(self) -> int:
        return self._gate.limit

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        gate = self._gate
        await gate.acquire()
        try:
            response = await call_next(request)
        except TimeoutError_:
            self._observe(overload=True)
            gate.release()
            raise
        except BaseException:
            gate.release()
            raise
        self._observe(overload=response.status in _OVERLOAD)
        if response.stream is None:
            gate.release()
            return response
        return attrs.evolve(response, stream=_SlotStream(response.stream, gate))

    def _observe(self, *, overload: bool) -> None:
        if self.policy is None:
            return
        if overload:
            self.policy.on_overload(self._clock())
        else:
            self.policy.on_success(self._gate.used)
        self._gate.resize(int(self.policy.limit))


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

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._gate.release()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()
