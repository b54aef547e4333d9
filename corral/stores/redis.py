"""``RedisStore``: one cache shared by many processes and machines.

It uses redis-py's blocking client in a worker thread, which runs unchanged under asyncio and
trio (redis-py's asyncio client would tie it to asyncio). Keys are prefixed; values expire
through Redis's own TTL.
"""

from __future__ import annotations

import anyio
import anyio.to_thread
import redis

__all__ = ["RedisStore"]


class RedisStore:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "corral:cache:",
        max_connections: int = 32,
        client: redis.Redis | None = None,
    ) -> None:
        self.prefix = prefix
        self._client = client or redis.Redis.from_url(url, max_connections=max_connections)
        self._threads = anyio.CapacityLimiter(max_connections)

    async def get(self, key: str) -> bytes | None:
        value = await anyio.to_thread.run_sync(
            self._client.get, self.prefix + key, limiter=self._threads
        )
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        px = None if ttl is None else max(1, int(ttl * 1000))
        await anyio.to_thread.run_sync(
            lambda: self._client.set(self.prefix + key, value, px=px), limiter=self._threads
        )

    async def delete(self, key: str) -> None:
        await anyio.to_thread.run_sync(
            self._client.delete, self.prefix + key, limiter=self._threads
        )

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._client.close)
