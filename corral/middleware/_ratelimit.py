"""Rate limiting by requests and tokens per minute (and per day): keyed, FIFO, strict.

The policy (token buckets over the provider's enforcement ``window``, the ``settle`` modes,
cold start, what headers teach, the 429 pause that drains the buckets) lives in
``corral.middleware._buckets``; what a call reserves is decided here: its prompt estimate plus
its maximum output (``max_tokens``, or for a body without it the model's recent high
percentile, ``OutputEstimate``), priced when the call reaches the head of its queue.

Shell: one FIFO queue per key. Only the head of the queue may take capacity, so a large call
is never starved by small ones behind it; a cancelled waiter leaves the queue having taken
nothing; a refund, a header resync or a pause end wakes the head early. A call that waited
emits ``RateLimitWaited``; a pause ``RateLimitPaused``; a key's first call
``RateLimitColdStart``; what the headers taught ``RateLimitLearned``. ``recent``/``resume``
carry what was sent in the last window from one run to the next (``corral run`` keeps it in
its manifest).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import attrs

from corral._clock import current_time
from corral.core._classify import parse_rate_limit_headers
from corral.core._compose import Handler
from corral.core._errors import DeadlineExceeded, RequestTooLarge
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
from corral.middleware._buckets import (
    Admission,
    Bucket,
    Cost,
    Delay,
    Learned,
    NoPause,
    Pause,
    PausePolicy,
    Proceed,
    RateLimitConfig,
    RateLimitPolicy,
    Reject,
    Settle,
    bucket_shape,
    settle_delta,
)
from corral.middleware._checks import never
from corral.middleware._outputs import OutputEstimate
from corral.middleware._sendlog import Sent

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

    async def acquire(
        self, price: Callable[[], Reservation], deadline: float | None = None
    ) -> tuple[float, Reservation]:
        """Wait for and take the call's reservation; returns the seconds spent waiting and the
        reservation taken. ``price`` is asked at each try: an estimated output learnt while
        the call waited lowers what it reserves. The wait ends at the call's ``deadline``."""
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
        if deadline is None:
            return await self._queued(price, start)
        with anyio.CancelScope(deadline=deadline):
            return await self._queued(price, start)
        raise DeadlineExceeded("the call's deadline passed while it waited for quota")

    async def _queued(
        self, price: Callable[[], Reservation], start: float
    ) -> tuple[float, Reservation]:
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
        calibrate: scale token reservations to the provider's own count, learnt from its
            ``x-ratelimit-remaining-tokens`` (``corral.middleware._calibration``); False keeps
            corral's estimate as it is.
        max_pause: the longest a 429's Retry-After may pause a key, in seconds.
        key: which quota a request counts against (``by_model``, ``by_endpoint``,
            ``by_credential`` or your own).
        counter: counts prompt tokens for the estimate (an estimating counter by default).

    Raises ``InvalidInput`` naming the field for a bad value. ``config`` is the frozen
    configuration; ``waited`` the total seconds calls spent waiting for quota (for the
    batch summary).
    """

    #: A wait for quota ends at the call's deadline (``core._compose``).
    honours_deadline = True

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
        calibrate: bool = True,
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
            calibrate=calibrate,
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
        waited, held = await queue.acquire(price, request.options.deadline)
        if waited > 0:
            self.waited += waited
            call.emit(RateLimitWaited, current_time(), key=key, waited=waited, tokens=held.tokens)
        policy = queue.policy
        counted = None if policy.calibration is None else policy.counted(current_time())
        mark = call.stream
        response = await call_next(request)
        now = current_time()
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
            ok = response.status == 200
            for learned in policy.learn(now, limits, counted if ok else None):
                call.emit(
                    RateLimitLearned,
                    now,
                    key=key,
                    dimension=learned.dimension,
                    limit=learned.limit,
                    level=learned.level,
                    scale=learned.scale,
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
