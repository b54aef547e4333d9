"""Stream wrappers that layers put around a response body they pass on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from corral.core.models import ByteStream
from corral.core.wire import Usage, UsageWatcher

__all__ = ["UsageStream"]


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
