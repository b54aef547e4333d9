"""Property tests of the pure policies: no I/O, time is an argument."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corral.core import errors
from corral.core.headers import Headers
from corral.middleware.breaker import BreakerPolicy, State
from corral.middleware.concurrency import AIMDPolicy
from corral.middleware.ratelimit import Cost, RateLimitPolicy, pause_after_429
from corral.middleware.retry import GiveUp, RetryAfter, RetryBudget, RetryPolicy

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
    policy = RateLimitPolicy(0.0, rpm=rpm, tpm=tpm, burst_requests=burst_r, burst_tokens=burst_t)
    token_cap = policy.tokens[0].capacity
    admitted: list[tuple[float, int]] = []
    clock = 0.0
    gap = 0.0
    for offset, tokens in arrivals:
        gap += offset
        clock = max(clock, gap)  # FIFO: a call starts no earlier than the one before it
        cost = Cost(1, tokens)
        if tokens > token_cap:
            with pytest.raises(errors.RequestTooLarge):
                policy.check(clock, cost)
            continue
        wait = policy.check(clock, cost)
        assert wait >= 0
        clock += wait
        assert policy.check(clock, cost) <= 1e-6  # work-conserving: no delay beyond the need
        policy.take(clock, cost)
        admitted.append((clock, tokens))
    # A burst below the limit is paid for by a slower refill, so a window holds <= limit;
    # a burst equal to the limit allows limit + burst, the bound the docs promise.
    req_cap, tok_cap = policy.requests[0].capacity, token_cap
    max_req = rpm if req_cap < rpm else rpm + req_cap
    max_tok = tpm if tok_cap < tpm else tpm + tok_cap
    for start, _ in admitted:  # every 60 s window that begins at an admission
        inside = [t for at, t in admitted if start <= at < start + 60]
        assert len(inside) <= max_req + 1e-6
        assert sum(inside) <= max_tok + 1e-6


def test_cold_start_burst_is_bounded() -> None:
    policy = RateLimitPolicy(0.0, rpm=600, burst_requests=5)
    taken = 0
    while policy.check(0.0, Cost()) == 0:
        policy.take(0.0, Cost())
        taken += 1
    assert taken == 5


def test_settle_refunds_and_resync_only_lowers() -> None:
    policy = RateLimitPolicy(0.0, tpm=6_000, burst_tokens=1_000)
    policy.take(0.0, Cost(1, 1_000))
    assert policy.check(0.0, Cost(1, 500)) > 0
    policy.settle(0.0, reserved=1_000, actual=400)
    assert policy.check(0.0, Cost(1, 500)) == 0
    policy.resync(0.0, None, 10_000)
    assert policy.tokens[0].level == 600
    policy.resync(0.0, None, 100)
    assert policy.tokens[0].level == 100


@given(
    attempt=st.integers(1, 80),
    hint=st.one_of(st.none(), st.floats(0, 200, allow_nan=False)),
    base=st.floats(0.01, 2),
    cap=st.floats(0.1, 60),
    seed=st.integers(),
)
def test_backoff_bounds_and_retry_after(
    attempt: int, hint: float | None, base: float, cap: float, seed: int
) -> None:
    policy = RetryPolicy(max_attempts=100, base=base, cap=cap, rng=random.Random(seed))
    headers = Headers({} if hint is None else {"retry-after": repr(hint)})
    decision = policy.decide(attempt, errors.ServerError("x", status=500), headers, 0.0, None, None)
    if hint is not None and hint > policy.max_retry_after:
        assert isinstance(decision, GiveUp)
        return
    assert isinstance(decision, RetryAfter)
    ceiling = min(cap, base * 2 ** min(attempt - 1, 60))
    if hint is None:
        assert 0 <= decision.delay <= ceiling
    else:
        assert decision.delay >= hint and decision.delay <= max(hint, ceiling)


@given(st.integers(1, 10), st.floats(0, 100), st.floats(0, 100))
def test_attempts_and_deadline_are_respected(
    max_attempts: int, now: float, budget_s: float
) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, base=1, cap=4, rng=random.Random(0))
    deadline = now + budget_s
    clock, attempts = now, 1
    while True:
        d = policy.decide(
            attempts, errors.ServerError("x", status=503), None, clock, deadline, None
        )
        if isinstance(d, GiveUp):
            break
        clock += d.delay
        attempts += 1
    assert attempts <= max_attempts
    assert clock < deadline or clock == now


@pytest.mark.parametrize(
    "error",
    [
        errors.BadRequestError("x", status=400),
        errors.AuthenticationError("x", status=401),
        errors.AuthenticationError("x", status=403),
        errors.NotFoundError("x", status=404),
        errors.ContextLengthExceeded("x"),
    ],
)
def test_client_errors_are_never_retried(error: errors.CorralError) -> None:
    assert isinstance(RetryPolicy().decide(1, error, Headers(), 0, None, None), GiveUp)


def test_should_retry_header_overrides() -> None:
    policy = RetryPolicy()
    no = Headers({"x-should-retry": "false"})
    yes = Headers({"x-should-retry": "true"})
    assert isinstance(
        policy.decide(1, errors.ServerError("x", status=500), no, 0, None, None), GiveUp
    )
    assert isinstance(
        policy.decide(1, errors.APIError("x", status=418), yes, 0, None, None), RetryAfter
    )


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
    policy = AIMDPolicy(minimum=lo, maximum=hi, limit=lo)
    now = 0.0
    for overload, in_flight, dt in events:
        now += dt
        if overload:
            policy.on_overload(now)
        else:
            policy.on_success(in_flight)
        assert lo <= policy.limit <= hi


def test_aimd_grows_when_saturated_and_backs_off() -> None:
    policy = AIMDPolicy(minimum=1, maximum=100, limit=10)
    for _ in range(100):
        policy.on_success(in_flight=int(policy.limit))
    assert policy.limit > 15
    before = policy.limit
    policy.on_overload(1.0)
    policy.on_overload(1.1)  # within the cooldown: one decrease only
    assert policy.limit == pytest.approx(before / 2)


class BreakerMachine(RuleBasedStateMachine):
    """Drives the breaker with random outcomes and clock steps; checks every transition is legal."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = BreakerPolicy(window=10, min_calls=4, threshold=0.5, cooldown=5, probes=1)
        self.now = 0.0
        self.admitted = 0

    @rule(dt=st.floats(0, 4))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(failed=st.booleans())
    def call(self, failed: bool) -> None:
        before = self.policy.state
        verdict = self.policy.before(self.now)
        if verdict is not None:
            assert self.policy.state in (State.OPEN, State.HALF_OPEN)
            assert verdict > self.now or self.policy.state is State.HALF_OPEN
            return
        mid = self.policy.state
        assert (before, mid) in {
            (State.CLOSED, State.CLOSED),
            (State.OPEN, State.HALF_OPEN),
            (State.HALF_OPEN, State.HALF_OPEN),
        }
        self.policy.record(self.now, failed)
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
        if self.now < self.policy.opened_at + self.policy.cooldown:
            assert self.policy.before(self.now) == self.policy.opened_at + self.policy.cooldown

    @invariant()
    def state_is_known(self) -> None:
        assert self.policy.state in State


TestBreaker = BreakerMachine.TestCase


@given(
    asked=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    max_pause=st.floats(0, 3600),
)
def test_a_429_pause_is_finite_and_capped(asked: float | None, max_pause: float) -> None:
    pause = pause_after_429(asked, max_pause)
    assert 0.0 <= pause.seconds <= max_pause
    assert pause.capped == (asked is not None and asked > max_pause)
