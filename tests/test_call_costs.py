"""What one ``Client.chat`` builds and parses (issue 15): counted, never timed.

The per-call cost itself is measured in benchmarks/client_instructions.py and
benchmarks/stack_overhead.py; these check the work that must not happen twice.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio._core._tasks as anyio_tasks
import pytest

from corral import Client
from corral._gate import Gate
from corral._pacing import DEFAULT_EVERY
from corral.core import Request, Response, api_request, build_stack
from corral.core import _wire as wire
from corral.core._headers import Headers
from corral.core._wire import Usage
from corral.middleware import ConcurrencyLimit, Deadline
from corral.testing.server import RunningEmulator
from corral.transports import MemoryTransport
from tests.support import ScopeCount

pytestmark = pytest.mark.anyio

KEY = "sk-test-costs-1234"
BODY = json.dumps(
    {
        "id": "c1",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()


def answer(_: Request) -> Response:
    return Response(200, [("content-type", "application/json")], BODY)


async def test_a_chat_through_the_default_stack_parses_its_usage_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Metrics and the decoded completion share the one ``Usage`` of the answer."""
    parsed: list[Any] = []
    parse = Usage.parse.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Usage], raw: Any) -> Usage | None:
        parsed.append(raw)
        result: Usage | None = parse(cls, raw)
        return result

    client = Client("http://h/v1", KEY, model="gpt-4o-mini", transport=MemoryTransport(answer))
    monkeypatch.setattr(wire.Usage, "parse", classmethod(counting))
    result = await client.chat([{"role": "user", "content": "hi"}])
    assert result.usage == Usage(3, 1, 4)
    assert len(parsed) == 1
    metrics = client.metrics
    assert metrics is not None and metrics.tokens_in == 3 and metrics.tokens_out == 1


async def test_without_metrics_the_completion_still_parses_its_usage() -> None:
    client = Client("http://h/v1", KEY, model="m", transport=MemoryTransport(answer), middleware=[])
    result = await client.chat([{"role": "user", "content": "hi"}])
    assert result.usage == Usage(3, 1, 4) and result.text == "hi"


def test_a_client_s_requests_share_their_headers_so_a_transport_checks_them_once() -> None:
    """The fields (accept, auth, content type, the client's own) are the same for every call of
    one kind: one ``Headers`` object, whose wire form is checked once."""
    client = Client("http://h/v1", KEY, model="m", headers={"X-Team": "a"})
    first = client.build_request("/chat/completions", {"model": "m", "messages": []})
    second = client.build_request("/chat/completions", {"model": "m", "messages": [1]})
    assert first.headers is second.headers
    assert first.headers.get("x-team") == "a"
    assert first.headers.get("authorization") == f"Bearer {KEY}"
    streamed = client.build_request("/chat/completions", {"model": "m", "stream": True})
    assert streamed.headers.get("accept") == "text/event-stream"
    assert streamed.headers is not first.headers
    get = client.build_request("/models", None)
    assert get.method == "GET" and "content-type" not in get.headers


def test_shared_headers_are_the_ones_api_request_always_built() -> None:
    for body in (None, {"model": "m"}, {"model": "m", "stream": True}):
        for extra in (None, {"X-A": "1", "Authorization": "Bearer other"}):
            request = api_request("http://h/v1/", "/chat", body, api_key=KEY, extra_headers=extra)
            fields: list[tuple[str, str]] = [
                (
                    "accept",
                    "text/event-stream" if body and body.get("stream") else "application/json",
                ),
                ("authorization", f"Bearer {KEY}"),
            ]
            if body is not None:
                fields.append(("content-type", "application/json"))
            fields += list((extra or {}).items())
            assert request.headers.items() == Headers(fields).items()
            assert request.url == "http://h/v1/chat"


async def ok_now(_: Request) -> Response:
    """A transport that answers without ever reaching a checkpoint."""
    return Response(200, [("content-type", "application/json")], BODY)


def plain_chat() -> Request:
    return api_request("http://h/v1", "/chat", {"model": "m"}, api_key=KEY)


async def test_a_free_slot_is_taken_without_awaiting_the_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ConcurrencyLimit`` takes a free slot in line; the gate's awaitable ``acquire`` only
    when it must wait, or (once in ``DEFAULT_EVERY`` calls) to give the loop a turn."""
    limit = ConcurrencyLimit(4)
    awaited = 0
    acquire = Gate.acquire

    async def counting(gate: Gate) -> None:
        nonlocal awaited
        awaited += 1
        await acquire(gate)

    monkeypatch.setattr(Gate, "acquire", counting)
    handler = build_stack([limit], ok_now)
    for _ in range(10 * DEFAULT_EVERY):
        assert (await handler(plain_chat())).status == 200
    assert limit.in_flight == 0
    assert awaited <= 10


async def test_calls_that_never_wait_for_a_slot_can_still_be_cancelled() -> None:
    """The in-line path still checkpoints every few calls: a loop of calls on a transport that
    never suspends stops at a cancellation (bounded: it would run all 10**6 calls otherwise)."""
    limit = ConcurrencyLimit(4)
    handler = build_stack([limit], ok_now)
    done = 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        for _ in range(10**6):
            await handler(plain_chat())
            done += 1
    assert scope.cancelled_caught and done < DEFAULT_EVERY
    assert limit.in_flight == 0


async def test_the_deadline_finds_anyio_s_backend_once_not_per_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``anyio.CancelScope()`` looks the backend up (sniffio) every time; the deadline's scope is
    built from the backend's own class, found once."""
    looked_up = 0
    lookup = vars(anyio_tasks)["get_async_backend"]  # what anyio.CancelScope() calls

    def counting(*args: Any) -> Any:
        nonlocal looked_up
        looked_up += 1
        return lookup(*args)

    handler = build_stack([Deadline(600)], ok_now)
    await handler(plain_chat())  # the first call may find it
    monkeypatch.setattr(anyio_tasks, "get_async_backend", counting)
    for _ in range(50):
        assert (await handler(plain_chat())).status == 200
    own = api_request("http://h/v1", "/chat", {"model": "m"}, api_key=KEY)
    soon = own.with_deadline(anyio.current_time() + 60)  # its own deadline: a scope of its own
    for _ in range(50):
        assert (await handler(soon)).status == 200
    assert looked_up == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_h11_on_asyncio_times_an_ordinary_request_without_a_cancel_scope(
    monkeypatch: pytest.MonkeyPatch, emulator: RunningEmulator
) -> None:
    """Reads take the connection's own timer (``receive_until``): no scope, and no timer armed
    and cancelled, per request. A wait for a pool slot or a connect still gets one."""
    from corral.transports import H11Transport

    scopes = ScopeCount(monkeypatch)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    request = api_request(emulator.base_url, "/chat/completions", body, api_key=KEY)
    async with H11Transport(max_connections=1) as transport:
        assert (await transport(request)).status == 200  # connects: a scope for the connect
        scopes.start()
        for _ in range(20):
            assert (await transport(request)).status == 200
        assert scopes.entered == 0
        async with anyio.create_task_group() as tg:  # two at once on one connection: one waits
            for _ in range(2):
                tg.start_soon(transport, request)
        assert scopes.entered >= 1
