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
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def aclose(self) -> None: ...
