"""Run anything built on httpx (or openai's httpx2 fork) through a corral stack.

``AsyncOpenAI(http_client=httpx2.AsyncClient(transport=corral_async_transport(stack)))`` makes
the official SDK's requests pass through corral's rate limits, retries, cache and metrics;
turn the SDK's own retries off (``max_retries=0``) so a 429 storm is handled once, by corral.

The SDK's timeout (``OpenAI(timeout=...)``, ``with_options(timeout=...)``) reaches a transport
as ``request.extensions["timeout"]``; it becomes the corral request's ``Timeouts``, so it bounds
each attempt's connect/read/write/pool phases exactly as it does in httpx. corral's Retry may
repeat a timed-out attempt (``max_attempts``); a ``Deadline`` bounds the whole call.

The same classes serve both packages: ``transports_for(httpx)`` or ``transports_for(httpx2)``
returns an async and a sync transport class bound to that package's types. The sync one runs
the stack on an event loop in a background thread.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator, Mapping
from types import ModuleType
from typing import Any

import anyio.from_thread

from corral.core import _errors as errors
from corral.core import _jsonlib as jsonlib
from corral.core._compose import Handler
from corral.core._models import Request, RequestOptions, Response, Timeouts

__all__ = [
    "corral_async_transport",
    "corral_sync_transport",
    "request_timeouts",
    "to_corral",
    "transports_for",
]


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def request_timeouts(request: Any) -> Timeouts | None:
    """The per-phase timeouts an httpx request carries (``extensions["timeout"]``), if any."""
    timeout = request.extensions.get("timeout")
    if not isinstance(timeout, Mapping):
        return None
    return Timeouts(
        connect=_seconds(timeout.get("connect")),
        read=_seconds(timeout.get("read")),
        write=_seconds(timeout.get("write")),
        pool=_seconds(timeout.get("pool")),
    )


def to_corral(
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes,
    timeouts: Timeouts | None = None,
) -> Request:
    """An httpx request as a corral ``Request``, with ``stream``/``model`` read from its JSON."""
    options = RequestOptions(timeouts=timeouts)
    if body[:1] == b"{":
        try:
            data = jsonlib.loads(body)
        except jsonlib.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            model = data.get("model")
            options = RequestOptions(
                model=model if isinstance(model, str) else None,
                stream=bool(data.get("stream")),
                timeouts=timeouts,
            )
    return Request(method, url, headers, body, options)


def _corral_request(request: Any, body: bytes) -> Request:
    headers = list(request.headers.multi_items())
    return to_corral(request.method, str(request.url), headers, body, request_timeouts(request))


def _map_error(module: ModuleType, exc: errors.CorralError) -> Exception:
    """corral's wire errors in the adapted package's own types, so its callers react in kind."""
    table = [
        (errors.ConnectTimeout, "ConnectTimeout"),
        (errors.ReadTimeout, "ReadTimeout"),
        (errors.WriteTimeout, "WriteTimeout"),
        (errors.PoolTimeout, "PoolTimeout"),
        (errors.DeadlineExceeded, "TimeoutException"),
        (errors.ConnectError, "ConnectError"),
        (errors.ReadError, "ReadError"),
        (errors.WriteError, "WriteError"),
        (errors.RemoteProtocolError, "RemoteProtocolError"),
    ]
    for corral_type, name in table:
        if isinstance(exc, corral_type):
            mapped: Exception = getattr(module, name)(str(exc))
            mapped.__cause__ = exc
            return mapped
    return exc


@functools.cache
def transports_for(module: ModuleType) -> tuple[type[Any], type[Any]]:
    """(async transport class, sync transport class) for ``httpx`` or ``httpx2``."""

    class _AsyncStream(module.AsyncByteStream):  # type: ignore[name-defined,misc]
        def __init__(self, response: Response) -> None:
            self._response = response

        async def __aiter__(self) -> AsyncIterator[bytes]:
            assert self._response.stream is not None
            try:
                async for chunk in self._response.stream:
                    yield chunk
            except errors.CorralError as exc:
                raise _map_error(module, exc) from exc

        async def aclose(self) -> None:
            await self._response.aclose()

    class CorralAsyncTransport(module.AsyncBaseTransport):  # type: ignore[name-defined,misc]
        """An httpx async transport that sends every request through a corral stack."""

        def __init__(self, handler: Handler, *, owned: Any = None) -> None:
            self._handler = handler
            self._owned = owned  # a corral transport to close with this one

        async def handle_async_request(self, request: Any) -> Any:
            corral_request = _corral_request(request, await request.aread())
            try:
                response = await self._handler(corral_request)
            except errors.CorralError as exc:
                raise _map_error(module, exc) from exc
            headers = list(response.headers.items())
            if response.stream is not None:
                return module.Response(
                    response.status, headers=headers, stream=_AsyncStream(response)
                )
            return module.Response(response.status, headers=headers, content=response.body)

        async def aclose(self) -> None:
            if self._owned is not None:
                await self._owned.aclose()

    class _SyncStream(module.SyncByteStream):  # type: ignore[name-defined,misc]
        def __init__(self, response: Response, portal: anyio.from_thread.BlockingPortal) -> None:
            self._response, self._portal = response, portal

        def __iter__(self) -> Iterator[bytes]:
            assert self._response.stream is not None
            chunks = self._response.stream.__aiter__()

            async def next_chunk() -> bytes | None:
                try:
                    return await chunks.__anext__()
                except StopAsyncIteration:
                    return None

            while True:
                try:
                    chunk = self._portal.call(next_chunk)
                except errors.CorralError as exc:
                    raise _map_error(module, exc) from exc
                if chunk is None:
                    return
                yield chunk

        def close(self) -> None:
            self._portal.call(self._response.aclose)

    class CorralSyncTransport(module.BaseTransport):  # type: ignore[name-defined,misc]
        """An httpx sync transport; the stack runs on an event loop in a background thread."""

        def __init__(
            self, handler: Handler, *, owned: Any = None, backend: str = "asyncio"
        ) -> None:
            self._handler = handler
            self._owned = owned
            self._portal_cm = anyio.from_thread.start_blocking_portal(backend)
            self._portal = self._portal_cm.__enter__()

        def handle_request(self, request: Any) -> Any:
            corral_request = _corral_request(request, request.read())
            try:
                response = self._portal.call(self._handler, corral_request)
            except errors.CorralError as exc:
                raise _map_error(module, exc) from exc
            headers = list(response.headers.items())
            if response.stream is not None:
                stream = _SyncStream(response, self._portal)
                return module.Response(response.status, headers=headers, stream=stream)
            return module.Response(response.status, headers=headers, content=response.body)

        def close(self) -> None:
            try:
                if self._owned is not None:
                    self._portal.call(self._owned.aclose)
            finally:
                self._portal_cm.__exit__(None, None, None)

    return CorralAsyncTransport, CorralSyncTransport


def _module(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(name)


def corral_async_transport(handler: Handler, *, package: str = "httpx2", owned: Any = None) -> Any:
    """An async transport for ``package`` ("httpx2" for openai >= 3, "httpx" before)."""
    return transports_for(_module(package))[0](handler, owned=owned)


def corral_sync_transport(handler: Handler, *, package: str = "httpx2", owned: Any = None) -> Any:
    return transports_for(_module(package))[1](handler, owned=owned)
