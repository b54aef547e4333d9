"""A circuit breaker per key: stop calling a backend that keeps failing, probe it later.

Policy (a state machine, pure): CLOSED counts outcomes in a rolling ``window``; when at least
``min_calls`` were seen and the failure rate reaches ``threshold`` it goes OPEN for
``cooldown`` seconds, refusing calls at once; then HALF_OPEN lets ``probes`` calls through:
their success closes the circuit, a failure opens it again. ``BreakerPolicy.verdict`` reads
each attempt's classified outcome: only server-side trouble is a failure (a 5xx, a connection
fault, a timeout); any other answer from the server (a 4xx, 429 included) is a success; an
attempt that ended with no answer for another reason (cancelled, a deadline, a malformed body)
counts as nothing. ``before`` answers ``Allow`` or ``Refuse(until)``; ``record`` answers
``Opened``, ``Closed`` or ``Unchanged``.

Shell: ``CircuitBreaker`` raises ``CircuitOpen`` on a refusal and emits ``BreakerRefused``,
``BreakerOpened`` and ``BreakerClosed``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Literal

import attrs

from corral._clock import current_time
from corral.core import _events as events
from corral.core._call import Call
from corral.core._compose import Handler
from corral.core._errors import APIError, CircuitOpen, CorralError, ServerError, TransportError
from corral.core._models import Request, Response
from corral.middleware._checks import at_least, between, finite, never

__all__ = [
    "Allow",
    "BreakerConfig",
    "BreakerPolicy",
    "CircuitBreaker",
    "Closed",
    "Opened",
    "Refuse",
    "State",
    "Unchanged",
    "by_host",
]


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# -- decisions ----------------------------------------------------------------------------------


@attrs.frozen
class Allow:
    """Let the call through (in HALF_OPEN: as a probe)."""


@attrs.frozen
class Refuse:
    """Refuse the call at once; a probe may go at ``until``."""

    until: float


@attrs.frozen
class Opened:
    """The circuit opened (``failure_rate`` of the calls counted failed); it refuses until
    ``until``."""

    failure_rate: float
    until: float


@attrs.frozen
class Closed:
    """A probe succeeded: the circuit is closed again."""


@attrs.frozen
class Unchanged:
    """The state stays."""


ALLOW, CLOSED, UNCHANGED = Allow(), Closed(), Unchanged()
#: The states as plain names: reading an enum member off its class costs ~70 ns on 3.11, and
#: the breaker compares states several times per call.
_CLOSED, _OPEN, _HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN
Verdict = Literal["failure", "success", "none"]

BUCKETS = 20
_FAILURES = (ServerError, TransportError)


@attrs.frozen
class BreakerConfig:
    """When a key's circuit opens and for how long; validated when built (``InvalidInput``
    names the field)."""

    window: float = attrs.field(default=30.0, validator=finite(open_below=True))
    min_calls: int = attrs.field(default=20, validator=at_least(1))
    threshold: float = attrs.field(default=0.5, validator=between(0, 1, open_high=False))
    cooldown: float = attrs.field(default=10.0, validator=finite())
    probes: int = attrs.field(default=1, validator=at_least(1))


@attrs.define(eq=False)
class BreakerPolicy:
    """One key's circuit (mutable state, equal only to itself; the thresholds are the frozen
    ``config``)."""

    config: BreakerConfig = attrs.field(factory=BreakerConfig)
    state: State = _CLOSED
    opened_at: float = 0.0
    #: The rolling window as ``BUCKETS`` slices of [start, calls, failures]: memory and time
    #: per call stay constant however many calls a window holds.
    _buckets: deque[list[float]] = attrs.field(factory=deque)
    _calls: float = 0
    _failures: float = 0
    _probes_out: int = 0

    @staticmethod
    def verdict(outcome: CorralError | None) -> Verdict:
        """What an attempt's outcome says about the backend's health."""
        if outcome is None:
            return "success"
        if isinstance(outcome, _FAILURES):
            return "failure"
        return "success" if isinstance(outcome, APIError) else "none"

    def before(self, now: float) -> Allow | Refuse:
        """May a call go now? In HALF_OPEN an allowed call is one of the ``probes``."""
        if self.state is _CLOSED:
            return ALLOW
        cooldown = self.config.cooldown
        if self.state is _OPEN:
            if now < self.opened_at + cooldown:
                return Refuse(self.opened_at + cooldown)
            self.state, self._probes_out = _HALF_OPEN, 0
        if self._probes_out >= self.config.probes:
            return Refuse(now + cooldown)
        self._probes_out += 1
        return ALLOW

    def record(self, now: float, outcome: CorralError | None) -> Opened | Closed | Unchanged:
        """An allowed call ended with ``outcome`` (None: success)."""
        if outcome is None and self.state is _CLOSED:  # most calls: one success counted
            self._current_bucket(now)[1] += 1
            self._calls += 1
            return UNCHANGED
        verdict = self.verdict(outcome)
        if verdict == "none":
            self._abandon()
            return UNCHANGED
        failed = verdict == "failure"
        if self.state is _HALF_OPEN:
            if failed:
                return self._open(now, 1.0)
            self.state = _CLOSED
            self._forget()
            return CLOSED
        if self.state is _OPEN:
            return UNCHANGED  # a call admitted before the trip finished late; it changes nothing
        bucket = self._current_bucket(now)
        bucket[1] += 1
        self._calls += 1
        if not failed:
            return UNCHANGED  # a success never trips the breaker, whatever the rate
        bucket[2] += 1
        self._failures += 1
        if self._calls >= self.config.min_calls and (
            self._failures >= self.config.threshold * self._calls
        ):
            return self._open(now, self._failures / self._calls)
        return UNCHANGED

    def abandon(self) -> None:
        """A call let through ended with no outcome (cancelled): free its probe slot."""
        self._abandon()

    def _abandon(self) -> None:
        if self.state is _HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    def _current_bucket(self, now: float) -> list[float]:
        buckets = self._buckets
        window = self.config.window
        while buckets and buckets[0][0] <= now - window:
            _, calls, failures = buckets.popleft()
            self._calls -= calls
            self._failures -= failures
        if not buckets or now >= buckets[-1][0] + window / BUCKETS:
            buckets.append([now, 0, 0])
        return buckets[-1]

    def _forget(self) -> None:
        self._buckets.clear()
        self._calls = self._failures = 0

    def _open(self, now: float, failure_rate: float) -> Opened:
        self.state, self.opened_at = _OPEN, now
        self._forget()
        return Opened(failure_rate, now + self.config.cooldown)


def by_host(request: Request) -> str:
    """The circuit key of a call: its URL's host and port."""
    url = request.url
    host = _HOSTS.get(url)
    if host is None:
        from urllib.parse import urlsplit  # ~3 ms to import, once (issue 15: import time)

        if len(_HOSTS) >= 1024:  # a client calls a handful of URLs; a scan must not grow this
            _HOSTS.clear()
        host = _HOSTS[url] = urlsplit(url).netloc
    return host


_HOSTS: dict[str, str] = {}


class CircuitBreaker:
    """Middleware: fail fast with ``CircuitOpen`` while a key's circuit is open.

    Args:
        window: seconds of outcomes the failure rate is measured over.
        min_calls: calls the window must hold before the rate can open the circuit.
        threshold: the failure rate (0-1] that opens it.
        cooldown: seconds it stays open before probes may go.
        probes: calls let through while half-open.
        key: which circuit a request belongs to (``by_host`` by default).

    Raises ``InvalidInput`` naming the field for a bad value. ``config`` is the frozen
    configuration; ``policies`` the state of each key's circuit.
    """

    #: It never waits: a call goes on or is refused at once (``core._compose``).
    honours_deadline = True

    def __init__(
        self,
        *,
        window: float = 30.0,
        min_calls: int = 20,
        threshold: float = 0.5,
        cooldown: float = 10.0,
        probes: int = 1,
        key: Callable[[Request], str] = by_host,
    ) -> None:
        self.config = BreakerConfig(
            window=window,
            min_calls=min_calls,
            threshold=threshold,
            cooldown=cooldown,
            probes=probes,
        )
        self._key = key
        self.policies: dict[str, BreakerPolicy] = {}

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Refuse the call with ``CircuitOpen`` while its key's circuit is open, else send it and
        record the classified outcome, which may open or close the circuit."""
        key = self._key(request)
        policy = self.policies.get(key)
        if policy is None:
            policy = self.policies[key] = BreakerPolicy(self.config)
        call = request.options.call
        # CLOSED lets every call through: the clock is read only when the answer may differ.
        if policy.state is not _CLOSED:
            match policy.before(current_time()):
                case Allow():
                    pass
                case Refuse(until=until):
                    call.emit(events.BreakerRefused, current_time(), key=key, until=until)
                    raise CircuitOpen(
                        f"circuit for {key} is open; next probe at t={until:.3f}", retry_at=until
                    )
                case other:
                    never(other)
        try:
            response = await call_next(request)
        except CorralError as exc:
            self._record(call, key, policy, exc)
            raise
        except BaseException:
            policy.abandon()
            raise
        self._record(call, key, policy, None if response.status < 400 else response.error())
        return response

    @staticmethod
    def _record(call: Call, key: str, policy: BreakerPolicy, outcome: CorralError | None) -> None:
        now = current_time()
        decision = policy.record(now, outcome)
        if decision is UNCHANGED:  # the common answer, a singleton: no class pattern to test
            return
        match decision:
            case Unchanged():
                pass
            case Opened(failure_rate=rate, until=until):
                call.emit(events.BreakerOpened, now, key=key, failure_rate=rate, until=until)
            case Closed():
                call.emit(events.BreakerClosed, now, key=key)
            case other:
                never(other)
