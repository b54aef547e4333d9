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
        try:
            while True:
                left = self._deadline - current_time()
                if left <= 0:
                    raise self._expired()
                try:
                    with anyio.fail_after(left):
                        chunk = await anext(pieces)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._expired() from None
                yield chunk
        finally:
            await self._inner.aclose()

    def _expired(self) -> DeadlineExceeded:
        return DeadlineExceeded("the call's deadline passed while its body was still arriving")

    async def aclose(self) -> None:
        await self._inner.aclose()
