"""corral: call OpenAI-compatible APIs at scale, within limits, without losing work.

The names here are the public API; modules whose names start with ``_`` are implementation.
``corral.core`` is the sans-IO layer (values, wire format, errors, events), ``corral.middleware``
and ``corral.transports`` the layers a stack is built from, ``corral.batch`` the resumable batch
runner, ``corral.observe`` the event sinks, ``corral.testing`` the emulator.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from corral._client import Client, MapResult, SyncClient, default_middleware
from corral._deployments import load_router
from corral.core import (
    CacheMode,
    Headers,
    Request,
    RequestOptions,
    Response,
    Timeouts,
    build_stack,
    errors,
    events,
)
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
from corral.middleware import (
    Budget,
    BudgetExceeded,
    Cache,
    CircuitBreaker,
    ConcurrencyLimit,
    Deadline,
    Deployment,
    Metrics,
    NoDeployment,
    RateLimit,
    Retry,
    Router,
    Truncate,
)
from corral.transports import H11Transport, MemoryTransport

if TYPE_CHECKING:
    from corral.batch import BatchJob, run_job
    from corral.middleware import SemanticCache, SharedRateLimit
    from corral.transports import AiohttpTransport, HttpxTransport

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

_LAZY = {
    "HttpxTransport": "corral.transports",
    "AiohttpTransport": "corral.transports",
    "SharedRateLimit": "corral.middleware",
    "SemanticCache": "corral.middleware",
    "BatchJob": "corral.batch",
    "run_job": "corral.batch",
}


def __getattr__(name: str) -> Any:
    """Names that need an optional extra, or are only for batch runs, load on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
