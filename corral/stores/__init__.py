"""Key-value stores for the response cache: in-process, SQLite (embedded), Redis (shared).

Every store has the same four async methods; values are opaque bytes (the cache writes JSON),
keys are hex digests that never contain a credential.
"""

from __future__ import annotations

from typing import Protocol

from corral.stores.memory import MemoryStore
from corral.stores.sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "Store"]


class Store(Protocol):
    """What the response cache needs from a backend: bytes by key with a TTL. Any object with
    these four methods works (``MemoryStore``, ``SQLiteStore``, ``RedisStore``)."""

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None when there is none or it has expired."""

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: until evicted), replacing any
        earlier value."""

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present, to invalidate an entry before its TTL ends."""

    async def aclose(self) -> None:
        """Release what the store holds (connections, files); the client calls it when it closes."""
