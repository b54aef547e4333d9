"""corral: call OpenAI-compatible APIs at scale, within limits, without losing work.

The names here are the public API; modules whose names start with ``_`` are implementation.
``corral.core`` is the sans-IO layer (values, wire format, errors, events), ``corral.middleware``
and ``corral.transports`` the layers a stack is built from, ``corral.batch`` the resumable batch
runner, ``corral.observe`` the event sinks, ``corral.testing`` the emulator.

``import corral`` loads what building a ``Client`` with the default stack needs; every other name
(routing, the rate limiter, the cache, the batch runner, the transports) loads its module on
first use (issue 15), so a script pays only for the paths it takes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from corral._client import Client, SyncClient, default_middleware
from corral.core import errors
from corral.core._compose import build_stack
from corral.core._errors import (
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CircuitOpen,
    ConnectError,
    ContextLengthExceeded,
    CorralError,
    DeadlineExceeded,
    InvalidInput,
    MalformedResponse,
    NotFoundError,
    RateLimitError,
    ServerError,
    TransportError,
)
from corral.core._headers import Headers
from corral.core._lazy import lazy_exports
from corral.core._models import CacheMode, Request, RequestOptions, Response, Timeouts
from corral.middleware._breaker import CircuitBreaker
from corral.middleware._concurrency import ConcurrencyLimit
from corral.middleware._deadline import Deadline
from corral.middleware._metrics import Metrics
from corral.middleware._retry import Retry

if TYPE_CHECKING:
    from corral._deployments import load_router
    from corral._mapping import MapResult
    from corral.batch import BatchJob, run_job
    from corral.core import events
    from corral.middleware import (
        Budget,
        BudgetExceeded,
        Cache,
        Deployment,
        NoDeployment,
        RateLimit,
        Router,
        SemanticCache,
        SharedRateLimit,
        Truncate,
    )
    from corral.transports import AiohttpTransport, H11Transport, HttpxTransport, MemoryTransport

__all__ = [
    "APIError",
    "APITimeoutError",
    "AiohttpTransport",
    "AuthenticationError",
    "BadRequestError",
    "BatchJob",
    "Budget",
    "BudgetExceeded",
    "Cache",
    "CacheMode",
    "CircuitBreaker",
    "CircuitOpen",
    "Client",
    "ConcurrencyLimit",
    "ConnectError",
    "ContextLengthExceeded",
    "CorralError",
    "Deadline",
    "DeadlineExceeded",
    "Deployment",
    "H11Transport",
    "Headers",
    "HttpxTransport",
    "InvalidInput",
    "MalformedResponse",
    "MapResult",
    "MemoryTransport",
    "Metrics",
    "NoDeployment",
    "NotFoundError",
    "RateLimit",
    "RateLimitError",
    "Request",
    "RequestOptions",
    "Response",
    "Retry",
    "Router",
    "SemanticCache",
    "ServerError",
    "SharedRateLimit",
    "SyncClient",
    "Timeouts",
    "TransportError",
    "Truncate",
    "__version__",
    "build_stack",
    "default_middleware",
    "errors",
    "events",
    "load_router",
    "run_job",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "load_router": "corral._deployments",
        "MapResult": "corral._mapping",
        **dict.fromkeys(["BatchJob", "run_job"], "corral.batch"),
        **dict.fromkeys(
            [
                "Budget",
                "BudgetExceeded",
                "Cache",
                "Deployment",
                "NoDeployment",
                "RateLimit",
                "Router",
                "SemanticCache",
                "SharedRateLimit",
                "Truncate",
            ],
            "corral.middleware",
        ),
        **dict.fromkeys(
            ["AiohttpTransport", "H11Transport", "HttpxTransport", "MemoryTransport"],
            "corral.transports",
        ),
    },
    {"events": "corral.core._events"},
)
