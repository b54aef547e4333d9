"""Retry with capped, fully jittered exponential backoff that honours the server's hints.

Policy: ``RetryPolicy.decide`` looks at one failed attempt (a typed error plus the response
headers, if any) and returns ``RetryAfter(delay)`` or ``GiveUp(reason)``. It retries only what
can succeed later (429, 408, 409, 5xx, connection faults, malformed 200s), never 400/401/403/
404/context length; it honours ``Retry-After``/``retry-after-ms``/``x-should-retry``, gives up
at once when the server asks for a longer wait than ``max_retry_after``, never sleeps past the
call's deadline, and spends from a ``RetryBudget`` shared by all calls so an outage does not
multiply the load.

Shell: ``Retry`` loops over attempts. A streamed body is handed to the caller as soon as its
status is good, so a stream is never retried once its first byte reached the caller.
"""

from __future__ import annotations

import random

import anyio
import attrs

from corral.clock import current_time
from corral.core import jsonlib
from corral.core.classify import classify, parse_retry_after, parse_should_retry
from corral.core.compose import Clock, Handler
from corral.core.errors import CorralError, MalformedResponse, TransportError
from corral.core.headers import Headers
from corral.core.models import Request, Response

__all__ = ["GiveUp", "Retry", "RetryAfter", "RetryBudget", "RetryPolicy"]


@attrs.frozen
class RetryAfter:
    delay: float


@attrs.frozen
class GiveUp:
    reason: str


class RetryBudget:
    """A token bucket of retries: each call deposits ``ratio``, each retry withdraws 1.

    With ratio 0.2, retries stay under ~20% of calls over time (plus ``reserve`` to start with,
    so a quiet client can still retry a few times). The balance never goes negative.
    """

    def __init__(self, ratio: float = 0.2, reserve: float = 10.0, cap: float = 100.0) -> None:
        if ratio < 0 or reserve < 0 or cap < reserve:
            raise ValueError("need ratio >= 0 and 0 <= reserve <= cap")
        self.ratio, self.cap = ratio, cap
        self.balance = reserve

    def deposit(self) -> None:
        self.balance = min(self.cap, self.balance + self.ratio)

    def withdraw(self) -> bool:
        if self.balance >= 1.0:
            self.balance -= 1.0
            return True
        return False


@attrs.define
class RetryPolicy:
    max_attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    #: A server asking for a longer wait than this makes the call fail at once.
    max_retry_after: float = 120.0
    #: Retry read errors/timeouts after the request was fully sent? LLM calls have no side
    #: effects, so yes by default; turn off for endpoints where a duplicate would matter.
    retry_sent: bool = True
    rng: random.Random = attrs.field(factory=random.Random)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
        ceiling = self.cap if attempt > 60 else min(self.cap, self.base * 2 ** (attempt - 1))
        return self.rng.uniform(0.0, ceiling)

    def retryable(self, error: CorralError, headers: Headers | None) -> bool:
        verdict = parse_should_retry(headers) if headers is not None else None
        if verdict is not None:
            return verdict
        if isinstance(error, TransportError) and error.request_sent and not self.retry_sent:
            return False
        return error.retryable

    def decide(
        self,
        attempt: int,
        error: CorralError,
        headers: Headers | None,
        now: float,
        deadline: float | None,
        budget: RetryBudget | None,
    ) -> RetryAfter | GiveUp:
        if not self.retryable(error, headers):
            return GiveUp(f"{error.kind} is not retryable")
        if attempt >= self.max_attempts:
            return GiveUp(f"gave up after {attempt} attempts")
        hint = parse_retry_after(headers) if headers is not None else None
        if hint is not None and hint > self.max_retry_after:
            return GiveUp(f"server asked to wait {hint:g}s > max_retry_after")
        delay = max(hint or 0.0, self.backoff(attempt))
        if deadline is not None and now + delay >= deadline:
            return GiveUp("the next attempt would start after the deadline")
        if budget is not None and not budget.withdraw():
            return GiveUp("retry budget exhausted")
        return RetryAfter(delay)


def _malformed(response: Response) -> MalformedResponse | None:
    """A buffered 200 that claims JSON but does not parse is worth another try."""
    if response.stream is not None or response.status != 200:
        return None
    if "json" not in (response.headers.get("content-type") or "json"):
        return None
    try:
        response.json()
    except jsonlib.JSONDecodeError:
        return MalformedResponse("HTTP 200 body is not valid JSON", status=200)
    return None


class Retry:
    """Middleware: repeat failed attempts per ``RetryPolicy``.

    Gives back the last response (an error status) or raises the last transport error, so the
    caller's decoding turns it into the typed error with the server's own message.
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        budget: RetryBudget | None = None,
        clock: Clock = current_time,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.budget = budget if budget is not None else RetryBudget()
        self._clock = clock
        #: Retries performed, by error kind (for metrics).
        self.retries: dict[str, int] = {}

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        self.budget.deposit()
        attempt = 0
        while True:
            attempt += 1
            response: Response | None = None
            try:
                response = await call_next(request)
            except (TransportError, MalformedResponse) as exc:
                error: CorralError = exc
            else:
                if response.status >= 400 and response.stream is not None:
                    response = await response.aread()
                found: CorralError | None = classify(
                    response.status, response.headers, response.body
                )
                if found is None:
                    found = _malformed(response)
                if found is None:
                    return response
                error = found
            headers = response.headers if response is not None else None
            decision = self.policy.decide(
                attempt, error, headers, self._clock(), request.options.deadline, self.budget
            )
            if isinstance(decision, GiveUp):
                if response is not None:
                    return response
                raise error
            self.retries[error.kind] = self.retries.get(error.kind, 0) + 1
            await anyio.sleep(decision.delay)
