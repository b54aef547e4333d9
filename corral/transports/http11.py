"""``H11Transport``: HTTP/1.1 with h11 over anyio streams, pooled; runs on asyncio and trio.

Each attempt holds a pool slot from before connect until its body is fully read or closed, so
``max_connections`` bounds in-flight requests and open sockets alike. Idle connections are kept
per origin (newest first) until ``keepalive_expiry``; one found closed by the server is dropped
before use, and if a reused connection still dies before a single response byte arrives the
request is sent once more on a fresh connection (the server cannot have answered it).
"""

from __future__ import annotations

import contextlib
import select
import ssl
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import anyio
import anyio.abc
import h11

from corral.core import errors
from corral.core.headers import Headers
from corral.core.models import Request, Response, Timeouts, Timing
from corral.transports.base import Origin, split_url

__all__ = ["H11Transport"]

_READ_SIZE = 65536
_NETWORK_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


class _Stale(Exception):
    """A reused connection failed before any response byte: safe to send again."""


class _Connection:
    __slots__ = ("h11", "idle_since", "origin", "stream")

    def __init__(self, origin: Origin, stream: anyio.abc.ByteStream) -> None:
        self.origin = origin
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def looks_closed(self) -> bool:
        """Did the server close (or write to) this idle connection? One non-blocking poll."""
        try:
            fd = self.stream.extra(anyio.abc.SocketAttribute.raw_socket).fileno()
        except anyio.TypedAttributeLookupError:
            return False
        try:
            readable, _, _ = select.select([fd], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(*_NETWORK_ERRORS):
                await self.stream.aclose()


class H11Transport:
    """The reference transport. Pass it to a ``Client`` or call it with a ``Request``."""

    def __init__(
        self,
        *,
        timeouts: Timeouts | None = None,
        max_connections: int = 100,
        max_per_host: int | None = None,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        if max_connections < 1 or (max_per_host is not None and max_per_host < 1):
            raise ValueError("max_connections and max_per_host must be >= 1")
        self._timeouts = timeouts or Timeouts()
        self._max_connections = max_connections
        self._max_per_host = max_per_host
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._clock = clock
        self._slots = anyio.Semaphore(max_connections)
        self._host_slots: dict[Origin, anyio.Semaphore] = {}
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Sockets currently open, idle or busy (for tests and metrics)."""
        return self._open

    async def __call__(self, request: Request) -> Response:
        if self._closed:
            raise errors.ConnectError("transport is closed")
        origin, target = split_url(request.url)
        timeouts = request.options.timeouts or self._timeouts
        started = self._clock()
        await self._acquire(origin, timeouts.pool)
        try:
            conn = await self._checkout(origin, timeouts)
            try:
                status, headers = await self._exchange(conn, request, target, timeouts)
            except _Stale:
                conn = await self._connect(origin, timeouts)
                try:
                    status, headers = await self._exchange(conn, request, target, timeouts)
                except _Stale:  # pragma: no cover - a fresh connection is never stale
                    raise AssertionError("unreachable") from None
        except BaseException:
            self._release(origin)
            raise
        timing = Timing(started=started, first_byte=self._clock())
        body = _Body(self, conn, timeouts)
        if request.options.stream:
            return Response(status, headers, stream=body, timing=timing)
        chunks = [chunk async for chunk in body]
        return Response(
            status,
            headers,
            b"".join(chunks),
            timing=Timing(started, timing.first_byte, self._clock()),
        )

    async def aclose(self) -> None:
        self._closed = True
        idle = [c for conns in self._idle.values() for c in conns]
        self._idle.clear()
        for conn in idle:
            self._open -= 1
            await conn.aclose()

    async def __aenter__(self) -> H11Transport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- pool -------------------------------------------------------------------------------

    async def _acquire(self, origin: Origin, wait: float | None) -> None:
        host_slots = None
        if self._max_per_host is not None:
            host_slots = self._host_slots.get(origin)
            if host_slots is None:
                host_slots = self._host_slots[origin] = anyio.Semaphore(self._max_per_host)
        try:
            with anyio.fail_after(wait):
                if host_slots is not None:
                    await host_slots.acquire()
                try:
                    await self._slots.acquire()
                except BaseException:
                    if host_slots is not None:
                        host_slots.release()
                    raise
        except TimeoutError:
            raise errors.PoolTimeout(
                f"no connection slot for {origin.host_header} within {wait}s"
            ) from None

    def _release(self, origin: Origin) -> None:
        self._slots.release()
        if self._max_per_host is not None:
            self._host_slots[origin].release()

    async def _checkout(self, origin: Origin, timeouts: Timeouts) -> _Connection:
        idle = self._idle.get(origin)
        now = self._clock()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self._keepalive_expiry and not conn.looks_closed():
                return conn
            self._open -= 1
            await conn.aclose()
        return await self._connect(origin, timeouts)

    async def _connect(self, origin: Origin, timeouts: Timeouts) -> _Connection:
        if self._open >= self._max_connections:
            await self._evict_one_idle()
        tls = origin.scheme == "https"
        try:
            with anyio.fail_after(timeouts.connect):
                stream: anyio.abc.ByteStream
                if tls:
                    stream = await anyio.connect_tcp(
                        origin.host,
                        origin.port,
                        tls=True,
                        ssl_context=self._ssl_context,
                        tls_standard_compatible=False,
                    )
                else:
                    stream = await anyio.connect_tcp(origin.host, origin.port)
        except TimeoutError:
            raise errors.ConnectTimeout(
                f"connecting to {origin.host_header} took over {timeouts.connect}s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise errors.ConnectError(f"cannot connect to {origin.host_header}: {exc}") from None
        self._open += 1
        return _Connection(origin, stream)

    async def _evict_one_idle(self) -> None:
        for origin, conns in self._idle.items():
            if conns:
                conn = conns.pop(0)
                if not conns:
                    del self._idle[origin]
                self._open -= 1
                await conn.aclose()
                return

    async def _done(self, conn: _Connection, reusable: bool) -> None:
        """The body is finished (or abandoned): pool or close the socket, free the slot."""
        try:
            if (
                reusable
                and not self._closed
                and conn.h11.our_state is h11.DONE
                and conn.h11.their_state is h11.DONE
            ):
                conn.h11.start_next_cycle()
                conn.idle_since = self._clock()
                self._idle.setdefault(conn.origin, []).append(conn)
            else:
                self._open -= 1
                await conn.aclose()
        finally:
            self._release(conn.origin)

    # -- one exchange -----------------------------------------------------------------------

    async def _exchange(
        self, conn: _Connection, request: Request, target: str, timeouts: Timeouts
    ) -> tuple[int, Headers]:
        reused = conn.h11.our_state is h11.IDLE and conn.idle_since > 0
        headers = [(b"host", conn.origin.host_header.encode())]
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", str(len(request.body)).encode()))
        headers.extend(request.headers.without("host").without("content-length").raw())
        try:
            data = conn.h11.send(h11.Request(method=request.method, target=target, headers=headers))
            if request.body:
                data += conn.h11.send(h11.Data(data=request.body))
            data += conn.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            await self._fail(conn)
            raise errors.InvalidInput(f"cannot encode request: {exc}") from None
        try:
            with anyio.fail_after(timeouts.write):
                await conn.stream.send(data)
        except TimeoutError:
            await self._fail(conn)
            raise errors.WriteTimeout(f"sending took over {timeouts.write}s") from None
        except _NETWORK_ERRORS as exc:
            await self._fail(conn)
            if reused:
                raise _Stale from None
            raise errors.WriteError(f"connection lost while sending: {exc!r}") from None
        got_bytes = False
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                chunk = await self._receive(
                    conn, timeouts, request_sent=True, stale_ok=reused and not got_bytes
                )
                got_bytes = got_bytes or bool(chunk)
                continue
            if isinstance(event, h11.Response):
                return event.status_code, Headers.from_raw(event.headers)
            if isinstance(event, h11.InformationalResponse):
                continue
            await self._fail(conn)
            raise errors.RemoteProtocolError(
                f"unexpected event before response: {event!r}", request_sent=True
            )

    async def _receive(
        self, conn: _Connection, timeouts: Timeouts, *, request_sent: bool, stale_ok: bool = False
    ) -> bytes:
        try:
            with anyio.fail_after(timeouts.read):
                chunk = await conn.stream.receive(_READ_SIZE)
        except TimeoutError:
            await self._fail(conn)
            raise errors.ReadTimeout(
                f"no data from server for {timeouts.read}s", request_sent=request_sent
            ) from None
        except anyio.EndOfStream:
            chunk = b""
        except _NETWORK_ERRORS as exc:
            await self._fail(conn)
            if stale_ok:
                raise _Stale from None
            raise errors.ReadError(f"connection lost: {exc!r}", request_sent=request_sent) from None
        if not chunk and stale_ok:
            await self._fail(conn)
            raise _Stale
        try:
            conn.h11.receive_data(chunk)
        except h11.RemoteProtocolError as exc:  # pragma: no cover - h11 defers errors to next_event
            self._raise_protocol(exc)
        return chunk

    async def _fail(self, conn: _Connection) -> None:
        self._open -= 1
        await conn.aclose()

    @staticmethod
    def _raise_protocol(exc: h11.RemoteProtocolError) -> NoReturn:
        raise errors.RemoteProtocolError(f"server broke HTTP/1.1: {exc}", request_sent=True)


class _Body:
    """The response body of one exchange; finishing or closing it returns the connection."""

    def __init__(self, transport: H11Transport, conn: _Connection, timeouts: Timeouts) -> None:
        self._transport = transport
        self._conn = conn
        self._timeouts = timeouts
        self._finished = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        conn, transport = self._conn, self._transport
        while not self._finished:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                await self._finish(reusable=False)
                raise errors.RemoteProtocolError(
                    f"response body cut short or malformed: {exc}", request_sent=True
                ) from None
            if event is h11.NEED_DATA:
                try:
                    await transport._receive(conn, self._timeouts, request_sent=True)
                except errors.TransportError:
                    self._finished = True
                    transport._release(conn.origin)
                    raise
            elif isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                await self._finish(reusable=True)
            else:
                await self._finish(reusable=False)
                raise errors.RemoteProtocolError(
                    f"connection closed before the body ended ({event!r})", request_sent=True
                )

    async def _finish(self, reusable: bool) -> None:
        if not self._finished:
            self._finished = True
            await self._transport._done(self._conn, reusable)

    async def aclose(self) -> None:
        await self._finish(reusable=False)
