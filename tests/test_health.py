"""The batch runner's fail-fast policy (health.py): pure, driven with explicit times."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.batch._health import Hold, ProviderHealth, Requeue, StopRun, WriteFailure
from corral.core import _errors as errors

FATAL = errors.AuthenticationError("bad key", status=401)
OUTAGE = errors.ServerError("unavailable", status=503)
#: Failures no line can cause: nothing of the request had left.
UNSENT = [
    errors.ConnectError("refused"),
    errors.ConnectTimeout("slow connect", request_sent=False),
    errors.PoolTimeout("no slot", request_sent=False),
    errors.CircuitOpen("open", retry_at=9.0),
]
LINE = errors.BadRequestError("bad body", status=400)

#: A sequence of outcomes a run sees, in time order: ("ok" | "fatal" | "outage" | "line").
outcomes = st.lists(st.sampled_from(["ok", "fatal", "outage", "line"]), max_size=60)


@given(outcomes)
def test_fatal_errors_stop_only_after_unbroken_confirmations(seq: list[str]) -> None:
    health = ProviderHealth(confirmations=3)
    streak = 0
    for t, outcome in enumerate(seq):
        now = float(t)
        if outcome == "ok":
            health.on_success(now)
            streak = 0
            continue
        error = {"fatal": FATAL, "outage": OUTAGE, "line": LINE}[outcome]
        decision = health.on_failure(error, now, now)
        if outcome == "fatal":
            streak += 1
            assert isinstance(decision, StopRun if streak >= 3 else Hold)
            if streak >= 3:
                assert decision.fatal  # type: ignore[union-attr]
        elif outcome == "line":
            assert isinstance(decision, WriteFailure)


@given(st.lists(st.floats(0, 1000), min_size=1, max_size=30))
def test_an_outage_never_writes_a_line_and_stops_at_max_outage(times: list[float]) -> None:
    """With no success at all, an outage failure is a requeue until ``max_outage`` passed."""
    health = ProviderHealth(max_outage=100.0)
    first = None
    for now in sorted(times):
        decision = health.on_failure(OUTAGE, now, now)
        first = now if first is None else first
        if now - first >= 100.0:
            assert isinstance(decision, StopRun) and not decision.fatal
        else:
            assert decision == Requeue()


@given(st.floats(0, 10), st.floats(0.1, 10), st.booleans())
def test_a_line_is_written_off_only_when_later_calls_succeed_twice_over(
    start: float, gap: float, served_after_resend: bool
) -> None:
    """A failure is the line's own only if a call sent after it succeeded; at the second such
    failure it is written. A call sent before it, succeeding later, proves nothing."""
    health = ProviderHealth()
    health.on_success(start + gap, started=start - 1)  # sent before: proves nothing
    assert health.on_failure(OUTAGE, start, start + gap) == Requeue()  # an outage
    health.on_success(start + gap, started=start + gap / 2)  # sent after: the line's strike
    struck_at = start + 2 * gap
    assert health.on_failure(OUTAGE, start, struck_at) == Requeue(strike=True)
    resent = struck_at + 1
    if served_after_resend:
        health.on_success(resent + 2, started=resent + 0.5)
    second = health.on_failure(OUTAGE, resent, resent + 3, struck_at)
    assert isinstance(second, WriteFailure) == served_after_resend
    assert (
        health.on_failure(errors.CircuitOpen("open", retry_at=9.0), resent, resent + 3, struck_at)
        == Requeue()
    )


def test_held_fatal_failures_stop_a_run_that_never_succeeded() -> None:
    health = ProviderHealth()
    assert isinstance(health.on_failure(FATAL, 0, 1), Hold)
    stop = health.end_of_input()
    assert stop is not None and stop.fatal
    health.on_success(2)
    assert health.end_of_input() is None


def test_probe_backoff_doubles_to_its_cap() -> None:
    health = ProviderHealth(probe_initial=1.0, probe_max=30.0)
    assert [health.next_probe_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]


@given(st.sampled_from(UNSENT), st.floats(0, 10), st.floats(0.1, 10))
def test_a_failure_before_anything_was_sent_is_never_the_line_s(
    error: errors.CorralError, start: float, gap: float
) -> None:
    """A refused connect at the edge of an outage, with calls sent after it succeeding (a CI
    run wrote one such line as failed): requeued, never a strike, never written."""
    health = ProviderHealth()
    health.on_success(start + gap, started=start + gap / 2)  # sent after it, and served
    assert health.on_failure(error, start, start + gap) == Requeue()
    assert health.on_failure(error, start, start + 2 * gap, struck_at=start) == Requeue()
