"""Truncation to the context window, and the token counters behind it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.client import Client, default_middleware
from corral.core import errors
from corral.core.tokens import (
    BPECounter,
    EstimatingCounter,
    count_messages,
    counter_for_model,
    encoding_for_model,
)
from corral.middleware.truncate import Truncate, fit_messages
from corral.testing.server import RunningEmulator
from tests.conftest import CANARY_KEY

pytestmark = pytest.mark.anyio
COUNTERS = [EstimatingCounter(), BPECounter("o200k_base"), BPECounter("cl100k_base")]

words = st.lists(st.sampled_from(["alpha", "beta", "gamma", "สวัสดี", "数据", "x" * 30]), max_size=60)
message = st.tuples(st.sampled_from(["user", "assistant", "system"]), words)


@settings(max_examples=150, deadline=None)
@given(st.lists(message, min_size=1, max_size=12), st.integers(20, 400), st.sampled_from(COUNTERS))
def test_fit_respects_budget_and_keeps_what_must_stay(
    raw: list[tuple[str, list[str]]], budget: int, counter: Any
) -> None:
    msgs = [{"role": role, "content": " ".join(ws)} for role, ws in raw]
    try:
        fit = fit_messages(msgs, budget, counter)
    except errors.ContextLengthExceeded as exc:
        assert exc.requested is not None and exc.max_context == budget
        return
    assert count_messages(fit.messages, counter) <= budget
    assert fit.tokens == count_messages(fit.messages, counter)
    roles = [m["role"] for m in fit.messages]
    assert roles.count("system") == [r for r, _ in raw].count("system")  # never dropped
    users = [i for i, (r, _) in enumerate(raw) if r == "user"]
    if users:  # the last user turn is still there (maybe trimmed), in order, at the end of it
        assert fit.messages[-(len(raw) - users[-1])]["role"] == "user"
    if not fit.dropped and not fit.trimmed:
        assert fit.messages == msgs


def test_oldest_turns_go_first_and_tool_calls_leave_with_their_results() -> None:
    counter = EstimatingCounter()
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "old " * 50},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t1"}]},
        {"role": "tool", "content": "result " * 50, "tool_call_id": "t1"},
        {"role": "assistant", "content": "recent answer"},
        {"role": "user", "content": "the question"},
    ]
    budget = count_messages([msgs[0], msgs[4], msgs[5]], counter) + 5
    fit = fit_messages(msgs, budget, counter)
    assert [m["content"] for m in fit.messages] == ["be brief", "recent answer", "the question"]
    assert fit.dropped == 3


def test_trims_inside_the_longest_message_then_refuses_with_numbers() -> None:
    counter = BPECounter("o200k_base")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "word " * 1000}]
    fit = fit_messages(msgs, 100, counter)
    assert fit.trimmed and count_messages(fit.messages, counter) <= 100
    assert fit.messages[1]["content"].startswith("word word")
    with pytest.raises(errors.ContextLengthExceeded, match="only 5 fit"):
        fit_messages(msgs, 5, counter)


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
    truncate = Truncate({"small-model": 4_096})
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
    truncate = Truncate({"small-model": 1_000_000})
    stack = [truncate, *default_middleware()]
    long = [{"role": "user", "content": "token " * 5_000}]
    async with Client(emulator.base_url, CANARY_KEY, middleware=stack) as client:
        result = await client.chat(long, model="small-model", max_tokens=50)
    assert result.text
    assert emulator.counts["context_length_exceeded"] == 1 and emulator.counts["ok"] == 1
