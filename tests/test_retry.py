"""Retry: the pure policy with explicit ``now`` and jitter, then the shell on both backends and
in virtual time, with the events it reports."""

from __future__ import annotations

import anyio
import pytest
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from corral.core import Headers, Request, Response, api_request, build_stack, errors
from corral.core._events import Event, GaveUp, RetryScheduled
from corral.core._models import RequestOptions
from corral.middleware import Deadline, Retry, RetryPolicy
from corral.middleware._retry import GiveUp as GiveUpDecision
from corral.middleware._retry import RetryAfter
from corral.transports import MemoryTransport
from tests.strategies import api_errors, jitters, retry_hints

pytestmark = pytest.mark.anyio
LABELS = {"custom_id": "line-7"}


def chat() -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        api_key="sk-test",
        options=RequestOptions(labels=LABELS),
    )


def error_body(status: int, headers: Headers | None = None) -> Response:
    return Response(status, headers or Headers(), b'{"error": {"message": "x"}}')


# -- policy --------------------------------------------------------------------------------------


@given(
    attempt=st.integers(1, 80),
    hint=retry_hints,
    base=st.floats(0.01, 2),
    cap=st.floats(0.1, 60),
    jitter=jitters,
    now=st.floats(0, 1e6),
)
def test_backoff_is_capped_and_honours_the_error_s_retry_after(
    attempt: int, hint: float | None, base: float, cap: float, jitter: float, now: float
) -> None:
    policy = RetryPolicy(max_attempts=100, base=base, cap=cap)
    error = errors.ServerError("x", status=503, retry_after=hint)
    decision = policy.decide(attempt, error, now, None, jitter, None)
    if hint is not None and hint > policy.max_retry_after:
        assert decision == GiveUpDecision("retry_after_too_long")
        return
    assert isinstance(decision, RetryAfter)
    ceiling = min(cap, base * 2 ** min(attempt - 1, 60))
    assert decision.delay == pytest.approx(max(hint or 0.0, jitter * ceiling))
    assert decision.delay <= max(hint or 0.0, ceiling)


@given(st.integers(1, 10), st.floats(0, 100), st.floats(0, 100), st.lists(jitters, min_size=11))
def test_attempts_and_deadline_are_respected(
    max_attempts: int, now: float, allowed: float, draws: list[float]
) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, base=1, cap=4)
    deadline = now + allowed
    clock, attempts = now, 1
    while True:
        d = policy.decide(
            attempts, errors.ServerError("x", status=503), clock, deadline, draws[attempts], None
        )
        if isinstance(d, GiveUpDecision):
            assert d.reason == ("attempts" if attempts >= max_attempts else "deadline")
            break
        clock += d.delay
        attempts += 1
    assert attempts <= max_attempts
    if attempts > 1:
        assert clock < deadline  # every retry started before the deadline
    else:
        assert clock == now


@given(api_errors(), st.integers(1, 4), jitters)
def test_a_server_s_verdict_decides_else_the_error_kind(
    error: errors.APIError, attempt: int, jitter: float
) -> None:
    decision = RetryPolicy().decide(attempt, error, 0.0, None, jitter, None)
    wanted = error.should_retry if error.should_retry is not None else error.retryable
    if not wanted:
        assert decision == GiveUpDecision("not_retryable")
    elif error.retry_after is not None and error.retry_after > 120:
        assert decision == GiveUpDecision("retry_after_too_long")
    else:
        assert isinstance(decision, RetryAfter)


def test_client_errors_are_never_retried_and_the_budget_runs_out() -> None:
    from corral.middleware._retry import RetryBudget

    policy = RetryPolicy()
    for error in (
        errors.BadRequestError("x", status=400),
        errors.AuthenticationError("x", status=401),
        errors.NotFoundError("x", status=404),
        errors.ContextLengthExceeded("x"),
    ):
        assert policy.decide(1, error, 0, None, 0.5, None) == GiveUpDecision("not_retryable")
    budget = RetryBudget(ratio=0, reserve=1, cap=1)
    server = errors.ServerError("x", status=500)
    assert isinstance(policy.decide(1, server, 0, None, 0.5, budget), RetryAfter)
    assert policy.decide(1, server, 0, None, 0.5, budget) == GiveUpDecision("budget")
    sent = errors.ReadTimeout("slow", request_sent=True)
    assert isinstance(policy.decide(1, sent, 0, None, 0.5, None), RetryAfter)
    no_resend = RetryPolicy(retry_sent=False)
    assert no_resend.decide(1, sent, 0, None, 0.5, None) == GiveUpDecision("not_retryable")


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", 0), ("base", -1.0), ("cap", float("inf")), ("budget_reserve", 500.0)],
)
def test_bad_configuration_is_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(errors.InvalidInput, match=field):
        Retry(**{field: value})  # type: ignore[arg-type]
    assert Retry(max_attempts=2).config.max_attempts == 2


# -- shell on both backends (no waiting: base=0) -------------------------------------------------


async def test_attempts_are_numbered_on_the_call_and_client_errors_end_at_once() -> None:
    seen: list[int] = []

    def handler(request: Request) -> Response:
        seen.append(request.options.call.attempt)
        return error_body(503 if len(seen) < 3 else 400)

    transport = MemoryTransport(handler)
    response = await build_stack([Retry(base=0)], transport)(chat())
    assert response.status == 400 and seen == [1, 2, 3]


async def test_transport_errors_are_retried_then_raised() -> None:
    def handler(_: Request) -> Response:
        raise errors.ConnectError("refused")

    transport = MemoryTransport(handler)
    with pytest.raises(errors.ConnectError):
        await build_stack([Retry(max_attempts=3, base=0)], transport)(chat())
    assert transport.calls == 3


async def test_each_decision_reaches_the_sink_with_labels_and_attempt() -> None:
    replies = iter([error_body(429, Headers({"retry-after": "0"})), error_body(500)])
    events: list[Event] = []
    stack = build_stack(
        [Retry(max_attempts=2, base=0)],
        MemoryTransport(lambda _: next(replies)),
        events=events.append,
    )
    assert (await stack(chat())).status == 500
    assert events == [
        RetryScheduled(
            time=events[0].time,
            labels=LABELS,
            attempt=1,
            kind="rate_limited",
            delay=0.0,
            retry_after=0.0,
        ),
        GaveUp(
            time=events[1].time, labels=LABELS, attempt=2, kind="server_error", reason="attempts"
        ),
    ]


# -- shell in virtual time -----------------------------------------------------------------------


class TestVirtualTime:
    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, object]]:
        return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}

    async def test_recovers_and_waits_what_the_server_asked(self) -> None:
        statuses = [503, 429, 200]
        times: list[float] = []

        def handler(_: Request) -> Response:
            times.append(anyio.current_time())
            status = statuses[len(times) - 1]
            headers = Headers({"retry-after": "3"}) if status == 429 else Headers()
            return error_body(status, headers) if status >= 400 else Response(200, headers, b"{}")

        retry = Retry(base=0.1, cap=1.0)
        assert (await build_stack([retry], MemoryTransport(handler))(chat())).status == 200
        assert len(times) == 3 and times[2] - times[1] >= 3.0
        assert retry.retries == {"server_error": 1, "rate_limited": 1}

    async def test_a_retry_never_sleeps_past_the_deadline(self) -> None:
        events: list[Event] = []
        transport = MemoryTransport(lambda _: error_body(503, Headers({"retry-after": "10"})))
        stack = build_stack([Deadline(5.0), Retry()], transport, events=events.append)
        t0 = anyio.current_time()
        assert (await stack(chat())).status == 503
        assert anyio.current_time() == t0 and transport.calls == 1
        assert [(type(e), getattr(e, "reason", None)) for e in events] == [(GaveUp, "deadline")]

    async def test_the_deadline_ends_a_slow_attempt(self) -> None:
        async def slow(_: Request) -> Response:
            await anyio.sleep(10)
            return Response(200, Headers(), b"{}")

        stack = build_stack([Deadline(5.0), Retry()], MemoryTransport(slow))
        t0 = anyio.current_time()
        with pytest.raises(errors.DeadlineExceeded):
            await stack(chat())
        assert anyio.current_time() - t0 == pytest.approx(5.0)
