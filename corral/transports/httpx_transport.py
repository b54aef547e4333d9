"""``HttpxTransport``: a corral transport over an ``httpx.AsyncClient`` (asyncio and trio)."""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable

import httpx

from corral.core import errors
from corral.core.compose import current_time
from corral.core.headers import Headers
from corral.core.models import Request, Response, Timeouts, Timing

__all__ = ["HttpxTransport"]

# Most specific first: httpx's timeouts subclass its TransportError too.
_ERROR_MAP: tuple[tuple[type[Exception], type[errors.TransportError]], ...] = (
    (httpx.ConnectTimeout, errors.ConnectTimeout),
    (httpx.ReadTimeout, errors.ReadTimeout),
    (httpx.WriteTimeout, errors.WriteTimeout),
    (httpx.PoolTimeout, errors.PoolTimeout),
    (httpx.ConnectError, errors.ConnectError),
    (httpx.ReadError, errors.ReadError),
    (httpx.WriteError, errors.WriteError),
    (httpx.RemoteProtocolError, errors.RemoteProtocolError),
    (httpx.TransportError, errors.NetworkError),
)


def map_httpx_error(exc: Exception, *, request_sent: bool) -> errors.TransportError:
    """The corral error for an httpx exception (backend errors never leak to users)."""
    for source, target in _ERROR_MAP:
        if isinstance(exc, source):
            sent = request_sent and target is not errors.ConnectError
            return target(f"{type(exc).__name__}: {exc}", request_sent=sent)
    return errors.NetworkError(f"{type(exc).__name__}: {exc}", request_sent=request_sent)


@functools.lru_cache(maxsize=64)
def _httpx_timeout(t: Timeouts) -> httpx.Timeout:
    return httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool)


class HttpxTransport:
    """Sends corral requests with httpx. Pass your own client to share its pool and settings."""

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        timeouts: Timeouts | None = None,
        max_connections: int = 100,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = current_time,
    ) -> None:
        self._timeouts = timeouts or Timeouts()
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=_httpx_timeout(self._timeouts),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            verify=ssl_context or True,
            follow_redirects=False,
        )
        self._clock = clock

    async def __call__(self, request: Request) -> Response:
        timeouts = request.options.timeouts or self._timeouts
        request.headers.raw()  # InvalidInput for a bad header, as on every transport (cached)
        started = self._clock()
        try:
            built = self._client.build_request(
                request.method,
                request.url,
                headers=list(request.headers.items()),
                content=request.body or None,
                timeout=_httpx_timeout(timeouts),
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise errors.InvalidInput(f"bad URL {request.url!r}: {exc}") from None
        try:
            reply = await self._client.send(built, stream=True)
        except httpx.UnsupportedProtocol as exc:
            raise errors.InvalidInput(f"bad URL {request.url!r}: {exc}") from None
        except httpx.TransportError as exc:
            raise map_httpx_error(exc, request_sent=False) from None
        headers = Headers(reply.headers.multi_items())
        timing = Timing(started, first_byte=self._clock())
        if request.options.stream:
            return Response(reply.status_code, headers, stream=_Body(reply), timing=timing)
        try:
            body = await reply.aread()
        except httpx.TransportError as exc:
            raise map_httpx_error(exc, request_sent=True) from None
        finally:
            await reply.aclose()
        return Response(
            reply.status_code,
            headers,
            body,
            timing=Timing(started, timing.first_byte, self._clock()),
        )

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> HttpxTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Body:
    def __init__(self, reply: httpx.Response) -> None:
        self._reply = reply

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._reply.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise map_httpx_error(exc, request_sent=True) from None
        finally:
            await self._reply.aclose()

    async def aclose(self) -> None:
        await self._reply.aclose()
