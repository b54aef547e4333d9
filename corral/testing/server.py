"""The emulator on the wire: a small asyncio HTTP/1.1 server, in the foreground or a thread.

The HTTP parsing is deliberately minimal (request line, headers, Content-Length bodies,
keep-alive, pipelining) because the emulator must outrun the clients it measures; a request the
parser does not support (chunked upload, oversized head) gets a clean 4xx and a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

from corral.testing.emulator import Emulator, EmulatorConfig, Fault, Plan

__all__ = ["RunningEmulator", "serve_forever", "serve_in_thread"]

_MAX_HEAD = 64 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    411: "Length Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse(buf: bytearray) -> tuple[str, str, dict[str, str], bytes, bool] | None:
    """One complete request off the front of ``buf``: method, path, headers, body, keep-alive."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > _MAX_HEAD:
            raise _BadRequest(431, "request head too large")
        return None
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
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest(411, "chunked request bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _BadRequest(400, "bad content-length") from None
    total = end + 4 + length
    if len(buf) < total:
        return None
    body = bytes(buf[end + 4 : total])
    del buf[:total]
    conn = headers.get("connection", "").lower()
    keep_alive = conn != "close" and (version == "HTTP/1.1" or conn == "keep-alive")
    return method, path, headers, body, keep_alive


def _head(status: int, headers: tuple[tuple[str, str], ...], extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Protocol(asyncio.Protocol):
    def __init__(self, emulator: Emulator, keepalive_timeout: float | None) -> None:
        self._emulator = emulator
        self._keepalive_timeout = keepalive_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._busy = False
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._emulator.counts["connections"] += 1
        self._arm_idle_timer()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _arm_idle_timer(self) -> None:
        """Close a keep-alive connection left idle too long, as real servers do."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._keepalive_timeout is not None and self._transport is not None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._keepalive_timeout, self._close_idle)

    def _close_idle(self) -> None:
        if self._transport is not None and not self._busy:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._task is not None:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        while not self._busy and self._transport is not None:
            try:
                parsed = _parse(self._buf)
            except _BadRequest as exc:
                body = f'{{"error": {{"message": "{exc}"}}}}'.encode()
                self._transport.write(
                    _head(exc.status, (("content-length", str(len(body))),), "") + body
                )
                self._transport.close()
                return
            if parsed is None:
                self._arm_idle_timer()
                return
            method, path, headers, body, keep_alive = parsed
            plan = self._emulator.handle(time.monotonic(), method, path, headers, body)
            if plan.delay <= 0 and plan.events is None and plan.fault is None:
                self._write_plain(plan, keep_alive)
                continue
            self._busy = True
            self._task = asyncio.get_running_loop().create_task(self._act(plan, keep_alive))

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
            self._busy = False
            self._task = None
        if self._transport is not None and not self._transport.is_closing():
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
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/v1"

    @property
    def counts(self) -> dict[str, int]:
        """Requests received, per outcome (a copy; safe to read from another thread)."""
        return dict(self.emulator.counts)

    def stop(self) -> None:
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
    keepalive_timeout: float | None = None,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Protocol(emulator, keepalive_timeout), host, port, backlog=4096, ssl=ssl_context
    )


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
    keepalive_timeout: float | None = None,
) -> Iterator[RunningEmulator]:
    """Run an emulator on its own event loop in a daemon thread, for any caller (trio too)."""
    emulator = Emulator(config)
    running = RunningEmulator(emulator, host, port, https=ssl_context is not None)
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        loop = _new_loop(use_uvloop)
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                _start(emulator, host, port, ssl_context, keepalive_timeout)
            )
        except BaseException as exc:  # reported to the starting thread
            failure.append(exc)
            ready.set()
            return
        running.port = server.sockets[0].getsockname()[1]
        running._loop, running._server = loop, server
        ready.set()
        try:
            loop.run_forever()
        finally:
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


def serve_forever(config: EmulatorConfig, host: str, port: int, *, use_uvloop: bool = True) -> None:
    """Serve in the foreground until interrupted (``corral serve``)."""
    loop = _new_loop(use_uvloop)
    emulator = Emulator(config)
    server = loop.run_until_complete(_start(emulator, host, port))
    bound = server.sockets[0].getsockname()
    print(f"corral emulator listening on http://{bound[0]}:{bound[1]}/v1", flush=True)
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        loop.close()
