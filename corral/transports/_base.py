"""What a transport is: the last handler of a stack, plus ``aclose``; and the rules every
transport applies the same way (phases and their timeouts, body size, encoding, scrubbing).

One contract, every transport:

- ``request_sent`` is False for an error in the pool, connect or write phase (the whole request
  had not left this process) and True once it had (the read phase, the body).
- An attempt's write phase is bounded by ``Timeouts.write`` and the wait for the response head
  by ``Timeouts.read`` in total, however many ``1xx`` responses come first.
- Bodies are asked for and read as ``identity`` (``Accept-Encoding: identity``), never inflated:
  a compressed body is refused with ``MalformedResponse``, so no decompression bomb can grow.
- A body over ``max_response_bytes`` (default 64 MiB) ends with ``ResponseTooLarge``.
- A credential of the request never appears in an error message, whatever the server echoes.
"""

from __future__ import annotations

import functools
import math
import ssl
from collections.abc import AsyncGenerator, Awaitable
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import anyio
import attrs

from corral._clock import current_time
from corral._scopes import new_scope
from corral.core import _errors as errors
from corral.core._errors import InvalidInput
from corral.core._headers import SENSITIVE_HEADERS, Headers
from corral.core._models import Request, Response

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "BodyLimit",
    "Origin",
    "PhaseWatch",
    "Transport",
    "check_head",
    "connect_failure",
    "scrub",
    "split_url",
]

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024

T = TypeVar("T")

_TIMEOUTS: dict[str, type[errors.APITimeoutError]] = {
    "pool": errors.PoolTimeout,
    "connect": errors.ConnectTimeout,
    "write": errors.WriteTimeout,
    "read": errors.ReadTimeout,
}


class Transport(Protocol):
    """Sends one request. Must raise only corral errors (``TransportError`` for the wire).

    Transports never follow redirects: a 3xx comes back as it is, so a credential is never
    re-sent to a host the caller did not name. (An API that redirects is misconfigured; point
    ``base_url`` at the final location.)
    """

    async def __call__(self, request: Request) -> Response:
        """Send ``request`` and return the response as soon as its head arrives (the body may
        still be streaming); wire failures raise typed ``TransportError``s."""

    async def aclose(self) -> None:
        """Close pooled connections and any client the transport created, so no socket outlives
        it."""


@attrs.frozen
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @functools.cached_property
    def host_bytes(self) -> bytes:
        """The Host header as sent (IDNA for a non-ASCII name); computed once per origin."""
        return self.host_header.encode("idna")


@functools.lru_cache(maxsize=512)
def split_url(url: str) -> tuple[Origin, str]:
    """(origin, request-target) of an absolute http(s) URL; ``InvalidInput`` names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"URL scheme must be http or https, got {parts.scheme!r} in {url!r}")
    if not parts.hostname:
        raise InvalidInput(f"URL has no host: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput(f"URL has a bad port: {url!r}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Origin(parts.scheme, parts.hostname, port), target


class PhaseWatch:
    """The phase (pool, connect, write, read) an attempt is in, and its time limit.

    Scoped (the default): one cancel scope for the whole attempt, whose deadline moves with the
    phase; moving a deadline costs almost nothing, a scope per socket operation costs CPU.
    Unscoped (``scoped=False``, for a transport whose reads take a deadline of their own, like
    ``AsyncioStream.receive_until``): no scope per attempt at all; ``until`` is the current
    phase's deadline for such reads, and the rare other waits (a pool slot, a connect, a full
    send buffer) go through ``wait``, which gives them a scope of their own.

    ``deadline``: the call's own (``request.options.deadline``); a phase ends at the earlier of
    it and its timeout, with ``DeadlineExceeded`` when the deadline was the earlier.
    """

    __slots__ = ("by_deadline", "deadline", "limit", "phase", "scope", "until")

    def __init__(
        self, phase: str = "pool", *, scoped: bool = True, deadline: float | None = None
    ) -> None:
        self.scope = new_scope() if scoped else None
        self.phase = phase
        self.limit: float | None = None
        self.until: float | None = None
        self.deadline = math.inf if deadline is None else deadline
        self.by_deadline = False

    def start(self, phase: str, seconds: float | None) -> None:
        self.phase, self.limit = phase, seconds
        end = math.inf if seconds is None else current_time() + seconds
        self.by_deadline = self.deadline < end
        if self.by_deadline:
            end = self.deadline
        if self.scope is not None:
            self.scope.deadline = end
        else:
            self.until = None if end == math.inf else end

    async def wait(self, phase: str, seconds: float | None, awaitable: Awaitable[T]) -> T:
        """``awaitable`` under the limit of ``phase`` (which starts now)."""
        self.start(phase, seconds)
        if self.scope is not None:  # the attempt's scope times it
            return await awaitable
        with anyio.CancelScope(deadline=math.inf if self.until is None else self.until):
            return await awaitable
        raise self.error()  # reached only when that scope's deadline fired

    def attempt_scope(self) -> anyio.CancelScope:
        """The scope that times a scoped watch's whole attempt (enter it around the attempt)."""
        assert self.scope is not None, "an unscoped PhaseWatch times each wait on its own"
        return self.scope

    @property
    def request_sent(self) -> bool:
        return self.phase == "read"

    def error(self) -> errors.APITimeoutError | errors.DeadlineExceeded:
        """The timeout of the phase whose deadline fired, or the call's deadline."""
        if self.by_deadline:
            return errors.DeadlineExceeded(
                f"the call did not finish within its deadline ({self.phase} phase)"
            )
        kind = _TIMEOUTS[self.phase]
        return kind(f"{self.phase} phase took over {self.limit}s", request_sent=self.request_sent)


class BodyLimit:
    """Counts body bytes; ``ResponseTooLarge`` once they pass ``limit``."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, 0

    def add(self, size: int) -> None:
        self.seen += size
        if self.seen > self.limit:
            raise _too_large(self.limit)


def _too_large(limit: int) -> errors.ResponseTooLarge:
    return errors.ResponseTooLarge(
        f"response body over max_response_bytes ({limit} bytes); raise the transport's "
        "max_response_bytes if this answer is expected"
    )


def check_head(status: int, headers: Headers, limit: int) -> None:
    """Refuse, before reading a byte of body, one that is encoded or announced over ``limit``."""
    encoding = headers.get("content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise errors.MalformedResponse(
            f"the server sent a {encoding!r}-encoded body although corral asked for "
            "Accept-Encoding: identity; corral never inflates bodies (no bound could hold "
            "against a decompression bomb)",
            status=status,
        )
    length = headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _too_large(limit)


def scrub(exc: errors.CorralError, headers: Headers) -> errors.CorralError:
    """Remove the request's credentials from ``exc``'s message (a server may echo them)."""
    text = exc.message
    for name in SENSITIVE_HEADERS:
        value = headers.get(name)
        if not value:
            continue
        token = value.partition(" ")[2]
        for secret in (value, token):
            if len(secret) >= 4:
                text = text.replace(secret, "[redacted]")
    if text != exc.message:
        exc.message = text
        exc.args = (text,)
    return exc


_CUT_OFF = (
    ConnectionResetError,
    ConnectionAbortedError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
)


def connect_failure(text: str, exc: BaseException, *, tls: bool) -> errors.ConnectError:
    """``ConnectError`` with ``text``; ``WrongScheme`` when the peer did not speak TLS.

    A plain-HTTP server answers a ClientHello with a 400 (an SSL "wrong version number") or
    closes the connection; either way the likely mistake is the URL's scheme.
    """
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    not_tls = any(
        isinstance(c, ssl.SSLError) and not isinstance(c, ssl.SSLCertVerificationError)
        for c in chain
    )
    hint = (
        " (the server did not answer TLS: is it a plain-HTTP server? check the URL "
        "scheme, http:// vs https://)"
    )
    if tls and not_tls:  # it answered, but not in TLS: the same on every try
        return errors.WrongScheme(text + hint)
    if tls and any(isinstance(c, _CUT_OFF) for c in chain):  # maybe, maybe a passing reset
        return errors.ConnectError(text + hint)
    return errors.ConnectError(text)


async def drain(pieces: AsyncGenerator[bytes, None]) -> bytes:
    """Join a body's pieces, closing the generator however the reading ends."""
    try:
        return b"".join([chunk async for chunk in pieces])
    finally:
        await pieces.aclose()
