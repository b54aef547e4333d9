"""A lean anyio ``ByteStream`` over an asyncio ``Protocol``, for ``H11Transport`` on asyncio.

anyio's own asyncio socket stream pauses and resumes the transport's reading around every
``receive`` (two ``epoll_ctl`` calls) and yields to the loop once per ``send`` even when the
write went straight out. For an HTTP client that sends one small request and then waits for
the answer, those are a third of the transport's CPU. This stream keeps reading while its
buffer is small, wakes the reader with one future, and only waits on ``send`` when the kernel
buffer is full. Cancellation works as for any await: anyio's cancel scopes cancel the task.

The protocol is a ``BufferedProtocol``: asyncio's plain protocols get a fresh 256 KiB ``bytes``
per read (an mmap, a mremap and a munmap each, for a 1 KiB answer); here every connection of a
thread reads into one buffer and keeps a copy of what came.

A read timeout (``receive_until``) needs no cancel scope: each wait records its deadline, and
one timer per connection, armed for the first wait, fails the waiter only if that wait's
deadline has passed; otherwise it moves to the current deadline. A streamed body read one event
at a time thus costs a float per read, not a scope and a timer.
Under trio the transport uses ``TrioStream`` (plain TCP) or anyio's streams (TLS).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import threading
from typing import Any, cast

import anyio
import anyio.abc

from corral.transports._lean_stream import LeanStream, ReadTimedOut

__all__ = ["AsyncioStream", "open_asyncio_stream"]

# Stop reading from the socket while this many bytes wait unread (back-pressure on big bodies).
_HIGH_WATER = 1 << 20

#: Bytes one read takes at most (asyncio's own socket transport reads this much at once).
_READ_SIZE = 256 * 1024
_buffers = threading.local()


def _read_buffer() -> memoryview:
    """This thread's read buffer. asyncio and uvloop fill it and call ``buffer_updated`` at once,
    before the loop does anything else, so all the connections of a loop can share it."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(_READ_SIZE))
    return view


class _Protocol(asyncio.BufferedProtocol):
    __slots__ = (
        "buffered",
        "chunks",
        "drain_waiter",
        "eof",
        "error",
        "loop",
        "lost",
        "read_buffer",
        "reading_paused",
        "timer",
        "timer_when",
        "transport",
        "wait_deadline",
        "waiter",
        "write_paused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.read_buffer = _read_buffer()
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = self.lost = self.reading_paused = self.write_paused = False
        self.error: BaseException | None = None
        # One fresh future per wait: asyncio cancels the future a cancelled task awaited.
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        # The read timeout: the current wait's deadline, and the one timer that checks it.
        self.wait_deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self.read_buffer[:nbytes])  # copied out before the next read reuses it
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # let asyncio close the transport: HTTP/1.1 never half-closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._wake()
        self._wake_drain()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def arm(self, deadline: float) -> None:
        """Time the coming wait out at ``deadline`` (the timer moves only to an earlier time)."""
        self.wait_deadline = deadline
        if self.timer is None or self.timer_when > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_when = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done() or not self.wait_deadline:
            return  # no timed wait now: the next one arms a timer again
        if self.loop.time() >= self.wait_deadline:
            waiter.set_exception(ReadTimedOut())
        else:
            self.arm(self.wait_deadline)

    def disarm(self) -> None:
        self.wait_deadline = 0.0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _wake_drain(self) -> None:
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)


class AsyncioStream(LeanStream):
    """One TCP (or TLS) connection on an asyncio loop (``LeanStream``)."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False

    async def receive_until(self, max_bytes: int, deadline: float | None) -> bytes:
        """No cancel scope even for a wait: the protocol's one timer fails it."""
        protocol = self._protocol
        if not protocol.chunks and deadline is not None:
            protocol.arm(deadline)
        elif protocol.wait_deadline:
            protocol.wait_deadline = 0.0
        while not protocol.chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if protocol.lost and protocol.error is not None:
                raise anyio.BrokenResourceError from protocol.error
            if protocol.eof or protocol.lost:
                raise anyio.EndOfStream
            protocol.waiter = protocol.loop.create_future()
            try:
                await protocol.waiter
            finally:
                protocol.waiter = None
        chunk = protocol.chunks.popleft()
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            protocol.chunks.appendleft(rest)
        protocol.buffered -= len(chunk)
        if protocol.reading_paused and protocol.buffered <= _HIGH_WATER // 4:
            protocol.reading_paused = False
            self._transport.resume_reading()
        return chunk

    def write(self, item: bytes) -> bool:
        protocol = self._protocol
        if self._closed:
            raise anyio.ClosedResourceError
        if protocol.lost or self._transport.is_closing():
            raise anyio.BrokenResourceError from protocol.error
        self._transport.write(item)
        return protocol.write_paused

    async def drain(self) -> None:
        """Wait until asyncio's write buffer is below its high-water mark again."""
        protocol = self._protocol
        while protocol.write_paused and not protocol.lost:
            protocol.drain_waiter = protocol.loop.create_future()
            try:
                await protocol.drain_waiter
            finally:
                protocol.drain_waiter = None
        if protocol.lost:
            raise anyio.BrokenResourceError from protocol.error

    def looks_closed(self) -> bool:
        protocol = self._protocol
        return self._closed or protocol.lost or protocol.eof or bool(protocol.chunks)

    async def send_eof(self) -> None:
        self._transport.write_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._protocol.disarm()
        self._transport.abort()

    @property
    def extra_attributes(self) -> dict[Any, Any]:
        sock = self._transport.get_extra_info("socket")
        return {anyio.abc.SocketAttribute.raw_socket: lambda: sock}


async def open_asyncio_stream(
    host: str, port: int, ssl_context: ssl.SSLContext | None
) -> AsyncioStream:
    """Connect (TLS when ``ssl_context`` is given) on the running asyncio loop."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: _Protocol(loop),
        host,
        port,
        ssl=ssl_context,
        server_hostname=host if ssl_context is not None else None,
    )
    return AsyncioStream(transport, protocol)
