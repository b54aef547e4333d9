"""Transports execute a ``Request`` on a real (or in-memory) connection.

``H11Transport`` (h11 over anyio, asyncio and trio) is the reference; ``HttpxTransport`` and
``AiohttpTransport`` need their extras. Each loads on first use (h11 and TLS only with the first
``H11Transport``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.core._lazy import lazy_exports

if TYPE_CHECKING:
    from corral.transports._aiohttp_transport import AiohttpTransport
    from corral.transports._base import Transport
    from corral.transports._http11 import H11Transport
    from corral.transports._httpx_transport import HttpxTransport
    from corral.transports._memory import MemoryTransport

__all__ = ["AiohttpTransport", "H11Transport", "HttpxTransport", "MemoryTransport", "Transport"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "AiohttpTransport": f"{__name__}._aiohttp_transport",
        "H11Transport": f"{__name__}._http11",
        "HttpxTransport": f"{__name__}._httpx_transport",
        "MemoryTransport": f"{__name__}._memory",
        "Transport": f"{__name__}._base",
    },
)
