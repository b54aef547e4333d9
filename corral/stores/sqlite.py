"""``SQLiteStore``: the embedded, persistent cache; several processes may share one file.

WAL journaling lets readers and a writer work at once; ``busy_timeout`` makes a second writer
wait instead of failing. The file is created with mode 0600 (responses can be private). Calls
run in a worker thread so the event loop never blocks on disk; one connection per store,
used by one thread at a time.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread

__all__ = ["SQLiteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corral_cache (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL NOT NULL
)
"""


class SQLiteStore:
    """The embedded, persistent store: one SQLite file (WAL, mode 0600) that survives restarts
    and that several processes may share; expiry is on wall time so it means the same in each."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        # Wall time, not the loop's clock: expiry must mean the same in every process.
        self._clock = clock
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        self._db.execute(_SCHEMA)
        self._lock = anyio.CapacityLimiter(1)

    def _get(self, key: str) -> bytes | None:
        row = self._db.execute(
            "SELECT value FROM corral_cache WHERE key = ? AND expires > ?", (key, self._clock())
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        expires = 1e18 if ttl is None else self._clock() + ttl
        self._db.execute(
            "INSERT OR REPLACE INTO corral_cache (key, value, expires) VALUES (?, ?, ?)",
            (key, value, expires),
        )

    def _delete(self, key: str) -> None:
        self._db.execute("DELETE FROM corral_cache WHERE key = ?", (key,))

    def purge_expired(self) -> int:
        """Delete expired rows; returns how many. Safe to call from any process."""
        return self._db.execute(
            "DELETE FROM corral_cache WHERE expires <= ?", (self._clock(),)
        ).rowcount

    async def get(self, key: str) -> bytes | None:
        """The value under ``key`` if it has not expired, read in a worker thread."""
        return await anyio.to_thread.run_sync(self._get, key, limiter=self._lock)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` for ``ttl`` seconds (None: no expiry), written in a worker thread."""
        await anyio.to_thread.run_sync(self._set, key, value, ttl, limiter=self._lock)

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        await anyio.to_thread.run_sync(self._delete, key, limiter=self._lock)

    async def aclose(self) -> None:
        """Close the database connection."""
        await anyio.to_thread.run_sync(self._db.close, limiter=self._lock)
