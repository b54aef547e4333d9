"""A rate limit shared by many processes and machines: GCRA in one Redis Lua script.

Policy: generic cell rate algorithm per dimension (requests, tokens), the same burst rule as the
local limiter (at most ``limit`` in any ``window``; at most ``burst`` at once). One script
checks both dimensions and the 429 pause, and reserves both or neither, atomically. It reads
``redis.call('TIME')``: every process is judged by the Redis server's clock, so a skewed local
clock changes nothing. Settling with the real ``usage`` moves the token cell's arrival time back
(refund) or forward (charge).

Shell: ``SharedRateLimit`` asks the script, sleeps for the wait it answers, asks again. When
Redis is unreachable or frozen (no answer within ``timeout``, 0.5 s by default) it either fails
closed (``RateLimitUnavailable``) or falls back to a local limiter with the limits divided by
``processes`` (the same limits by default); after ``recheck`` seconds one call probes Redis and
the limiter goes back to it when it answers. A call cancelled while Redis is silent (deadline,
Ctrl-C) leaves at once. Waiters in different processes are not served FIFO (each retries after
its own wait).

A 429 pauses every process, for the server's ``Retry-After`` but at most ``max_pause`` seconds
(60 by default); the script also caps a pause already stored (say by an older version) at
``max_pause``, so no key in Redis can stop the quota for longer.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, cast

import anyio
import redis

from corral.clock import current_time
from corral.core import errors
from corral.core.classify import parse_retry_after
from corral.core.compose import Clock, Handler
from corral.core.models import Request, Response
from corral.core.wire import response_usage
from corral.middleware.ratelimit import (
    RateLimit,
    bucket_shape,
    check_max_pause,
    log_capped,
    pause_after_429,
)
from corral.stores.redis import DEFAULT_TIMEOUT, redis_client, run_blocking

__all__ = ["RateLimitUnavailable", "SharedRateLimit"]

log = logging.getLogger("corral.ratelimit")

# KEYS: requests cell, tokens cell, pause.  ARGV: req interval, req burst, tok interval,
# tok burst, tokens, key ttl ms, max pause s.  An interval of 0 switches that dimension off.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local pause = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
local max_pause = tonumber(ARGV[7])
if pause > now + max_pause then
  pause = now + max_pause
  redis.call('SET', KEYS[3], tostring(pause), 'PX', math.ceil(max_pause * 1000) + 1000)
end
if pause > now then return {0, tostring(pause - now)} end
local function cell(key, interval, burst, cost)
  if interval <= 0 then return nil, 0 end
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local wait = new_tat - burst * interval - now
  if wait > 0 then return nil, wait end
  return new_tat, 0
end
local r_tat, r_wait = cell(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1)
local k_tat, k_wait = cell(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
local wait = math.max(r_wait, k_wait)
if wait > 0 then return {0, tostring(wait)} end
if r_tat then redis.call('SET', KEYS[1], tostring(r_tat), 'PX', ARGV[6]) end
if k_tat then redis.call('SET', KEYS[2], tostring(k_tat), 'PX', ARGV[6]) end
return {1, '0'}
"""

# KEYS: tokens cell.  ARGV: tok interval, token delta (actual - reserved), key ttl ms.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
tat = tat + tonumber(ARGV[2]) * tonumber(ARGV[1])
if tat < now then tat = now end
redis.call('SET', KEYS[1], tostring(tat), 'PX', ARGV[3])
return 1
"""

# KEYS: pause.  ARGV: seconds.
_PAUSE = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > pause then
  redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return 1
"""


class RateLimitUnavailable(errors.CorralError):
    """The shared limiter's Redis is unreachable and the limiter is set to fail closed."""

    kind = "rate_limit_unavailable"
    retryable = True


def _cell(name: str, limit: int | None, window: float, burst: float | None) -> tuple[float, float]:
    """(seconds per unit, burst units): the local limiter's bucket as a GCRA cell."""
    if limit is None:
        return 0.0, 0.0
    rate, cap = bucket_shape(name, limit, window, burst)
    return 1.0 / rate, cap


class SharedRateLimit:
    """Middleware: one RPM/TPM quota for every process using the same Redis and ``name``."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        name: str = "default",
        rpm: int | None = None,
        tpm: int | None = None,
        window: float = 60.0,
        burst_requests: float | None = None,
        burst_tokens: float | None = None,
        on_unavailable: Literal["fail", "local"] = "local",
        processes: int = 1,
        recheck: float = 5.0,
        max_pause: float = 60.0,
        timeout: float = DEFAULT_TIMEOUT,
        client: redis.Redis | None = None,
        clock: Clock = current_time,
    ) -> None:
        """``client``, if given, is used as it is: give it timeouts too (``redis_client``)."""
        self._client = client or redis_client(url, timeout)
        self._max_pause = check_max_pause(max_pause)
        self._keys = [f"corral:rl:{name}:{k}" for k in ("requests", "tokens", "pause")]
        self._req = _cell("rpm", rpm, window, burst_requests)
        self._tok = _cell("tpm", tpm, window, burst_tokens)
        self._ttl_ms = str(int(window * 2000))
        self._reserve = self._client.register_script(_RESERVE)
        self._settle = self._client.register_script(_SETTLE)
        self._pause = self._client.register_script(_PAUSE)
        self._on_unavailable = on_unavailable
        self._recheck = recheck
        self._clock = clock
        self._down_since: float | None = None
        # The fallback: each of ``processes`` takes an equal share of the quota.
        share = max(1, processes)
        self._local = RateLimit(
            rpm=None if rpm is None else max(1, int(rpm * 60 / window) // share),
            tpm=None if tpm is None else max(1, int(tpm * 60 / window) // share),
            max_pause=max_pause,
            clock=clock,
        )
        self._estimate = self._local.estimate
        self.waited = 0.0

    async def _call(self, script: Any, keys: list[str], args: list[object]) -> object:
        return await run_blocking(lambda: script(keys=keys, args=args))

    def _redis_usable(self) -> bool:
        """True when Redis is up, or for the one call that probes it after ``recheck``."""
        if self._down_since is None:
            return True
        now = self._clock()
        if now - self._down_since < self._recheck:
            return False
        self._down_since = now  # this call probes; the others keep to the fallback
        return True

    def _went_down(self, exc: Exception) -> None:
        if self._down_since is None:
            log.warning(
                "shared rate limit: Redis unreachable (%s); %s",
                type(exc).__name__,
                "failing closed" if self._on_unavailable == "fail" else "using local share",
            )
        self._down_since = self._clock()

    async def _acquire(self, tokens: int) -> bool:
        """Reserve through Redis; False when Redis is down (the caller falls back)."""
        args = [
            *(self._req[0], self._req[1], self._tok[0], self._tok[1]),
            *(tokens, self._ttl_ms, self._max_pause),
        ]
        if tokens > self._tok[1] > 0:
            raise errors.RequestTooLarge(
                f"this call needs {tokens} tokens but the shared bucket holds {self._tok[1]:g}"
            )
        start = self._clock()
        while True:
            try:
                result = await self._call(self._reserve, self._keys, args)
            except redis.RedisError as exc:
                self._went_down(exc)
                return False
            if self._down_since is not None:
                log.warning("shared rate limit: Redis is back")
                self._down_since = None
            admitted, wait = cast(list[Any], result)
            if int(admitted):
                self.waited += self._clock() - start
                return True
            await anyio.sleep(float(wait))

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        reserved = self._estimate(request)
        if not self._redis_usable() or not await self._acquire(reserved):
            if self._on_unavailable == "fail":
                raise RateLimitUnavailable("the shared rate limit's Redis is unreachable")
            return await self._local(request, call_next)
        response = await call_next(request)
        try:
            if response.status == 429:
                pause = pause_after_429(parse_retry_after(response.headers), self._max_pause)
                log_capped(pause, "shared rate limit")
                await self._call(self._pause, [self._keys[2]], [pause.seconds])
            usage = response_usage(response) if response.status == 200 else None
            if usage is not None and self._tok[0] > 0 and usage.total_tokens != reserved:
                delta = usage.total_tokens - reserved
                await self._call(self._settle, [self._keys[1]], [self._tok[0], delta, self._ttl_ms])
        except redis.RedisError as exc:
            self._went_down(exc)
        return response
