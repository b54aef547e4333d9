"""``HttpxTransport``: a corral transport over an ``httpx.AsyncClient`` (asyncio and trio).

It also takes an ``httpx2.AsyncClient`` (the fork the openai SDK moved to), whose connection
pool costs a fraction of httpx 0.28's at high concurrency: ``HttpxTransport(package="httpx2")``
or pass your own client of either package. Errors of either become corral's.

The contract of ``transports.base`` holds here too: httpcore's ``trace`` extension tells which
phase an attempt is in, so ``request_sent`` means what it means on H11, the write phase and the
wait for the response head (however many ``1xx``) are bounded by one cancel scope, bodies are
read raw (``Accept-Encoding: identity``, never inflated, ``DecodingError`` cannot arise) up to
``max_response_bytes``, and a connection with bytes left unread after a response is closed
rather than pooled.
"""

from __future__ import annotations

import functools
import importlib
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import ModuleType
from typing import Any

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
    exc: Exception, *, request_sent: bool, module: ModuleType, tls: bool = False
) -> errors.TransportError:
    """The corral error for an exception of ``module`` (httpx or httpx2); none leaks."""
    for source, target in _error_map(module):
        if isinstance(exc, source):
            text = f"{type(exc).__name__}: {exc}"
            if target is errors.ConnectError:
                return connect_failure(text, exc, tls=tls)
            return target(text, request_sent=request_sent)
    return errors.NetworkError(f"{type(exc).__name__}: {exc}", request_sent=request_sent)


class _Tracer:
    """httpcore's ``trace`` callback: moves the attempt's watch into the write and read phases."""

    __slots__ = ("timeouts", "watch")

    def __init__(self, watch: PhaseWatch, timeouts: Timeouts) -> None:
        self.watch, self.timeouts = watch, timeouts

    async def __call__(self, name: str, info: object) -> None:
        if name == "http11.send_request_headers.started":
            self.watch.start("write", self.timeouts.write)
        elif name == "http11.send_request_body.complete":
            self.watch.start("read", self.timeouts.read)


def _h11_connection(reply: Any) -> Any:
    """httpcore's HTTP/1.1 connection under ``reply`` (None if the layout is not the known one).

    httpcore pools a connection whose h11 buffer still holds bytes sent past the response; the
    next request would read them as its answer. No public API exposes the buffer.
    """
    node = reply.stream
    for name in ("_stream", "_httpcore_stream", "_stream", "_connection"):
        node = getattr(node, name, None)
    return node if hasattr(node, "_h11_state") else None


async def _close_if_poisoned(connection: Any) -> None:
    if connection is not None and any(connection._h11_state.trailing_data):
        await connection.aclose()


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
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
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
        self._max_response_bytes = max_response_bytes

    async def __call__(self, request: Request) -> Response:
        """Send ``request`` with the httpx client and return once the response head arrives;
        httpx's exceptions come out as corral's typed errors."""
        module = self._module
        timeouts = request.options.timeouts or self._timeouts
        request.headers.raw()  # InvalidInput for a bad header, as on every transport (cached)
        started = self._clock()
        headers = list(request.headers.items())
        if "accept-encoding" not in request.headers:
            headers.append(("accept-encoding", "identity"))
        watch = PhaseWatch()  # pool and connect: httpx's own timers
        try:
            built = self._client.build_request(
                request.method,
                request.url,
                headers=headers,
                content=request.body or None,
                timeout=_timeout(module, timeouts),
                extensions={"trace": _Tracer(watch, timeouts)},
            )
        except (module.InvalidURL, module.UnsupportedProtocol) as exc:
            raise errors.InvalidInput(f"bad URL {request.url!r}: {exc}") from None
        reply = None
        try:
            with watch.attempt_scope():
                reply = await self._client.send(built, stream=True)
        except module.UnsupportedProtocol as exc:
            raise errors.InvalidInput(f"bad URL {request.url!r}: {exc}") from None
        except module.TransportError as exc:
            error = map_httpx_error(
                exc,
                request_sent=watch.request_sent,
                module=module,
                tls=request.url.startswith("https:"),
            )
            raise scrub(error, request.headers) from None
        if reply is None:
            raise watch.error()
        got = Headers(reply.headers.multi_items())
        timing = Timing(started, first_byte=self._clock())
        body = _Body(reply, module, request.headers, self._max_response_bytes)
        try:
            check_head(reply.status_code, got, self._max_response_bytes)
        except errors.CorralError:
            await reply.aclose()
            raise
        if request.options.stream:
            return Response(reply.status_code, got, stream=body, timing=timing)
        data = await body.read_all()
        return Response(
            reply.status_code,
            got,
            data,
            timing=Timing(started, timing.first_byte, self._clock()),
        )

    async def aclose(self) -> None:
        """Close the httpx client if this transport made it; a client passed in stays open for
        its owner."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> HttpxTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Body:
    def __init__(
        self, reply: Any, module: ModuleType, request_headers: Headers, limit: int
    ) -> None:
        self._reply = reply
        self._module = module
        self._request_headers = request_headers
        self._limit = BodyLimit(limit)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def read_all(self) -> bytes:
        """The whole body, within the size cap."""
        return await drain(self._iterate())

    async def _iterate(self) -> AsyncGenerator[bytes, None]:
        connection = _h11_connection(self._reply)
        complete = False
        try:
            async for chunk in self._reply.aiter_raw():
                self._limit.add(len(chunk))
                yield chunk
            complete = True
        except self._module.TransportError as exc:
            error = map_httpx_error(exc, request_sent=True, module=self._module)
            raise scrub(error, self._request_headers) from None
        finally:
            await self._reply.aclose()
            if complete:
                await _close_if_poisoned(connection)

    async def aclose(self) -> None:
        await self._reply.aclose()
