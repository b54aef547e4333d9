"""Stream wrappers that layers put around a response body they pass on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio

from corral.core.errors import DeadlineExceeded
from corral.core.models import ByteStream
from corral.core.wire import Usage, UsageWatcher

__all__ = ["DeadlineStream", "UsageStream"]


class UsageStream:
    """Passes a stream through and reports its ``usage`` as soon as the stream states it."""

    def __init__(self, inner: ByteStream, on_usage: Callable[[Usage], None]) -> None:
        self._inner, self._on_usage = inner, on_usage
        self._watcher = UsageWatcher()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            usage = self._watcher.feed(chunk)
            if usage is not None:
                self._on_usage(usage)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class DeadlineStream:
    """Passes a stream through but ends it with ``DeadlineExceeded`` at the call's deadline.

    The deadline bounds the whole call, body included: a server trickling a stream must not
    outlive it. ``deadline`` is on ``clock``; the wait for each piece is a cancel scope.
    """

    def __init__(self, inner: ByteStream, deadline: float, clock: Callable[[], float]) -> None:
        self._inner, self._deadline, self._clock = inner, deadline, clock

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        pieces = aiter(self._inner)
        try:
            while True:
                left = self._deadline - self._clock()
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
