"""The immutable values that flow through a stack: ``Request`` in, ``Response`` out."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from corral.core import _jsonlib as jsonlib
from corral.core._call import Call
from corral.core._classify import classify
from corral.core._errors import APIError, InvalidInput
from corral.core._headers import Headers

__all__ = [
    "ByteStream",
    "CacheMode",
    "Request",
    "RequestOptions",
    "Response",
    "Timeouts",
    "Timing",
]


def _headers(value: Any) -> Headers:
    return value if type(value) is Headers or isinstance(value, Headers) else Headers(value)


@runtime_checkable
class ByteStream(Protocol):
    """A response body that arrives in pieces. Close it if you stop reading early."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None:
        """Release the connection under the stream; call it when you stop reading before the end."""


class CacheMode(enum.Enum):
    """What the cache middleware may do for one call."""

    USE = "use"  #: read a fresh entry if there is one, store a new success
    BYPASS = "bypass"  #: neither read nor write
    REFRESH = "refresh"  #: skip the read, store the new success


def _seconds(_: object, field: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidInput(f"Timeouts.{field.name} must be seconds > 0 or None, got {value!r}")


@attrs.frozen
class Timeouts:
    """Seconds allowed for each phase of one attempt; ``None`` waits forever. A value that is
    not a positive number (0, negative, NaN) is refused with ``InvalidInput`` naming it."""

    connect: float | None = attrs.field(default=10.0, validator=_seconds)
    read: float | None = attrs.field(default=600.0, validator=_seconds)
    write: float | None = attrs.field(default=30.0, validator=_seconds)
    pool: float | None = attrs.field(default=30.0, validator=_seconds)


@attrs.frozen
class RequestOptions:
    """Typed per-call facts that middleware reads; never sent on the wire."""

    model: str | None = None
    #: Does the caller want the body as it arrives (SSE)?
    stream: bool = False
    #: Tokens this call will be charged before it is sent (prompt + max output), for rate limits.
    estimated_tokens: int | None = None
    #: Absolute time on the stack's clock after which the call must give up.
    deadline: float | None = None
    cache: CacheMode = CacheMode.USE
    timeouts: Timeouts | None = None
    #: Free-form labels (a batch's custom_id, say) for metrics and logs. Never secrets.
    labels: Mapping[str, str] = attrs.field(factory=dict)
    #: The call's shared facts and its event sink (call.py); one per call, all attempts.
    call: Call = attrs.field(
        eq=False,
        default=attrs.Factory(lambda self: Call(labels=self.labels), takes_self=True),
    )


@attrs.frozen(repr=False)
class Request:
    """One HTTP request plus the options middleware acts on."""

    method: str
    url: str
    headers: Headers = attrs.field(factory=Headers, converter=_headers)
    body: bytes = b""
    options: RequestOptions = attrs.field(factory=RequestOptions)

    def evolve(self, **changes: Any) -> Request:
        """A copy with ``changes`` to its fields (requests are frozen, so layers change copies)."""
        return attrs.evolve(self, **changes)

    def with_options(self, **changes: Any) -> Request:
        """A copy with ``changes`` to its options (model, deadline, cache mode, timeouts...)."""
        return attrs.evolve(self, options=attrs.evolve(self.options, **changes))

    def with_deadline(self, deadline: float | None) -> Request:
        """``with_options(deadline=...)`` without attrs.evolve's introspection (a hot path)."""
        o = self.options
        options = RequestOptions(
            o.model, o.stream, o.estimated_tokens, deadline, o.cache, o.timeouts, o.labels, o.call
        )
        return Request(self.method, self.url, self.headers, self.body, options)

    def __repr__(self) -> str:
        # Headers redact credentials; the body is summarised so prompts do not fill logs.
        return (
            f"Request({self.method} {self.url}, headers={self.headers!r}, "
            f"body=<{len(self.body)} bytes>, options={self.options!r})"
        )


@attrs.frozen
class Timing:
    """Clock readings (the stack's clock) for one attempt on the wire."""

    started: float
    first_byte: float | None = None
    ended: float | None = None


@attrs.frozen(repr=False)
class Response:
    """An HTTP response; ``stream`` is set instead of ``body`` when the request asked to stream."""

    status: int
    headers: Headers = attrs.field(factory=Headers, converter=_headers)
    body: bytes = b""
    stream: ByteStream | None = attrs.field(default=None, eq=False)
    timing: Timing | None = attrs.field(default=None, eq=False)
    #: Set by the cache middleware when this came from a store rather than the network.
    from_cache: bool = False
    #: Parsed forms of ``body`` (JSON, usage), computed once however many layers ask.
    _parsed: dict[str, Any] = attrs.field(factory=dict, eq=False, init=False, repr=False)

    def json(self) -> Any:
        """``body`` parsed as JSON (cached); raises a ``jsonlib.JSONDecodeError`` type."""
        if "json" not in self._parsed:
            self._parsed["json"] = jsonlib.loads(self.body)
        return self._parsed["json"]

    def error(self) -> APIError | None:
        """The error this response stands for (``classify``), computed once; None for 1xx-3xx.

        For the stack's decisions (retry, breaker, overload): its text is not scrubbed of the
        caller's key, so users get ``Client.error_for`` instead. A streamed error body must be
        read (``aread``) first.
        """
        if self.status < 400:
            return None
        if "error" not in self._parsed:
            self._parsed["error"] = classify(self.status, self.headers, self.body)
        error: APIError | None = self._parsed["error"]
        return error

    @property
    def request_id(self) -> str | None:
        """The provider's id for this request, from whichever header it uses, to quote to its
        support."""
        h = self.headers
        return h.get("x-request-id") or h.get("request-id") or h.get("openai-request-id")

    async def aread(self) -> Response:
        """Drain ``stream`` into ``body`` and return the buffered copy."""
        if self.stream is None:
            return self
        chunks = []
        try:
            async for chunk in self.stream:
                chunks.append(chunk)
        finally:
            await self.stream.aclose()
        return attrs.evolve(self, body=b"".join(chunks), stream=None)

    async def aclose(self) -> None:
        """Close the body stream, if any, so its connection goes back to the pool or is dropped."""
        if self.stream is not None:
            await self.stream.aclose()

    def __repr__(self) -> str:
        kind = "stream" if self.stream is not None else f"<{len(self.body)} bytes>"
        return f"Response({self.status}, headers={self.headers!r}, body={kind})"
