"""Transports execute a ``Request`` on a real (or in-memory) connection.

``H11Transport`` (h11 over anyio, asyncio and trio) is the reference; ``HttpxTransport`` and
``AiohttpTransport`` need their extras and load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.transports._base import Transport
from corral.transports._http11 import H11Transport
from corral.transports._memory import MemoryTransport

if TYPE_CHECKING:
    from corral.transports._aiohttp_transport import AiohttpTransport
    from corral.transports._httpx_transport import HttpxTransport

__all__ = ["AiohttpTransport", "H11Transport", "HttpxTransport", "MemoryTransport", "Transport"]

_LAZY = {
    "HttpxTransport": "corral.transports._httpx_transport",
    "AiohttpTransport": "corral.transports._aiohttp_transport",
}


def __getattr__(name: str) -> Any:
    """Transports with optional dependencies load when first named."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corral.transports' has no attribute {name!r}")
