"""A circuit breaker per key: stop calling a backend that keeps failing, probe it later.

Policy (a state machine, pure): CLOSED counts outcomes in a rolling ``window``; when at least
``min_calls`` were seen and the failure rate reaches ``threshold`` it goes OPEN for
``cooldown`` seconds, refusing calls at once; then HALF_OPEN lets ``probes`` calls through:
their success closes the circuit, a failure opens it again. Only server-side trouble counts as
failure (5xx, connection faults, timeouts); a 4xx (429 included) never trips it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import attrs

from corral.clock import current_time
from corral.core.compose import Clock, Handler
from corral.core.errors import CircuitOpen, TransportError
from corral.core.models import Request, Response

__all__ = ["BreakerPolicy", "CircuitBreaker", "State", "by_host"]


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


BUCKETS = 20


@attrs.define
class BreakerPolicy:
    window: float = 30.0
    min_calls: int = 20
    threshold: float = 0.5
    cooldown: float = 10.0
    probes: int = 1
    state: State = State.CLOSED
    opened_at: float = 0.0
    #: The rolling window as ``BUCKETS`` slices of [start, calls, failures]: memory and time
    #: per call stay constant however many calls a window holds.
    _buckets: deque[list[float]] = attrs.field(factory=deque)
    _calls: float = 0
    _failures: float = 0
    _probes_out: int = 0

    def before(self, now: float) -> float | None:
        """None to let the call through, else the time the breaker will allow a probe."""
        if self.state is State.OPEN:
            if now < self.opened_at + self.cooldown:
                return self.opened_at + self.cooldown
            self.state, self._probes_out = State.HALF_OPEN, 0
        if self.state is State.HALF_OPEN:
            if self._probes_out >= self.probes:
                return now + self.cooldown
            self._probes_out += 1
        return None

    def record(self, now: float, failed: bool) -> None:
        if self.state is State.HALF_OPEN:
            if failed:
                self._open(now)
            else:
                self.state = State.CLOSED
                self._forget()
            return
        if self.state is State.OPEN:
            return  # a call admitted before the trip finished late; it changes nothing
        bucket = self._current_bucket(now)
        bucket[1] += 1
        self._calls += 1
        if not failed:
            return  # a success never trips the breaker, whatever the rate
        bucket[2] += 1
        self._failures += 1
        if self._calls >= self.min_calls and self._failures >= self.threshold * self._calls:
            self._open(now)

    def _current_bucket(self, now: float) -> list[float]:
        buckets = self._buckets
        while buckets and buckets[0][0] <= now - self.window:
            _, calls, failures = buckets.popleft()
            self._calls -= calls
            self._failures -= failures
        if not buckets or now >= buckets[-1][0] + self.window / BUCKETS:
            buckets.append([now, 0, 0])
        return buckets[-1]

    def _forget(self) -> None:
        self._buckets.clear()
        self._calls = self._failures = 0

    def abandon(self) -> None:
        """A call let through ended with no outcome (cancelled): free its probe slot."""
        if self.state is State.HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    def _open(self, now: float) -> None:
        self.state, self.opened_at = State.OPEN, now
        self._forget()


def by_host(request: Request) -> str:
    return urlsplit(request.url).netloc


class CircuitBreaker:
    """Middleware: fail fast with ``CircuitOpen`` while a key's circuit is open."""

    def __init__(
        self,
        *,
        key: Callable[[Request], str] = by_host,
        policy: Callable[[], BreakerPolicy] = BreakerPolicy,
        clock: Clock = current_time,
    ) -> None:
        self._key, self._new_policy, self._clock = key, policy, clock
        self.policies: dict[str, BreakerPolicy] = {}

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        key = self._key(request)
        policy = self.policies.get(key)
        if policy is None:
            policy = self.policies[key] = self._new_policy()
        retry_at = None if policy.state is State.CLOSED else policy.before(self._clock())
        if retry_at is not None:
            raise CircuitOpen(
                f"circuit for {key} is open; next probe at t={retry_at:.3f}", retry_at=retry_at
            )
        try:
            response = await call_next(request)
        except TransportError:
            policy.record(self._clock(), failed=True)
            raise
        except BaseException:
            policy.abandon()
            raise
        policy.record(self._clock(), failed=response.status >= 500)
        return response
