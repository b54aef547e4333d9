"""Middleware: each module holds a pure policy and the thin anyio shell that carries it out.

The shells (``RateLimit``, ``Retry``...) are what a stack lists; the policies and their typed
decisions are public too, for property tests and simulations. ``SharedRateLimit`` needs the
``redis`` extra and ``SemanticCache`` an embedding model. Every name loads its module on first
use, so a program pays only for the layers it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.core._lazy import lazy_exports

if TYPE_CHECKING:
    from corral.middleware._breaker import BreakerConfig, BreakerPolicy, CircuitBreaker
    from corral.middleware._budget import (
        Budget,
        BudgetExceeded,
        BudgetPolicy,
        BudgetUnavailable,
    )
    from corral.middleware._cache import Cache, CacheRules
    from corral.middleware._concurrency import AIMDPolicy, ConcurrencyConfig, ConcurrencyLimit
    from corral.middleware._deadline import Deadline
    from corral.middleware._metrics import Aggregator, Metrics, Price
    from corral.middleware._prices import PriceTable
    from corral.middleware._ratelimit import (
        PausePolicy,
        RateLimit,
        RateLimitConfig,
        RateLimitPolicy,
    )
    from corral.middleware._retry import GiveUp, Retry, RetryAfter, RetryBudget, RetryPolicy
    from corral.middleware._router import (
        CooldownPolicy,
        Deployment,
        NoDeployment,
        RoutePolicy,
        Router,
        RouterConfig,
    )
    from corral.middleware._semantic_cache import SemanticCache
    from corral.middleware._shared_ratelimit import SharedRateLimit
    from corral.middleware._truncate import Truncate, fit_messages

__all__ = [
    "AIMDPolicy",
    "Aggregator",
    "BreakerConfig",
    "BreakerPolicy",
    "Budget",
    "BudgetExceeded",
    "BudgetPolicy",
    "BudgetUnavailable",
    "Cache",
    "CacheRules",
    "CircuitBreaker",
    "ConcurrencyConfig",
    "ConcurrencyLimit",
    "CooldownPolicy",
    "Deadline",
    "Deployment",
    "GiveUp",
    "Metrics",
    "NoDeployment",
    "PausePolicy",
    "Price",
    "PriceTable",
    "RateLimit",
    "RateLimitConfig",
    "RateLimitPolicy",
    "Retry",
    "RetryAfter",
    "RetryBudget",
    "RetryPolicy",
    "RoutePolicy",
    "Router",
    "RouterConfig",
    "SemanticCache",
    "SharedRateLimit",
    "Truncate",
    "fit_messages",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ["BreakerConfig", "BreakerPolicy", "CircuitBreaker"], f"{__name__}._breaker"
        ),
        **dict.fromkeys(
            ["Budget", "BudgetExceeded", "BudgetPolicy", "BudgetUnavailable"], f"{__name__}._budget"
        ),
        **dict.fromkeys(["Cache", "CacheRules"], f"{__name__}._cache"),
        **dict.fromkeys(
            ["AIMDPolicy", "ConcurrencyConfig", "ConcurrencyLimit"], f"{__name__}._concurrency"
        ),
        "Deadline": f"{__name__}._deadline",
        **dict.fromkeys(["Aggregator", "Metrics", "Price"], f"{__name__}._metrics"),
        "PriceTable": f"{__name__}._prices",
        **dict.fromkeys(
            ["PausePolicy", "RateLimit", "RateLimitConfig", "RateLimitPolicy"],
            f"{__name__}._ratelimit",
        ),
        **dict.fromkeys(
            ["GiveUp", "Retry", "RetryAfter", "RetryBudget", "RetryPolicy"], f"{__name__}._retry"
        ),
        **dict.fromkeys(
            [
                "CooldownPolicy",
                "Deployment",
                "NoDeployment",
                "RoutePolicy",
                "Router",
                "RouterConfig",
            ],
            f"{__name__}._router",
        ),
        "SemanticCache": f"{__name__}._semantic_cache",
        "SharedRateLimit": f"{__name__}._shared_ratelimit",
        **dict.fromkeys(["Truncate", "fit_messages"], f"{__name__}._truncate"),
    },
)
