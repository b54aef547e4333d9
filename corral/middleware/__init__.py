"""Middleware: each module holds a pure policy and the thin anyio shell that carries it out."""

from corral.middleware.breaker import BreakerPolicy, CircuitBreaker
from corral.middleware.concurrency import AIMDPolicy, ConcurrencyLimit
from corral.middleware.deadline import Deadline
from corral.middleware.ratelimit import RateLimit, RateLimitPolicy
from corral.middleware.retry import Retry, RetryBudget, RetryPolicy

__all__ = [
    "AIMDPolicy",
    "BreakerPolicy",
    "CircuitBreaker",
    "ConcurrencyLimit",
    "Deadline",
    "RateLimit",
    "RateLimitPolicy",
    "Retry",
    "RetryBudget",
    "RetryPolicy",
]
