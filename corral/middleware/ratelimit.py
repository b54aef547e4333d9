"""Rate limiting by requests and tokens per minute (and per day), keyed, FIFO, refundable.

Policy: one token bucket per dimension. A bucket of ``limit`` per ``window`` with burst ``B``
holds at most ``B`` and refills at ``(limit - B) / window``, so *any* window of that length
admits at most ``limit`` (what a provider's sliding window enforces) and a cold start sends at
most ``B`` at once. A call reserves its estimated cost (prompt + max output tokens, as providers
count) and later settles with the real ``usage``: the difference is refunded or charged.

Shell: one FIFO queue per key. Only the head of the queue may take capacity, so a large call
is never starved by small ones behind it; a cancelled waiter leaves the queue having taken
nothing; a refund, a header resync or a pause end wakes the head early.

A 429 pauses the whole key for the server's ``Retry-After``, but never longer than
``max_pause`` (60 s by default): a server that asks for 10^8 seconds (or 1e308) would otherwise
stop every later call of the run. A capped pause is logged as a warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable

import anyio
import attrs

from corral.clock import current_time
from corral.core import jsonlib
from corral.core.classify import parse_rate_limit_headers, parse_retry_after
from corral.core.compose import Clock, Handler
from corral.core.errors import RequestTooLarge
from corral.core.models import Request, Response
from corral.core.tokens import EstimatingCounter, TokenCounter, estimate_request_tokens
from corral.core.wire import Usage, response_usage
from corral.streams import UsageStream

__all__ = [
    "Bucket",
    "Cost",
    "Pause",
    "RateLimit",
    "RateLimitPolicy",
    "bucket_shape",
    "by_credential",
    "by_endpoint",
    "by_model",
    "pause_after_429",
]

log = logging.getLogger("corral.ratelimit")

#: Seconds a 429 pauses a key when the server gives no usable Retry-After.
DEFAULT_PAUSE = 1.0


@attrs.frozen
class Cost:
    requests: int = 1
    tokens: int = 0


#: Default bursts: 1% of the limit, but room for at least one typical call's tokens.
MIN_DEFAULT_BURST = {"requests": 1.0, "tokens": 4096.0}


def bucket_shape(name: str, limit: int, window: float, burst: float | None) -> tuple[float, float]:
    """(refill rate per second, capacity) so that any ``window`` admits at most ``limit``.

    The burst is paid for by a slower refill: capacity B refilled at (limit - B) / window.
    A burst equal to the limit refills at limit / window and bounds a window by limit + burst.
    """
    if limit <= 0:
        raise ValueError(f"{name} limit must be positive, got {limit}")
    floor = MIN_DEFAULT_BURST["tokens" if name.startswith("tp") else "requests"]
    cap = float(min(limit, burst if burst is not None else max(floor, limit / 100)))
    if cap <= 0:
        raise ValueError(f"{name} burst must be positive, got {burst}")
    return ((limit - cap) / window if cap < limit else limit / window), cap


@attrs.define
class Bucket:
    """``capacity`` units, refilled at ``rate`` per second; starts full."""

    name: str
    rate: float
    capacity: float
    level: float
    updated: float

    @classmethod
    def per_window(
        cls, name: str, limit: int, window: float, burst: float | None, now: float
    ) -> Bucket:
        rate, cap = bucket_shape(name, limit, window, burst)
        return cls(name, rate, cap, cap, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, amount: float) -> float:
        """Seconds until ``amount`` is available (after ``refill``)."""
        missing = amount - self.level
        if missing <= 1e-9:
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf


class RateLimitPolicy:
    """The buckets of one key. Pure: every method takes ``now``."""

    def __init__(
        self,
        now: float,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        rpd: int | None = None,
        tpd: int | None = None,
        burst_requests: float | None = None,
        burst_tokens: float | None = None,
    ) -> None:
        self.requests = [
            Bucket.per_window(name, limit, window, burst_requests if window == 60 else None, now)
            for name, limit, window in (("rpm", rpm, 60.0), ("rpd", rpd, 86_400.0))
            if limit is not None
        ]
        self.tokens = [
            Bucket.per_window(name, limit, window, burst_tokens if window == 60 else None, now)
            for name, limit, window in (("tpm", tpm, 60.0), ("tpd", tpd, 86_400.0))
            if limit is not None
        ]
        self.paused_until = -math.inf

    def _pairs(self, cost: Cost) -> list[tuple[Bucket, int]]:
        return [(b, cost.requests) for b in self.requests] + [(b, cost.tokens) for b in self.tokens]

    def check(self, now: float, cost: Cost) -> float:
        """Seconds until ``cost`` can be taken (0: now). ``RequestTooLarge`` if never."""
        for bucket, amount in self._pairs(cost):
            if amount > bucket.capacity:
                raise RequestTooLarge(
                    f"this call needs {amount} {bucket.name} units but the bucket holds at most "
                    f"{bucket.capacity:g}; raise the burst or split the request"
                )
        wait = max(0.0, self.paused_until - now)
        for bucket, amount in self._pairs(cost):
            bucket.refill(now)
            wait = max(wait, bucket.wait(amount))
        return wait

    def take(self, now: float, cost: Cost) -> None:
        for bucket, amount in self._pairs(cost):
            bucket.refill(now)
            bucket.level -= amount

    def settle(self, now: float, reserved: int, actual: int) -> None:
        """Refund (or charge) the difference between reserved and actual tokens."""
        for bucket in self.tokens:
            bucket.refill(now)
            bucket.level = min(bucket.capacity, bucket.level + reserved - actual)

    def resync(
        self, now: float, remaining_requests: int | None, remaining_tokens: int | None
    ) -> None:
        """Trust the server when it says less is left than we think (never when it says more)."""
        for buckets, remaining in (
            (self.requests, remaining_requests),
            (self.tokens, remaining_tokens),
        ):
            if remaining is None:
                continue
            for bucket in buckets[:1]:  # the per-minute bucket is the one headers describe
                bucket.refill(now)
                bucket.level = min(bucket.level, float(remaining))

    def pause(self, until: float) -> None:
        """After a 429 the whole key waits, not only the call that got it."""
        self.paused_until = max(self.paused_until, until)


@attrs.frozen
class Pause:
    """How long a 429 pauses a key; ``asked`` is what the server asked for (None: nothing)."""

    seconds: float
    asked: float | None

    @property
    def capped(self) -> bool:
        return self.asked is not None and self.asked > self.seconds


def pause_after_429(asked: float | None, max_pause: float) -> Pause:
    """The server's wait (``DEFAULT_PAUSE`` if none or not a number), within [0, max_pause]."""
    if asked is None or math.isnan(asked):
        return Pause(min(DEFAULT_PAUSE, max_pause), None)
    return Pause(min(max(asked, 0.0), max_pause), asked)


def check_max_pause(max_pause: float) -> float:
    if not 0 <= max_pause < math.inf:
        raise ValueError(f"max_pause must be a finite number of seconds >= 0, got {max_pause}")
    return max_pause


def log_capped(pause: Pause, where: str) -> None:
    if pause.capped:
        log.warning(
            "%s: the server asked for a %gs pause; capped at max_pause=%gs",
            where,
            pause.asked,
            pause.seconds,
        )


def by_model(request: Request) -> str:
    """The default key: one quota per model, as providers meter."""
    return request.options.model or "default"


def by_endpoint(request: Request) -> str:
    """One quota per URL (host and path), e.g. chat and embeddings metered apart."""
    return request.url.split("?", 1)[0]


def by_credential(request: Request) -> str:
    """One quota per API key (a hash of it: the key itself is never kept), per model."""
    auth = request.headers.get("authorization") or ""
    return hashlib.sha256(auth.encode()).hexdigest()[:16] + ":" + by_model(request)


@attrs.define(eq=False)
class _Waiter:
    cost: Cost
    wake: anyio.Event = attrs.field(factory=anyio.Event)


class _KeyQueue:
    def __init__(self, policy: RateLimitPolicy, clock: Clock) -> None:
        self.policy = policy
        self.clock = clock
        self.queue: deque[_Waiter] = deque()

    def wake_head(self) -> None:
        if self.queue:
            self.queue[0].wake.set()

    async def acquire(self, cost: Cost) -> float:
        """Wait for and take ``cost``; returns the seconds spent waiting."""
        start = self.clock()
        if not self.queue and self.policy.check(start, cost) <= 0:
            self.policy.take(start, cost)
            return 0.0
        me = _Waiter(cost)
        self.queue.append(me)
        try:
            while True:
                if self.queue[0] is me:
                    now = self.clock()
                    wait = self.policy.check(now, cost)
                    if wait <= 0:
                        self.policy.take(now, cost)
                        return now - start
                    with anyio.move_on_after(wait):
                        await me.wake.wait()
                else:
                    await me.wake.wait()
                me.wake = anyio.Event()
        finally:
            head = self.queue[0] is me
            self.queue.remove(me)
            if head:
                self.wake_head()


class RateLimit:
    """Middleware: wait for quota before each attempt; learn from usage, headers and 429s."""

    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        rpd: int | None = None,
        tpd: int | None = None,
        burst_requests: float | None = None,
        burst_tokens: float | None = None,
        key: Callable[[Request], str] = by_model,
        counter: TokenCounter | None = None,
        max_pause: float = 60.0,
        clock: Clock = current_time,
    ) -> None:
        self._max_pause = check_max_pause(max_pause)
        self._new_policy = functools.partial(
            RateLimitPolicy,
            rpm=rpm,
            tpm=tpm,
            rpd=rpd,
            tpd=tpd,
            burst_requests=burst_requests,
            burst_tokens=burst_tokens,
        )
        self._new_policy(0.0)  # validate the limits now, not on the first call
        self._key = key
        self._counter = counter or EstimatingCounter()
        self._clock = clock
        self._queues: dict[str, _KeyQueue] = {}
        #: Total seconds calls spent waiting for quota (for metrics).
        self.waited = 0.0

    def policy(self, key: str) -> RateLimitPolicy:
        return self._queue(key).policy

    def _queue(self, key: str) -> _KeyQueue:
        queue = self._queues.get(key)
        if queue is None:
            policy = self._new_policy(self._clock())
            queue = self._queues[key] = _KeyQueue(policy, self._clock)
        return queue

    def estimate(self, request: Request) -> int:
        if request.options.estimated_tokens is not None:
            return request.options.estimated_tokens
        if not request.body:
            return 0
        try:
            body = jsonlib.loads(request.body)
        except jsonlib.JSONDecodeError:
            return 0
        return estimate_request_tokens(body, self._counter) if isinstance(body, dict) else 0

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        queue = self._queue(self._key(request))
        reserved = self.estimate(request)
        waited = await queue.acquire(Cost(1, reserved))
        self.waited += waited  # not `+= await`: that would read the total before the wait
        response = await call_next(request)
        now = self._clock()
        policy = queue.policy
        if response.status == 429:
            pause = pause_after_429(parse_retry_after(response.headers), self._max_pause)
            log_capped(pause, "rate limit")
            policy.pause(now + pause.seconds)
        limits = parse_rate_limit_headers(response.headers)
        if limits.present:
            policy.resync(now, limits.remaining_requests, limits.remaining_tokens)
        if response.status == 200 and response.stream is not None:
            settle = functools.partial(self._settle_stream, queue, reserved)
            response = attrs.evolve(response, stream=UsageStream(response.stream, settle))
        elif response.status == 200:
            usage = response_usage(response)
            if usage is not None:
                policy.settle(now, reserved, usage.total_tokens)
        queue.wake_head()
        return response

    def _settle_stream(self, queue: _KeyQueue, reserved: int, usage: Usage) -> None:
        queue.policy.settle(self._clock(), reserved, usage.total_tokens)
        queue.wake_head()
