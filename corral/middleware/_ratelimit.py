"""Rate limiting by requests and tokens per minute (and per day), keyed, FIFO, refundable.

Policy: one token bucket per dimension. A bucket of ``limit`` per ``window`` with burst ``B``
holds at most ``B`` and refills at ``(limit - B) / window``, so *any* window of that length
admits at most ``limit`` (what a provider's sliding window enforces) and a cold start sends at
most ``B`` at once. A call reserves its estimated cost (prompt + max output tokens, as providers
count) and later settles with the real ``usage``: the difference is refunded or charged.
``RateLimitPolicy.admit`` decides ``Proceed`` (taken), ``Delay(until)`` (nothing taken) or
``Reject`` (the cost exceeds a bucket: waiting would never help).

A 429 pauses the whole key for the server's ``Retry-After``, but never longer than
``max_pause`` (60 s by default): a server that asks for 10^8 seconds (or 1e308) would otherwise
stop every later call of the run. ``PausePolicy.decide`` reads the attempt's classified outcome
and answers ``Pause(until, requested, capped)`` or ``NoPause``; a capped pause is also logged as
a warning.

Shell: one FIFO queue per key. Only the head of the queue may take capacity, so a large call
is never starved by small ones behind it; a cancelled waiter leaves the queue having taken
nothing; a refund, a header resync or a pause end wakes the head early. A call that waited
emits ``RateLimitWaited``; a pause emits ``RateLimitPaused``.
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

from corral._clock import current_time
from corral.core._classify import parse_rate_limit_headers
from corral.core._compose import Handler
from corral.core._errors import CorralError, RateLimitError, RequestTooLarge
from corral.core._events import RateLimitPaused, RateLimitWaited
from corral.core._models import Request, Response
from corral.core._tokens import EstimatingCounter, TokenCounter, estimate_request_tokens
from corral.core._wire import Usage, response_usage, shared_parse
from corral.middleware._checks import at_least, finite, never, optional

__all__ = [
    "Admission",
    "Bucket",
    "Cost",
    "Delay",
    "NoPause",
    "Pause",
    "PausePolicy",
    "Proceed",
    "RateLimit",
    "RateLimitConfig",
    "RateLimitPolicy",
    "Reject",
    "bucket_shape",
    "by_credential",
    "by_endpoint",
    "by_model",
    "call_tokens",
]

log = logging.getLogger("corral.ratelimit")

#: Seconds a 429 pauses a key when the server gives no usable Retry-After.
DEFAULT_PAUSE = 1.0


@attrs.frozen
class Cost:
    requests: int = 1
    tokens: int = 0


# -- decisions ----------------------------------------------------------------------------------


@attrs.frozen
class Proceed:
    """The cost is taken: send the call now."""


@attrs.frozen
class Delay:
    """Not yet (nothing taken): ask again at ``until``, or earlier when woken."""

    until: float


@attrs.frozen
class Reject:
    """The cost exceeds what a bucket can ever hold: waiting would never help."""

    reason: str


Admission = Proceed | Delay | Reject
PROCEED = Proceed()


@attrs.frozen
class Pause:
    """A 429 pauses the key until ``until``; ``requested`` is the server's wait (None: unsaid),
    ``capped`` when it asked for longer than ``max_pause``."""

    until: float
    seconds: float
    requested: float | None
    capped: bool


@attrs.frozen
class NoPause:
    """The outcome asks for no pause."""


NO_PAUSE = NoPause()


# -- configuration ------------------------------------------------------------------------------


@attrs.frozen
class PausePolicy:
    """What an attempt's outcome means for its key: a 429 (``RateLimitError``) pauses it."""

    #: The longest a 429 may pause a key, whatever its Retry-After says.
    max_pause: float = attrs.field(default=60.0, validator=finite())

    def decide(self, now: float, outcome: CorralError | None) -> Pause | NoPause:
        """``Pause`` for a ``RateLimitError`` outcome (its Retry-After within [0, max_pause];
        ``DEFAULT_PAUSE`` when it gave none or not a number), else ``NoPause``."""
        if not isinstance(outcome, RateLimitError):
            return NO_PAUSE
        asked = outcome.retry_after
        if asked is None or math.isnan(asked):
            seconds, asked = min(DEFAULT_PAUSE, self.max_pause), None
        else:
            seconds = min(max(asked, 0.0), self.max_pause)
        return Pause(now + seconds, seconds, asked, asked is not None and asked > seconds)


_LIMIT = optional(at_least(1))
_BURST = optional(finite(open_below=True))


@attrs.frozen
class RateLimitConfig:
    """What ``RateLimit`` enforces; validated when built (``InvalidInput`` names the field)."""

    rpm: int | None = attrs.field(default=None, validator=_LIMIT)
    tpm: int | None = attrs.field(default=None, validator=_LIMIT)
    rpd: int | None = attrs.field(default=None, validator=_LIMIT)
    tpd: int | None = attrs.field(default=None, validator=_LIMIT)
    #: Calls (tokens) a cold start may send at once; see ``bucket_shape``.
    burst_requests: float | None = attrs.field(default=None, validator=_BURST)
    burst_tokens: float | None = attrs.field(default=None, validator=_BURST)
    pause: PausePolicy = attrs.field(factory=PausePolicy)


#: Default bursts: 1% of the limit, but room for at least one typical call's tokens.
MIN_DEFAULT_BURST = {"requests": 1.0, "tokens": 4096.0}


def bucket_shape(name: str, limit: int, window: float, burst: float | None) -> tuple[float, float]:
    """(refill rate per second, capacity) so that any ``window`` admits at most ``limit``.

    The burst is paid for by a slower refill: capacity B refilled at (limit - B) / window.
    A burst equal to the limit refills at limit / window and bounds a window by limit + burst.
    """
    floor = MIN_DEFAULT_BURST["tokens" if name.startswith("tp") else "requests"]
    cap = float(min(limit, burst if burst is not None else max(floor, limit / 100)))
    return ((limit - cap) / window if cap < limit else limit / window), cap


# -- policy (per-key state) ---------------------------------------------------------------------


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
    """The buckets of one key (mutable state; the limits are the frozen ``config``).

    Pure: every method takes ``now``.
    """

    def __init__(self, config: RateLimitConfig, now: float) -> None:
        self.config = config
        c = config
        self.requests = [
            Bucket.per_window(name, limit, window, c.burst_requests if window == 60 else None, now)
            for name, limit, window in (("rpm", c.rpm, 60.0), ("rpd", c.rpd, 86_400.0))
            if limit is not None
        ]
        self.tokens = [
            Bucket.per_window(name, limit, window, c.burst_tokens if window == 60 else None, now)
            for name, limit, window in (("tpm", c.tpm, 60.0), ("tpd", c.tpd, 86_400.0))
            if limit is not None
        ]
        self.paused_until = -math.inf

    def _pairs(self, cost: Cost) -> list[tuple[Bucket, int]]:
        return [(b, cost.requests) for b in self.requests] + [(b, cost.tokens) for b in self.tokens]

    def admit(self, now: float, cost: Cost) -> Admission:
        """Take ``cost`` if every bucket holds it and the key is not paused (``Proceed``);
        else ``Delay`` until the moment it will (taking nothing), or ``Reject`` if never."""
        pairs = self._pairs(cost)
        for bucket, amount in pairs:
            if amount > bucket.capacity:
                return Reject(
                    f"this call needs {amount} {bucket.name} units but the bucket holds at most "
                    f"{bucket.capacity:g}; raise the burst or split the request"
                )
        until = self.paused_until
        for bucket, amount in pairs:
            bucket.refill(now)
            wait = bucket.wait(amount)
            if wait > 0:
                until = max(until, now + wait)
        if until > now:
            return Delay(until)
        for bucket, amount in pairs:
            bucket.level -= amount
        return PROCEED

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


def log_capped(pause: Pause, where: str) -> None:
    if pause.capped:
        log.warning(
            "%s: the server asked for a %gs pause; capped at max_pause=%gs",
            where,
            pause.requested,
            pause.seconds,
        )


# -- keys and the token estimate ----------------------------------------------------------------


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


def call_tokens(request: Request, counter: TokenCounter) -> int:
    """The call's token estimate (prompt + max output), computed once per call and kept in
    ``request.options.call.tokens``: the caller's ``estimated_tokens`` if given, else estimated
    from the call's parsed body (``call.json``), never from the bytes again."""
    call = request.options.call
    tokens = call.tokens
    if tokens is None:
        tokens = request.options.estimated_tokens
        if tokens is None:
            body = call.json(request.body)
            tokens = estimate_request_tokens(body, counter) if isinstance(body, dict) else 0
        call.tokens = tokens
    return tokens


# -- shell --------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Waiter:
    cost: Cost
    wake: anyio.Event = attrs.field(factory=anyio.Event)


class _KeyQueue:
    def __init__(self, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self.queue: deque[_Waiter] = deque()

    def wake_head(self) -> None:
        if self.queue:
            self.queue[0].wake.set()

    async def acquire(self, cost: Cost) -> float:
        """Wait for and take ``cost``; returns the seconds spent waiting."""
        start = current_time()
        if not self.queue:
            match self.policy.admit(start, cost):
                case Proceed():
                    return 0.0
                case Reject(reason=reason):
                    raise RequestTooLarge(reason)
                case Delay():
                    pass  # queue up
                case other:
                    never(other)
        me = _Waiter(cost)
        self.queue.append(me)
        try:
            while True:
                if self.queue[0] is me:
                    now = current_time()
                    match self.policy.admit(now, cost):
                        case Proceed():
                            return now - start
                        case Delay(until=until):
                            with anyio.CancelScope(deadline=until):
                                await me.wake.wait()
                        case Reject(reason=reason):
                            raise RequestTooLarge(reason)
                        case other:
                            never(other)
                else:
                    await me.wake.wait()
                me.wake = anyio.Event()
        finally:
            head = self.queue[0] is me
            self.queue.remove(me)
            if head:
                self.wake_head()


class RateLimit:
    """Middleware: wait for quota before each attempt; learn from usage, headers and 429s.

    Args:
        rpm, tpm, rpd, tpd: requests and tokens per minute and per day (None: unlimited).
        burst_requests, burst_tokens: what a cold start may send at once (``bucket_shape``).
        max_pause: the longest a 429's Retry-After may pause a key, in seconds.
        key: which quota a request counts against (``by_model``, ``by_endpoint``,
            ``by_credential`` or your own).
        counter: counts prompt tokens for the estimate (an estimating counter by default).

    Raises ``InvalidInput`` naming the field for a bad value. ``config`` is the frozen
    configuration; ``waited`` the total seconds calls spent waiting for quota (for the
    batch summary).
    """

    def __init__(
        self,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        rpd: int | None = None,
        tpd: int | None = None,
        burst_requests: float | None = None,
        burst_tokens: float | None = None,
        max_pause: float = 60.0,
        key: Callable[[Request], str] = by_model,
        counter: TokenCounter | None = None,
    ) -> None:
        self.config = RateLimitConfig(
            rpm=rpm,
            tpm=tpm,
            rpd=rpd,
            tpd=tpd,
            burst_requests=burst_requests,
            burst_tokens=burst_tokens,
            pause=PausePolicy(max_pause=max_pause),
        )
        self._key = key
        self._counter = counter or EstimatingCounter()
        self._queues: dict[str, _KeyQueue] = {}
        #: Total seconds calls spent waiting for quota (read by the batch summary).
        self.waited = 0.0

    def policy(self, key: str) -> RateLimitPolicy:
        """The state of one key's buckets (created on first use)."""
        return self._queue(key).policy

    def _queue(self, key: str) -> _KeyQueue:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _KeyQueue(RateLimitPolicy(self.config, current_time()))
        return queue

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Wait until the key's quota admits this attempt's estimated cost, send it, then settle
        the estimate against the real usage and learn from headers and 429s."""
        key = self._key(request)
        queue = self._queue(key)
        reserved = call_tokens(request, self._counter)
        waited = await queue.acquire(Cost(1, reserved))
        call = request.options.call
        if waited > 0:
            self.waited += waited
            call.emit(RateLimitWaited, current_time(), key=key, waited=waited, tokens=reserved)
        mark = call.stream
        response = await call_next(request)
        now = current_time()
        policy = queue.policy
        match self.config.pause.decide(now, response.error()):
            case NoPause():
                pass
            case Pause() as pause:
                log_capped(pause, "rate limit")
                policy.pause(pause.until)
                call.emit(
                    RateLimitPaused,
                    now,
                    key=key,
                    until=pause.until,
                    requested=pause.requested,
                    capped=pause.capped,
                )
            case other:
                never(other)
        limits = parse_rate_limit_headers(response.headers)
        if limits.present:
            policy.resync(now, limits.remaining_requests, limits.remaining_tokens)
        if response.status == 200 and response.stream is not None:
            # The call's one parse of the stream (shared with Metrics, the cache, the reader)
            # settles the reservation when the usage arrives.
            stream, parse = shared_parse(call, response.stream, mark)
            parse.on_usage(functools.partial(self._settle_stream, queue, reserved))
            if stream is not response.stream:
                response = attrs.evolve(response, stream=stream)
        elif response.status == 200:
            usage = response_usage(response)
            if usage is not None:
                policy.settle(now, reserved, usage.total_tokens)
        queue.wake_head()
        return response

    def _settle_stream(self, queue: _KeyQueue, reserved: int, usage: Usage) -> None:
        queue.policy.settle(current_time(), reserved, usage.total_tokens)
        queue.wake_head()
