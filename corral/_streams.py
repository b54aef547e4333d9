"""Stream wrappers that layers put around a response body they pass on."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from corral._clock import current_time
from corral.core._errors import DeadlineExceeded
from corral.core._models import ByteStream

__all__ = ["DeadlineStream"]


class DeadlineStream:
    """Passes a stream through but ends it with ``DeadlineExceeded`` at the call's deadline.

    The deadline bounds the whole call, body included: a server trickling a stream must not
    outlive it. ``deadline`` is on the loop's clock; the wait for each piece is a cancel scope.
    """

    def __init__(self, inner: ByteStream, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        pieces = aiter(self._inner)
        deadline = self._deadline
        try:
            while True:
                if current_time() >= deadline:
                    raise self._expired()
                # A scope per piece, but at an absolute time (no fail_after wrapper, no clock
                # read in it); the transport hands over a read's worth of events per piece.
                with anyio.CancelScope(deadline=deadline) as scope:
                    try:
                        chunk = await anext(pieces)
                    except StopAsyncIteration:
                        return
                if scope.cancelled_caught:
                    raise self._expired()
                yield chunk
        finally:
            await self._inner.aclose()

    def _expired(self) -> DeadlineExceeded:
        return DeadlineExceeded("the call's deadline passed while its body was still arriving")

    async def aclose(self) -> None:
        await self._inner.aclose()
