"""The limiter's calibration to the provider's token count (issue 14): its parts as properties,
on a virtual clock (times are arguments)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core._classify import RateLimitHeaders
from corral.middleware._buckets import (
    Cost,
    Delay,
    Proceed,
    RateLimitConfig,
    RateLimitPolicy,
    Reject,
)
from corral.middleware._calibration import MAX_FACTOR, MIN_FACTOR, Calibration, WindowSum
from tests.support import most_in_a_window

adds = st.lists(st.tuples(st.floats(0, 3), st.integers(-50, 500)), min_size=1, max_size=80)


@given(adds=adds, window=st.floats(0.5, 60), slices=st.integers(1, 300), after=st.floats(0, 5))
def test_the_window_sum_is_exact_but_for_one_slice_at_its_old_edge(
    adds: list[tuple[float, int]], window: float, slices: int, after: float
) -> None:
    """``total(now)`` is what was charged in the window, but for the charges within one slice
    of its old edge (the oldest slice is counted pro rata)."""
    ours, t, log = WindowSum(window, slices), 0.0, []
    for gap, amount in adds:
        t += gap
        ours.add(t, amount)
        log.append((t, amount))
    now = t + after
    width = window / slices
    exact = sum(a for at, a in log if at > now - window)
    edge = sum(abs(a) for at, a in log if abs(at - (now - window)) <= width)
    assert abs(ours.total(now) - exact) <= edge + 1e-6


@given(
    ratio=st.floats(MIN_FACTOR, 3.0),
    noise=st.lists(st.floats(-0.01, 0.01), min_size=Calibration.TRUST, max_size=200),
)
def test_consistent_samples_give_their_ratio_erring_high(ratio: float, noise: list[float]) -> None:
    """Windows the provider counts at ``ratio`` x ours (1% noise) teach a factor within 1% of
    it, at or above the samples' median; before ``TRUST`` samples it stays 1."""
    calibration, allowance, ours = Calibration(), 10_000.0, 3_000.0
    for i, e in enumerate(noise):
        calibration.observe(ours, ratio * (1 + e) * ours, allowance)
        if i + 1 < Calibration.TRUST:
            assert calibration.factor == 1.0
    assert abs(calibration.factor - ratio) <= ratio * 0.0101
    recent = sorted(noise[-Calibration.KEEP :])
    assert calibration.factor >= ratio * (1 + recent[len(recent) // 2]) * (1 - 1e-9)


@given(
    samples=st.lists(
        st.tuples(st.floats(0, 20_000), st.floats(-5_000, 20_000), st.floats(1, 20_000)),
        max_size=200,
    )
)
def test_any_samples_keep_the_factor_in_bounds(samples: list[tuple[float, float, float]]) -> None:
    calibration = Calibration()
    for ours, counted, allowance in samples:
        calibration.observe(ours, counted, allowance)
        assert MIN_FACTOR <= calibration.factor <= MAX_FACTOR


@settings(max_examples=150, deadline=None)
@given(
    window=st.sampled_from([2.0, 10.0, 60.0]),
    tpm=st.integers(600, 60_000),
    calls=st.lists(
        st.tuples(
            st.floats(0, 2),  # gap before the call
            st.floats(0.001, 0.3),  # reservation as a share of a window's allowance
            st.floats(0, 1.2),  # the remaining-tokens its response reports, as a share
        ),
        min_size=1,
        max_size=80,
    ),
)
def test_whatever_the_headers_teach_no_window_takes_more_than_the_limit(
    window: float, tpm: int, calls: list[tuple[float, float, float]]
) -> None:
    """However the factor moves (any remaining-tokens a provider reports), what the buckets
    take, in the provider's tokens, in any window stays within limit x w / 60."""
    policy = RateLimitPolicy(RateLimitConfig(tpm=tpm, window=window), 0.0)
    allowance = policy.tokens[0].allowance
    assert policy.calibration is not None
    taken: list[tuple[float, int, float]] = []
    now = 0.0
    for gap, share, remaining in calls:
        now += gap
        tokens = max(1, int(share * allowance))
        scaled = policy.calibration.scale(tokens)
        for _ in range(1_000):
            match policy.admit(now, Cost(1, tokens)):
                case Proceed():
                    taken.append((now, 1, scaled))
                    break
                case Delay(until=until):
                    now = until
                case Reject():
                    break
        counted = policy.counted(now)
        headers = RateLimitHeaders(remaining_tokens=int(remaining * allowance))
        policy.learn(now, headers, counted)
    assert most_in_a_window(taken, window, 2) <= allowance + 1e-6
