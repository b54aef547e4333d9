"""The middleware shells on a virtual clock (trio's MockClock): the real stack, simulated time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import trio.testing

from corral.core import Headers, Request, Response, api_request, build_stack, errors
from corral.middleware import (
    CircuitBreaker,
    ConcurrencyLimit,
    RateLimit,
    Retry,
)
from corral.testing.emulator import EmulatorConfig, Latency
from corral.testing.simulator import SimulatedProvider
from corral.transports import MemoryTransport
from tests.support import send

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


def chat(tokens: int = 10, model: str = "m") -> Request:
    request = api_request(
        "http://sim/v1",
        "/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "hi"}]},
        api_key="sk-test",
    )
    return request.with_options(estimated_tokens=tokens)


def ok(_: Request) -> Response:
    return Response(
        200, Headers({"content-type": "application/json"}), b'{"usage": {"total_tokens": 5}}'
    )


async def test_full_stack_in_virtual_time_meets_the_limit_with_no_429s() -> None:
    provider = SimulatedProvider(
        EmulatorConfig(rpm=600, tpm=100_000, latency=Latency.uniform(0.2, 0.8))
    )
    limiter = RateLimit(rpm=600, tpm=100_000, burst_requests=6, burst_tokens=2_000)
    stack = build_stack([Retry(), limiter, ConcurrencyLimit(64)], provider)
    n = 1_500
    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(
                send,
                stack,
                api_request(
                    "http://sim/v1",
                    "/chat/completions",
                    {
                        "model": "m",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 20,
                    },
                    api_key="sk-test",
                ),
            )
    makespan = anyio.current_time() - start
    ideal = n / (600 / 60)
    assert provider.counts.get("rate_limited", 0) == 0
    assert provider.counts["ok"] == n
    assert ideal <= makespan <= ideal * 1.02 + 1.0


async def test_a_429_pauses_the_whole_key_until_retry_after() -> None:
    calls: list[float] = []

    def handler(request: Request) -> Response:
        calls.append(anyio.current_time())
        if len(calls) == 1:
            return Response(429, Headers({"retry-after": "5"}), b"{}")
        return ok(request)

    limiter = RateLimit(rpm=6_000)
    stack = build_stack([limiter], MemoryTransport(handler))
    t0 = anyio.current_time()
    assert (await stack(chat())).status == 429
    assert (await stack(chat())).status == 200
    assert calls[1] - t0 >= 5.0


async def test_fifo_a_large_request_is_not_starved() -> None:
    order: list[int] = []

    def handler(request: Request) -> Response:
        order.append(request.options.estimated_tokens or 0)
        return Response(200, Headers(), b"{}")

    stack = build_stack([RateLimit(tpm=6_000, burst_tokens=1_000)], MemoryTransport(handler))
    async with anyio.create_task_group() as tg:
        await stack(chat(900))  # drain the bucket
        tg.start_soon(send, stack, chat(1_000))
        await anyio.sleep(0.01)
        for _ in range(20):
            tg.start_soon(send, stack, chat(50))
            await anyio.sleep(0.001)
    assert order[1] == 1_000


async def test_cancelled_waiter_uses_no_capacity_and_too_large_fails_at_once() -> None:
    limiter = RateLimit(tpm=6_000, burst_tokens=1_000)
    stack = build_stack([limiter], MemoryTransport(ok))
    await stack(chat(1_000))
    with anyio.move_on_after(1):
        await stack(chat(1_000))  # needs 10 s of refill; cancelled after 1 s
    level_after_cancel = limiter.policy("m").tokens[0]
    level_after_cancel.refill(anyio.current_time())
    assert level_after_cancel.level >= 0  # nothing was taken by the cancelled call
    t = anyio.current_time()
    with pytest.raises(errors.RequestTooLarge):
        await stack(chat(5_000))
    assert anyio.current_time() == t


async def test_circuit_opens_on_server_errors_not_on_4xx() -> None:
    status = [429]
    transport = MemoryTransport(lambda _: Response(status[0], Headers(), b"{}"))
    breaker = CircuitBreaker(min_calls=5, cooldown=10)
    stack = build_stack([breaker], transport)
    for _ in range(10):
        await stack(chat())
    assert breaker.policies["sim"].state.value == "closed"  # 429s never trip it
    status[0] = 500
    for _ in range(10):  # 10 failures of 20 calls reaches the 50% threshold
        await stack(chat())
    with pytest.raises(errors.CircuitOpen):
        await stack(chat())
    assert transport.calls == 20
    await anyio.sleep(10)
    status[0] = 200
    assert (await stack(chat())).status == 200  # the probe closes it again


async def test_concurrency_limit_caps_in_flight() -> None:
    in_flight = [0, 0]

    async def handler(_: Request) -> Response:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        await anyio.sleep(0.1)
        in_flight[0] -= 1
        return Response(200, Headers(), b"{}")

    stack = build_stack([ConcurrencyLimit(7)], MemoryTransport(handler))
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(send, stack, chat())
    assert in_flight[1] == 7


async def test_keys_meter_separately() -> None:
    from corral.middleware._ratelimit import by_credential, by_endpoint

    stack_m = RateLimit(rpm=60, burst_requests=1, cold_start=1.0)
    handler = build_stack([stack_m], MemoryTransport(ok))
    t0 = anyio.current_time()
    await handler(chat(model="a"))
    await handler(chat(model="b"))  # another model: its own bucket, no wait
    assert anyio.current_time() == t0
    await handler(chat(model="a"))  # same model: waits for the refill
    assert anyio.current_time() > t0
    assert by_endpoint(chat()) == "http://sim/v1/chat/completions"
    key = by_credential(chat())
    assert "sk-test" not in key and key.endswith(":m")


async def test_streamed_calls_settle_their_tokens_when_usage_arrives() -> None:
    from corral.middleware._metrics import Metrics

    events = (
        b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3,'
        b' "total_tokens": 10}}\n\ndata: [DONE]\n\n'
    )

    class Once:
        def __aiter__(self) -> AsyncIterator[bytes]:
            return self._it()

        async def _it(self) -> AsyncIterator[bytes]:
            for i in range(0, len(events), 7):
                yield events[i : i + 7]

        async def aclose(self) -> None: ...

    limiter = RateLimit(tpm=60_000, burst_tokens=2_000, settle="usage", cold_start=1.0)
    metrics = Metrics()
    stack = build_stack(
        [metrics, limiter], MemoryTransport(lambda _: Response(200, Headers(), stream=Once()))
    )
    response = await stack(chat(tokens=1_500).with_options(stream=True))
    bucket = limiter.policy("m").tokens[0]
    bucket.refill(anyio.current_time())
    assert bucket.level == pytest.approx(500)  # 1500 reserved while the stream runs
    assert response.stream is not None
    async for _ in response.stream:
        pass
    bucket.refill(anyio.current_time())
    assert bucket.level == pytest.approx(1_990)  # settled to the 10 tokens actually used
    assert metrics.aggregator.tokens_in == 7 and metrics.aggregator.tokens_out == 3


@pytest.mark.parametrize(
    "header",
    [
        ("retry-after", "99999999"),
        ("retry-after", "1e308"),
        ("retry-after-ms", "1e308"),
        ("retry-after", "61"),
        ("retry-after", "inf"),
        ("retry-after", "nan"),
        ("retry-after", "-5"),
        ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
    ],
)
async def test_a_hostile_retry_after_pauses_the_key_at_most_max_pause(
    header: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []

    def handler(request: Request) -> Response:
        calls.append(anyio.current_time())
        if len(calls) == 1:
            headers = Headers([header, ("date", "Thu, 01 Jan 2026 00:00:00 GMT")])
            return Response(429, headers, b"{}")
        return ok(request)

    stack = build_stack([RateLimit(rpm=6_000, max_pause=30.0)], MemoryTransport(handler))
    t0 = anyio.current_time()
    with caplog.at_level("WARNING", logger="corral.ratelimit"):
        assert (await stack(chat())).status == 429
        with anyio.fail_after(31):  # virtual time: the pause ends at 30 s, not 3 years later
            assert (await stack(chat())).status == 200
    assert calls[1] - t0 <= 30.0 + 0.1  # the pause, then one call's refill (no burst after it)
    capped = [r for r in caplog.records if "capped" in r.getMessage()]
    assert len(capped) == (1 if header[1] not in ("inf", "nan", "-5") else 0)


async def test_default_middleware_passes_max_pause_to_the_rate_limit() -> None:
    from corral._client import default_middleware

    calls: list[float] = []

    def handler(request: Request) -> Response:
        calls.append(anyio.current_time())
        if len(calls) == 1:
            return Response(429, Headers({"retry-after": "99999999"}), b"{}")
        return ok(request)

    layers = default_middleware(rpm=6_000, max_attempts=1, max_pause=7.0)
    stack = build_stack(layers, MemoryTransport(handler))
    t0 = anyio.current_time()
    assert (await stack(chat())).status == 429
    assert (await stack(chat())).status == 200
    assert 7.0 <= calls[1] - t0 <= 7.5
