"""The sans-IO core: values, wire format, SSE, errors. No sockets, no sleeping, no clock."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.core import _errors as errors
from corral.core._errors import *  # noqa: F403 - the error tree is part of the core API
from corral.core._errors import __all__ as _error_names
from corral.core._lazy import lazy_exports

if TYPE_CHECKING:
    from corral.core import _events as events
    from corral.core._classify import (
        classify,
        parse_duration,
        parse_retry_after,
        parse_should_retry,
    )
    from corral.core._compose import Clock, Handler, Middleware, build_stack, honours_deadline
    from corral.core._headers import Headers
    from corral.core._models import (
        ByteStream,
        CacheMode,
        Request,
        RequestOptions,
        Response,
        Timeouts,
        Timing,
    )
    from corral.core._quota import RateLimitHeaders, parse_rate_limit_headers
    from corral.core._sse import SSEEvent, SSEParser
    from corral.core._streaming import ChatChunk, ChatStreamDecoder
    from corral.core._wire import (
        ChatCompletion,
        Embeddings,
        Usage,
        api_request,
        decode_chat,
        decode_embeddings,
        decode_json,
        decode_models,
        raise_for_status,
    )

__all__ = [
    "ByteStream",
    "CacheMode",
    "ChatChunk",
    "ChatCompletion",
    "ChatStreamDecoder",
    "Clock",
    "Embeddings",
    "Handler",
    "Headers",
    "Middleware",
    "RateLimitHeaders",
    "Request",
    "RequestOptions",
    "Response",
    "SSEEvent",
    "SSEParser",
    "Timeouts",
    "Timing",
    "Usage",
    "api_request",
    "build_stack",
    "honours_deadline",
    "classify",
    "decode_chat",
    "decode_embeddings",
    "decode_json",
    "decode_models",
    "errors",
    "events",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "parse_should_retry",
    "raise_for_status",
    *_error_names,
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ["classify", "parse_duration", "parse_retry_after", "parse_should_retry"],
            "corral.core._classify",
        ),
        **dict.fromkeys(["RateLimitHeaders", "parse_rate_limit_headers"], "corral.core._quota"),
        **dict.fromkeys(
            ["Clock", "Handler", "Middleware", "build_stack", "honours_deadline"],
            "corral.core._compose",
        ),
        "Headers": "corral.core._headers",
        **dict.fromkeys(
            [
                "ByteStream",
                "CacheMode",
                "Request",
                "RequestOptions",
                "Response",
                "Timeouts",
                "Timing",
            ],
            "corral.core._models",
        ),
        **dict.fromkeys(["SSEEvent", "SSEParser"], "corral.core._sse"),
        **dict.fromkeys(["ChatChunk", "ChatStreamDecoder"], "corral.core._streaming"),
        **dict.fromkeys(
            [
                "ChatCompletion",
                "Embeddings",
                "Usage",
                "api_request",
                "decode_chat",
                "decode_embeddings",
                "decode_json",
                "decode_models",
                "raise_for_status",
            ],
            "corral.core._wire",
        ),
    },
    {"events": "corral.core._events"},
)
