"""The spend cap (issue 16 item 4): the ledger's invariant under any interleaving, its Lua
scripts against their model on a real Redis, and the middleware holding, settling and refusing
calls on both backends."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import anyio
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.core import build_stack
from corral.core._errors import ConnectError, InvalidInput
from corral.core._events import BudgetRefused, BudgetReserved, BudgetSettled, Event
from corral.core._models import Request, RequestOptions, Response
from corral.core._tokens import EstimatingCounter, count_messages
from corral.core._wire import Usage, api_request
from corral.middleware._budget import (
    RESERVE,
    SETTLE,
    Budget,
    BudgetExceeded,
    BudgetPolicy,
    BudgetUnavailable,
    Held,
    Ledger,
    Short,
)
from corral.middleware._metrics import Price
from corral.middleware._prices import NANO, usage_nano
from corral.transports import MemoryTransport

PRICE = Price(input=1.0, output=2.0)  # USD per million tokens

# -- the policy: a property over every interleaving ----------------------------------------------

#: ("reserve", amount) or ("settle", which outstanding hold, share of it actually spent).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 5_000)),
        st.tuples(st.just("settle"), st.integers(0, 1_000), st.floats(0, 1)),
    ),
    max_size=80,
)


@given(cap=st.integers(0, 50_000), ops=steps)
def test_spent_plus_reserved_never_exceeds_the_cap(cap: int, ops: list[tuple[Any, ...]]) -> None:
    policy, state = BudgetPolicy(cap), Ledger()
    holds: list[int] = []
    for op in ops:
        if op[0] == "reserve":
            state, decision = policy.reserve(state, op[1])
            if isinstance(decision, Held):
                holds.append(decision.amount)
            else:
                assert decision == Short(max(0, cap - state.spent - state.reserved), sum(holds) > 0)
        elif holds:
            held = holds.pop(op[1] % len(holds))
            state = policy.settle(state, held, int(held * op[2]))
        assert state.spent + state.reserved <= cap
        assert state.reserved == sum(holds)
        assert state.overrun == 0


@given(cap=st.integers(0, 50_000), ops=steps, excess=st.integers(0, 500))
def test_a_cost_beyond_its_hold_is_charged_and_counted_as_overrun(
    cap: int, ops: list[tuple[Any, ...]], excess: int
) -> None:
    policy, state = BudgetPolicy(cap), Ledger()
    holds: list[int] = []
    for op in ops:
        if op[0] == "reserve":
            state, decision = policy.reserve(state, op[1])
            if isinstance(decision, Held):
                holds.append(decision.amount)
        elif holds:
            held = holds.pop(op[1] % len(holds))
            state = policy.settle(state, held, held + excess)
        assert state.spent + state.reserved <= cap + state.overrun


# -- the Lua scripts agree with the policy -------------------------------------------------------


@pytest.fixture(scope="module")
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cap=st.integers(0, 10**13), ops=steps, excess=st.integers(0, 100))
def test_the_lua_scripts_agree_with_the_policy(
    client: redis.Redis, cap: int, ops: list[tuple[Any, ...]], excess: int
) -> None:
    key = f"corral:budget:test-{uuid.uuid4().hex}"
    reserve, settle = client.register_script(RESERVE), client.register_script(SETTLE)
    policy, state = BudgetPolicy(cap), Ledger()
    holds: list[int] = []
    try:
        for op in ops:
            if op[0] == "reserve":
                amount = op[1] * 10**6  # nano-dollars at a realistic scale
                code, spent, reserved = reserve(keys=[key], args=[cap, amount])
                state, decision = policy.reserve(state, amount)
                assert code == (1 if isinstance(decision, Held) else 0)
                if isinstance(decision, Held):
                    holds.append(amount)
            elif holds:
                held = holds.pop(op[1] % len(holds))
                actual = int(held * op[2]) + excess
                spent, reserved = settle(keys=[key], args=[-held, actual, max(0, actual - held)])
                state = policy.settle(state, held, actual)
            else:
                continue
            assert (spent, reserved) == (state.spent, state.reserved)
        stored = client.hmget(key, ["spent", "reserved", "overrun"])
        assert [int(v or 0) for v in stored] == [state.spent, state.reserved, state.overrun]
    finally:
        client.delete(key)


def test_the_script_refuses_a_second_cap_for_the_same_budget(client: redis.Redis) -> None:
    key = f"corral:budget:test-{uuid.uuid4().hex}"
    reserve = client.register_script(RESERVE)
    assert reserve(keys=[key], args=[1000, 10]) == [1, 0, 10]
    assert reserve(keys=[key], args=[2000, 10]) == [-1, 1000, 0]
    client.delete(key)


# -- the middleware ------------------------------------------------------------------------------


def chat(prompt: str = "hello there", max_tokens: int = 10, **extra: Any) -> Request:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        **extra,
    }
    return api_request("http://x/v1", "/chat/completions", body, api_key="k")


def answer(usage: dict[str, Any], status: int = 200) -> Response:
    message = {"role": "assistant", "content": "hi"}
    body = {"id": "c", "choices": [{"index": 0, "message": message}], "usage": usage}
    return Response(status, {"content-type": "application/json"}, json.dumps(body).encode())


def prompt_tokens(text: str) -> int:
    return count_messages([{"role": "user", "content": text}], EstimatingCounter())


@pytest.mark.anyio
async def test_a_call_holds_its_worst_case_and_settles_with_cached_and_reasoning_prices() -> None:
    price = Price(input=1.0, output=4.0, cached_input=0.25, reasoning=8.0)
    budget = Budget(1.0, prices={"m": price}, margin=0.0)
    events: list[Event] = []
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 40},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }
    handler = build_stack([budget], MemoryTransport(lambda r: answer(usage)), events=events.append)
    await handler(chat("hello there", max_tokens=10))
    reserved = next(e for e in events if isinstance(e, BudgetReserved))
    settled = next(e for e in events if isinstance(e, BudgetSettled))
    # The worst case: the prompt at the input rate, all 10 output tokens at the dearer
    # (reasoning) rate.
    assert reserved.usd == pytest.approx((prompt_tokens("hello there") * 1.0 + 10 * 8.0) / 1e6)
    # The real cost: 60 plain + 40 cached prompt tokens, 20 plain + 30 reasoning output tokens.
    assert settled.usd == pytest.approx((60 * 1.0 + 40 * 0.25 + 20 * 4.0 + 30 * 8.0) / 1e6)
    # This answer cost more than its hold (a provider counting more than the estimate):
    # charged in full, and the excess reported.
    cost = usage_nano(price, Usage(100, 50, 150, 40, 30))
    assert budget.last == Ledger(cost, 0, cost - round(reserved.usd * NANO))


@pytest.mark.anyio
async def test_concurrent_calls_never_take_spending_past_the_cap() -> None:
    """200 calls at once, each holding about its cost: the cap admits ~40; the others wait
    for holds to settle and are then refused unsent."""
    per_call = Usage(prompt_tokens("x" * 40), 10, 0)
    cost = usage_nano(PRICE, per_call)
    budget = Budget(40.5 * cost / NANO, prices={"m": PRICE}, margin=0.0)
    sent = 0

    async def provider(request: Request) -> Response:
        nonlocal sent
        sent += 1
        await anyio.sleep(0.01)
        return answer(per_call.wire())

    handler = build_stack([budget], MemoryTransport(provider))
    refused = 0

    async def one() -> None:
        nonlocal refused
        try:
            await handler(chat("x" * 40, max_tokens=10))
        except BudgetExceeded:
            refused += 1

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one)
    assert (sent, refused) == (40, 160)
    assert budget.last == Ledger(40 * cost, 0)
    assert budget.exhausted


@pytest.mark.anyio
async def test_errors_are_free_and_a_connection_lost_after_sending_costs_its_hold() -> None:
    budget = Budget(1.0, prices={"m": PRICE}, margin=0.0)
    replies: list[Any] = [
        answer({}, status=500),
        ConnectError("refused", request_sent=False),
        ConnectError("reset", request_sent=True),
    ]

    def provider(request: Request) -> Response:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        assert isinstance(reply, Response)
        return reply

    events: list[Event] = []
    handler = build_stack([budget], MemoryTransport(provider), events=events.append)
    await handler(chat())
    for _ in range(2):
        with pytest.raises(ConnectError):
            await handler(chat())
    settled = [e for e in events if isinstance(e, BudgetSettled)]
    hold = settled[2].reserved
    assert [e.usd for e in settled] == [0.0, 0.0, hold]
    assert hold > 0 and budget.last == Ledger(round(hold * NANO), 0)


class Chunks:
    """A streamed body from a list of pieces."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __aiter__(self) -> Any:
        return self._each()

    async def _each(self) -> Any:
        for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_a_stream_settles_when_its_usage_arrives() -> None:
    budget = Budget(1.0, prices={"m": PRICE}, margin=0.0)
    usage = b'{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}'
    chunks = [
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
        b'data: {"choices":[],"usage":' + usage + b"}\n\n",
        b"data: [DONE]\n\n",
    ]
    stream = Response(200, {"content-type": "text/event-stream"}, stream=Chunks(chunks))
    handler = build_stack([budget], MemoryTransport(lambda r: stream))
    response = await handler(chat(stream=True))
    assert budget.last.reserved > 0  # held while the body arrives
    await response.aread()
    assert budget.last == Ledger(usage_nano(PRICE, Usage(7, 3, 10)), 0)


@pytest.mark.anyio
async def test_an_unpriced_model_is_refused_not_counted_free() -> None:
    transport = MemoryTransport(lambda r: answer({}))
    handler = build_stack([Budget(1.0, prices={})], transport)
    with pytest.raises(InvalidInput, match="no price for model 'm'"):
        await handler(chat())
    assert transport.calls == 0


@pytest.mark.anyio
async def test_a_call_bigger_than_the_cap_is_refused_unsent_with_an_event() -> None:
    events: list[Event] = []
    transport = MemoryTransport(lambda r: answer({}))
    handler = build_stack([Budget(1e-6, prices={"m": PRICE})], transport, events=events.append)
    with pytest.raises(BudgetExceeded, match="cap is reached"):
        await handler(chat(max_tokens=1000))
    assert transport.calls == 0
    assert [type(e) for e in events] == [BudgetRefused]


@pytest.mark.anyio
async def test_a_shared_budget_fails_closed_without_redis() -> None:
    budget = Budget(1.0, prices={"m": PRICE}, redis="redis://127.0.0.1:1/0", timeout=0.2)
    transport = MemoryTransport(lambda r: answer({}))
    with pytest.raises(BudgetUnavailable, match="nothing was sent"):
        await build_stack([budget], transport)(chat())
    await budget.aclose()
    assert transport.calls == 0


@pytest.mark.anyio
async def test_two_budgets_share_one_ledger_through_redis(redis_url: str) -> None:
    name = f"t-{uuid.uuid4().hex}"
    per_call = Usage(prompt_tokens("x" * 40), 10, 0)
    cost = usage_nano(PRICE, per_call)
    budgets = [
        Budget(30 * cost / NANO, prices={"m": PRICE}, redis=redis_url, name=name, margin=0.0)
        for _ in range(2)
    ]
    sent = 0

    def provider(request: Request) -> Response:
        nonlocal sent
        sent += 1
        return answer(per_call.wire())

    handlers = [build_stack([b], MemoryTransport(provider)) for b in budgets]

    async def one(i: int) -> None:
        with contextlib.suppress(BudgetExceeded):
            await handlers[i % 2](chat("x" * 40, max_tokens=10))

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(one, i)
    assert sent == 30
    assert await budgets[0].status() == Ledger(30 * cost, 0)
    other = Budget(1.0, prices={"m": PRICE}, redis=redis_url, name=name)
    with pytest.raises(InvalidInput, match="has a cap of"):
        await build_stack([other], MemoryTransport(provider))(chat())
    for b in [*budgets, other]:
        await b.aclose()


@pytest.mark.anyio
async def test_the_hold_reads_the_body_not_the_callers_estimate() -> None:
    """A caller's own ``estimated_tokens`` (for rate limits) does not lower the hold: the
    budget prices the body, the one thing the provider bills."""
    budget = Budget(1.0, prices={"m": PRICE}, margin=0.0)
    events: list[Event] = []
    handler = build_stack([budget], MemoryTransport(lambda r: answer({})), events=events.append)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    options = RequestOptions(estimated_tokens=1)
    await handler(
        api_request("http://x/v1", "/chat/completions", body, api_key="k", options=options)
    )
    reserved = next(e for e in events if isinstance(e, BudgetReserved))
    assert reserved.usd == pytest.approx((prompt_tokens("hi") * 1.0 + 100 * 2.0) / 1e6)
