"""The limiters' policies decide in typed values from classified outcomes (no I/O, time is an
argument): the rate limit's admission and 429 pause, AIMD, the circuit breaker."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core import _errors as errors
from corral.middleware._breaker import (
    Allow,
    BreakerConfig,
    BreakerPolicy,
    Closed,
    Opened,
    Refuse,
    State,
)
from corral.middleware._breaker import Unchanged as BreakerUnchanged
from corral.middleware._concurrency import (
    AIMDPolicy,
    ConcurrencyConfig,
    LimitChanged,
    Unchanged,
    is_overload,
)
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
)
from tests.strategies import outcomes, retry_after_values, steps

#: Outcomes that mean "the server answered and is not overloaded" / "no answer at all".
ANSWERED = (type(None), errors.APIError)


@given(
    outcome=outcomes,
    now=st.floats(0, 1e9),
    max_pause=st.floats(0, 3600),
)
def test_only_a_429_pauses_and_never_past_max_pause(
    outcome: errors.CorralError | None, now: float, max_pause: float
) -> None:
    decision = PausePolicy(max_pause=max_pause).decide(now, outcome)
    if not isinstance(outcome, errors.RateLimitError):
        assert decision == NoPause()
        return
    assert isinstance(decision, Pause)
    assert 0 <= decision.seconds <= max_pause and decision.until == now + decision.seconds
    assert decision.requested == (
        None
        if outcome.retry_after is None or outcome.retry_after != outcome.retry_after
        else outcome.retry_after
    )
    assert decision.capped == (decision.requested is not None and decision.requested > max_pause)


@given(asked=retry_after_values)
def test_a_pause_says_what_the_server_asked(asked: float | None) -> None:
    pause = PausePolicy(max_pause=30.0).decide(0.0, errors.RateLimitError("x", retry_after=asked))
    assert isinstance(pause, Pause)
    if asked is None or asked != asked:  # none, or NaN: the default second
        assert pause.seconds == 1.0 and pause.requested is None and not pause.capped


@settings(max_examples=200)
@given(
    rpm=st.integers(1, 600),
    tpm=st.integers(1, 50_000),
    ops=st.lists(st.tuples(steps, st.integers(0, 60_000), st.floats(0, 60)), max_size=60),
)
def test_admission_takes_all_or_nothing(
    rpm: int, tpm: int, ops: list[tuple[float, int, float]]
) -> None:
    """Proceed takes the cost (and a grown bucket's debt when it shrinks back); Delay takes
    nothing and names a later time that is at least the pause; Reject exactly when a bucket
    could never hold the cost."""
    policy = RateLimitPolicy(RateLimitConfig(rpm=rpm, tpm=tpm), 0.0)
    now = 0.0
    for dt, tokens, pause in ops:
        now += dt
        if pause > 50:
            policy.pause(now, now + pause)
        for bucket in policy.requests + policy.tokens:
            bucket.refill(now)
        buckets = policy.requests + policy.tokens
        before = [b.level for b in buckets]
        capacities = [max(b.capacity, n) for b, n in zip(buckets, (1, tokens), strict=True)]
        decision = policy.admit(now, Cost(1, tokens))
        after = [b.level for b in policy.requests + policy.tokens]
        window = policy.tokens[0]  # the default burst grows to any call short of a window
        too_large = tokens > window.allowance or tokens == window.allowance > window.base
        match decision:
            case Reject():
                assert too_large and after == before
            case Delay(until=until):
                assert not too_large and after == before
                assert until > now and until >= policy.paused_until
            case Proceed():
                assert not too_large and now >= policy.paused_until
                # exactly the cost, or more if a grown bucket shrank back (debt)
                shrank = [b.capacity < c for b, c in zip(buckets, capacities, strict=True)]
                taken = [before[0] - after[0], before[1] - after[1]]
                for took, cost, less in zip(taken, (1, tokens), shrank, strict=True):
                    assert took >= cost - 1e-9 if less else took == pytest.approx(cost)


@given(
    lo=st.integers(1, 20),
    span=st.integers(0, 200),
    events=st.lists(st.tuples(outcomes, st.integers(0, 300), steps), max_size=200),
)
def test_aimd_moves_only_on_what_the_outcome_says(
    lo: int, span: int, events: list[tuple[errors.CorralError | None, int, float]]
) -> None:
    config = ConcurrencyConfig(adaptive=True, minimum=lo, maximum=lo + span, limit=lo)
    policy = AIMDPolicy(config)
    now = 0.0
    for outcome, in_flight, dt in events:
        now += dt
        before = policy.limit
        decision = policy.observe(now, outcome, in_flight)
        assert lo <= policy.limit <= lo + span
        if is_overload(outcome):
            assert policy.limit <= before
        elif isinstance(outcome, ANSWERED):
            assert policy.limit >= before
        else:  # a refused connection, a malformed body: nothing learnt about load
            assert policy.limit == before and decision == Unchanged()
        match decision:
            case LimitChanged(old=old, new=new, reason=reason):
                assert (old, new) == (int(before), int(policy.limit)) and old != new
                assert reason.startswith("overload") == (new < old)
            case Unchanged():
                assert int(before) == int(policy.limit)


def test_overload_is_a_429_a_503_or_a_timeout() -> None:
    assert is_overload(errors.RateLimitError("x"))
    assert is_overload(errors.ServerError("x", status=503))
    assert is_overload(errors.ReadTimeout("x")) and is_overload(errors.PoolTimeout("x"))
    assert not is_overload(errors.ServerError("x", status=500))
    assert not is_overload(errors.ConnectError("x")) and not is_overload(None)


@settings(max_examples=200)
@given(events=st.lists(st.tuples(outcomes, steps), max_size=120))
def test_the_breaker_trips_on_failures_only_and_reports_each_change(
    events: list[tuple[errors.CorralError | None, float]],
) -> None:
    config = BreakerConfig(window=10, min_calls=3, threshold=0.5, cooldown=5, probes=1)
    policy = BreakerPolicy(config)
    now = 0.0
    for outcome, dt in events:
        now += dt
        state = policy.state
        cooling_until = policy.opened_at + config.cooldown
        cooling = state is State.OPEN and now < cooling_until
        match policy.before(now):
            case Refuse(until=until):
                # Each call here ends before the next starts, so a half-open breaker always has
                # its probe back (a call with no answer frees it): only the cooldown refuses.
                assert cooling and policy.state is State.OPEN and until == cooling_until
                continue
            case Allow():
                assert not cooling
        admitted = policy.state
        verdict = BreakerPolicy.verdict(outcome)
        assert verdict == (
            "failure"
            if isinstance(outcome, errors.ServerError | errors.TransportError)
            else "success"
            if isinstance(outcome, ANSWERED)
            else "none"
        )
        decision = policy.record(now, outcome)
        match decision:
            case Opened(failure_rate=rate, until=until):
                assert verdict == "failure" and policy.state is State.OPEN
                assert until == now + config.cooldown and rate >= config.threshold
            case Closed():
                assert verdict == "success" and admitted is State.HALF_OPEN
                assert policy.state is State.CLOSED
            case BreakerUnchanged():
                assert policy.state is admitted
        assert state is not State.CLOSED or policy.state is not State.HALF_OPEN


def test_a_call_that_ended_without_an_answer_frees_its_probe() -> None:
    policy = BreakerPolicy(BreakerConfig(min_calls=1, threshold=1.0, cooldown=1, probes=1))
    policy.record(0.0, errors.ServerError("x", status=500))
    assert policy.state is State.OPEN
    assert policy.before(1.0) == Allow()  # the probe
    assert isinstance(policy.before(1.0), Refuse)  # only one
    assert policy.record(1.0, errors.DeadlineExceeded("late")) == BreakerUnchanged()
    assert policy.before(1.0) == Allow()  # the probe slot came back
    assert policy.record(1.0, None) == Closed()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: RateLimitConfig(rpm=0), "rpm"),
        (lambda: RateLimitConfig(tpm=-1), "tpm"),
        (lambda: RateLimitConfig(rpd=1.5), "rpd"),  # type: ignore[arg-type]
        (lambda: RateLimitConfig(burst_tokens=0), "burst_tokens"),
        (lambda: RateLimitConfig(burst_requests=float("nan")), "burst_requests"),
        (lambda: PausePolicy(max_pause=float("inf")), "max_pause"),
        (lambda: PausePolicy(max_pause=-1), "max_pause"),
        (lambda: ConcurrencyConfig(limit=0), "limit"),
        (lambda: ConcurrencyConfig(decrease=1.0), "decrease"),
        (lambda: ConcurrencyConfig(adaptive=True, limit=300, maximum=256), "limit"),
        (lambda: ConcurrencyConfig(cooldown=-1), "cooldown"),
        (lambda: BreakerConfig(threshold=0), "threshold"),
        (lambda: BreakerConfig(min_calls=0), "min_calls"),
        (lambda: BreakerConfig(window=0), "window"),
        (lambda: BreakerConfig(probes=0), "probes"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(build: object, field: str) -> None:
    with pytest.raises(errors.InvalidInput, match=rf"\.{field} must be"):
        build()  # type: ignore[operator]


def test_configs_are_frozen() -> None:
    for config in (RateLimitConfig(), ConcurrencyConfig(), BreakerConfig(), PausePolicy()):
        first = attrs.fields(type(config))[0].name
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(config, first, 1)
