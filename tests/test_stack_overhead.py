"""The default stack's fast paths (issue 15) keep their behaviour: what each layer saves per call
is measured in benchmarks/stack_overhead.py; these check what the cheaper code still does."""

from __future__ import annotations

import anyio
import pytest
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from corral.core import Request, Response, api_request, build_stack, errors
from corral.core._models import RequestOptions
from corral.core._wire import Usage
from corral.middleware import _breaker as breaker
from corral.middleware._breaker import CircuitBreaker, State
from corral.middleware._deadline import Deadline
from corral.middleware._metrics import Price
from corral.transports import MemoryTransport

pytestmark = pytest.mark.anyio


def chat(deadline: float | None = None) -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        api_key="sk-test",
        options=RequestOptions(deadline=deadline),
    )


def ok(_: Request) -> Response:
    return Response(200, [("content-type", "application/json")], b'{"choices":[]}')


async def test_a_timeout_inside_the_call_is_not_reported_as_the_deadline() -> None:
    """Only the Deadline's own expiry becomes ``DeadlineExceeded``: a ``TimeoutError`` an inner
    layer raises long before the deadline propagates as it is."""

    async def own_timeout(request: Request, call_next: object) -> Response:
        with anyio.fail_after(0.001):
            await anyio.sleep(1)
        raise AssertionError("unreachable")

    stack = build_stack([Deadline(600.0), own_timeout], MemoryTransport(ok))
    with pytest.raises(TimeoutError) as caught:
        await stack(chat())
    assert not isinstance(caught.value, errors.DeadlineExceeded)


def test_the_deadline_still_cancels_a_hanging_call_in_virtual_time() -> None:
    """The cheaper scope still bounds the call: a handler that never answers ends at the
    deadline, on trio's MockClock (exactly 7 s)."""

    async def hang(_: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def main() -> float:
        start = anyio.current_time()
        with pytest.raises(errors.DeadlineExceeded):
            await build_stack([Deadline(7.0)], MemoryTransport(hang))(chat())
        return anyio.current_time() - start

    took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert took == pytest.approx(7.0)


async def test_the_call_s_own_earlier_deadline_wins_and_reaches_inner_layers() -> None:
    seen: list[float | None] = []

    async def look(request: Request, call_next: object) -> Response:
        seen.append(request.options.deadline)
        return ok(request)

    now = anyio.current_time()
    await build_stack([Deadline(600.0), look], MemoryTransport(ok))(chat(deadline=now + 5))
    await build_stack([Deadline(600.0), look], MemoryTransport(ok))(chat())
    assert seen[0] == now + 5
    assert seen[1] is not None and now + 599 < seen[1] <= anyio.current_time() + 600


def test_calls_sharing_the_timer_are_each_cut_at_their_own_deadline() -> None:
    """asyncio: calls that hang, started at different times among calls that answer, each end
    with ``DeadlineExceeded``, none before its own 0.2 s (the shared timer moves from one
    deadline to the next); the ones that answer are untouched and nothing stays registered."""
    layer = Deadline(0.2)
    outcomes: dict[int, tuple[str, float]] = {}

    async def maybe_hang(request: Request) -> Response:
        if request.options.labels["i"] in {"1", "3", "4"}:
            await anyio.sleep_forever()
        return ok(request)

    stack = build_stack([layer], MemoryTransport(maybe_hang))

    async def one(i: int) -> None:
        started = anyio.current_time()
        try:
            await stack(chat().with_options(labels={"i": str(i)}))
            outcomes[i] = ("ok", anyio.current_time() - started)
        except errors.DeadlineExceeded:
            outcomes[i] = ("deadline", anyio.current_time() - started)

    async def main() -> None:
        with anyio.fail_after(10):  # bounded: a lost timer would hang here instead
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(one, i)
                    await anyio.sleep(0.05)

    anyio.run(main, backend="asyncio")
    assert {i: kind for i, (kind, _) in outcomes.items()} == {
        0: "ok",
        1: "deadline",
        2: "ok",
        3: "deadline",
        4: "deadline",
        5: "ok",
    }
    assert all(took >= 0.2 for kind, took in outcomes.values() if kind == "deadline")
    assert layer._watch is not None and layer._watch.scopes == {}


def test_one_deadline_layer_serves_successive_event_loops() -> None:
    layer = Deadline(0.1)

    async def hang(_: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def main() -> None:
        with anyio.fail_after(10), pytest.raises(errors.DeadlineExceeded):
            await build_stack([layer], MemoryTransport(hang))(chat())
        assert await build_stack([layer], MemoryTransport(ok))(chat()) is not None

    for backend in ("asyncio", "asyncio", "trio", "asyncio"):
        anyio.run(main, backend=backend)


@given(
    prompt=st.integers(0, 10**7),
    completion=st.integers(0, 10**7),
    rates=st.tuples(*[st.floats(0, 1000, allow_nan=False)] * 2),
    cached_rate=st.none() | st.floats(0, 1000, allow_nan=False),
)
def test_a_price_without_cached_or_reasoning_tokens_is_the_general_formula(
    prompt: int, completion: int, rates: tuple[float, float], cached_rate: float | None
) -> None:
    """``Price.usd``'s two-rate shortcut (most calls) gives exactly what the general formula
    gives with zero cached and reasoning tokens."""
    price = Price(*rates, cached_input=cached_rate, reasoning=cached_rate)
    usage = Usage(prompt, completion, prompt + completion)
    general = (
        (prompt - 0) * price.input
        + 0 * (price.input if cached_rate is None else cached_rate)
        + (completion - 0) * price.output
        + 0 * (price.output if cached_rate is None else cached_rate)
    ) / 1e6
    assert price.usd(usage) == general


async def test_a_closed_breaker_still_counts_successes_and_opens_on_failures() -> None:
    """The success fast path (no decision to match) still feeds the window: after enough
    successes a burst of 5xx opens the circuit only once the failure rate reaches it."""
    statuses = iter([200] * 10 + [500] * 10)

    def answer(_: Request) -> Response:
        return Response(next(statuses), [("content-type", "application/json")], b"{}")

    layer = CircuitBreaker(min_calls=4, threshold=0.5, window=60.0)
    stack = build_stack([layer], MemoryTransport(answer))
    states = []
    for _ in range(20):  # opens at the 20th: 10 failures of 20 calls (9 < 0.5 * 19 before)
        await stack(chat())
        states.append(layer.policies["h"].state)
    assert states == [State.CLOSED] * 19 + [State.OPEN]
    with pytest.raises(errors.CircuitOpen):
        await stack(chat())


def test_the_breaker_key_is_the_host_and_port_for_any_number_of_urls() -> None:
    """``by_host`` remembers the URLs it parsed, up to a bound: a scan over many hosts neither
    grows it without end nor gets a stale answer."""
    for i in range(3000):
        url = f"http://h{i}.example:{1000 + i % 7}/v1"
        request = api_request(url, "/chat/completions", {}, api_key="k")
        assert breaker.by_host(request) == f"h{i}.example:{1000 + i % 7}"
    assert 0 < len(breaker._HOSTS) <= 1024
