"""Rate limiting by requests and tokens per minute (and per day), keyed, FIFO, strict.

Policy: one token bucket per dimension. Per-minute limits are enforced over a ``window`` of
``w`` seconds (60 by default; OpenAI documents that they may be enforced over shorter periods):
any ``w`` seconds may admit at most the *allowance* ``limit * w / 60``. A bucket of capacity
``B`` (the burst) refilled at ``(allowance - B) / w`` guarantees exactly that, whatever the
arrivals. The default burst is ``BURST_SHARE`` of the allowance, grown to hold a larger call
and shrunk back once a window has passed without one, the shrink paid as debt (the faster
refill must not let a window hold more); an explicit burst is kept as given.

What a call costs: its reservation, prompt estimate plus maximum output (``max_tokens``, or for
a body without it the model's recent high percentile, ``OutputEstimate``). ``settle``
says what happens when the real ``usage`` arrives: ``"reserved"`` (the default, and what
OpenAI counts) keeps the reservation, charging only what the usage exceeds it by and, for a
body without ``max_tokens``, correcting the estimated output; ``"usage"`` refunds or charges the
whole difference, for providers that count what was used.

Cold start: a key starts with ``cold_start`` of its burst, less what a previous run sent into
the window (``SendLog``/``room``: a resumed ``corral run`` reads it from its manifest), then
learns from the first response's ``x-ratelimit-remaining-*``/``reset-*`` headers, and from any
response a provider limit lower than the configured one. Every later response caps a bucket at
what the provider says remains.

``RateLimitPolicy.admit`` decides ``Proceed`` (taken), ``Delay(until)`` (nothing taken) or
``Reject`` (the cost exceeds what a bucket or a window can ever hold).

A 429 pauses the whole key for the server's ``Retry-After``, but never longer than
``max_pause`` (60 s by default): a server that asks for 10^8 seconds (or 1e308) would otherwise
stop every later call of the run. ``PausePolicy.decide`` reads the attempt's classified outcome
and answers ``Pause(until, requested, capped)`` or ``NoPause``; a capped pause is also logged as
a warning. No credit accumulates during a pause: the buckets restart empty at its end, so
the key resumes at the steady rate, not with a burst into the window that just refused it.

Shell: one FIFO queue per key. Only the head of the queue may take capacity, so a large call
is never starved by small ones behind it; a cancelled waiter leaves the queue having taken
nothing; a refund, a header resync or a pause end wakes the head early. A call that waited
emits ``RateLimitWaited``; a pause ``RateLimitPaused``; a key's first call
``RateLimitColdStart``; what the headers taught ``RateLimitLearned``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

import anyio
import attrs

from corral._clock import current_time
from corral.core._classify import RateLimitHeaders, parse_rate_limit_headers
from corral.core._compose import Handler
from corral.core._errors import CorralError, InvalidInput, RateLimitError, RequestTooLarge
from corral.core._events import (
    RateLimitColdStart,
    RateLimitLearned,
    RateLimitPaused,
    RateLimitWaited,
)
from corral.core._models import Request, Response
from corral.core._tokens import (
    DEFAULT_MAX_OUTPUT,
    EstimatingCounter,
    TokenCounter,
    estimate_request_tokens,
)
from corral.core._wire import Usage, response_usage, shared_parse
from corral.middleware._checks import at_least, between, finite, never, optional
from corral.middleware._outputs import OutputEstimate
from corral.middleware._sendlog import SendLog, Sent, room

__all__ = [
    "Admission",
    "Bucket",
    "Cost",
    "Delay",
    "Learned",
    "NoPause",
    "Pause",
    "PausePolicy",
    "Proceed",
    "RateLimit",
    "RateLimitConfig",
    "RateLimitPolicy",
    "Reject",
    "Reservation",
    "Settle",
    "bucket_shape",
    "by_credential",
    "by_endpoint",
    "by_model",
    "call_tokens",
    "reservation",
    "settle_delta",
    "usage_delta",
]

log = logging.getLogger("corral.ratelimit")

#: Seconds a 429 pauses a key when the server gives no usable Retry-After.
DEFAULT_PAUSE = 1.0

#: The default burst: this share of what one window admits (the steady rate is the rest).
BURST_SHARE = 0.02

Settle = Literal["reserved", "usage"]


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


@attrs.frozen
class Learned:
    """The provider's headers changed a bucket: a lower per-minute ``limit`` than configured
    (None: unchanged), and the ``level`` the bucket holds now."""

    dimension: str
    limit: float | None
    level: float


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


def one_of(*allowed: str) -> Any:
    """A validator: one of ``allowed`` (``InvalidInput`` names the field)."""

    def check(instance: object, attribute: Any, value: object) -> None:
        if value not in allowed:
            raise InvalidInput(
                f"{type(instance).__name__}.{attribute.name} must be one of "
                f"{', '.join(map(repr, allowed))}, got {value!r}"
            )

    return check


_LIMIT = optional(at_least(1))
_BURST = optional(finite(open_below=True))
_WINDOW = finite(open_below=True)
_SETTLE = one_of("reserved", "usage")


@attrs.frozen
class RateLimitConfig:
    """What ``RateLimit`` enforces; validated when built (``InvalidInput`` names the field)."""

    rpm: int | None = attrs.field(default=None, validator=_LIMIT)
    tpm: int | None = attrs.field(default=None, validator=_LIMIT)
    rpd: int | None = attrs.field(default=None, validator=_LIMIT)
    tpd: int | None = attrs.field(default=None, validator=_LIMIT)
    #: Calls (tokens) the limiter may send at once; see ``bucket_shape``.
    burst_requests: float | None = attrs.field(default=None, validator=_BURST)
    burst_tokens: float | None = attrs.field(default=None, validator=_BURST)
    #: Seconds over which the provider enforces the per-minute limits.
    window: float = attrs.field(default=60.0, validator=_WINDOW)
    #: What a call costs once its usage is known: its reservation, or its usage.
    settle: Settle = attrs.field(default="reserved", validator=_SETTLE)
    #: The share of the burst a key starts with (a window may be full from another process).
    cold_start: float = attrs.field(
        default=0.1, validator=between(0.0, 1.0, open_low=False, open_high=False)
    )
    pause: PausePolicy = attrs.field(factory=PausePolicy)


def allowance(name: str, limit: float, window: float) -> float:
    """What one ``window`` admits of a per-minute ``limit`` (whole calls, at least one)."""
    share = limit * window / 60
    return max(1.0, math.floor(share + 1e-9)) if name == "requests" else share


def default_burst(allowance: float, floor: float = 1.0) -> float:
    """``BURST_SHARE`` of the allowance, at least ``floor``, at most the allowance."""
    return min(allowance, max(floor, allowance * BURST_SHARE))


def bucket_shape(allowance: float, window: float, burst: float) -> tuple[float, float]:
    """(refill rate per second, capacity) so that any ``window`` admits at most ``allowance``.

    The burst is paid for by a slower refill: capacity B refilled at (allowance - B) / window.
    A burst of the whole allowance (or more) refills at allowance / window and bounds a window
    by twice the allowance: asked for explicitly, never chosen by the limiter.
    """
    cap = float(min(allowance, burst))
    return ((allowance - cap) / window if cap < allowance else allowance / window), cap


# -- policy (per-key state) ---------------------------------------------------------------------


@attrs.define
class Bucket:
    """Units refilled at ``rate`` per second up to ``capacity``, so that any ``window`` admits
    at most ``allowance``; ``level`` may go below 0 (debt: nothing is admitted until repaid),
    and ``updated`` may lie ahead (a pause: no refill before it)."""

    name: str
    #: The limit per minute (per day for a daily bucket) and what one window admits of it.
    limit: float
    window: float
    allowance: float
    #: The configured burst (None: ``default_burst``, grown to fit a call).
    burst: float | None
    capacity: float = 0.0
    rate: float = 0.0
    level: float = 0.0
    updated: float = 0.0
    #: The highest level since the last shrink, and the largest recent call (``take``).
    peak: float = 0.0
    largest: float = 0.0
    largest_at: float = -math.inf

    @classmethod
    def make(cls, name: str, limit: float, window: float, burst: float | None) -> Bucket:
        dimension = "requests" if name in ("rpm", "rpd") else "tokens"
        bucket = cls(name, limit, window, allowance(dimension, limit, window), burst)
        bucket.reshape(bucket.base)
        bucket.level = bucket.peak = bucket.capacity
        return bucket

    @property
    def base(self) -> float:
        return self.burst if self.burst is not None else default_burst(self.allowance)

    def reshape(self, capacity: float) -> None:
        self.rate, self.capacity = bucket_shape(self.allowance, self.window, capacity)
        self.level = min(self.level, self.capacity)

    def relimit(self, now: float, limit: float) -> None:
        """A lower limit (the provider said so): the same burst rule on its allowance."""
        self.refill(now)
        self.limit = limit
        dimension = "requests" if self.name in ("rpm", "rpd") else "tokens"
        self.allowance = allowance(dimension, limit, self.window)
        self.reshape(min(self.base, self.capacity))

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now
            self.peak = max(self.peak, self.level)

    def fit(self, amount: float) -> bool:
        """Grow the bucket to hold ``amount`` (default burst only; the level is untouched);
        False if it never can."""
        if self.burst is not None:
            return amount <= self.capacity
        if amount > self.allowance or (amount == self.allowance > self.base):
            return False  # the whole window for one call: only an explicit burst allows it
        if amount > self.capacity:
            self.reshape(amount)
        return True

    def take(self, now: float, amount: float) -> None:
        """Take ``amount``; then shrink a grown bucket back to the largest call of the last
        window (at least the base), paying for it: whatever the level rose above the new
        capacity since the last shrink becomes debt, or the faster refill that follows would
        let a window hold more than the allowance."""
        self.level -= amount
        if self.burst is None:
            if amount >= self.largest or now - self.largest_at > self.window:
                self.largest, self.largest_at = amount, now
            want = max(self.base, self.largest)
            if want < self.capacity:
                self.level -= max(0.0, self.peak - want)
                self.reshape(want)
                self.peak = self.level

    def wait(self, amount: float) -> float:
        """Seconds of refill until ``amount`` is there (after ``refill``; a pause not counted)."""
        missing = amount - self.level
        if missing <= 1e-9:
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf

    def available_at(self, now: float, amount: float) -> float:
        """When ``amount`` will be there (after ``refill``), a pause counted."""
        return max(now, self.updated) + self.wait(amount)

    def drain(self, now: float, until: float) -> None:
        """Empty (debt stays), and no refill before ``until``."""
        self.refill(now)
        self.level = min(self.level, 0.0)
        self.updated = max(self.updated, until)


def settle_delta(
    mode: Settle, reserved: int, total: int, completion: int, guess: int | None
) -> int:
    """Tokens to charge (positive) or refund (negative) once a call's usage is known.

    ``guess``: the output the reservation estimated (a body without ``max_tokens``), else None.
    """
    if mode == "usage":
        return total - reserved
    over = max(0, total - reserved)
    if guess is None:
        return over
    output = completion - guess  # the provider counts the real output of such a call
    return max(over, output) if over else output


class RateLimitPolicy:
    """The buckets of one key (mutable state; the limits are the frozen ``config``).

    Pure: every method takes ``now``. ``sent``: what a previous run sent into the window
    (``SendLog.recent``), so the buckets start with no more than the window has room for;
    ``missed``: seconds after that record in which it may have sent more, unrecorded (at most
    a burst and that many seconds of refill, counted as sent just now).
    """

    def __init__(
        self, config: RateLimitConfig, now: float, sent: Sent = (), missed: float = 0.0
    ) -> None:
        self.config = c = config
        w = c.window
        self.minute: dict[str, Bucket | None] = {
            "requests": None if c.rpm is None else Bucket.make("rpm", c.rpm, w, c.burst_requests),
            "tokens": None if c.tpm is None else Bucket.make("tpm", c.tpm, w, c.burst_tokens),
        }
        self.requests = [b for b in (self.minute["requests"],) if b is not None]
        self.tokens = [b for b in (self.minute["tokens"],) if b is not None]
        if c.rpd is not None:
            self.requests.append(Bucket.make("rpd", c.rpd, 86_400.0, None))
        if c.tpd is not None:
            self.tokens.append(Bucket.make("tpd", c.tpd, 86_400.0, None))
        for bucket in self.requests + self.tokens:
            bucket.updated = now
        for dimension, column in (("requests", 1), ("tokens", 2)):
            start = self.minute[dimension]
            if start is not None:
                start.level *= c.cold_start
                if sent or missed:
                    history = [(one[0], float(one[column])) for one in sent]
                    if missed:
                        history.append((0.0, start.capacity + start.rate * missed))
                    start.level = min(start.level, room(start.allowance, start.rate, w, history))
        self.paused_until = -math.inf
        #: Whether a previous run's sends shaped the start (``sent``).
        self.sent_before = bool(sent or missed)
        self.sent = SendLog(w)
        #: Dimensions whose first headers are still to come.
        self._cold = {"requests", "tokens"}

    def _pairs(self, cost: Cost) -> list[tuple[Bucket, int]]:
        return [(b, cost.requests) for b in self.requests] + [(b, cost.tokens) for b in self.tokens]

    def admit(self, now: float, cost: Cost) -> Admission:
        """Take ``cost`` if every bucket holds it and the key is not paused (``Proceed``);
        else ``Delay`` until the moment it will (taking nothing), or ``Reject`` if never."""
        pairs = self._pairs(cost)
        for bucket, amount in pairs:
            if not bucket.fit(amount):
                return Reject(
                    f"this call needs {amount} {bucket.name} units but the bucket holds at most "
                    f"{bucket.capacity:g} (a {bucket.window:g} s window {bucket.allowance:g}); "
                    "raise the burst or the limit, or split the request"
                )
        until = self.paused_until
        for bucket, amount in pairs:
            bucket.refill(now)
            until = max(until, bucket.available_at(now, amount))
        if until > now:
            return Delay(until)
        for bucket, amount in pairs:
            bucket.take(now, amount)
        self.sent.add(now, cost.requests, cost.tokens)
        return PROCEED

    def settle(self, now: float, delta: int) -> None:
        """Charge (positive) or refund (negative) tokens once the usage is known
        (``settle_delta`` says how much)."""
        if not delta:
            return
        for bucket in self.tokens:
            bucket.refill(now)
            bucket.level = min(bucket.capacity, bucket.level - delta)
        if delta > 0:
            self.sent.add(now, 0, delta)

    def learn(self, now: float, headers: RateLimitHeaders) -> list[Learned]:
        """What a response's ``x-ratelimit-*`` headers say, applied; only ever lowers.

        A stated limit below the configured one replaces it. The first remaining count of a
        dimension (cold start) also says how full the window already is: the level may then be
        at most ``remaining`` and ``allowance - rate * reset`` (what is in the window leaves
        within ``reset`` seconds, while we refill). Every later one caps the level at
        ``remaining``.
        """
        learned: list[Learned] = []
        for dimension, limit, remaining, reset in (
            (
                "requests",
                headers.limit_requests,
                headers.remaining_requests,
                headers.reset_requests,
            ),
            ("tokens", headers.limit_tokens, headers.remaining_tokens, headers.reset_tokens),
        ):
            bucket = self.minute[dimension]
            if bucket is None:
                continue
            if limit is not None and 0 < limit < bucket.limit:
                bucket.relimit(now, limit)
                learned.append(Learned(dimension, float(limit), bucket.level))
            if remaining is None:
                continue
            bucket.refill(now)
            bound = float(remaining)
            if dimension in self._cold:
                self._cold.discard(dimension)
                bound = min(bound, bucket.allowance - bucket.rate * (reset or 0.0))
                if bound < bucket.level:
                    bucket.level = bound
                    learned.append(Learned(dimension, None, bound))
            bucket.level = min(bucket.level, bound)
        return learned

    def pause(self, now: float, until: float) -> None:
        """After a 429 the whole key waits, not only the call that got it, and no credit
        builds up meanwhile: the buckets start empty at ``until``."""
        self.paused_until = max(self.paused_until, until)
        for bucket in self.requests + self.tokens:
            bucket.drain(now, until)

    def recent(self, now: float) -> Sent:
        """What this key sent that may still count in the provider's window."""
        return self.sent.recent(now)


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


@attrs.frozen
class Reservation:
    """What a call reserves: ``tokens``; of them ``guess`` estimated output (a body without
    ``max_tokens``; None otherwise), for ``choices`` answers of ``model``."""

    tokens: int
    guess: int | None = None
    choices: int = 1
    model: str = "default"


def _states_max_output(body: Mapping[str, Any]) -> bool:
    return any(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for v in (body.get("max_completion_tokens"), body.get("max_tokens"))
    )


def reservation(request: Request, counter: TokenCounter, outputs: OutputEstimate) -> Reservation:
    """The call's reservation: ``call_tokens``, except that a chat body without ``max_tokens``
    reserves the model's recent high percentile of output (``outputs``) instead of the fixed
    ``DEFAULT_MAX_OUTPUT`` per choice."""
    tokens = call_tokens(request, counter)
    if request.options.estimated_tokens is not None:
        return Reservation(tokens)
    body = request.options.call.json(request.body)
    if not isinstance(body, dict) or "messages" not in body or _states_max_output(body):
        return Reservation(tokens)
    n = body.get("n", 1)
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    model = by_model(request)
    guess = outputs.reserve(model) * choices
    return Reservation(tokens - DEFAULT_MAX_OUTPUT * choices + guess, guess, choices, model)


def usage_delta(mode: Settle, held: Reservation, usage: Usage, outputs: OutputEstimate) -> int:
    """``settle_delta`` for a call's usage; an estimated output also teaches ``outputs``."""
    if held.guess is not None:
        outputs.observe(held.model, -(-usage.completion_tokens // held.choices))
    return settle_delta(mode, held.tokens, usage.total_tokens, usage.completion_tokens, held.guess)


# -- shell --------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Waiter:
    wake: anyio.Event = attrs.field(factory=anyio.Event)


class _KeyQueue:
    def __init__(self, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self.queue: deque[_Waiter] = deque()

    def wake_head(self) -> None:
        if self.queue:
            self.queue[0].wake.set()

    def _admit(self, now: float, price: Callable[[], Reservation]) -> tuple[Admission, Reservation]:
        held = price()
        return self.policy.admit(now, Cost(1, held.tokens)), held

    async def acquire(self, price: Callable[[], Reservation]) -> tuple[float, Reservation]:
        """Wait for and take the call's reservation; returns the seconds spent waiting and the
        reservation taken. ``price`` is asked at each try: an estimated output learnt while
        the call waited lowers what it reserves."""
        start = current_time()
        if not self.queue:
            match self._admit(start, price):
                case Proceed(), held:
                    return 0.0, held
                case Reject(reason=reason), _:
                    raise RequestTooLarge(reason)
                case Delay(), _:
                    pass  # queue up
                case other:
                    never(other)
        me = _Waiter()
        self.queue.append(me)
        try:
            while True:
                if self.queue[0] is me:
                    now = current_time()
                    match self._admit(now, price):
                        case Proceed(), held:
                            return now - start, held
                        case Delay(until=until), _:
                            with anyio.CancelScope(deadline=until):
                                await me.wake.wait()
                        case Reject(reason=reason), _:
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
        burst_requests, burst_tokens: what may be sent at once (``bucket_shape``); by default
            ``BURST_SHARE`` of what one window admits, grown to fit a larger call.
        window: seconds over which the provider enforces the per-minute limits; no ``window``
            ever holds more than ``limit * window / 60``.
        settle: ``"reserved"`` (a call costs its reservation, as OpenAI counts) or ``"usage"``
            (refunded to its real usage, for providers that count usage).
        cold_start: the share of the burst a key starts with (0 to 1).
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
        window: float = 60.0,
        settle: Settle = "reserved",
        cold_start: float = 0.1,
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
            window=window,
            settle=settle,
            cold_start=cold_start,
            pause=PausePolicy(max_pause=max_pause),
        )
        self._key = key
        self._counter = counter or EstimatingCounter()
        self._outputs = OutputEstimate()
        self._queues: dict[str, _KeyQueue] = {}
        self._history: dict[str, Sent] = {}
        self._history_at = 0.0
        self._missed = 0.0
        #: Total seconds calls spent waiting for quota (read by the batch summary).
        self.waited = 0.0

    def policy(self, key: str) -> RateLimitPolicy:
        """The state of one key's buckets (created on first use)."""
        return self._queue(key).policy

    def recent(self) -> dict[str, Sent]:
        """Per key, what was sent that may still count in the provider's window:
        ``(seconds ago, requests, tokens)`` slices, for a run manifest."""
        now = current_time()
        return {key: queue.policy.recent(now) for key, queue in self._queues.items()}

    def resume(self, history: Mapping[str, Sent], missed: float = 0.0) -> None:
        """What a previous run sent (``recent`` of its limiter, its ages counted from now), and
        for how many seconds after that record it may have sent more: keys created from now
        on start with no more than their window has room for."""
        self._history = dict(history)
        self._history_at = current_time()
        self._missed = missed

    def _queue(self, key: str) -> _KeyQueue:
        queue = self._queues.get(key)
        if queue is None:
            now = current_time()
            late = now - self._history_at
            sent = tuple((age + late, r, t) for age, r, t in self._history.pop(key, ()))
            missed = self._missed if sent else 0.0
            policy = RateLimitPolicy(self.config, now, sent, missed)
            queue = self._queues[key] = _KeyQueue(policy)
        return queue

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Wait until the key's quota admits this attempt's estimated cost, send it, then settle
        the estimate against the real usage and learn from headers and 429s."""
        key = self._key(request)
        call = request.options.call
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queue(key)
            minute = queue.policy.minute
            call.emit(
                RateLimitColdStart,
                current_time(),
                key=key,
                requests=None if minute["requests"] is None else minute["requests"].level,
                tokens=None if minute["tokens"] is None else minute["tokens"].level,
                resumed=bool(queue.policy.sent_before),
            )
        price = functools.partial(reservation, request, self._counter, self._outputs)
        waited, held = await queue.acquire(price)
        if waited > 0:
            self.waited += waited
            call.emit(RateLimitWaited, current_time(), key=key, waited=waited, tokens=held.tokens)
        mark = call.stream
        response = await call_next(request)
        now = current_time()
        policy = queue.policy
        match self.config.pause.decide(now, response.error()):
            case NoPause():
                pass
            case Pause() as pause:
                log_capped(pause, "rate limit")
                policy.pause(now, pause.until)
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
            for learned in policy.learn(now, limits):
                call.emit(
                    RateLimitLearned,
                    now,
                    key=key,
                    dimension=learned.dimension,
                    limit=learned.limit,
                    level=learned.level,
                )
        if response.status == 200 and response.stream is not None:
            # The call's one parse of the stream (shared with Metrics, the cache, the reader)
            # settles the reservation when the usage arrives.
            stream, parse = shared_parse(call, response.stream, mark)
            parse.on_usage(functools.partial(self._settle_stream, queue, held))
            if stream is not response.stream:
                response = attrs.evolve(response, stream=stream)
        elif response.status == 200:
            usage = response_usage(response)
            if usage is not None:
                policy.settle(now, usage_delta(self.config.settle, held, usage, self._outputs))
        queue.wake_head()
        return response

    def _settle_stream(self, queue: _KeyQueue, held: Reservation, usage: Usage) -> None:
        delta = usage_delta(self.config.settle, held, usage, self._outputs)
        queue.policy.settle(current_time(), delta)
        queue.wake_head()
