"""What the stack decided, as frozen values: the record of why a call waited, retried, hit the
cache, failed over or stopped.

Every policy decision that changes what happens to a call becomes one event. A stack has one
sink (``EventSink``: a plain function taking an event); the shells hand each event to the
call's sink, and build it only when there is a sink, so a stack without one pays one ``if``.
Sinks live in ``corral.observe``: structured logging, OpenTelemetry span events, and a JSONL
trace file (``corral run --trace FILE``).

Events never carry secrets: no headers, no bodies, only kinds, numbers and the call's labels
(a batch's custom_id).

An event type is an attrs class, built when its module loads, and most programs never see
most of them. So only the base and ``TransportResent`` (the H11 transport imports it) are
defined here; the default stack's decisions (retry, breaker, adaptive limit) live in
``_stack_events`` and those of the layers a stack adds (rate limit, cache, truncation, routing,
budget) in ``_optional_events``. Both load with the first use of one of their names from this
module, so ``import corral`` does not build classes it may never need (issue 15).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from corral.core._lazy import lazy_exports

if TYPE_CHECKING:
    from corral.core._optional_events import (
        BudgetRefused,
        BudgetReserved,
        BudgetSettled,
        CacheHit,
        CacheMiss,
        CacheStored,
        CooledDown,
        FailedOver,
        RateLimitColdStart,
        RateLimitLearned,
        RateLimitPaused,
        RateLimitWaited,
        RouteChosen,
        RouteWaited,
        SemanticCacheHit,
        SemanticCacheMiss,
        Truncated,
    )
    from corral.core._stack_events import (
        BreakerClosed,
        BreakerOpened,
        BreakerRefused,
        ConcurrencyChanged,
        GaveUp,
        RetryScheduled,
    )

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
class TransportResent(Event):
    """A reused connection died before any response byte; the request went again."""

    name: ClassVar[str] = "transport.resent"
    reason: str


def event_fields(event: Event) -> dict[str, Any]:
    """The event as plain JSON-ready fields, ``event`` first (for logs and trace files)."""
    fields: dict[str, Any] = {"event": event.name}
    for field in attrs.fields(type(event)):
        value = getattr(event, field.name)
        fields[field.name] = dict(value) if field.name == "labels" else value
    return fields


__getattr__, __dir__ = lazy_exports(
    __name__,
    dict.fromkeys(
        [
            "BreakerClosed",
            "BreakerOpened",
            "BreakerRefused",
            "ConcurrencyChanged",
            "GaveUp",
            "RetryScheduled",
        ],
        "corral.core._stack_events",
    )
    | dict.fromkeys(
        [
            "BudgetRefused",
            "BudgetReserved",
            "BudgetSettled",
            "CacheHit",
            "CacheMiss",
            "CacheStored",
            "CooledDown",
            "FailedOver",
            "RateLimitColdStart",
            "RateLimitLearned",
            "RateLimitPaused",
            "RateLimitWaited",
            "RouteChosen",
            "RouteWaited",
            "SemanticCacheHit",
            "SemanticCacheMiss",
            "Truncated",
        ],
        "corral.core._optional_events",
    ),
)
