"""The limiting shells on asyncio and trio: what they decide reaches the stack's sink as an
event with the call's labels and attempt; the token estimate is the call's, computed once."""

from __future__ import annotations

import inspect
import uuid

import anyio
import pytest
from trio.testing import MockClock

from corral.core import Headers, Request, Response, api_request, build_stack, errors
from corral.core._events import (
    BreakerClosed,
    BreakerOpened,
    BreakerRefused,
    ConcurrencyChanged,
    Event,
    RateLimitPaused,
    RateLimitWaited,
)
from corral.core._models import RequestOptions
from corral.middleware import CircuitBreaker, ConcurrencyLimit, RateLimit
from corral.middleware._shared_ratelimit import SharedRateLimit
from corral.transports import MemoryTransport

pytestmark = pytest.mark.anyio

LABELS = {"custom_id": "line-1234"}
ATTEMPT = 2


def chat(content: str = "hi", *, model: str = "m") -> Request:
    """A labelled call on its second attempt (what Retry and the batch runner set)."""
    request = api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 5},
        api_key="sk-test",
        options=RequestOptions(labels=LABELS),
    )
    request.options.call.attempt = ATTEMPT
    return request


def ok(_: Request) -> Response:
    return Response(200, Headers(), b'{"usage": {"total_tokens": 5}}')


def answer(status: int, **headers: str) -> Response:
    return Response(status, Headers(headers), b'{"error": {"message": "x"}}')


def of_call(events: list[Event], kind: type[Event]) -> list[Event]:
    found = [e for e in events if isinstance(e, kind)]
    for event in found:
        assert dict(event.labels) == LABELS and event.attempt == ATTEMPT
    return found


async def test_a_call_that_waited_for_quota_says_so() -> None:
    events: list[Event] = []
    limiter = RateLimit(rpm=6_000, burst_requests=1, cold_start=1.0)  # one call per 10 ms
    stack = build_stack([limiter], MemoryTransport(ok), events=events.append)
    await stack(chat())
    assert of_call(events, RateLimitWaited) == []  # the first call did not wait
    await stack(chat())
    [waited] = of_call(events, RateLimitWaited)
    assert isinstance(waited, RateLimitWaited)
    assert waited.key == "m" and waited.waited > 0 and waited.tokens > 0
    assert limiter.waited == pytest.approx(waited.waited)


@pytest.mark.parametrize(("retry_after", "capped"), [("0.01", False), ("3600", True)])
async def test_a_429_pause_is_reported_capped_or_not(retry_after: str, capped: bool) -> None:
    events: list[Event] = []
    replies = iter([answer(429, **{"retry-after": retry_after})])
    transport = MemoryTransport(lambda r: next(replies, None) or ok(r))
    stack = build_stack([RateLimit(rpm=6_000, max_pause=0.02)], transport, events=events.append)
    before = anyio.current_time()
    assert (await stack(chat())).status == 429
    [paused] = of_call(events, RateLimitPaused)
    assert isinstance(paused, RateLimitPaused)
    assert paused.key == "m" and paused.capped is capped
    assert paused.requested == float(retry_after)
    assert before < paused.until <= paused.time + 0.02
    with anyio.fail_after(5):
        assert (await stack(chat())).status == 200
    assert anyio.current_time() >= paused.until


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio")]
)
async def test_the_breaker_reports_opening_refusing_and_closing() -> None:
    """On trio's MockClock: the cooldown passes in virtual time."""
    events: list[Event] = []
    status = [500]
    transport = MemoryTransport(lambda _: answer(status[0]))
    breaker = CircuitBreaker(min_calls=2, threshold=0.5, cooldown=10.0)
    stack = build_stack([breaker], transport, events=events.append)
    for _ in range(2):
        await stack(chat())
    [opened] = of_call(events, BreakerOpened)
    assert isinstance(opened, BreakerOpened)
    assert opened.key == "h" and opened.failure_rate == 1.0
    assert opened.until == opened.time + 10.0
    with pytest.raises(errors.CircuitOpen):
        await stack(chat())
    [refused] = of_call(events, BreakerRefused)
    assert isinstance(refused, BreakerRefused) and refused.until == opened.until
    await anyio.sleep(9)
    with pytest.raises(errors.CircuitOpen):
        await stack(chat())  # still cooling down
    await anyio.sleep(2)
    status[0] = 200
    assert (await stack(chat())).status == 200
    [closed] = of_call(events, BreakerClosed)
    assert isinstance(closed, BreakerClosed) and closed.key == "h"
    assert transport.calls == 3


async def test_a_4xx_or_a_lost_call_never_trips_the_breaker() -> None:
    def handler(request: Request) -> Response:
        if transport.calls % 2 == 0:
            raise errors.MalformedResponse("garbled")
        return answer(429)

    transport = MemoryTransport(handler)
    breaker = CircuitBreaker(min_calls=2, threshold=0.5)
    stack = build_stack([breaker], transport)
    for _ in range(5):
        assert (await stack(chat())).status == 429
        with pytest.raises(errors.MalformedResponse):
            await stack(chat())
    assert breaker.policies["h"].state.value == "closed" and transport.calls == 10


async def test_aimd_reports_a_change_of_the_limit() -> None:
    events: list[Event] = []
    limiter = ConcurrencyLimit(4, adaptive=True, minimum=1, maximum=8, cooldown=0)
    stack = build_stack([limiter], MemoryTransport(lambda _: answer(429)), events=events.append)
    await stack(chat())
    [changed] = of_call(events, ConcurrencyChanged)
    assert isinstance(changed, ConcurrencyChanged)
    assert (changed.old, changed.new) == (4, 2) and changed.reason == "overload: rate_limited"
    assert limiter.limit == 2


async def test_aimd_ignores_a_refused_connection_and_backs_off_on_a_timeout() -> None:
    failure: list[errors.CorralError] = [errors.ConnectError("refused")]

    def handler(_: Request) -> Response:
        raise failure[0]

    limiter = ConcurrencyLimit(4, adaptive=True, cooldown=0)
    stack = build_stack([limiter], MemoryTransport(handler))
    with pytest.raises(errors.ConnectError):
        await stack(chat())
    assert limiter.limit == 4 and limiter.in_flight == 0
    failure[0] = errors.ReadTimeout("slow")
    with pytest.raises(errors.ReadTimeout):
        await stack(chat())
    assert limiter.limit == 2 and limiter.in_flight == 0


async def test_the_estimate_is_the_calls_parsed_body_not_its_bytes() -> None:
    """A layer above rewrote the body (truncation): the limiter reads the call's JSON, once,
    and keeps the estimate on the call for every later layer and attempt."""
    request = chat("word " * 20_000)  # the bytes: ~20k tokens, more than the bucket holds
    request.options.call.replace_json(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        request.body,
    )
    limiter = RateLimit(tpm=60_000, burst_tokens=1_000)
    stack = build_stack([limiter], MemoryTransport(ok))
    assert (await stack(request)).status == 200
    tokens = request.options.call.tokens
    assert tokens is not None and 5 < tokens < 100
    request.options.call.tokens = 10_000  # set once: never estimated again
    with pytest.raises(errors.RequestTooLarge):
        await stack(request)


async def test_a_given_estimate_is_used_without_parsing() -> None:
    request = Request("POST", "http://h/v1/chat/completions", body=b"not json at all")
    request = request.with_options(model="m", estimated_tokens=700)
    limiter = RateLimit(tpm=60_000, burst_tokens=1_000)
    await build_stack([limiter], MemoryTransport(ok))(request)
    assert request.options.call.tokens == 700


def test_no_limiter_takes_a_clock_or_a_policy_factory() -> None:
    for layer in (RateLimit, SharedRateLimit, ConcurrencyLimit, CircuitBreaker):
        parameters = inspect.signature(layer.__init__).parameters
        assert "clock" not in parameters and "policy" not in parameters, layer


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: RateLimit(rpm=0), "rpm"),
        (lambda: RateLimit(max_pause=-1), "max_pause"),
        (lambda: ConcurrencyLimit(0), "limit"),
        (lambda: ConcurrencyLimit(adaptive=True, decrease=2), "decrease"),
        (lambda: CircuitBreaker(threshold=1.5), "threshold"),
        (lambda: SharedRateLimit("redis://127.0.0.1:1/0", rpm=1, window=0), "window"),
        (lambda: SharedRateLimit("redis://127.0.0.1:1/0", processes=0), "processes"),
        (
            lambda: SharedRateLimit("redis://127.0.0.1:1/0", on_unavailable="x"),  # type: ignore[arg-type]
            "on_unavailable",
        ),
    ],
)
def test_the_middleware_refuse_a_bad_value_naming_its_field(build: object, field: str) -> None:
    with pytest.raises(errors.InvalidInput, match=rf"\.{field} must be"):
        build()  # type: ignore[operator]


def test_the_config_is_exposed_and_frozen() -> None:
    breaker = CircuitBreaker(cooldown=3.0)
    assert breaker.config.cooldown == 3.0
    assert RateLimit(rpm=5).config.rpm == 5
    assert ConcurrencyLimit(7).config.limit == 7
    assert SharedRateLimit("redis://127.0.0.1:1/0", name="q").config.name == "q"


# -- the shared limiter (real Redis) -------------------------------------------------------------


async def test_the_shared_limiter_reports_waits_and_pauses(redis_url: str) -> None:
    events: list[Event] = []
    name = uuid.uuid4().hex
    replies = iter([ok(chat()), answer(429, **{"retry-after": "0.01"})])
    transport = MemoryTransport(lambda r: next(replies, None) or ok(r))
    # 120 RPM, a burst of 1: the second call waits ~0.5 s (a 10 ms gap was not always there
    # on a loaded machine, where the first call alone took longer).
    limiter = SharedRateLimit(redis_url, name=name, rpm=120, burst_requests=1)
    stack = build_stack([limiter], transport, events=events.append)
    try:
        await stack(chat())
        with anyio.fail_after(5):
            assert (await stack(chat())).status == 429  # waited ~0.5 s for the quota
        [waited] = of_call(events, RateLimitWaited)
        assert isinstance(waited, RateLimitWaited) and waited.key == name and waited.waited > 0
        [paused] = of_call(events, RateLimitPaused)
        assert isinstance(paused, RateLimitPaused) and paused.key == name
        assert paused.requested == 0.01 and not paused.capped
        assert limiter.waited >= waited.waited
    finally:
        await limiter.aclose()
