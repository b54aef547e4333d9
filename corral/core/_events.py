"""What the stack decided, as frozen values: the record of why a call waited, retried, hit the
cache, failed over or stopped.

Every policy decision that changes what happens to a call becomes one event. A stack has one
sink (``EventSink``: a plain function taking an event); the shells hand each event to the
call's sink, and build it only when there is a sink, so a stack without one pays one ``if``.
Sinks live in ``corral.observe``: structured logging, OpenTelemetry span events, and a JSONL
trace file (``corral run --trace FILE``).

Events never carry secrets: no headers, no bodies, only kinds, numbers and the call's labels
(a batch's custom_id).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs

__all__ = [
    "BreakerClosed",
    "BreakerOpened",
    "BreakerRefused",
    "BudgetRefused",
    "BudgetReserved",
    "BudgetSettled",
    "CacheHit",
    "CacheMiss",
    "CacheStored",
    "ConcurrencyChanged",
    "CooledDown",
    "Event",
    "EventSink",
    "FailedOver",
    "GaveUp",
    "RateLimitColdStart",
    "RateLimitLearned",
    "RateLimitPaused",
    "RateLimitWaited",
    "RetryScheduled",
    "RouteChosen",
    "RouteWaited",
    "SemanticCacheHit",
    "SemanticCacheMiss",
    "TransportResent",
    "Truncated",
    "event_fields",
]


@attrs.frozen(kw_only=True)
class Event:
    """Base of every event: when (the stack's clock), and which call (labels, attempt)."""

    name: ClassVar[str] = "event"
    time: float
    labels: Mapping[str, str] = attrs.field(factory=dict)
    attempt: int = 0


EventSink = Callable[[Event], None]


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
class RateLimitWaited(Event):
    """The call waited ``waited`` seconds for quota under ``key`` (requests and tokens)."""

    name: ClassVar[str] = "ratelimit.waited"
    key: str
    waited: float
    tokens: int


@attrs.frozen(kw_only=True)
class RateLimitPaused(Event):
    """A 429 paused ``key`` until ``until``; ``capped`` if the server asked for longer."""

    name: ClassVar[str] = "ratelimit.paused"
    key: str
    until: float
    requested: float | None
    capped: bool


@attrs.frozen(kw_only=True)
class RateLimitColdStart(Event):
    """``key``'s first call: its per-minute buckets start at ``requests`` and ``tokens`` (None:
    no such limit), a share of the burst; ``resumed``: less what a previous run sent into
    the window."""

    name: ClassVar[str] = "ratelimit.cold_start"
    key: str
    requests: float | None
    tokens: float | None
    resumed: bool


@attrs.frozen(kw_only=True)
class RateLimitLearned(Event):
    """A response's ``x-ratelimit-*`` headers changed ``key``'s ``dimension``: a per-minute
    ``limit`` below the configured one (None: unchanged), or at cold start a fuller window
    than assumed, or (``scale``) how many of the provider's tokens one token of corral's
    estimate is, as its remaining-tokens showed; ``level``: what the bucket holds after."""

    name: ClassVar[str] = "ratelimit.learned"
    key: str
    dimension: str
    limit: float | None
    level: float
    scale: float | None = None


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


@attrs.frozen(kw_only=True)
class CacheHit(Event):
    name: ClassVar[str] = "cache.hit"


@attrs.frozen(kw_only=True)
class CacheMiss(Event):
    name: ClassVar[str] = "cache.miss"
    #: "absent", "store_error" (the store failed or froze: treated as a miss), "refresh" (the
    #: call skips the read), "bypass" (the call said so), "uncacheable" (its body is not JSON).
    reason: str = "absent"


@attrs.frozen(kw_only=True)
class CacheStored(Event):
    name: ClassVar[str] = "cache.stored"


@attrs.frozen(kw_only=True)
class SemanticCacheHit(Event):
    """A near-duplicate question's answer served the call: cosine ``score``."""

    name: ClassVar[str] = "semantic_cache.hit"
    score: float


@attrs.frozen(kw_only=True)
class SemanticCacheMiss(Event):
    """Nothing near enough: the best ``score`` found (0 for an empty scope)."""

    name: ClassVar[str] = "semantic_cache.miss"
    score: float


@attrs.frozen(kw_only=True)
class Truncated(Event):
    """Messages were dropped or trimmed to fit the model's context window."""

    name: ClassVar[str] = "truncate.fitted"
    tokens_before: int
    tokens_after: int
    dropped_messages: int


@attrs.frozen(kw_only=True)
class TransportResent(Event):
    """A reused connection died before any response byte; the request went again."""

    name: ClassVar[str] = "transport.resent"
    reason: str


@attrs.frozen(kw_only=True)
class RouteChosen(Event):
    """The router sends this attempt to ``deployment`` (``lane``: which key of its pool, as
    ``name#i``, never the key itself); ``reason``: the strategy or ``failover``."""

    name: ClassVar[str] = "router.chosen"
    deployment: str
    lane: str
    reason: str


@attrs.frozen(kw_only=True)
class FailedOver(Event):
    """The attempt on ``deployment`` failed with ``kind``; the call moves to another one at
    once (``reason``: ``unavailable``, ``rate_limited`` or ``context_window``)."""

    name: ClassVar[str] = "router.failover"
    deployment: str
    kind: str
    reason: str


@attrs.frozen(kw_only=True)
class CooledDown(Event):
    """``deployment`` (``lane``) takes no calls until ``until``: ``kind`` failed it
    ``failures`` times in a row; after ``until`` one probe call decides."""

    name: ClassVar[str] = "router.cooldown"
    deployment: str
    lane: str
    kind: str
    failures: int
    until: float


@attrs.frozen(kw_only=True)
class RouteWaited(Event):
    """No deployment that serves the call could take it; it waited ``waited`` seconds for the
    first to come back."""

    name: ClassVar[str] = "router.waited"
    waited: float


@attrs.frozen(kw_only=True)
class BudgetReserved(Event):
    """``usd`` (the call's most: prompt estimate and maximum output) is held against the
    cap ``cap``; ``spent`` and ``reserved`` after the hold, across every process."""

    name: ClassVar[str] = "budget.reserved"
    usd: float
    spent: float
    reserved: float
    cap: float


@attrs.frozen(kw_only=True)
class BudgetSettled(Event):
    """The hold of ``reserved`` USD became the real cost ``usd`` (0 for an unbilled error)."""

    name: ClassVar[str] = "budget.settled"
    reserved: float
    usd: float


@attrs.frozen(kw_only=True)
class BudgetRefused(Event):
    """The call needs ``usd`` but only ``free`` is left under the cap: it is not sent."""

    name: ClassVar[str] = "budget.refused"
    usd: float
    free: float
    cap: float


def event_fields(event: Event) -> dict[str, Any]:
    """The event as plain JSON-ready fields, ``event`` first (for logs and trace files)."""
    fields: dict[str, Any] = {"event": event.name}
    for field in attrs.fields(type(event)):
        value = getattr(event, field.name)
        fields[field.name] = dict(value) if field.name == "labels" else value
    return fields
