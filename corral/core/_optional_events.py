"""The events of the layers a stack adds beyond the default one: rate limit, cache, semantic
cache, truncation, routing and budget (``corral.core._events`` says what an event is, and
re-exports these; they load with the first use of one, issue 15)."""

from __future__ import annotations

from typing import ClassVar

import attrs

from corral.core._events import Event

__all__ = [
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
]


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
