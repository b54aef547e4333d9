"""Retry with capped, fully jittered exponential backoff that honours the server's hints.

Policy (pure): ``RetryPolicy.decide`` looks at one failed attempt (its classified error, which
carries the server's ``Retry-After`` and ``x-should-retry``) and returns ``RetryAfter(delay)`` or
``GiveUp(reason)``. It retries only what can succeed later (429, 408, 409, 5xx, connection
faults, malformed 200s), never 400/401/403/404/context length; it honours the server's hints,
gives up at once when the server asks for a longer wait than ``max_retry_after``, never sleeps
past the call's deadline, and spends from a ``RetryBudget`` shared by all calls so an outage does
not multiply the load. The jitter is an input (a number in [0, 1)), so the policy holds no
random state.

Shell: ``Retry`` loops over attempts, numbering them on the call (``call.attempt``, 1 first),
and reports each decision (``RetryScheduled``, ``GaveUp``). A streamed body is handed to the
caller as soon as its status is good, so a stream is never retried once its first byte reached
the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import attrs

from corral._clock import current_time
from corral._streams import DeadlineStream
from corral.core import _events as events
from corral.core import _jsonlib as jsonlib
from corral.core._compose import Handler
from corral.core._errors import (
    APIError,
    CorralError,
    InvalidInput,
    MalformedResponse,
    TransportError,
)
from corral.core._models import Request, Response
from corral.middleware._checks import at_least, finite, never

__all__ = ["GiveUp", "Retry", "RetryAfter", "RetryBudget", "RetryDecision", "RetryPolicy"]


@attrs.frozen
class RetryAfter:
    """Try again after ``delay`` seconds."""

    delay: float


@attrs.frozen
class GiveUp:
    """No more attempts. ``reason``: ``not_retryable``, ``attempts``, ``retry_after_too_long``,
    ``deadline`` or ``budget``."""

    reason: str


RetryDecision = RetryAfter | GiveUp


class RetryBudget:
    """A token bucket of retries: each call deposits ``ratio``, each retry withdraws 1.

    With ratio 0.2, retries stay under ~20% of calls over time (plus ``reserve`` to start with,
    so a quiet client can still retry a few times). The balance never goes negative.
    """

    def __init__(self, ratio: float = 0.2, reserve: float = 10.0, cap: float = 100.0) -> None:
        if not (ratio >= 0 and 0 <= reserve <= cap):
            raise InvalidInput(
                f"RetryBudget needs ratio >= 0 and 0 <= reserve <= cap, got ratio={ratio!r}, "
                f"reserve={reserve!r}, cap={cap!r}"
            )
        self.ratio, self.cap = ratio, cap
        self.balance = reserve

    def deposit(self) -> None:
        """Credit one call's share of a retry, up to ``cap``."""
        self.balance = min(self.cap, self.balance + self.ratio)

    def withdraw(self) -> bool:
        """Take one retry if the budget holds one; False means give up rather than add load to a
        struggling provider."""
        if self.balance >= 1.0:
            self.balance -= 1.0
            return True
        return False


def _budget_shape(instance: RetryPolicy, attribute: attrs.Attribute[float], value: float) -> None:
    if instance.budget_reserve > instance.budget_cap:
        raise InvalidInput(
            f"RetryPolicy.budget_reserve must be <= budget_cap, got {instance.budget_reserve!r}"
        )


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """When to try again, and after how long. Frozen; a bad value raises ``InvalidInput``."""

    #: Attempts in all, the first included.
    max_attempts: int = attrs.field(default=5, validator=at_least(1))
    #: The first backoff's ceiling (seconds); it doubles per attempt up to ``cap``.
    base: float = attrs.field(default=0.5, validator=finite())
    cap: float = attrs.field(default=30.0, validator=finite())
    #: A server asking for a longer wait than this makes the call fail at once.
    max_retry_after: float = attrs.field(default=120.0, validator=finite())
    #: Retry read errors/timeouts after the request was fully sent? LLM calls have no side
    #: effects, so yes by default; turn off for endpoints where a duplicate would matter.
    retry_sent: bool = True
    #: The shared budget: each call deposits ``budget_ratio`` retries, up to ``budget_cap``,
    #: starting from ``budget_reserve``.
    budget_ratio: float = attrs.field(default=0.2, validator=finite())
    budget_reserve: float = attrs.field(default=10.0, validator=finite())
    budget_cap: float = attrs.field(default=100.0, validator=[finite(), _budget_shape])

    def backoff(self, attempt: int, jitter: float) -> float:
        """Full jitter: ``jitter`` (in [0, 1]) of min(cap, base * 2**(attempt-1))."""
        ceiling = self.cap if attempt > 60 else min(self.cap, self.base * 2 ** (attempt - 1))
        return jitter * ceiling

    def retryable(self, error: CorralError) -> bool:
        """Whether sending again could help: the server's ``x-should-retry`` first, then a
        request already sent when ``retry_sent`` is off, then the error class."""
        if isinstance(error, APIError) and error.should_retry is not None:
            return error.should_retry
        if isinstance(error, TransportError) and error.request_sent and not self.retry_sent:
            return False
        return error.retryable

    def decide(
        self,
        attempt: int,
        error: CorralError,
        now: float,
        deadline: float | None,
        jitter: float,
        budget: RetryBudget | None,
    ) -> RetryDecision:
        """What follows failed attempt number ``attempt`` (1 for the first) at ``now``."""
        if not self.retryable(error):
            return GiveUp("not_retryable")
        if attempt >= self.max_attempts:
            return GiveUp("attempts")
        hint = error.retry_after if isinstance(error, APIError) else None
        if hint is not None and hint > self.max_retry_after:
            return GiveUp("retry_after_too_long")
        delay = max(hint or 0.0, self.backoff(attempt, jitter))
        if deadline is not None and now + delay >= deadline:
            return GiveUp("deadline")
        if budget is not None and not budget.withdraw():
            return GiveUp("budget")
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


async def _read_whole(response: Response, deadline: float | None) -> Response:
    """A streamed error answer, read whole to decide on it: by the call's deadline too, since
    ``Deadline`` above may have passed it down rather than cut this read with a scope."""
    stream = response.stream
    if deadline is not None and stream is not None:
        response = attrs.evolve(response, stream=DeadlineStream(stream, deadline))
    return await response.aread()


class Retry:
    """Middleware: repeat failed attempts per ``RetryPolicy``.

    Gives back the last response (an error status) or raises the last transport error, so the
    caller's decoding turns it into the typed error with the server's own message.

    Args:
        max_attempts, base, cap, max_retry_after, retry_sent, budget_ratio, budget_reserve,
            budget_cap: the ``RetryPolicy`` fields (``.config``).
        seed: seeds the jitter (None: from the system), for runs that must repeat exactly.
    """

    #: It starts no sleep that would end past the call's deadline (``core._compose``).
    honours_deadline = True

    def __init__(
        self,
        *,
        max_attempts: int = 5,
        base: float = 0.5,
        cap: float = 30.0,
        max_retry_after: float = 120.0,
        retry_sent: bool = True,
        budget_ratio: float = 0.2,
        budget_reserve: float = 10.0,
        budget_cap: float = 100.0,
        seed: int | None = None,
    ) -> None:
        self.config = RetryPolicy(
            max_attempts=max_attempts,
            base=base,
            cap=cap,
            max_retry_after=max_retry_after,
            retry_sent=retry_sent,
            budget_ratio=budget_ratio,
            budget_reserve=budget_reserve,
            budget_cap=budget_cap,
        )
        self.budget = RetryBudget(budget_ratio, budget_reserve, budget_cap)
        self._seed = seed
        self._draw: Callable[[], float] | None = None
        #: Retries performed, by error kind (for metrics).
        self.retries: dict[str, int] = {}

    def _jitter(self) -> float:
        """A draw in [0, 1): the generator is made at the first failed attempt, so ``random``
        (~2 ms to import) loads only in a program whose calls fail (issue 15: import time)."""
        draw = self._draw
        if draw is None:
            import random

            draw = self._draw = random.Random(self._seed).random
        return draw()

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Send the request, and after a retryable failure wait and send it again, per the
        policy, the deadline and the budget."""
        self.budget.deposit()
        call = request.options.call
        attempt = 0
        while True:
            attempt += 1
            call.attempt = attempt
            response: Response | None = None
            try:
                response = await call_next(request)
            except (TransportError, MalformedResponse) as exc:
                error: CorralError = exc
            else:
                found: CorralError | None
                if response.status < 400:  # no error status: only a malformed 200 to look for
                    found = _malformed(response)
                else:
                    if response.stream is not None:
                        response = await _read_whole(response, request.options.deadline)
                    found = response.error() or _malformed(response)
                if found is None:
                    return response
                error = found
            now = current_time()
            decision = self.config.decide(
                attempt, error, now, request.options.deadline, self._jitter(), self.budget
            )
            match decision:
                case RetryAfter(delay=delay):
                    self.retries[error.kind] = self.retries.get(error.kind, 0) + 1
                    hint = error.retry_after if isinstance(error, APIError) else None
                    call.emit(
                        events.RetryScheduled, now, kind=error.kind, delay=delay, retry_after=hint
                    )
                    await anyio.sleep(delay)
                case GiveUp(reason=reason):
                    call.emit(events.GaveUp, now, kind=error.kind, reason=reason)
                    if response is not None:
                        return response
                    raise error
                case _:
                    never(decision)
