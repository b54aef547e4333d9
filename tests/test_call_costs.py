"""What one ``Client.chat`` builds and parses (issue 15): counted, never timed.

The per-call cost itself is measured in benchmarks/client_instructions.py and
benchmarks/stack_overhead.py; these check the work that must not happen twice.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral import Client
from corral.core import Request, Response, api_request
from corral.core import _wire as wire
from corral.core._headers import Headers
from corral.core._wire import Usage
from corral.transports import MemoryTransport

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
