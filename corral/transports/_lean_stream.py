"""What ``H11Transport`` needs of a stream to run an attempt without a cancel scope.

anyio's streams are timed by cancel scopes; entering one per request (or per read) costs a
good part of a small request's CPU. A lean stream takes its read deadline as an argument
(``receive_until``), writes without waiting when the kernel takes the bytes at once
(``write``), and answers "did the peer close this idle connection?" from what it already
knows (``looks_closed``). ``AsyncioStream`` is one (asyncio, any scheme), ``TrioStream`` the
other (trio, plain TCP); TLS on trio goes through anyio's streams and one scope per attempt.
"""

from __future__ import annotations

import abc
import socket

import anyio.abc

__all__ = ["LeanStream", "ReadTimedOut", "peek_closed"]

_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


class ReadTimedOut(Exception):
    """``receive_until``'s deadline passed with no byte (not an ``OSError``, as TimeoutError is,
    so no handler of network errors takes it for one)."""


class LeanStream(anyio.abc.ByteStream):
    """One connection; one reader and one writer at a time, as HTTP/1.1 needs."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.receive_until(max_bytes, None)

    @abc.abstractmethod
    async def receive_until(self, max_bytes: int, deadline: float | None) -> bytes:
        """``receive``, raising ``ReadTimedOut`` if no byte has come by ``deadline`` (on the
        running loop's clock; None: no limit), with no cancel scope. The stream may be closed
        after a timeout (a transport drops such a connection anyway)."""

    async def send(self, item: bytes) -> None:
        if self.write(item):
            await self.drain()

    @abc.abstractmethod
    def write(self, item: bytes) -> bool:
        """Hand ``item`` to the kernel without waiting; True if ``drain`` must be awaited."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until what ``write`` could not hand over has gone out."""

    @abc.abstractmethod
    def looks_closed(self) -> bool:
        """For an idle connection: has the peer closed it or sent something unasked?"""


def peek_closed(sock: socket.socket) -> bool:
    """Has the peer closed this idle socket, or sent bytes nobody asked for? One non-blocking
    peek (not ``select``, which fails for descriptors >= 1024)."""
    try:
        sock.recv(1, _PEEK)  # b"" (closed) or unasked bytes: either way unusable
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True
