"""A lean ``LeanStream`` over a plain TCP socket, for ``H11Transport`` on trio.

anyio's trio stream wraps trio's socket, and trio's socket operations each enter a context
manager and end with a trip through the scheduler even when the kernel answered at once; a
read timeout needs a cancel scope around the attempt. For a client that writes one small
request and reads one answer, that was half of the transport's CPU on trio. This stream calls
the socket directly and waits (``wait_readable``/``wait_writable``, trio's checkpoints) only
when the kernel has nothing to give or no room to take.

A read deadline needs no cancel scope either (one cost 7 us, a tenth of a request): a timed
read registers with its run's ``_Watchdog``, a system task that sleeps until the earliest
registered deadline and closes the socket of every read past its own. The waiting read then
raises ``ReadTimedOut``; the transport drops a connection whose read timed out anyway.

Trio's rules still hold: every receive notices a cancelled scope first, and a reader whose
bytes keep coming without a wait takes a full checkpoint every few reads (``Pacer``), before
taking any byte, so a deadline still fires and other tasks still run.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import trio

from corral._pacing import Pacer
from corral.transports._lean_stream import LeanStream, ReadTimedOut, peek_closed

__all__ = ["TrioStream", "open_trio_stream"]


class _Watchdog:
    """Ends the timed reads of one trio run that wait past their deadline.

    It wakes at the earliest deadline of a read waiting at the time (a read with an earlier
    deadline moves the wake-up), times out the reads past theirs and sleeps until the next. A
    read that ends in time only leaves the set: the wake-up it may have set finds nothing.
    """

    def __init__(self) -> None:
        self.waiting: set[TrioStream] = set()
        self.wake_at = math.inf
        self._scope: trio.CancelScope | None = None

    def watch(self, stream: TrioStream, deadline: float) -> None:
        self.waiting.add(stream)
        if deadline < self.wake_at:
            self.wake_at = deadline
            if self._scope is not None:
                self._scope.deadline = deadline

    async def run(self) -> None:
        """The system task (cancelled when the run's main task ends). It must never raise:
        trio turns an error of a system task into a crash of the whole run."""
        while True:
            with trio.CancelScope(deadline=self.wake_at) as self._scope:
                await trio.sleep_forever()
            now = trio.current_time()
            self.wake_at = math.inf
            for stream in list(self.waiting):
                if stream.wait_deadline <= now:
                    self.waiting.discard(stream)
                    stream.time_out()
                else:
                    self.wake_at = min(self.wake_at, stream.wait_deadline)


_WATCHDOG: trio.lowlevel.RunVar[_Watchdog] = trio.lowlevel.RunVar("corral_read_watchdog")


def _watchdog() -> _Watchdog:
    """This run's watchdog, started on first use."""
    try:
        return _WATCHDOG.get()
    except LookupError:
        dog = _Watchdog()
        trio.lowlevel.spawn_system_task(dog.run, name="corral read watchdog")
        _WATCHDOG.set(dog)
        return dog


class TrioStream(LeanStream):
    """One TCP connection on trio, over a non-blocking socket it owns. A read that times out
    closes it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._pending: memoryview | None = None  # what ``write`` could not hand over
        self._pace = Pacer()
        self._closed = False
        self.wait_deadline = math.inf  # of the timed read waiting now
        self._timed_out = False

    async def receive_until(self, max_bytes: int, deadline: float | None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._pace()
        sock = self._sock
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            else:
                if not data:
                    raise anyio.EndOfStream
                return data
            if not await self._wait(trio.lowlevel.wait_readable, deadline):
                raise ReadTimedOut

    def write(self, item: bytes) -> bool:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._pending is not None:  # still draining: queue behind it
            self._pending = memoryview(bytes(self._pending) + item)
            return True
        sent = self._send(item)
        if sent < len(item):
            self._pending = memoryview(item)[sent:]
            return True
        return False

    async def drain(self) -> None:
        while self._pending is not None:
            await self._wait(trio.lowlevel.wait_writable, None)
            sent = self._send(self._pending)
            rest = self._pending[sent:]
            self._pending = rest if len(rest) else None

    async def _wait(
        self, wait: Callable[[socket.socket], Awaitable[None]], deadline: float | None
    ) -> bool:
        """Wait until the socket is ready; False (the socket closed) if ``deadline`` came first."""
        dog = None
        if deadline is not None:  # the running trio.run's (a pooled connection may outlive one)
            dog = _watchdog()
            self.wait_deadline = deadline
            dog.watch(self, deadline)
        try:
            await wait(self._sock)
        except trio.ClosedResourceError:  # the watchdog, or ``aclose`` while waiting
            if not self._timed_out:
                raise anyio.ClosedResourceError from None
        finally:
            if dog is not None:
                dog.waiting.discard(self)
            # Timed out, also when the bytes or a cancel came just as the watchdog ran: the
            # socket ``time_out`` notified is closed now, whatever ends this wait.
            if self._timed_out:
                self._close()
        return not self._timed_out

    def time_out(self) -> None:
        """Wake the read waiting past its deadline (the watchdog's call). A stream another
        task closed meanwhile is left alone: its read wakes anyway, and trio may refuse to
        notify a closed socket (an error in the watchdog would crash the run)."""
        if not self._closed:
            self._timed_out = True
            trio.lowlevel.notify_closing(self._sock)

    def _send(self, data: bytes | memoryview) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    def looks_closed(self) -> bool:
        return self._closed or peek_closed(self._sock)

    async def send_eof(self) -> None:
        self._sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)  # wakes a task waiting on it, if any
            self._sock.close()

    @property
    def extra_attributes(self) -> dict[Any, Any]:
        sock = self._sock
        return {anyio.abc.SocketAttribute.raw_socket: lambda: sock}


async def open_trio_stream(host: str, port: int) -> TrioStream:
    """Connect with trio's happy eyeballs (``TCP_NODELAY`` set), then own the socket."""
    stream = await trio.open_tcp_stream(host, port)
    return TrioStream(socket.socket(fileno=stream.socket.detach()))
