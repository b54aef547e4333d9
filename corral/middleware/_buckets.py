"""The rate limiter's policy: token buckets per minute (and per day), pure, strict.

Per-minute limits are enforced over a ``window`` of ``w`` seconds (60 by default; OpenAI
documents that they may be enforced over shorter periods): any ``w`` seconds may admit at most
the *allowance* ``limit * w / 60``. A bucket of capacity ``B`` (the burst) refilled at
``(allowance - B) / w`` guarantees exactly that, whatever the arrivals. The default burst is
``BURST_SHARE`` of the allowance, grown to hold a larger call and shrunk back once a window has
passed without one, the shrink paid as debt (the faster refill must not let a window hold
more); an explicit burst is kept as given.

What a call costs: its reservation, prompt estimate plus maximum output. ``settle_delta``
applies the ``settle`` mode once the real ``usage`` arrives: ``"reserved"`` (the default, and
what OpenAI counts) keeps the reservation, charging only what the usage exceeds it by and, for
a body without ``max_tokens``, correcting the estimated output; ``"usage"`` refunds or charges
the whole difference, for providers that count what was used.

Cold start: a key starts with ``cold_start`` of its burst, less what a previous run sent into
the window (``SendLog``/``room``), then ``learn`` reads the first response's
``x-ratelimit-remaining-*``/``reset-*`` headers, and from any response a provider limit lower
than the configured one. Every later response caps a bucket at what the provider says remains.

``RateLimitPolicy.admit`` decides ``Proceed`` (taken), ``Delay(until)`` (nothing taken) or
``Reject`` (the cost exceeds what a bucket or a window can ever hold). A 429
(``PausePolicy.decide``: ``Pause`` or ``NoPause``) pauses the key for its Retry-After, at most
``max_pause``, and drains the buckets: no credit accumulates during a pause, so the key resumes
at the steady rate, not with a burst into the window that just refused it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs

from corral.core._classify import RateLimitHeaders
from corral.core._errors import CorralError, InvalidInput, RateLimitError
from corral.middleware._calibration import Calibration, WindowSum
from corral.middleware._checks import at_least, between, finite, optional
from corral.middleware._sendlog import SendLog, Sent, room

__all__ = [
    "BURST_SHARE",
    "DEFAULT_PAUSE",
    "NO_PAUSE",
    "PROCEED",
    "Admission",
    "Bucket",
    "Cost",
    "Delay",
    "Learned",
    "NoPause",
    "Pause",
    "PausePolicy",
    "Proceed",
    "RateLimitConfig",
    "RateLimitPolicy",
    "Reject",
    "Settle",
    "allowance",
    "bucket_shape",
    "default_burst",
    "one_of",
    "settle_delta",
]

#: Seconds a 429 pauses a key when the server gives no usable Retry-After.
DEFAULT_PAUSE = 1.0

#: The default burst: this share of what one window admits (the steady rate is the rest).
BURST_SHARE = 0.02

Settle = Literal["reserved", "usage"]


@attrs.frozen
class Cost:
    requests: int = 1
    tokens: float = 0


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
    #: The provider's tokens per token of ours, when that is what changed (``Calibration``).
    scale: float | None = None


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
    #: Scale token reservations to the provider's count, learnt from its remaining-tokens.
    calibrate: bool = True


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
        """Seconds of refill until ``amount`` is there (after ``refill``; a pause not counted),
        rounded up by a nanosecond: a float that rounds down would admit a call a hair before
        the provider's window lets the old one go."""
        missing = amount - self.level
        if missing <= 0:
            return 0.0
        return missing / self.rate + 1e-9 if self.rate > 0 else math.inf

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
        #: What we charged in the last window, in our own estimate's tokens, and what the
        #: provider counts per such token (None: not calibrated).
        self.ours = WindowSum(w)
        self.calibration = Calibration() if c.calibrate and c.tpm is not None else None

    def _pairs(self, cost: Cost) -> list[tuple[Bucket, float]]:
        return [(b, cost.requests) for b in self.requests] + [(b, cost.tokens) for b in self.tokens]

    def admit(self, now: float, cost: Cost) -> Admission:
        """Take ``cost`` if every bucket holds it and the key is not paused (``Proceed``);
        else ``Delay`` until the moment it will (taking nothing), or ``Reject`` if never.
        ``cost.tokens`` is in our estimate's tokens; the buckets hold the provider's."""
        ours = cost.tokens
        if self.calibration is not None and ours:
            cost = Cost(cost.requests, self.calibration.scale(ours))
        pairs = self._pairs(cost)
        for bucket, amount in pairs:
            if not bucket.fit(amount):
                return Reject(
                    f"this call needs {amount:g} {bucket.name} units but the bucket holds at most "
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
        if self.calibration is not None:
            self.ours.add(now, ours)
        return PROCEED

    def settle(self, now: float, delta: int) -> None:
        """Charge (positive) or refund (negative) tokens once the usage is known
        (``settle_delta`` says how much, in our estimate's tokens)."""
        if not delta:
            return
        amount: float = delta
        if self.calibration is not None:
            self.ours.add(now, delta)
            amount = self.calibration.scale(delta)
        for bucket in self.tokens:
            bucket.refill(now)
            bucket.level = min(bucket.capacity, bucket.level - amount)
        if amount > 0:
            self.sent.add(now, 0, amount)

    def counted(self, now: float) -> float:
        """What we charged in the last window (our estimate's tokens): taken when a call is
        admitted, handed back to ``learn`` with its response."""
        return self.ours.total(now)

    def learn(
        self, now: float, headers: RateLimitHeaders, counted: float | None = None
    ) -> list[Learned]:
        """What a response's ``x-ratelimit-*`` headers say, applied; only ever lowers.

        A stated limit below the configured one replaces it. The first remaining count of a
        dimension (cold start) also says how full the window already is: the level may then be
        at most ``remaining`` and ``allowance - rate * reset`` (what is in the window leaves
        within ``reset`` seconds, while we refill). Every later one caps the level at
        ``remaining``. ``counted``: ``counted()`` when this call was admitted (a successful
        call); with the remaining tokens it is a sample for the ``calibration``.
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
        self._calibrate(headers, counted, learned)
        return learned

    def _calibrate(
        self, headers: RateLimitHeaders, counted: float | None, learned: list[Learned]
    ) -> None:
        bucket = self.minute["tokens"]
        remaining = headers.remaining_tokens
        if self.calibration is None or bucket is None or counted is None or remaining is None:
            return
        limit = headers.limit_tokens if headers.limit_tokens else bucket.limit
        whole = allowance("tokens", limit, bucket.window)
        if self.calibration.observe(counted, whole - remaining, whole):
            learned.append(Learned("tokens", None, bucket.level, self.calibration.factor))

    def pause(self, now: float, until: float) -> None:
        """After a 429 the whole key waits, not only the call that got it, and no credit
        builds up meanwhile: the buckets start empty at ``until``."""
        self.paused_until = max(self.paused_until, until)
        for bucket in self.requests + self.tokens:
            bucket.drain(now, until)

    def recent(self, now: float) -> Sent:
        """What this key sent that may still count in the provider's window."""
        return self.sent.recent(now)
