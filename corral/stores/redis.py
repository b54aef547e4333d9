"""``RedisStore``: one cache shared by many processes and machines.

It uses redis-py's blocking client in a worker thread, which runs unchanged under asyncio and
trio (redis-py's asyncio client would tie it to asyncio). Keys are prefixed; values expire
through Redis's own TTL.

A Redis that stops answering (frozen, partitioned) must never hold a call: every client corral
makes has connect and socket timeouts (``timeout``, 0.5 s by default) and no redis-py retries,
so a command fails within about a second; and a call cancelled while its command is on the wire
(a deadline, Ctrl-C) leaves at once, abandoning the worker thread, which ends at the timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisStore", "redis_client", "run_blocking"]

T = TypeVar("T")

#: Seconds to connect, and to wait for each reply, before a Redis call fails.
DEFAULT_TIMEOUT = 0.5


def redis_client(url: str, timeout: float = DEFAULT_TIMEOUT, **kwargs: object) -> redis.Redis:
    """A client whose every command fails after ``timeout`` seconds instead of waiting.

    No retries: redis-py 6+ retries a timed-out command several times with backoff by default,
    which would multiply the wait. Query parameters in ``url`` still win over these defaults.
    """
    if not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )


async def run_blocking(call: Callable[[], T], limiter: anyio.CapacityLimiter | None = None) -> T:
    """Run a blocking Redis call in a worker thread; cancelling the caller abandons it."""
    return await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=limiter)


class RedisStore:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "corral:cache:",
        max_connections: int = 32,
        timeout: float = DEFAULT_TIMEOUT,
        client: redis.Redis | None = None,
    ) -> None:
        """``client``, if given, is used as it is: give it timeouts too."""
        self.prefix = prefix
        self._client = client or redis_client(url, timeout, max_connections=max_connections)
        self._threads = anyio.CapacityLimiter(max_connections)

    async def get(self, key: str) -> bytes | None:
        name = self.prefix + key
        value = await run_blocking(lambda: self._client.get(name), self._threads)
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        name, px = self.prefix + key, None if ttl is None else max(1, int(ttl * 1000))
        await run_blocking(lambda: self._client.set(name, value, px=px), self._threads)

    async def delete(self, key: str) -> None:
        name = self.prefix + key
        await run_blocking(lambda: self._client.delete(name), self._threads)

    async def aclose(self) -> None:
        await run_blocking(self._client.close)
