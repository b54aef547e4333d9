"""``MemoryStore``: an LRU bounded by entry count and by total bytes, with TTLs.

Its calls never wait, so every few of them take a checkpoint (``Pacer``): a loop of reads
still honours cancellation. Expiry is on the event loop's clock (``corral._clock``), so trio's
``MockClock`` drives it in tests.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from corral._clock import current_time
from corral._pacing import Pacer
from corral.core._errors import InvalidInput

__all__ = ["MemoryStore"]


class MemoryStore:
    """The in-process store: an LRU bounded by ``max_entries`` and ``max_bytes`` with per-entry
    TTLs on the loop's clock; lost when the process ends."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise InvalidInput(
                f"MemoryStore needs max_entries and max_bytes >= 1, got {max_entries}, {max_bytes}"
            )
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.size = 0
        self._pace = Pacer()

    async def get(self, key: str) -> bytes | None:
        """The value under ``key`` if it has not expired, marking it recently used."""
        await self._pace()
        item = self._items.get(key)
        if item is None:
            return None
        value, expires = item
        if expires <= current_time():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` for ``ttl`` seconds, evicting the least recently used entries past
        either bound; a value bigger than ``max_bytes`` is not stored."""
        await self._pace()
        if len(value) > self.max_bytes:
            return  # would evict everything and still not fit
        if key in self._items:
            self._drop(key)
        expires = math.inf if ttl is None else current_time() + ttl
        self._items[key] = (value, expires)
        self.size += len(value)
        while len(self._items) > self.max_entries or self.size > self.max_bytes:
            self._drop(next(iter(self._items)))

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        await self._pace()
        if key in self._items:
            self._drop(key)

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self.size -= len(value)

    def __len__(self) -> int:
        return len(self._items)

    async def aclose(self) -> None:
        """Drop every entry, freeing the memory."""
        self._items.clear()
        self.size = 0
