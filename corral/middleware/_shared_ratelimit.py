"""A rate limit shared by many processes and machines: GCRA in Redis Lua scripts.

Policy: generic cell rate algorithm per dimension (requests, tokens), the same rule as the
local limiter: per-minute limits enforced over ``window`` seconds, so no ``window`` admits more
than ``limit * window / 60``, at most ``burst`` at once; the scripts and their Python model
(``GcraPolicy``, which tests hold them to) live in ``corral.middleware._gcra``. One script
checks both dimensions and the 429 pause, and reserves both or neither, atomically, on the
Redis server's clock, so a skewed local clock changes nothing. ``settle`` is the local
limiter's (``settle_delta``): ``"reserved"`` keeps the reservation (charging only an
overrun, or the real output of a body without ``max_tokens``), ``"usage"`` moves the token
cell's arrival time back (refund) or forward (charge) to the real usage; a streamed answer's
usage (``stream_options.include_usage``) is settled with the next reservation. The cells' state
lives in Redis, so a process that starts late joins the quota where it stands (no cold burst).

Shell: ``SharedRateLimit`` asks the script, sleeps for the wait it answers, asks again. When
Redis is unreachable or frozen (no answer within ``timeout``, 0.5 s by default) it either fails
closed (``RateLimitUnavailable``) or falls back to a local limiter with the limits divided by
``processes`` (the same limits by default); after ``recheck`` seconds one call probes Redis and
the limiter goes back to it when it answers. A call cancelled while Redis is silent (deadline,
Ctrl-C) leaves at once. Waiters in different processes are not served FIFO (each retries after
its own wait).

A 429 pauses every process, for the server's ``Retry-After`` but at most ``max_pause`` seconds
(60 by default; ``PausePolicy``), and empties both cells at the pause's end (no burst after
it); the script also caps a pause already stored (say by an older version) at ``max_pause``,
so no key in Redis can stop the quota for longer.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import anyio
import attrs
import redis

from corral._clock import current_time
from corral.core import _errors as errors
from corral.core._compose import Handler
from corral.core._events import RateLimitPaused, RateLimitWaited
from corral.core._models import Request, Response
from corral.core._tokens import EstimatingCounter
from corral.core._wire import Usage, response_usage, shared_parse
from corral.middleware._buckets import (
    Delay,
    NoPause,
    Pause,
    PausePolicy,
    Proceed,
    Settle,
    allowance,
    bucket_shape,
    default_burst,
    one_of,
)
from corral.middleware._checks import at_least, finite, never, optional
from corral.middleware._gcra import PAUSE, RESERVE, SETTLE, Cell, GcraPolicy, ScriptArgs, decode
from corral.middleware._outputs import OutputEstimate
from corral.middleware._ratelimit import (
    RateLimit,
    Reservation,
    log_capped,
    reservation,
    usage_delta,
)
from corral.stores.redis import DEFAULT_TIMEOUT, redis_client, run_blocking

__all__ = ["RateLimitUnavailable", "SharedRateLimit", "SharedRateLimitConfig"]

log = logging.getLogger("corral.ratelimit")


class RateLimitUnavailable(errors.CorralError):
    """The shared limiter's Redis is unreachable and the limiter is set to fail closed."""

    kind = "rate_limit_unavailable"
    retryable = True


_LIMIT = optional(at_least(1))
_BURST = optional(finite(open_below=True))


#: The shared cells are fixed (not grown per call): a default token burst holds at least
#: one typical call.
MIN_SHARED_BURST_TOKENS = 4096.0


@attrs.frozen
class SharedRateLimitConfig:
    """What ``SharedRateLimit`` enforces; validated when built (``InvalidInput`` names the
    field)."""

    #: Every process using the same Redis and ``name`` shares one quota.
    name: str = "default"
    rpm: int | None = attrs.field(default=None, validator=_LIMIT)
    tpm: int | None = attrs.field(default=None, validator=_LIMIT)
    #: Seconds over which the provider enforces the per-minute limits.
    window: float = attrs.field(default=60.0, validator=finite(open_below=True))
    burst_requests: float | None = attrs.field(default=None, validator=_BURST)
    burst_tokens: float | None = attrs.field(default=None, validator=_BURST)
    settle: Settle = attrs.field(default="reserved", validator=one_of("reserved", "usage"))
    on_unavailable: Literal["fail", "local"] = attrs.field(
        default="local", validator=one_of("fail", "local")
    )
    processes: int = attrs.field(default=1, validator=at_least(1))
    recheck: float = attrs.field(default=5.0, validator=finite())
    pause: PausePolicy = attrs.field(factory=PausePolicy)
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, validator=finite(open_below=True))

    def gcra(self) -> GcraPolicy:
        """The two cells: the local limiter's buckets as GCRA cells."""
        return GcraPolicy(
            _cell("requests", self.rpm, self.window, self.burst_requests, 1.0),
            _cell("tokens", self.tpm, self.window, self.burst_tokens, MIN_SHARED_BURST_TOKENS),
            self.pause.max_pause,
        )

    def local_share(self) -> RateLimit:
        """The fallback: each of ``processes`` takes an equal share of the quota."""
        rpm, tpm, share = self.rpm, self.tpm, self.processes
        return RateLimit(
            rpm=None if rpm is None else max(1, rpm // share),
            tpm=None if tpm is None else max(1, tpm // share),
            window=self.window,
            settle=self.settle,
            max_pause=self.pause.max_pause,
        )


def _cell(
    dimension: str, limit: int | None, window: float, burst: float | None, floor: float
) -> Cell:
    if limit is None:
        return Cell()
    allowed = allowance(dimension, limit, window)
    rate, cap = bucket_shape(
        allowed, window, burst if burst is not None else default_burst(allowed, floor)
    )
    return Cell(1.0 / rate, cap)


class SharedRateLimit:
    """Middleware: one RPM/TPM quota for every process using the same Redis and ``name``.

    Args:
        url: the Redis server (``redis://host:port/db``).
        name: the quota's name; processes with the same Redis and name share it.
        rpm, tpm: requests and tokens per minute.
        window: seconds over which the provider enforces them (60 by default): no ``window``
            admits more than ``limit * window / 60``.
        burst_requests, burst_tokens: what may be sent at once (by default 2% of a window's
            allowance; at least 4096 tokens).
        settle: ``"reserved"`` (a call costs its reservation, as OpenAI counts) or ``"usage"``.
        on_unavailable: ``"local"`` falls back to a local limiter with the limits divided by
            ``processes`` while Redis is unreachable; ``"fail"`` raises ``RateLimitUnavailable``.
        recheck: seconds between probes of an unreachable Redis.
        max_pause: the longest a 429's Retry-After may pause the quota, in seconds.
        timeout: seconds a Redis command may take before Redis counts as unreachable.
        client: a ``redis.Redis`` to use as it is (give it timeouts too: ``redis_client``);
            it is not closed by ``aclose``.

    ``config`` is the frozen configuration; ``waited`` the total seconds calls spent waiting
    for quota, in Redis and in the fallback (for the batch summary).
    """

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
        settle: Settle = "reserved",
        on_unavailable: Literal["fail", "local"] = "local",
        processes: int = 1,
        recheck: float = 5.0,
        max_pause: float = 60.0,
        timeout: float = DEFAULT_TIMEOUT,
        client: redis.Redis | None = None,
    ) -> None:
        self.config = config = SharedRateLimitConfig(
            name=name,
            rpm=rpm,
            tpm=tpm,
            window=window,
            burst_requests=burst_requests,
            burst_tokens=burst_tokens,
            settle=settle,
            on_unavailable=on_unavailable,
            processes=processes,
            recheck=recheck,
            pause=PausePolicy(max_pause=max_pause),
            timeout=timeout,
        )
        self._owns_client = client is None
        self._client = client or redis_client(url, timeout)
        self._keys = [f"corral:rl:{name}:{k}" for k in ("requests", "tokens", "pause")]
        self._gcra = config.gcra()
        #: Keys outlive their arrival time by a window (an expired key reads as "no debt").
        self._margin_ms = int(window * 1000)
        self._reserve = self._client.register_script(RESERVE)
        self._settle = self._client.register_script(SETTLE)
        self._pause = self._client.register_script(PAUSE)
        self._down_since: float | None = None
        self._local = config.local_share()
        self._counter = EstimatingCounter()
        self._outputs = OutputEstimate()
        self._waited = 0.0
        #: Tokens streamed answers' usage settled since the last call (sent with the next).
        self._owed = 0

    @property
    def waited(self) -> float:
        """Total seconds calls spent waiting for quota (Redis and the local fallback)."""
        return self._waited + self._local.waited

    async def aclose(self) -> None:
        """Close the Redis client this limiter made (not one it was given)."""
        if self._owns_client:
            await run_blocking(self._client.close)

    async def _call(self, script: Any, keys: list[str], args: ScriptArgs) -> object:
        return await run_blocking(lambda: script(keys=keys, args=args))

    def _redis_usable(self) -> bool:
        """True when Redis is up, or for the one call that probes it after ``recheck``."""
        if self._down_since is None:
            return True
        now = current_time()
        if now - self._down_since < self.config.recheck:
            return False
        self._down_since = now  # this call probes; the others keep to the fallback
        return True

    def _went_down(self, exc: Exception) -> None:
        if self._down_since is None:
            log.warning(
                "shared rate limit: Redis unreachable (%s); %s",
                type(exc).__name__,
                "failing closed" if self.config.on_unavailable == "fail" else "using local share",
            )
        self._down_since = current_time()

    async def _acquire(self, request: Request, tokens: int) -> bool:
        """Reserve through Redis; False when Redis is down (the caller falls back)."""
        burst = self._gcra.tokens.burst
        if tokens > burst > 0:
            raise errors.RequestTooLarge(
                f"this call needs {tokens} tokens but the shared bucket holds {burst:g}"
            )
        args = self._gcra.reserve_args(tokens, self._margin_ms)
        start = current_time()
        delayed = False
        while True:
            try:
                await self._settle_owed()
                reply = await self._call(self._reserve, self._keys, args)
            except redis.RedisError as exc:
                self._went_down(exc)
                return False
            if self._down_since is not None:
                log.warning("shared rate limit: Redis is back")
                self._down_since = None
            now = current_time()
            match decode(reply, now):
                case Proceed():
                    if delayed:  # the time of a round trip to Redis is no wait for quota
                        waited = now - start
                        self._waited += waited
                        request.options.call.emit(
                            RateLimitWaited, now, key=self.config.name, waited=waited, tokens=tokens
                        )
                    return True
                case Delay(until=until):
                    delayed = True
                    await anyio.sleep_until(until)
                case other:
                    never(other)

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Wait until the shared Redis quota admits this attempt, then send it; if Redis is
        unreachable, fall back or fail as ``on_unavailable`` says."""
        held = reservation(request, self._counter, self._outputs)
        if not self._redis_usable() or not await self._acquire(request, held.tokens):
            if self.config.on_unavailable == "fail":
                raise RateLimitUnavailable("the shared rate limit's Redis is unreachable")
            return await self._local(request, call_next)
        call = request.options.call
        mark = call.stream
        response = await call_next(request)
        try:
            now = current_time()
            match self.config.pause.decide(now, response.error()):
                case NoPause():
                    pass
                case Pause() as pause:
                    log_capped(pause, "shared rate limit")
                    keys = [self._keys[2], self._keys[0], self._keys[1]]
                    args = self._gcra.pause_args(pause.seconds, self._margin_ms)
                    await self._call(self._pause, keys, args)
                    request.options.call.emit(
                        RateLimitPaused,
                        now,
                        key=self.config.name,
                        until=pause.until,
                        requested=pause.requested,
                        capped=pause.capped,
                    )
                case other:
                    never(other)
            if response.status == 200 and response.stream is not None:
                # Settled when the stream's usage arrives, sent to Redis before the next
                # reservation (the parse reports it synchronously, inside the reader's loop).
                stream, parse = shared_parse(call, response.stream, mark)
                parse.on_usage(functools.partial(self._owe, held))
                if stream is not response.stream:
                    response = attrs.evolve(response, stream=stream)
            elif response.status == 200:
                usage = response_usage(response)
                if usage is not None:
                    self._owe(held, usage)
                    await self._settle_owed()
        except redis.RedisError as exc:
            self._went_down(exc)
        return response

    def _owe(self, held: Reservation, usage: Usage) -> None:
        if self._gcra.tokens.interval > 0:
            self._owed += usage_delta(self.config.settle, held, usage, self._outputs)

    async def _settle_owed(self) -> None:
        """Send what answers settled since the last reservation to the token cell."""
        delta, self._owed = self._owed, 0
        if delta:
            args = self._gcra.settle_args(delta, self._margin_ms)
            try:
                await self._call(self._settle, [self._keys[1]], args)
            except redis.RedisError:
                self._owed += delta  # kept for the next call
                raise
