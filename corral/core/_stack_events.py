"""The events of the default stack's decisions: a retry scheduled or given up, a circuit
opened, closed or refusing, an adaptive limit moved (``corral.core._events`` says what an event
is, and re-exports these).

None is built on a call that goes through at once, so they load with the first use of one (a
first retry, say) rather than with ``import corral`` (issue 15).
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from corral.core._events import Event

__all__ = [
    "BreakerClosed",
    "BreakerOpened",
    "BreakerRefused",
    "ConcurrencyChanged",
    "GaveUp",
    "RetryScheduled",
]


@attrs.frozen(kw_only=True)
class RetryScheduled(Event):
    """The attempt failed with ``kind``; the next starts after ``delay`` seconds."""

    name: ClassVar[str] = "retry.scheduled"
    kind: str
    delay: float
    #: Seconds the server asked for (Retry-After), if it did.
    retry_after: float | None = None


@attrs.frozen(kw_only=True)
class GaveUp(Event):
    """No more attempts: ``reason`` says why (attempts, budget, deadline, not retryable)."""

    name: ClassVar[str] = "retry.gave_up"
    kind: str
    reason: str


@attrs.frozen(kw_only=True)
class BreakerOpened(Event):
    name: ClassVar[str] = "breaker.opened"
    key: str
    failure_rate: float
    until: float


@attrs.frozen(kw_only=True)
class BreakerClosed(Event):
    name: ClassVar[str] = "breaker.closed"
    key: str


@attrs.frozen(kw_only=True)
class BreakerRefused(Event):
    """The call was refused at once: the circuit for ``key`` is open until ``until``."""

    name: ClassVar[str] = "breaker.refused"
    key: str
    until: float


@attrs.frozen(kw_only=True)
class ConcurrencyChanged(Event):
    """The adaptive limit moved (AIMD): down on overload, up on success at the limit."""

    name: ClassVar[str] = "concurrency.changed"
    old: int
    new: int
    reason: str
