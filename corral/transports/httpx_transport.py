"""``HttpxTransport``: a corral transport over an ``httpx.AsyncClient`` (asyncio and trio).

It also takes an ``httpx2.AsyncClient`` (the fork the openai SDK moved to), whose connection
pool costs a fraction of httpx 0.28's at high concurrency: ``HttpxTransport(package="httpx2")``
or pass your own client of either package. Errors of either become corral's.
"""

from __future__ import annotations

import functools
import importlib
import ssl
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

from corral.core import errors
from corral.core.compose import current_time
from corral.core.headers import Headers
from corral.core.models import Request, Response, Timeouts, Timing

__all__ = ["HttpxTransport", "map_httpx_error"]

# Most specific first: httpx's timeouts subclass its TransportError too.
_ERROR_NAMES: tuple[tuple[str, type[errors.TransportError]], ...] = (
    ("ConnectTimeout", errors.ConnectTimeout),
    ("ReadTimeout", errors.ReadTimeout),
    ("WriteTimeout", errors.WriteTimeout),
    ("PoolTimeout", errors.PoolTimeout),
    ("ConnectError", errors.ConnectError),
    ("ReadError", errors.ReadError),
    ("WriteError", errors.WriteError),
    ("RemoteProtocolError", errors.RemoteProtocolError),
    ("TransportError", errors.NetworkError),
)


@functools.cache
def _error_map(
    module: ModuleType,
) -> tuple[tuple[type[Exception], type[errors.TransportError]], ...]:
    return tuple((getattr(module, name), target) for name, target in _ERROR_NAMES)


def map_httpx_error(
    exc: Exception, *, request_sent: bool, module: ModuleType
) -> errors.TransportError:
    """The corral error for an exception of ``module`` (httpx or httpx2); none leaks."""
    for source, target in _error_map(module):
        if isinstance(exc, source):
            sent = request_sent and target is not errors.ConnectError
            return target(f"{type(exc).__name__}: {exc}", request_sent=sent)
    return errors.NetworkError(f"{type(exc).__name__}: {exc}", request_sent=request_sent)


@functools.lru_cache(maxsize=64)
def _timeout(module: ModuleType, t: Timeouts) -> Any:
    return module.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool)


class HttpxTransport:
    """Sends corral requests with httpx or httpx2. Pass your own client to share its pool."""

    def __init__(
        self,
        client: Any = None,
        *,
        package: str = "httpx",
        timeouts: Timeouts | None = None,
        max_connections: int = 100,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = current_time,
    ) -> None:
        if client is not None:
            package = type(client).__module__.partition(".")[0]
        if package not in ("httpx", "httpx2"):
            raise errors.InvalidInput(f"package must be 'httpx' or 'httpx2', got {package!r}")
        try:
            self._module = importlib.import_module(package)
        except ImportError:
            raise errors.InvalidInput(
                f"HttpxTransport needs {package}: pip install 'corral[httpx]' (or httpx2)"
            ) from None
        module = self._module
        self._timeouts = timeouts or Timeouts()
        self._owns_client = client is None
        self._client = client or module.AsyncClient(
            timeout=_timeout(module, self._timeouts),
            limits=module.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            verify=ssl_context or True,
            follow_redirects=False,
        )
        self._clock = clock

    async def __call__(self, request: Request) -> Response:
        module = self._module
        timeouts = request.options.timeouts or self._timeouts
        request.headers.raw()  # InvalidInput for a bad header, as on every transport (cached)
        started = self._clock()
        try:
            built = self._client.build_request(
                request.method,
                request.url,
                headers=list(request.headers.items()),
                content=request.body or None,
                timeout=_timeout(module, timeouts),
            )
        except (module.InvalidURL, module.UnsupportedProtocol) as exc:
            raise errors.InvalidInput(f"bad URL {request.url!r}: {exc}") from None
        try:
            reply = await self._client.send(built, stream=True)
        except module.UnsupportedProtocol as exc:
            raise errors.InvalidInput(f"bad URL {request.url!r}: {exc}") from None
        except module.TransportError as exc:
            raise map_httpx_error(exc, request_sent=False, module=module) from None
        headers = Headers(reply.headers.multi_items())
        timing = Timing(started, first_byte=self._clock())
        if request.options.stream:
            return Response(reply.status_code, headers, stream=_Body(reply, module), timing=timing)
        try:
            body = await reply.aread()
        except module.TransportError as exc:
            raise map_httpx_error(exc, request_sent=True, module=module) from None
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
    def __init__(self, reply: Any, module: ModuleType) -> None:
        self._reply = reply
        self._module = module

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._reply.aiter_bytes():
                yield chunk
        except self._module.TransportError as exc:
            raise map_httpx_error(exc, request_sent=True, module=self._module) from None
        finally:
            await self._reply.aclose()

    async def aclose(self) -> None:
        await self._reply.aclose()
