"""``AiohttpTransport``: a corral transport over an ``aiohttp.ClientSession`` (asyncio only).

The contract of ``transports.base`` holds here too. aiohttp has no write timeout and restarts its
read timer on every ``1xx``, so one cancel scope per attempt bounds both: the request body is
handed to aiohttp as a one-piece async iterator, whose first pull starts the write phase and
whose last (aiohttp pulls again only once the piece is written and drained) starts the read
phase; that also makes ``request_sent`` exact. Bodies are asked for as ``identity`` and never
inflated (``auto_decompress=False``), and read up to ``max_response_bytes``.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiohttp

from corral._clock import current_time
from corral.core import _errors as errors
from corral.core._headers import Headers
from corral.core._models import Request, Response, Timeouts, Timing
from corral.transports._base import (
    DEFAULT_MAX_RESPONSE_BYTES,
    BodyLimit,
    PhaseWatch,
    check_head,
    connect_failure,
    drain,
    scrub,
)

__all__ = ["AiohttpTransport"]


def map_aiohttp_error(
    exc: BaseException, *, request_sent: bool, tls: bool = False
) -> errors.TransportError:
    """The corral error for an aiohttp exception."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return errors.ConnectTimeout(text)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return errors.ReadTimeout(text, request_sent=request_sent)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return connect_failure(text, exc, tls=tls)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return errors.RemoteProtocolError(text, request_sent=request_sent)
    if isinstance(exc, aiohttp.ClientResponseError):
        return errors.RemoteProtocolError(text, request_sent=request_sent)
    return errors.ReadError(text, request_sent=request_sent)


@functools.lru_cache(maxsize=64)
def _client_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    # The write timeout and the head's total read time are the transport's own cancel scope;
    # aiohttp's ``connect`` covers the wait for a pooled connection.
    pool_and_connect = None if t.pool is None or t.connect is None else t.pool + t.connect
    return aiohttp.ClientTimeout(
        total=None, connect=pool_and_connect, sock_connect=t.connect, sock_read=t.read
    )


class AiohttpTransport:
    """Sends corral requests with aiohttp. Raises ``InvalidInput`` when used outside asyncio."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        timeouts: Timeouts | None = None,
        max_connections: int = 100,
        max_per_host: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        clock: Callable[[], float] = current_time,
    ) -> None:
        self._timeouts = timeouts or Timeouts()
        self._session = session
        self._owns_session = session is None
        self._limits = (max_connections, max_per_host)
        self._ssl_context = ssl_context
        self._clock = clock
        self._max_response_bytes = max_response_bytes

    def _get_session(self) -> aiohttp.ClientSession:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise errors.InvalidInput(
                "AiohttpTransport runs only under asyncio; use H11Transport or HttpxTransport "
                "with trio"
            ) from None
        if self._session is None:
            limit, per_host = self._limits
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=limit, limit_per_host=per_host, ssl=self._ssl_context or True
                ),
                timeout=_client_timeout(self._timeouts),
                auto_decompress=False,
            )
        return self._session

    async def __call__(self, request: Request) -> Response:
        """Send ``request`` on the session and return once the response head arrives; aiohttp's
        exceptions come out as corral's typed errors."""
        session = self._get_session()
        request.headers.raw()  # InvalidInput for a bad header, as on every transport (cached)
        timeouts = request.options.timeouts or self._timeouts
        started = self._clock()
        headers = list(request.headers.items())
        if "accept-encoding" not in request.headers:
            headers.append(("accept-encoding", "identity"))
        watch = PhaseWatch()  # pool and connect: aiohttp's own timers
        data: Any = None
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            headers.append(("content-length", str(len(request.body))))
            data = _timed_body(request.body, watch, timeouts)
        else:  # nothing to time the write by: one bound for the whole wait for the head
            watch.start("read", _total(timeouts))
        reply = None
        try:
            with watch.attempt_scope():
                reply = await session.request(
                    request.method,
                    request.url,
                    headers=headers,
                    data=data,
                    timeout=_client_timeout(timeouts),
                    allow_redirects=False,  # corral never follows redirects (see transports/base)
                    auto_decompress=False,
                )
        except aiohttp.InvalidURL as exc:
            raise errors.InvalidInput(f"bad URL {request.url!r}: {exc}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = map_aiohttp_error(
                exc, request_sent=watch.request_sent, tls=request.url.startswith("https:")
            )
            raise scrub(error, request.headers) from None
        if reply is None:
            raise watch.error()
        got = Headers(reply.headers.items())
        timing = Timing(started, first_byte=self._clock())
        body = _Body(reply, request.headers, self._max_response_bytes)
        try:
            check_head(reply.status, got, self._max_response_bytes)
        except errors.CorralError:
            reply.close()
            raise
        if request.options.stream:
            return Response(reply.status, got, stream=body, timing=timing)
        content = await body.read_all()
        return Response(
            reply.status, got, content, timing=Timing(started, timing.first_byte, self._clock())
        )

    async def aclose(self) -> None:
        """Close the session if this transport made it; a session passed in stays open for its
        owner."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AiohttpTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _total(t: Timeouts) -> float | None:
    parts = (t.pool, t.connect, t.write, t.read)
    return None if None in parts else sum(p for p in parts if p is not None)


async def _timed_body(body: bytes, watch: PhaseWatch, timeouts: Timeouts) -> AsyncIterator[bytes]:
    """The body in one piece; aiohttp pulls again only after writing and draining it."""
    watch.start("write", timeouts.write)
    yield body
    watch.start("read", timeouts.read)


class _Body:
    def __init__(self, reply: aiohttp.ClientResponse, request_headers: Headers, limit: int) -> None:
        self._reply = reply
        self._request_headers = request_headers
        self._limit = BodyLimit(limit)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def read_all(self) -> bytes:
        """The whole body, within the size cap."""
        return await drain(self._iterate())

    async def _iterate(self) -> AsyncGenerator[bytes, None]:
        complete = False
        try:
            async for chunk in self._reply.content.iter_any():
                self._limit.add(len(chunk))
                yield chunk
            complete = True
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = map_aiohttp_error(exc, request_sent=True)
            raise scrub(error, self._request_headers) from None
        finally:
            if complete:
                self._reply.release()
            else:
                self._reply.close()

    async def aclose(self) -> None:
        self._reply.close()
