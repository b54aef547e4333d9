"""Middleware: each module holds a pure policy and the thin anyio shell that carries it out.

The shells (``RateLimit``, ``Retry``...) are what a stack lists; the policies and their typed
decisions are public too, for property tests and simulations. ``SharedRateLimit`` needs the
``redis`` extra and ``SemanticCache`` an embedding model; both load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from corral.middleware._ratelimit import PausePolicy, RateLimit, RateLimitConfig, RateLimitPolicy
from corral.middleware._retry import GiveUp, Retry, RetryAfter, RetryBudget, RetryPolicy
from corral.middleware._router import (
    CooldownPolicy,
    Deployment,
    NoDeployment,
    RoutePolicy,
    Router,
    RouterConfig,
)
from corral.middleware._truncate import Truncate, fit_messages

if TYPE_CHECKING:
    from corral.middleware._semantic_cache import SemanticCache
    from corral.middleware._shared_ratelimit import SharedRateLimit

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

_LAZY = {
    "SharedRateLimit": "corral.middleware._shared_ratelimit",
    "SemanticCache": "corral.middleware._semantic_cache",
}


def __getattr__(name: str) -> Any:
    """Middleware with optional dependencies load when first named."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corral.middleware' has no attribute {name!r}")
