"""Property tests of the pure policies: no I/O, time is an argument."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corral.core import _errors as errors
from corral.core._classify import RateLimitHeaders
from corral.middleware._breaker import Allow, BreakerConfig, BreakerPolicy, Refuse, State
from corral.middleware._concurrency import AIMDPolicy, ConcurrencyConfig
from corral.middleware._ratelimit import (
    Cost,
    Delay,
    NoPause,
    Pause,
    PausePolicy,
    Proceed,
    RateLimitConfig,
    RateLimitPolicy,
    Reject,
    settle_delta,
)
from corral.middleware._retry import RetryBudget

arrivals = st.lists(
    st.tuples(st.floats(0, 30, allow_nan=False), st.integers(1, 400)), min_size=1, max_size=80
)


@settings(max_examples=200, deadline=None)
@given(
    arrivals=arrivals,
    rpm=st.integers(1, 120),
    tpm=st.integers(400, 20_000),
    burst_r=st.one_of(st.none(), st.integers(1, 10)),
    burst_t=st.one_of(st.none(), st.integers(400, 2_000)),
)
def test_rate_limit_windows_and_work_conservation(
    arrivals: list[tuple[float, int]], rpm: int, tpm: int, burst_r: int | None, burst_t: int | None
) -> None:
    config = RateLimitConfig(rpm=rpm, tpm=tpm, burst_requests=burst_r, burst_tokens=burst_t)
    policy = RateLimitPolicy(config, 0.0)
    bucket = policy.tokens[0]
    # An explicit burst is the most a call may cost; the default one grows to fit any call
    # short of the whole window.
    token_cap = bucket.capacity if burst_t is not None else tpm - (bucket.base < tpm)
    admitted: list[tuple[float, int]] = []
    clock = 0.0
    gap = 0.0
    for offset, tokens in arrivals:
        gap += offset
        clock = max(clock, gap)  # FIFO: a call starts no earlier than the one before it
        cost = Cost(1, tokens)
        decision = policy.admit(clock, cost)
        if tokens > token_cap:
            assert isinstance(decision, Reject)
            continue
        if isinstance(decision, Delay):
            assert decision.until > clock
            clock = decision.until
            decision = policy.admit(clock, cost)
        assert isinstance(decision, Proceed)  # work-conserving: no delay beyond the need
        admitted.append((clock, tokens))
    # A burst below the limit is paid for by a slower refill, so a window holds <= limit;
    # a burst equal to the limit allows limit + burst, the bound the docs promise.
    req_cap, tok_cap = policy.requests[0].capacity, bucket.capacity
    max_req = rpm if req_cap < rpm else rpm + req_cap
    max_tok = tpm if burst_t is None or tok_cap < tpm else tpm + tok_cap
    for start, _ in admitted:  # every 60 s window that begins at an admission
        inside = [t for at, t in admitted if start <= at < start + 60]
        assert len(inside) <= max_req + 1e-6
        assert sum(inside) <= max_tok + 1e-6


def test_cold_start_burst_is_bounded() -> None:
    policy = RateLimitPolicy(RateLimitConfig(rpm=600, burst_requests=5, cold_start=1.0), 0.0)
    taken = 0
    while isinstance(policy.admit(0.0, Cost()), Proceed):
        taken += 1
    assert taken == 5


def test_settle_refunds_and_headers_only_lower() -> None:
    config = RateLimitConfig(tpm=6_000, burst_tokens=1_000, settle="usage", cold_start=1.0)
    policy = RateLimitPolicy(config, 0.0)
    assert isinstance(policy.admit(0.0, Cost(1, 1_000)), Proceed)
    assert isinstance(policy.admit(0.0, Cost(1, 500)), Delay)
    policy.settle(0.0, settle_delta("usage", 1_000, 400, 0, None))
    assert policy.tokens[0].level == 600
    policy.learn(0.0, RateLimitHeaders(remaining_tokens=10_000))
    assert policy.tokens[0].level == 600
    policy.learn(0.0, RateLimitHeaders(remaining_tokens=100))
    assert policy.tokens[0].level == 100


@given(st.lists(st.booleans(), max_size=300), st.floats(0, 1))
def test_budget_never_negative_and_bounds_retries(ops: list[bool], ratio: float) -> None:
    budget = RetryBudget(ratio=ratio, reserve=5, cap=50)
    calls = retries = 0
    for is_call in ops:
        if is_call:
            budget.deposit()
            calls += 1
        elif budget.withdraw():
            retries += 1
        assert budget.balance >= 0
    assert retries <= 5 + ratio * calls + 1e-9


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.floats(0, 5)), max_size=300),
    st.integers(1, 20),
    st.integers(20, 300),
)
def test_aimd_stays_within_bounds(events: list[tuple[bool, int, float]], lo: int, hi: int) -> None:
    policy = AIMDPolicy(ConcurrencyConfig(adaptive=True, minimum=lo, maximum=hi, limit=lo))
    now = 0.0
    overloaded = errors.RateLimitError("x")
    for overload, in_flight, dt in events:
        now += dt
        policy.observe(now, overloaded if overload else None, in_flight)
        assert lo <= policy.limit <= hi


def test_aimd_grows_when_saturated_and_backs_off() -> None:
    policy = AIMDPolicy(ConcurrencyConfig(adaptive=True, minimum=1, maximum=100, limit=10))
    for _ in range(100):
        policy.observe(0.0, None, in_flight=int(policy.limit))
    assert policy.limit > 15
    before = policy.limit
    policy.observe(1.0, errors.ServerError("x", status=503), 1)
    policy.observe(1.1, errors.ReadTimeout("x"), 1)  # within the cooldown: one decrease only
    assert policy.limit == pytest.approx(before / 2)


class BreakerMachine(RuleBasedStateMachine):
    """Drives the breaker with random outcomes and clock steps; checks every transition is legal."""

    def __init__(self) -> None:
        super().__init__()
        config = BreakerConfig(window=10, min_calls=4, threshold=0.5, cooldown=5, probes=1)
        self.policy = BreakerPolicy(config)
        self.now = 0.0
        self.admitted = 0

    @rule(dt=st.floats(0, 4))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(failed=st.booleans())
    def call(self, failed: bool) -> None:
        before = self.policy.state
        cooling_until = self.policy.opened_at + self.policy.config.cooldown
        cooling = before is State.OPEN and self.now < cooling_until
        verdict = self.policy.before(self.now)
        if isinstance(verdict, Refuse):
            # Each call ends before the next starts, so a half-open breaker has its probe
            # back: only the cooldown refuses.
            assert cooling and self.policy.state is State.OPEN and verdict.until == cooling_until
            return
        assert isinstance(verdict, Allow) and not cooling
        mid = self.policy.state
        # allowed past the cooldown, an open breaker lets this call through as its probe
        assert mid is (State.CLOSED if before is State.CLOSED else State.HALF_OPEN)
        self.policy.record(self.now, errors.ServerError("x", status=500) if failed else None)
        after = self.policy.state
        allowed = {
            State.CLOSED: {State.CLOSED, State.OPEN},
            State.HALF_OPEN: {State.OPEN if failed else State.CLOSED},
        }
        assert after in allowed[mid]
        if after is State.OPEN and mid is State.CLOSED:
            assert failed  # only a failure can trip it

    @precondition(lambda self: self.policy.state is State.OPEN)
    @rule()
    def open_refuses_until_cooldown(self) -> None:
        until = self.policy.opened_at + self.policy.config.cooldown
        if self.now < until:
            assert self.policy.before(self.now) == Refuse(until)

    @invariant()
    def state_is_known(self) -> None:
        assert self.policy.state in State


TestBreaker = BreakerMachine.TestCase


@given(
    asked=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    max_pause=st.floats(0, 3600),
)
def test_a_429_pause_is_finite_and_capped(asked: float | None, max_pause: float) -> None:
    pause = PausePolicy(max_pause=max_pause).decide(
        100.0, errors.RateLimitError("x", retry_after=asked)
    )
    assert isinstance(pause, Pause)
    assert 0.0 <= pause.seconds <= max_pause and pause.until == 100.0 + pause.seconds
    assert pause.capped == (asked is not None and asked > max_pause)
    assert isinstance(PausePolicy(max_pause=max_pause).decide(0.0, None), NoPause)
