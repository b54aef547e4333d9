"""``AiohttpTransport``: a corral transport over an ``aiohttp.ClientSession`` (asyncio only)."""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator, Callable

import aiohttp

from corral.core import errors
from corral.core.compose import current_time
from corral.core.headers import Headers
from corral.core.models import Request, Response, Timeouts, Timing

__all__ = ["AiohttpTransport"]


def map_aiohttp_error(exc: BaseException, *, request_sent: bool) -> errors.TransportError:
    """The corral error for an aiohttp exception."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return errors.ConnectTimeout(text)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return errors.ReadTimeout(text, request_sent=request_sent)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return errors.ConnectError(text)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return errors.RemoteProtocolError(text, request_sent=request_sent)
    if isinstance(exc, aiohttp.ClientResponseError):
        return errors.RemoteProtocolError(text, request_sent=request_sent)
    return errors.ReadError(text, request_sent=request_sent)


@functools.lru_cache(maxsize=64)
def _client_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    # aiohttp has no write timeout; its ``connect`` covers the wait for a pooled connection.
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
        clock: Callable[[], float] = current_time,
    ) -> None:
        self._timeouts = timeouts or Timeouts()
        self._session = session
        self._owns_session = session is None
        self._limits = (max_connections, max_per_host)
        self._ssl_context = ssl_context
        self._clock = clock

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
            )
        return self._session

    async def __call__(self, request: Request) -> Response:
        session = self._get_session()
        request.headers.raw()  # InvalidInput for a bad header, as on every transport (cached)
        timeouts = request.options.timeouts or self._timeouts
        started = self._clock()
        try:
            reply = await session.request(
                request.method,
                request.url,
                headers=list(request.headers.items()),
                data=request.body or None,
                timeout=_client_timeout(timeouts),
                allow_redirects=False,  # corral never follows redirects (see transports/base)
            )
        except aiohttp.InvalidURL as exc:
            raise errors.InvalidInput(f"bad URL {request.url!r}: {exc}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise map_aiohttp_error(exc, request_sent=False) from None
        headers = Headers(reply.headers.items())
        timing = Timing(started, first_byte=self._clock())
        if request.options.stream:
            return Response(reply.status, headers, stream=_Body(reply), timing=timing)
        try:
            body = await reply.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise map_aiohttp_error(exc, request_sent=True) from None
        finally:
            reply.release()
        return Response(
            reply.status, headers, body, timing=Timing(started, timing.first_byte, self._clock())
        )

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AiohttpTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Body:
    def __init__(self, reply: aiohttp.ClientResponse) -> None:
        self._reply = reply

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._reply.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise map_aiohttp_error(exc, request_sent=True) from None
        finally:
            self._reply.release()

    async def aclose(self) -> None:
        self._reply.close()
