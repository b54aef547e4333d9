"""``H11Transport``: HTTP/1.1 with h11 over lean socket streams, pooled; asyncio and trio.

Each attempt holds a pool slot from before connect until its body is fully read or closed, so
``max_connections`` bounds in-flight requests and open sockets alike. Idle connections are kept
per origin (newest first) until ``keepalive_expiry``; one found closed by the server is dropped
before use, and if a reused connection still dies before a single response byte arrives the
request is sent once more on a fresh connection (the server cannot have answered it).

Timeouts: each attempt passes through phases (pool, connect, write, read), each with its limit.
A lean stream (``_lean_stream``: asyncio, and plain TCP on trio) takes a read's deadline as an
argument and ends that wait itself, and writes without waiting when the kernel takes the bytes,
so an attempt enters a cancel scope only to wait for a pool slot, a connect or a full send
buffer; TLS on trio goes through anyio's stream, timed by one scope per attempt whose deadline
moves with the phase. The wait for the response head
is one read timeout in total, however many ``1xx`` come first.

Bodies: sent with ``Accept-Encoding: identity`` and never inflated (an encoded body is refused);
at most ``max_response_bytes``. A connection is pooled again only when nothing unread follows
the response, so bytes a server sends past its answer never become the next request's answer.
A request body too big to hold (a file upload) goes out in pieces through ``send_streaming``,
each piece under the write timeout.

Wire format: h11 is the reference. The ordinary exchange (a request of checked fields, answered
by an ``HTTP/1.1`` head with a length or chunked body) is written and read by ``_fast_http``
without h11's state machine; h11 reads anything else from the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import h11

from corral._clock import current_time
from corral._gate import Gate
from corral._streams import ErrorFactory, WaitBounds
from corral.core import _errors as errors
from corral.core._events import TransportResent
from corral.core._headers import Headers
from corral.core._models import Request, Response, Timeouts, Timing
from corral.transports._asyncio_stream import open_asyncio_stream
from corral.transports._base import (
    DEFAULT_MAX_RESPONSE_BYTES,
    BodyLimit,
    Origin,
    PhaseWatch,
    check_head,
    connect_failure,
    scrub,
    split_url,
)
from corral.transports._chunked import ChunkedDecoder
from corral.transports._fast_http import FALLBACK, Head, LengthDecoder, parse_head, request_bytes
from corral.transports._lean_stream import LeanStream, ReadTimedOut, peek_closed

__all__ = ["BodySource", "H11Transport"]

_READ_SIZE = 65536
_END = h11.EndOfMessage()  # events are immutable; one serves every request
_NETWORK_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)
_IDENTITY = (b"accept-encoding", b"identity")
# A body read past h11 (fast_http or ChunkedDecoder), and whether the connection may be reused.
_Decoded = tuple[ChunkedDecoder | LengthDecoder, bool]


class BodySource(Protocol):
    """A request body read as it is sent (a file upload): its exact length in bytes, and a
    fresh generator of its pieces for each attempt (a stale connection sends it again)."""

    @property
    def length(self) -> int: ...

    def chunks(self) -> AsyncGenerator[bytes, None]: ...


class _Stale(Exception):
    """A reused connection failed before any response byte: safe to send again."""


class _Connection:
    __slots__ = ("closed", "h11", "idle_since", "origin", "sock", "stream")

    def __init__(self, origin: Origin, stream: anyio.abc.ByteStream) -> None:
        self.origin = origin
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.closed = False
        try:
            self.sock: socket.socket | None = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        except anyio.TypedAttributeLookupError:
            self.sock = None

    def looks_closed(self) -> bool:
        """Did the server close (or write to) this idle connection?"""
        if isinstance(self.stream, LeanStream):
            return self.stream.looks_closed()
        return self.sock is not None and peek_closed(self.sock)

    async def aclose(self) -> None:
        self.closed = True
        with anyio.CancelScope(shield=True), contextlib.suppress(*_NETWORK_ERRORS):
            await self.stream.aclose()


class _Lease:
    """A pool slot and (once connected) the connection using it; ``finish`` returns both once."""

    __slots__ = ("conn", "done", "origin", "transport")

    def __init__(self, transport: H11Transport, origin: Origin) -> None:
        self.transport, self.origin = transport, origin
        self.conn: _Connection | None = None
        self.done = False

    async def finish(self, reusable: bool) -> None:
        if self.done:
            return
        self.done = True
        try:
            if self.conn is not None:
                await self.transport._put_back(self.conn, reusable)
        finally:
            self.transport._release(self.origin)


class H11Transport:
    """The reference transport. Pass it to a ``Client`` or call it with a ``Request``."""

    #: Every wait of an attempt (pool, connect, write, read) ends by the request's deadline,
    #: with ``DeadlineExceeded`` (``core._compose``).
    honours_deadline = True

    def __init__(
        self,
        *,
        timeouts: Timeouts | None = None,
        max_connections: int = 100,
        max_per_host: int | None = None,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        clock: Callable[[], float] = current_time,
    ) -> None:
        if max_connections < 1 or (max_per_host is not None and max_per_host < 1):
            raise ValueError("max_connections and max_per_host must be >= 1")
        self._timeouts = timeouts or Timeouts()
        self._max_connections = max_connections
        self._max_per_host = max_per_host
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._clock = clock
        self._max_response_bytes = max_response_bytes
        self._slots = Gate(max_connections)
        self._host_slots: dict[Origin, Gate] = {}
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Sockets currently open, idle or busy (for tests and metrics)."""
        return self._open

    async def __call__(self, request: Request) -> Response:
        """Send ``request`` on a pooled (or new) connection and return once the response head
        arrives. A reused connection the server had closed (no response byte) is replaced and
        the request sent once more (a ``TransportResent`` event)."""
        return await self._request(request, None)

    async def send_streaming(self, request: Request, body: BodySource) -> Response:
        """Send ``request`` with ``body`` in place of ``request.body`` (which must be empty),
        read piece by piece as it goes out, so a file of any size costs one piece of memory.

        Wrap it in a handler to put middleware around it:
        ``build_stack([Retry()], lambda r: transport.send_streaming(r, body))``.
        """
        if request.body:
            raise errors.InvalidInput("send_streaming: the request has a body already")
        return await self._request(request, body)

    async def _request(self, request: Request, source: BodySource | None) -> Response:
        if self._closed:
            raise errors.ConnectError("transport is closed")
        timeouts = request.options.timeouts or self._timeouts
        origin, target = split_url(request.url)
        # A lean stream (asyncio; plain TCP on trio) times each wait where it happens: no
        # cancel scope per attempt. TLS on trio: one scope times the attempt, phase by phase.
        scoped = origin.scheme == "https" and not _on_asyncio()
        watch = PhaseWatch(scoped=scoped, deadline=request.options.deadline)
        leases: list[_Lease] = []  # the attempt's connection lease, once it has one
        try:
            if watch.scope is None:
                return await self._attempt(request, origin, target, source, timeouts, watch, leases)
            with watch.scope:
                return await self._attempt(request, origin, target, source, timeouts, watch, leases)
        except errors.CorralError as exc:
            if leases:
                await leases[0].finish(reusable=False)
            raise scrub(exc, request.headers) from None
        except BaseException:
            if leases:
                await leases[0].finish(reusable=False)
            raise
        # Only reached when the scope's own deadline fired.
        if leases:
            await leases[0].finish(reusable=False)
        raise watch.error()

    async def _attempt(
        self,
        request: Request,
        origin: Origin,
        target: str,
        source: BodySource | None,
        timeouts: Timeouts,
        watch: PhaseWatch,
        leases: list[_Lease],
    ) -> Response:
        started = self._clock()
        if not self._try_acquire(origin):  # time the pool only when waiting
            await watch.wait("pool", timeouts.pool, self._acquire(origin))
        lease = _Lease(self, origin)
        leases.append(lease)
        conn = lease.conn = await self._checkout(origin, timeouts, watch)
        try:
            status, headers, decoded = await self._exchange(
                conn, request, target, timeouts, watch, source
            )
        except _Stale:
            request.options.call.emit(
                TransportResent, self._clock(), reason="a reused connection closed unread"
            )
            conn = lease.conn = await self._connect(origin, timeouts, watch)
            status, headers, decoded = await self._exchange(
                conn, request, target, timeouts, watch, source
            )
        first_byte = self._clock()
        check_head(status, headers, self._max_response_bytes)
        body = _Body(lease, timeouts, request.headers, self._max_response_bytes)
        if decoded is not None:
            body.decode(*decoded)
        elif _chunked(request.method, status, headers):
            body.decode_chunks()
        if request.options.stream:
            return Response(status, headers, stream=body, timing=Timing(started, first_byte))
        data = await body.read_all(watch)
        return Response(status, headers, data, timing=Timing(started, first_byte, self._clock()))

    async def aclose(self) -> None:
        """Refuse further requests and close the idle pooled connections."""
        self._closed = True
        idle = [c for conns in self._idle.values() for c in conns]
        self._idle.clear()
        for conn in idle:
            await self._discard(conn)

    async def __aenter__(self) -> H11Transport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- pool -------------------------------------------------------------------------------

    def _try_acquire(self, origin: Origin) -> bool:
        """Take a slot (and the origin's) if both are free now, without waiting."""
        if self._max_per_host is None:
            return self._slots.try_acquire()
        host_slots = self._host_gate(origin)
        if not host_slots.try_acquire():
            return False
        if self._slots.try_acquire():
            return True
        host_slots.release()
        return False

    def _host_gate(self, origin: Origin) -> Gate:
        host_slots = self._host_slots.get(origin)
        if host_slots is None:
            assert self._max_per_host is not None
            host_slots = self._host_slots[origin] = Gate(self._max_per_host)
        return host_slots

    async def _acquire(self, origin: Origin) -> None:
        if self._max_per_host is None:
            await self._slots.acquire()
            return
        host_slots = self._host_gate(origin)
        await host_slots.acquire()
        try:
            await self._slots.acquire()
        except BaseException:
            host_slots.release()
            raise

    def _release(self, origin: Origin) -> None:
        self._slots.release()
        if self._max_per_host is not None:
            self._host_slots[origin].release()

    async def _checkout(self, origin: Origin, timeouts: Timeouts, watch: PhaseWatch) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if self._clock() - conn.idle_since < self._keepalive_expiry and not conn.looks_closed():
                return conn
            await self._discard(conn)
        return await self._connect(origin, timeouts, watch)

    async def _connect(self, origin: Origin, timeouts: Timeouts, watch: PhaseWatch) -> _Connection:
        if self._open >= self._max_connections:
            await self._evict_one_idle()
        tls = None
        if origin.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            tls = self._ssl_context
        try:
            opening: Awaitable[anyio.abc.ByteStream]
            if _on_asyncio():
                opening = open_asyncio_stream(origin.host, origin.port, tls)
            elif tls is None:
                from corral.transports._trio_stream import open_trio_stream  # imports trio

                opening = open_trio_stream(origin.host, origin.port)
            else:
                opening = anyio.connect_tcp(
                    origin.host, origin.port, ssl_context=tls, tls_standard_compatible=False
                )
            stream = await watch.wait("connect", timeouts.connect, opening)
        except (OSError, ssl.SSLError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            text = f"cannot connect to {origin.host_header}: {exc!r}"
            raise connect_failure(text, exc, tls=tls is not None) from None
        self._open += 1
        return _Connection(origin, stream)

    async def _evict_one_idle(self) -> None:
        for origin, conns in self._idle.items():
            if conns:
                conn = conns.pop(0)
                if not conns:
                    del self._idle[origin]
                await self._discard(conn)
                return

    async def _discard(self, conn: _Connection) -> None:
        if not conn.closed:
            self._open -= 1
            await conn.aclose()

    async def _put_back(self, conn: _Connection, reusable: bool) -> None:
        machine = conn.h11
        ours = machine.our_state
        if not reusable or conn.closed or self._closed:
            reusable = False
        elif ours is h11.DONE:
            reusable = machine.their_state is h11.DONE and not any(
                machine.trailing_data  # bytes past the response, or EOF: never reuse
            )
            if reusable:
                machine.start_next_cycle()
        else:  # a body read past h11 left it idle, or replaced it at its clean end
            reusable = ours is h11.IDLE
        if reusable:
            conn.idle_since = self._clock()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            await self._discard(conn)

    # -- one exchange -----------------------------------------------------------------------

    async def _exchange(
        self,
        conn: _Connection,
        request: Request,
        target: str,
        timeouts: Timeouts,
        watch: PhaseWatch,
        source: BodySource | None = None,
    ) -> tuple[int, Headers, _Decoded | None]:
        """Send the request, read the response head. An ordinary exchange goes past h11
        (``_fast_http``); anything else, or a response head it does not take, goes through it."""
        reused = conn.idle_since > 0
        headers = [(b"host", conn.origin.host_bytes)]
        if "accept-encoding" not in request.headers:
            headers.append(_IDENTITY)
        length = len(request.body) if source is None else source.length
        if length or request.method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", str(length).encode()))
        extra = request.headers
        if "host" in extra or "content-length" in extra:
            extra = extra.without("host").without("content-length")
        headers.extend(extra.raw())  # checked once per Headers: h11 need not re-check them
        data = None
        if source is None:
            with contextlib.suppress(UnicodeEncodeError):  # h11 names the problem below
                data = request_bytes(
                    request.method.encode("ascii"), target.encode("ascii"), headers, request.body
                )
        fast = data is not None
        if data is None:
            data = _h11_send(conn, request, target, headers, source is None)
        try:
            await self._write(conn, data, timeouts, watch)
            if source is not None:
                await self._write_pieces(conn, source, timeouts, watch)
        except _NETWORK_ERRORS as exc:
            await self._discard(conn)
            if reused:
                raise _Stale from None
            raise errors.WriteError(f"connection lost while sending: {exc!r}") from None
        watch.start("read", timeouts.read)
        got_bytes = False
        if fast:
            pieces: list[bytes] = []
            while True:
                chunk = await self._receive(
                    conn, stale_ok=reused and not got_bytes, sink=pieces.append, watch=watch
                )
                got_bytes = got_bytes or bool(chunk)
                buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                head = parse_head(buf, eof=not chunk)
                if isinstance(head, Head):
                    decoder = head.decoder(buf[head.end :])
                    fields = Headers.from_raw(head.fields)
                    return head.status, fields, (decoder, head.keep_alive)
                if head is FALLBACK:  # h11 judges, in the state the request left it
                    _h11_send(conn, request, target, headers, True)
                    conn.h11.receive_data(buf)
                    if not chunk:
                        conn.h11.receive_data(b"")
                    break
        while True:
            event = _next_event(conn, "bad response head")
            if event is h11.NEED_DATA:
                chunk = await self._receive(conn, stale_ok=reused and not got_bytes, watch=watch)
                got_bytes = got_bytes or bool(chunk)
            elif isinstance(event, h11.Response):
                return event.status_code, Headers.from_raw(event.headers), None
            elif not isinstance(event, h11.InformationalResponse):
                raise errors.RemoteProtocolError(
                    f"connection closed before a response ({type(event).__name__})",
                    request_sent=True,
                )

    async def _write(
        self, conn: _Connection, data: bytes, timeouts: Timeouts, watch: PhaseWatch
    ) -> None:
        stream = conn.stream
        if not isinstance(stream, LeanStream):
            await watch.wait("write", timeouts.write, stream.send(data))
        elif stream.write(data):  # the kernel buffer is full: time the wait for it
            await watch.wait("write", timeouts.write, stream.drain())

    async def _write_pieces(
        self, conn: _Connection, source: BodySource, timeouts: Timeouts, watch: PhaseWatch
    ) -> None:
        """``source``'s pieces, each written (and its buffer drained) before the next is read;
        a source longer or shorter than it said is refused before its end goes out."""
        async with contextlib.aclosing(source.chunks()) as pieces:
            while True:
                try:  # reading a piece is part of sending it: the write phase's limit holds
                    piece = await watch.wait("write", timeouts.write, anext(pieces))
                except StopAsyncIteration:
                    break
                if piece:
                    try:
                        data = conn.h11.send(h11.Data(data=piece))
                    except h11.LocalProtocolError:
                        raise errors.InvalidInput(
                            f"the request body is longer than its stated {source.length} bytes"
                        ) from None
                    await self._write(conn, data, timeouts, watch)
                # A lean stream's write is no checkpoint: pieces the kernel takes at once would
                # otherwise all go out under a cancelled scope, with no other task running.
                await anyio.lowlevel.checkpoint()
        try:
            end = conn.h11.send(_END)
        except h11.LocalProtocolError:
            raise errors.InvalidInput(
                f"the request body is shorter than its stated {source.length} bytes"
            ) from None
        await self._write(conn, end, timeouts, watch)

    async def _receive(
        self,
        conn: _Connection,
        *,
        stale_ok: bool = False,
        until: float | None = None,
        sink: Callable[[bytes], None] | None = None,
        watch: PhaseWatch | None = None,
    ) -> bytes:
        """One read into ``conn``'s h11 (or ``sink``); ``until`` (a ``LeanStream`` only)
        ends the wait with ``ReadTimedOut``, and an unscoped ``watch``'s deadline with the read
        phase's timeout."""
        if watch is not None and watch.scope is None and watch.until is not None:
            try:
                return await self._receive(conn, stale_ok=stale_ok, until=watch.until, sink=sink)
            except ReadTimedOut:
                raise watch.error() from None
        try:
            if until is not None:
                assert isinstance(conn.stream, LeanStream)
                chunk = await conn.stream.receive_until(_READ_SIZE, until)
            else:
                chunk = await conn.stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            chunk = b""
        except _NETWORK_ERRORS as exc:
            await self._discard(conn)
            if stale_ok:
                raise _Stale from None
            raise errors.ReadError(f"connection lost: {exc!r}", request_sent=True) from None
        if not chunk and stale_ok:
            await self._discard(conn)
            raise _Stale
        (conn.h11.receive_data if sink is None else sink)(chunk)
        return chunk


def _h11_send(
    conn: _Connection,
    request: Request,
    target: str,
    headers: list[tuple[bytes, bytes]],
    whole: bool,
) -> bytes:
    """The request through ``conn``'s h11: its head and body, and its end when ``whole`` (a
    ``BodySource``'s pieces follow otherwise)."""
    try:
        # _parsed=True is h11's flag for headers already validated (it uses it for what it
        # parsed itself); method and target are still checked. Tested with h11 0.14-0.16.
        head = h11.Request(
            method=request.method.encode("ascii"),
            target=target.encode("ascii"),
            headers=headers,
            _parsed=True,
        )
        data = conn.h11.send(head)
        if request.body:
            data += conn.h11.send(h11.Data(data=request.body))
        if whole:
            data += conn.h11.send(_END)
    except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
        raise errors.InvalidInput(f"cannot encode request: {exc}") from None
    return data


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_CUT_SHORT = "response body cut short or malformed"
_CHUNKED_METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE"))


def _chunked(method: str, status: int, headers: Headers) -> bool:
    """Is this a chunked body by h11's framing rules? (h11 has already refused any
    transfer-encoding but ``chunked``; HEAD, CONNECT, 204 and 304 have no body.)"""
    return (
        method in _CHUNKED_METHODS and status not in (204, 304) and "transfer-encoding" in headers
    )


def _body_timeout(read: float | None) -> errors.ReadTimeout:
    return errors.ReadTimeout(f"no body data for {read}s", request_sent=True)


def _closed_early(event: object) -> errors.RemoteProtocolError:
    return errors.RemoteProtocolError(
        f"connection closed before the body ended ({type(event).__name__})", request_sent=True
    )


def _next_event(conn: _Connection, problem: str) -> object:
    """h11's next event; its protocol errors become corral's, named for the phase."""
    try:
        return conn.h11.next_event()
    except h11.RemoteProtocolError as exc:
        raise errors.RemoteProtocolError(f"{problem}: {exc}", request_sent=True) from None


class _Body:
    """The response body of one exchange; finishing or closing it returns the connection."""

    def __init__(
        self, lease: _Lease, timeouts: Timeouts, request_headers: Headers, max_bytes: int
    ) -> None:
        assert lease.conn is not None
        self._lease = lease
        self._conn = lease.conn
        self._timeouts = timeouts
        self._request_headers = request_headers
        self._limit = BodyLimit(max_bytes)
        self._pending: object = None  # the event h11 gave after the data it joined
        self._error: errors.CorralError | None = None  # found while joining: raised next
        self._chunks: ChunkedDecoder | LengthDecoder | None = None  # a body read past h11
        self._keep_alive = True
        self._waits: WaitBounds | None = None  # a streamed body's limits (built when read)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self.next_chunk(None)) is not None:
                yield chunk
        except errors.CorralError as exc:
            raise scrub(exc, self._request_headers) from None
        finally:
            await self._lease.finish(reusable=False)  # no-op when already finished

    async def read_all(self, watch: PhaseWatch) -> bytes:
        """The whole body, its reads timed by the attempt's scope (no generator: a hot path)."""
        chunks = []
        try:
            while (chunk := await self.next_chunk(watch)) is not None:
                chunks.append(chunk)
        finally:
            await self._lease.finish(reusable=False)  # no-op when already finished
        return b"".join(chunks)

    async def next_chunk(self, watch: PhaseWatch | None) -> bytes | None:
        """The body bytes received so far (every h11 ``Data`` event already buffered, joined),
        or None at its end (the connection then goes back).

        One piece per read rather than per event: h11 makes an event of each chunked-encoding
        chunk, and a provider sends each SSE event as one, so every layer above would otherwise
        pay per event. With ``watch`` the caller's scope times the reads; without, each wait
        ends at the limits of ``_bounds`` (a lean stream's own timer: asyncio's loop timer,
        trio's watchdog; a scope per wait for TLS on trio).
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._chunks is not None:
            return await self._next_decoded(self._chunks, watch)
        conn = self._conn
        while not self._lease.done:
            event, self._pending = self._pending or _next_event(conn, _CUT_SHORT), None
            if event is h11.NEED_DATA:
                await self._read(watch)
            elif type(event) is h11.Data:
                return self._gather(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self._lease.finish(reusable=True)
            else:
                raise _closed_early(event)
        return None

    def decode(self, decoder: ChunkedDecoder | LengthDecoder, keep_alive: bool) -> None:
        """Read this body with ``decoder`` (a head ``_fast_http`` read, h11 untouched)."""
        self._chunks, self._keep_alive = decoder, keep_alive

    def decode_chunks(self) -> None:
        """Read this (chunked) body with ``ChunkedDecoder`` rather than h11's event per chunk,
        starting from the bytes h11 received past the head."""
        decoder = self._chunks = ChunkedDecoder()
        data, closed = self._conn.h11.trailing_data
        if data:
            decoder.feed(data)
        if closed:
            decoder.feed(b"")

    async def _next_decoded(
        self, decoder: ChunkedDecoder | LengthDecoder, watch: PhaseWatch | None
    ) -> bytes | None:
        while not self._lease.done:
            data = decoder.take()
            if data:
                self._limit.add(len(data))
                return data
            if decoder.error is not None:
                raise decoder.error
            if decoder.done:
                clean = self._keep_alive and not decoder.eof and not decoder.leftover
                if clean and self._conn.h11.our_state is not h11.IDLE:
                    self._conn.h11 = h11.Connection(h11.CLIENT)  # the next exchange's
                await self._lease.finish(reusable=clean)
                return None
            await self._read(watch, decoder.feed)
        return None

    def _gather(self, first: bytes) -> bytes:
        """``first`` and the data events h11 can give without another read; an error found
        past them is kept for the next call, so the bytes before it still reach the caller."""
        self._limit.add(len(first))
        conn = self._conn
        pieces = [first]
        try:
            while True:
                event = _next_event(conn, _CUT_SHORT)
                if type(event) is not h11.Data:
                    break
                data = bytes(event.data)
                self._limit.add(len(data))
                pieces.append(data)
        except errors.CorralError as exc:
            self._error = exc
            return b"".join(pieces)
        if event is not h11.NEED_DATA:
            self._pending = event
        return first if len(pieces) == 1 else b"".join(pieces)

    def bound_waits(
        self, *, deadline: float | None = None, idle: float | None = None, error: ErrorFactory
    ) -> bool:
        """Take a limit of a layer above into this body's reads (``corral._streams``)."""
        return self._bounds().add(deadline, idle, error)

    def _bounds(self) -> WaitBounds:
        waits = self._waits
        if waits is None:
            read = self._timeouts.read
            waits = self._waits = WaitBounds(read, lambda: _body_timeout(read))
        return waits

    async def _read(
        self, watch: PhaseWatch | None, sink: Callable[[bytes], None] | None = None
    ) -> None:
        conn, transport = self._conn, self._lease.transport
        if watch is not None:
            watch.start("read", self._timeouts.read)
            await transport._receive(conn, sink=sink, watch=watch)
            return
        bounds = self._bounds()
        now = current_time()
        end = bounds.end(now)
        if isinstance(conn.stream, LeanStream):
            try:
                await transport._receive(conn, until=None if end == math.inf else end, sink=sink)
            except ReadTimedOut:
                raise bounds.error(now) from None
            return
        with anyio.CancelScope(deadline=end) as scope:
            await transport._receive(conn, sink=sink)
        if scope.cancelled_caught:
            raise bounds.error(now)

    async def aclose(self) -> None:
        await self._lease.finish(reusable=False)
