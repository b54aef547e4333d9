"""``H11Transport.send_streaming`` with pieces that never wait: the upload still stops at a
cancel and lets other tasks run (a lean stream's ``write`` is no checkpoint)."""

from __future__ import annotations

import socket
from collections.abc import AsyncGenerator

import anyio
import pytest

from corral.core._models import Request
from corral.transports._http11 import H11Transport

pytestmark = pytest.mark.anyio

PIECES = 32  # of 1 KiB: all fit in the kernel's buffers, so no write ever waits


class _FromMemory:
    """Pieces already in memory (no await of their own); the caller's scope is cancelled as
    the third one goes out."""

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.taken = 0

    @property
    def length(self) -> int:
        return PIECES * 1024

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        for _ in range(PIECES):
            self.taken += 1
            if self.taken == 3:
                self.scope.cancel()
            yield bytes(1024)


async def test_a_cancel_stops_a_streamed_body_at_the_next_piece(
    peer: tuple[int, list[socket.socket]],
) -> None:
    """The old anyio stream's ``send`` was a checkpoint per piece; without one the whole body
    went out under a cancelled scope (and no other task ran) before the read noticed."""
    port, _ = peer
    request = Request("POST", f"http://127.0.0.1:{port}/v1/files")
    async with H11Transport() as transport:
        with anyio.fail_after(10), anyio.CancelScope() as scope:
            source = _FromMemory(scope)
            await transport.send_streaming(request, source)
        assert scope.cancelled_caught
        assert source.taken == 3
        assert transport.open_connections == 0  # the half-sent exchange is dropped
