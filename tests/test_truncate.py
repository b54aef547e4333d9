"""Truncation to the context window, and the token counters behind it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral._client import Client, default_middleware
from corral.core import Headers, Request, Response, api_request, build_stack, errors
from corral.core._events import Event, Truncated
from corral.core._models import RequestOptions
from corral.core._tokens import (
    BPECounter,
    EstimatingCounter,
    count_messages,
    counter_for_model,
    encoding_for_model,
)
from corral.middleware._truncate import Fits, Fitted, TooLong, Truncate, fit_messages
from corral.testing.server import RunningEmulator
from corral.transports import MemoryTransport
from tests.strategies import chat_messages
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio
COUNTERS = [EstimatingCounter(), BPECounter("o200k_base"), BPECounter("cl100k_base")]


@settings(max_examples=150, deadline=None)
@given(chat_messages, st.integers(20, 400), st.sampled_from(COUNTERS))
def test_fit_respects_budget_and_keeps_what_must_stay(
    msgs: list[dict[str, str]], budget: int, counter: Any
) -> None:
    fit = fit_messages(msgs, budget, counter)
    match fit:
        case TooLong(needed=needed, budget=refused):
            assert refused == budget and needed > budget
        case Fits(tokens=tokens):
            assert tokens == count_messages(msgs, counter) <= budget
        case Fitted():
            assert fit.tokens_before == count_messages(msgs, counter) > budget
            assert fit.tokens == count_messages(fit.messages, counter) <= budget
            assert fit.dropped or fit.trimmed
            roles = [m["role"] for m in fit.messages]
            assert roles.count("system") == [m["role"] for m in msgs].count("system")  # kept
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if users:  # the last user turn is still there (maybe trimmed), in order, at the end
                assert fit.messages[-(len(msgs) - users[-1])]["role"] == "user"
        case _:
            raise AssertionError(fit)


def test_oldest_turns_go_first_and_tool_calls_leave_with_their_results() -> None:
    counter = EstimatingCounter()
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "old " * 50},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]},
        {"role": "tool", "content": "result " * 50, "tool_call_id": "t1"},
        {"role": "assistant", "content": "recent answer"},
        {"role": "user", "content": "the question"},
    ]
    budget = count_messages([msgs[0], msgs[4], msgs[5]], counter) + 5
    fit = fit_messages(msgs, budget, counter)
    assert isinstance(fit, Fitted)
    assert [m["content"] for m in fit.messages] == ["be brief", "recent answer", "the question"]
    assert fit.dropped == 3


def test_trims_inside_the_longest_message_then_refuses_with_numbers() -> None:
    counter = BPECounter("o200k_base")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "word " * 1000}]
    fit = fit_messages(msgs, 100, counter)
    assert isinstance(fit, Fitted)
    assert fit.trimmed and count_messages(fit.messages, counter) <= 100
    assert fit.messages[1]["content"].startswith("word word")
    refused = fit_messages(msgs, 5, counter)
    assert isinstance(refused, TooLong) and refused.budget == 5


def test_counters_per_model() -> None:
    assert encoding_for_model("gpt-4o-mini") == "o200k_base"
    assert encoding_for_model("gpt-3.5-turbo") == "cl100k_base"
    assert isinstance(counter_for_model("gpt-4.1"), BPECounter)
    assert BPECounter("o200k_base").count("hello world") == 2
    estimate = EstimatingCounter()
    for text in ["hello world, how are you today?", "สวัสดีครับ ยินดีต้อนรับ", "数据处理"]:
        assert estimate.count(text) >= BPECounter("o200k_base").count(text)  # errs high
        assert estimate.count(estimate.truncate(text, 3)) <= 3


async def test_request_is_fitted_before_sending(emulator: RunningEmulator) -> None:
    truncate = Truncate(windows={"small-model": 4_096})
    stack = [truncate, *default_middleware()]
    history = [
        {"role": "user" if i % 2 else "assistant", "content": f"turn {i} " + "blah " * 300}
        for i in range(40)
    ]
    async with Client(emulator.base_url, CANARY_KEY, middleware=stack) as client:
        result = await client.chat(
            [*history, {"role": "user", "content": "and now?"}], model="small-model", max_tokens=100
        )
    # Fitted once up front; the emulator counts tokens more coarsely than the real BPE, so it
    # may still refuse, and then exactly one refit with its numbers follows.
    refused = emulator.counts.get("context_length_exceeded", 0)
    assert result.text and refused <= 1 and truncate.truncated == 1 + refused


async def test_server_context_error_is_retried_once_with_its_numbers(
    emulator: RunningEmulator,
) -> None:
    # corral is told the window is huge; the emulator (4096, counting higher) says 400 once.
    truncate = Truncate(windows={"small-model": 1_000_000})
    stack = [truncate, *default_middleware()]
    long = [{"role": "user", "content": "token " * 5_000}]
    async with Client(emulator.base_url, CANARY_KEY, middleware=stack) as client:
        result = await client.chat(long, model="small-model", max_tokens=50)
    assert result.text
    assert emulator.counts["context_length_exceeded"] == 1 and emulator.counts["ok"] == 1


def chat_request(messages: list[dict[str, str]], labels: dict[str, str]) -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "tiny", "messages": messages, "max_tokens": 10},
        api_key="sk-test",
        options=RequestOptions(labels=labels),
    )


async def test_a_fitted_call_is_reported_and_inner_layers_read_the_new_body() -> None:
    seen: list[Any] = []

    async def inner(request: Request, call_next: Any) -> Response:
        call = request.options.call
        seen.append(call.json(request.body))
        return await call_next(request)  # type: ignore[no-any-return]

    def answer(request: Request) -> Response:
        seen.append(json.loads(request.body))
        return Response(200, Headers(), b"{}")

    events: list[Event] = []
    truncate = Truncate(windows={"tiny": 200}, counter_for=lambda _: EstimatingCounter())
    stack = build_stack([truncate, inner], MemoryTransport(answer), events=events.append)
    history = [{"role": "user", "content": f"turn {i} " + "blah " * 40} for i in range(8)]
    await stack(chat_request(history, {"custom_id": "t1"}))
    assert seen[0] == seen[1] and len(seen[0]["messages"]) < len(history)
    [event] = events
    assert isinstance(event, Truncated) and event.labels == {"custom_id": "t1"}
    assert event.attempt == 0  # no Retry in this stack: attempts are not numbered
    assert event.tokens_before > event.tokens_after and event.dropped_messages >= 1


async def test_a_call_that_cannot_fit_fails_before_it_is_sent() -> None:
    transport = MemoryTransport(lambda _: Response(200, Headers(), b"{}"))
    truncate = Truncate(windows={"tiny": 40}, counter_for=lambda _: EstimatingCounter())
    with pytest.raises(errors.ContextLengthExceeded, match="only"):
        await build_stack([truncate], transport)(
            chat_request([{"role": "system", "content": "rules " * 30}] * 5, {})
        )
    assert transport.calls == 0


@pytest.mark.parametrize(
    ("field", "value"), [("margin", -1), ("default_window", 0), ("windows", {"m": 0})]
)
def test_bad_configuration_is_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(errors.InvalidInput, match=field):
        Truncate(**{field: value})  # type: ignore[arg-type]
    assert Truncate(margin=3).config.margin == 3
