"""``MemoryTransport``: answers requests with a Python function; for tests and simulations."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from corral.core._models import Request, Response

__all__ = ["MemoryTransport"]


class MemoryTransport:
    """Calls ``handler(request)`` (sync or async) and returns its ``Response``.

    The handler may raise corral errors to simulate wire faults. ``calls`` counts requests.
    """

    def __init__(self, handler: Callable[[Request], Response | Awaitable[Response]]) -> None:
        self._handler = handler
        self.calls = 0

    async def __call__(self, request: Request) -> Response:
        """Count the call and return what ``handler`` returns (awaited if it is a coroutine);
        what it raises propagates as it is."""
        self.calls += 1
        result = self._handler(request)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def aclose(self) -> None:
        """Nothing to release; present so a ``MemoryTransport`` fits wherever a transport does."""
        return None
