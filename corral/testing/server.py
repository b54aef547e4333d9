"""The emulator on the wire: a small asyncio HTTP/1.1 server, in the foreground or a thread.

The HTTP parsing is deliberately minimal (request line, headers, Content-Length bodies,
keep-alive, pipelining) because the emulator must outrun the clients it measures; a request the
parser does not support (chunked upload, oversized head) gets a clean 4xx and a close.

Theory of operation for hostile clients: every connection is in one phase (idle, reading a
request, busy answering one, closing) with a deadline; one sweep per tick closes the overdue.
A connection that has sent nothing since it opened or since its last answer is idle; once the
first byte of a request arrives the whole request must arrive within ``request_timeout``
(slowloris) or the client gets 408. A bad ``Content-Length`` gets 400, one over ``max_body`` gets
413 at once, before any of the body is read. A refused client's further bytes are read and
dropped for ``linger`` seconds after our FIN, so it reads the answer instead of a reset. At
``max_connections`` a newcomer closes the longest-idle connection, or gets 503 if all are busy.
A TLS ClientHello (a client given ``https://``) gets a plain-HTTP 400 and a close at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import math
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple, cast

import attrs

from corral.core import _jsonlib as jsonlib
from corral.testing.emulator import Emulator, EmulatorConfig, Fault, Plan

__all__ = ["RunningEmulator", "ServerLimits", "serve_forever", "serve_in_thread"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TLS_HANDSHAKE = b"\x16\x03"  # a TLS record of type handshake, version 3.x: a ClientHello


@attrs.frozen
class ServerLimits:
    """What one client may cost the server, whatever it sends (see docs/reliability.md)."""

    #: Bytes of request body; a longer Content-Length is answered 413 without reading the body.
    max_body: int = 32 * 1024 * 1024
    #: ``max_body`` for a file upload (``POST /v1/files``): a Batch API input may be 200 MB.
    max_upload: int = 256 * 1024 * 1024
    #: Bytes of request line plus headers; a longer head is answered 431.
    max_head: int = 64 * 1024
    #: Seconds from a request's first byte (or from the connection's opening) to its last.
    request_timeout: float = 30.0
    #: Seconds an idle keep-alive connection is kept after an answer (longer than the client
    #: pools' expiry, so they close first and never race the server's close).
    keepalive_timeout: float = 60.0
    #: Open connections (keep it under ``ulimit -n``); see the module docstring for the policy.
    max_connections: int = 1000
    #: Seconds a refused client's further bytes are read and dropped before the socket closes.
    linger: float = 2.0

    @property
    def tick(self) -> float:
        """How often the sweep looks for overdue connections."""
        shortest = min(self.request_timeout, self.keepalive_timeout, self.linger)
        return min(1.0, max(0.01, shortest / 4))


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Head(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    keep_alive: bool
    #: Bytes of the head, its blank line included.
    size: int
    #: Bytes of the body that follows.
    length: int


def _parse_head(buf: bytearray, end: int, max_body: int, max_upload: int = 0) -> _Head:
    """The request head ending at ``end`` (the blank line); ``_BadRequest`` says what is wrong."""
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    try:
        method, path, version = lines[0].split(" ", 2)
    except ValueError:
        raise _BadRequest(400, "bad request line") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise _BadRequest(400, "bad header line")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length" and headers.get(name, value) != value:
            raise _BadRequest(400, "conflicting Content-Length headers")
        headers[name] = value
    if "transfer-encoding" in headers:
        raise _BadRequest(411, "chunked request bodies are not supported; send Content-Length")
    raw = headers.get("content-length", "0")
    if not (raw.isascii() and raw.isdigit()):
        raise _BadRequest(400, f"bad Content-Length {raw[:40]!r}: expected a non-negative integer")
    length = int(raw)
    if method == "POST" and path.split("?", 1)[0] == "/v1/files":
        max_body = max(max_body, max_upload)
    if length > max_body:
        raise _BadRequest(
            413, f"a request body of {length} bytes is over this server's {max_body}-byte limit"
        )
    conn = headers.get("connection", "").lower()
    keep_alive = conn != "close" and (version == "HTTP/1.1" or conn == "keep-alive")
    return _Head(method, path, headers, keep_alive, end + 4, length)


def _head(status: int, headers: tuple[tuple[str, str], ...], extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def _error_response(status: int, message: str) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": None, "code": None}
    body = jsonlib.dumps({"error": error})
    extra = f"content-length: {len(body)}\r\nconnection: close\r\n"
    return _head(status, (("content-type", "application/json"),), extra) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Phase(enum.Enum):
    IDLE = "idle"  #: no byte of a request yet
    READING = "reading"  #: part of a request has arrived
    BUSY = "busy"  #: answering (a delay, a stream); the server, not the client, is slow
    CLOSING = "closing"  #: refused: reading and dropping until the client closes or ``linger``


class _Connections:
    """The open connections of one server, longest-idle first, and the sweep that expires them."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._open: collections.OrderedDict[_Protocol, None] = collections.OrderedDict()
        self._sweep_handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: _Protocol) -> bool:
        """Register ``conn``; at the cap close the longest-idle one first, or refuse (False)."""
        if len(self._open) >= self.limits.max_connections:
            victim = next((c for c in self._open if c.phase is not _Phase.BUSY), None)
            if victim is None:
                return False
            self.forget(victim)
            victim.close()
        self._open[conn] = None
        return True

    def touch(self, conn: _Protocol) -> None:
        if conn in self._open:  # not when evicted or closed
            self._open.move_to_end(conn)

    def forget(self, conn: _Protocol) -> None:
        self._open.pop(conn, None)

    def reset_all(self) -> None:
        """Reset every open connection, as the kernel does for a process that died."""
        for conn in list(self._open):
            conn._reset()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep_handle = loop.call_later(self.limits.tick, self._sweep, loop)

    def stop(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for conn in [c for c in self._open if c.deadline <= now]:
            conn.expire()
        self.start(loop)


class _Protocol(asyncio.Protocol):
    def __init__(self, emulator: Emulator, conns: _Connections) -> None:
        self._emulator = emulator
        self._conns = conns
        self._limits = conns.limits
        self._buf = bytearray()
        self._scanned = 0  # bytes of ``_buf`` known to hold no end of head
        self._head: _Head | None = None
        self.phase = _Phase.IDLE
        self.deadline = math.inf
        self._paused = False
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self._transport = cast(asyncio.Transport, transport)
        self._emulator.counts["connections"] += 1
        if not self._conns.admit(self):
            tcp.write(_error_response(503, "too many connections; retry later"))
            tcp.close()
            return
        self._enter(_Phase.IDLE, time.monotonic() + self._limits.request_timeout)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._conns.forget(self)
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _enter(self, phase: _Phase, deadline: float) -> None:
        self.phase, self.deadline = phase, deadline
        self._conns.touch(self)

    def expire(self) -> None:
        """The sweep found this connection past its deadline."""
        if self.phase is _Phase.READING:
            self._refuse(
                408, f"the request did not arrive within {self._limits.request_timeout:g} s"
            )
        elif self.phase is _Phase.CLOSING and self._transport is not None:
            self._transport.abort()
        else:
            self.close()

    def _plain_http_only(self) -> None:
        """Answer a TLS ClientHello in plain HTTP and close, as nginx does: the client's TLS
        stack fails at once with "wrong version number" (the usual sign of https:// to an
        http:// port) instead of waiting for a ServerHello until it times out."""
        assert self._transport is not None
        message = "this server speaks plain HTTP, not TLS: use an http:// URL"
        self._transport.write(_error_response(400, message))
        self.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close, dropping what the client still sends for ``linger`` s."""
        transport = self._transport
        if transport is None:
            return
        transport.write(_error_response(status, message))
        self._buf.clear()
        self._head = None
        if not transport.can_write_eof():  # TLS: no half-close
            transport.close()
            return
        transport.write_eof()
        if self._paused:
            transport.resume_reading()
            self._paused = False
        self._enter(_Phase.CLOSING, time.monotonic() + self._limits.linger)

    # -- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is _Phase.CLOSING:
            return
        if phase is _Phase.IDLE and data.startswith(_TLS_HANDSHAKE):  # https:// to plain HTTP
            self._plain_http_only()
            return
        self._buf += data
        if phase is not _Phase.BUSY:
            self._serve_buffered()
        elif len(self._buf) > self._limits.max_head + self._limits.max_body:
            assert self._transport is not None
            self._transport.pause_reading()  # a pipelining client outrunning a slow answer
            self._paused = True

    def _serve_buffered(self) -> None:
        """Answer every complete request in the buffer, then wait in the right phase.

        Called with the connection open and not busy (from ``data_received`` or after an answer).
        """
        served = False
        now = time.monotonic()
        while self._buf:
            head = self._head
            if head is None:
                end = self._buf.find(b"\r\n\r\n", self._scanned)
                if end < 0 or end > self._limits.max_head:
                    if len(self._buf) > self._limits.max_head:
                        self._refuse(431, f"the request head is over {self._limits.max_head} bytes")
                        return
                    self._scanned = max(0, len(self._buf) - 3)
                    break
                try:
                    head = self._head = _parse_head(
                        self._buf, end, self._limits.max_body, self._limits.max_upload
                    )
                except _BadRequest as exc:
                    self._refuse(exc.status, str(exc))
                    return
            total = head.size + head.length
            if len(self._buf) < total:
                break
            body = bytes(self._buf[head.size : total])
            del self._buf[:total]
            self._head, self._scanned, served = None, 0, True
            plan = self._emulator.handle(now, head.method, head.path, head.headers, body)
            if plan.delay <= 0 and plan.events is None and plan.fault is None:
                self._write_plain(plan, head.keep_alive)
                if not head.keep_alive:
                    return  # closed
                continue
            self.phase, self.deadline = _Phase.BUSY, math.inf
            self._task = asyncio.get_running_loop().create_task(self._act(plan, head.keep_alive))
            return
        if served:
            if self._buf:
                self._enter(_Phase.READING, now + self._limits.request_timeout)
            else:
                self._enter(_Phase.IDLE, now + self._limits.keepalive_timeout)
        elif self.phase is _Phase.IDLE and self._buf:  # the first bytes of a request
            self._enter(_Phase.READING, now + self._limits.request_timeout)

    def _write_plain(self, plan: Plan, keep_alive: bool) -> None:
        assert self._transport is not None
        extra = f"content-length: {len(plan.body)}\r\n"
        if not keep_alive:
            extra += "connection: close\r\n"
        self._transport.write(_head(plan.status, plan.headers, extra) + plan.body)
        if not keep_alive:
            self._transport.close()

    def _reset(self) -> None:
        """Abort with an RST, the way a crashed proxy or a killed server does."""
        if self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()

    async def _act(self, plan: Plan, keep_alive: bool) -> None:
        try:
            if plan.fault is Fault.RESET:
                self._reset()
                return
            if plan.delay > 0:
                await asyncio.sleep(plan.delay)
            if plan.fault is Fault.HANG:
                if self._transport is not None:
                    self._transport.close()
                return
            if self._transport is None:
                return
            if plan.fault is Fault.RESET_AFTER_FIRST_BYTE:
                self._transport.write(
                    _head(plan.status, plan.headers, "transfer-encoding: chunked\r\n")
                )
                self._transport.write(_chunk(plan.events[0] if plan.events else plan.body[:10]))
                await asyncio.sleep(0)
                self._reset()
                return
            if plan.events is None:
                if plan.fault is Fault.TRUNCATE:
                    extra = f"content-length: {len(plan.body)}\r\nconnection: close\r\n"
                    self._transport.write(_head(plan.status, plan.headers, extra))
                    self._transport.write(plan.body[: len(plan.body) // 2])
                    self._transport.close()
                    return
                self._write_plain(plan, keep_alive)
            else:
                await self._stream(plan, keep_alive)
        finally:
            self._task = None
        if self._transport is None or self._transport.is_closing():
            return
        if self._paused:
            self._transport.resume_reading()
            self._paused = False
        now = time.monotonic()
        if self._buf:
            self._enter(_Phase.READING, now + self._limits.request_timeout)
        else:
            self._enter(_Phase.IDLE, now + self._limits.keepalive_timeout)
        self._serve_buffered()

    async def _stream(self, plan: Plan, keep_alive: bool) -> None:
        assert plan.events is not None
        transport = self._transport
        extra = "transfer-encoding: chunked\r\n" + ("" if keep_alive else "connection: close\r\n")
        assert transport is not None
        transport.write(_head(plan.status, plan.headers, extra))
        for i, event in enumerate(plan.events):
            if i and plan.pace > 0:
                await asyncio.sleep(plan.pace)
            if transport.is_closing():
                return
            transport.write(_chunk(event))
        transport.write(b"0\r\n\r\n")
        if not keep_alive:
            transport.close()


class RunningEmulator:
    """A live emulator: its URL, its counters, and ``stop()``."""

    def __init__(self, emulator: Emulator, host: str, port: int, *, https: bool = False) -> None:
        self.emulator = emulator
        self.scheme = "https" if https else "http"
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._connections: _Connections | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The URL to give a client (``.../v1``), with the port the server bound."""
        return f"{self.scheme}://{self.host}:{self.port}/v1"

    @property
    def counts(self) -> dict[str, int]:
        """Requests received, per outcome (a copy; safe to read from another thread)."""
        return dict(self.emulator.counts)

    @property
    def open_connections(self) -> int:
        """Connections the server holds now (approximate from another thread)."""
        return len(self._connections) if self._connections is not None else 0

    def kill(self) -> None:
        """Stop as a crashed server does: the port closes and every open connection is reset
        at once (``stop`` leaves the loop's sockets to the garbage collector)."""
        loop, server, conns = self._loop, self._server, self._connections
        if loop is None or server is None or conns is None:
            return
        done = threading.Event()

        def crash() -> None:
            server.close()
            conns.reset_all()
            done.set()

        loop.call_soon_threadsafe(crash)
        done.wait(timeout=10)
        self.stop()

    def stop(self) -> None:
        """Stop the server's loop and join its thread (bounded); safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None


async def _start(
    emulator: Emulator,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    limits: ServerLimits | None = None,
) -> tuple[asyncio.Server, _Connections]:
    loop = asyncio.get_running_loop()
    conns = _Connections(limits or ServerLimits())
    server = await loop.create_server(
        lambda: _Protocol(emulator, conns), host, port, backlog=4096, ssl=ssl_context
    )
    conns.start(loop)
    return server, conns


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


@contextlib.contextmanager
def serve_in_thread(
    config: EmulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    use_uvloop: bool = True,
    ssl_context: ssl.SSLContext | None = None,
    limits: ServerLimits | None = None,
    any_model: bool = True,
    emulator: Emulator | None = None,
) -> Iterator[RunningEmulator]:
    """Run an emulator on its own event loop in a daemon thread, for any caller (trio too).

    Tests and benchmarks name models freely ("m"), so by default this server accepts any model;
    ``any_model=False`` keeps ``config.models`` (as ``corral serve`` does) for tests of a
    client's handling of ``model_not_found``.
    ``emulator``: serve this one (a metered one, say) instead of one built from ``config``.
    """
    config = config or EmulatorConfig()
    if any_model:
        config = attrs.evolve(config, any_model=True)
    emulator = emulator or Emulator(config)
    running = RunningEmulator(emulator, host, port, https=ssl_context is not None)
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        loop = _new_loop(use_uvloop)
        asyncio.set_event_loop(loop)
        try:
            server, conns = loop.run_until_complete(
                _start(emulator, host, port, ssl_context, limits)
            )
        except BaseException as exc:  # reported to the starting thread
            failure.append(exc)
            ready.set()
            return
        running.port = server.sockets[0].getsockname()[1]
        running._loop, running._server, running._connections = loop, server, conns
        ready.set()
        try:
            loop.run_forever()
        finally:
            conns.stop()
            server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    thread = threading.Thread(target=run, name="corral-emulator", daemon=True)
    running._thread = thread
    thread.start()
    ready.wait(timeout=10)
    if failure:
        raise failure[0]
    try:
        yield running
    finally:
        running.stop()


def serve_forever(
    config: EmulatorConfig,
    host: str,
    port: int,
    *,
    use_uvloop: bool = True,
    limits: ServerLimits | None = None,
) -> None:
    """Serve in the foreground until interrupted (``corral serve``)."""
    loop = _new_loop(use_uvloop)
    emulator = Emulator(config)
    server, conns = loop.run_until_complete(_start(emulator, host, port, limits=limits))
    bound = server.sockets[0].getsockname()
    print(f"corral emulator listening on http://{bound[0]}:{bound[1]}/v1", flush=True)
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        conns.stop()
        server.close()
        loop.close()
