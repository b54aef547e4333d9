"""One call, one context (issue 13 item 1): every fact is computed once and shared by the layers.

A chat call's request body is parsed once however many layers read it; a stream is SSE-parsed
once, each of its events JSON-decoded once, whoever watches it (metrics, the cache, the
caller's chunks).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral._client import Client, default_middleware
from corral.core import Headers, Request, Response, errors
from corral.core import _jsonlib as jsonlib
from corral.core import _streaming as streaming_module
from corral.core import _wire as wire_module
from corral.core._sse import SSEParser
from corral.core._wire import StreamParse
from corral.middleware._cache import Cache
from corral.middleware._metrics import Metrics
from corral.middleware._truncate import Truncate
from corral.stores import MemoryStore
from corral.transports import MemoryTransport

pytestmark = pytest.mark.anyio
KEY = "sk-context-Zq8xW3vT9pL2mN5b"
MESSAGES = [{"role": "user", "content": "hi"}]
ANSWER = {
    "id": "c",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def sse(*events: object) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )


def delta(text: str) -> dict[str, Any]:
    return {"id": "s", "model": "m", "choices": [{"index": 0, "delta": {"content": text}}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
STREAM = sse(delta("hel"), delta("lo"), USAGE, b"[DONE]")


class Pieces:
    """A byte stream cut into ``size``-byte pieces (splits land inside events)."""

    def __init__(self, data: bytes, size: int = 7) -> None:
        self._data, self._size = data, size

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self._data), self._size):
            yield self._data[i : i + self._size]

    async def aclose(self) -> None:
        return None


def answer(data: bytes = STREAM) -> MemoryTransport:
    def handler(request: Request) -> Response:
        if request.options.stream:
            return Response(
                200, Headers({"content-type": "text/event-stream"}), stream=Pieces(data)
            )
        return Response(
            200, Headers({"content-type": "application/json"}), json.dumps(ANSWER).encode()
        )

    return MemoryTransport(handler)


def every_layer(cache: Cache, metrics: Metrics) -> list[Any]:
    """Metrics, Cache, Truncate, Deadline, Retry, CircuitBreaker, RateLimit, ConcurrencyLimit."""
    return default_middleware(
        metrics=metrics, cache=cache, truncate=Truncate(), rpm=6_000, tpm=1_000_000
    )


async def test_one_chat_call_parses_its_request_body_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes | str] = []
    loads = jsonlib.loads

    def counting(data: bytes | str) -> Any:
        parsed.append(data)
        return loads(data)

    metrics, cache = Metrics(), Cache(MemoryStore())
    transport = answer()
    client = Client("http://h/v1", KEY, model="gpt-4o-mini", transport=transport,
                    middleware=every_layer(cache, metrics))  # fmt: skip
    monkeypatch.setattr(jsonlib, "loads", counting)
    result = await client.chat(MESSAGES, max_tokens=5)
    assert result.text == "ok" and transport.calls == 1
    texts = [p.decode() if isinstance(p, bytes) else p for p in parsed]
    request_bodies = [t for t in texts if '"messages"' in t]
    response_bodies = [t for t in texts if '"choices"' in t]
    assert len(request_bodies) == 1  # Cache's key, Truncate, the rate limiter's estimate share it
    assert len(response_bodies) == 1  # Retry's check, Metrics' usage, the cache, decode_chat
    assert len(parsed) == 2
    assert metrics.aggregator.tokens_in == 3


async def test_one_stream_is_sse_parsed_once_and_each_event_decoded_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsers: list[SSEParser] = []
    decoded: list[bytes | str] = []
    loads = jsonlib.loads

    class Counting(SSEParser):
        def __init__(self) -> None:
            super().__init__()
            parsers.append(self)

    def counting(data: bytes | str) -> Any:
        decoded.append(data)
        return loads(data)

    metrics, cache = Metrics(), Cache(MemoryStore())
    layers = list(every_layer(cache, metrics))
    client = Client("http://h/v1", KEY, model="gpt-4o-mini", transport=answer(), middleware=layers)
    monkeypatch.setattr(streaming_module, "SSEParser", Counting)
    monkeypatch.setattr(jsonlib, "loads", counting)
    chunks = [c async for c in client.stream_chat(MESSAGES)]
    assert "".join(c.text for c in chunks) == "hello"
    assert len(parsers) == 1  # Metrics' usage, the cache's completeness, stream_chat's chunks
    events = [d for d in decoded if isinstance(d, str)]
    assert len(events) == 3  # two deltas and the usage; [DONE] is not JSON
    assert metrics.aggregator.tokens_in == 7 and metrics.aggregator.tokens_out == 3
    again = [c async for c in client.stream_chat(MESSAGES)]  # stored: the stream was complete
    assert [c.text for c in again] == [c.text for c in chunks] and cache.hits == 1


async def test_the_call_knows_its_stream_s_usage_when_it_arrives() -> None:
    transport = answer()
    client = Client("http://h/v1", KEY, model="m", transport=transport, middleware=[Metrics()])
    request = client.build_request(
        "/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}
    )
    call = request.options.call
    response = await client.send(request)
    assert call.usage is None and isinstance(call.stream, StreamParse)
    assert response.stream is not None
    async for _ in response.stream:
        pass
    assert call.usage == wire_module.Usage(7, 3, 10) and call.stream.complete


@pytest.mark.parametrize(
    ("data", "error", "quoted"),
    [
        (sse(delta("a"), b"{not json " + KEY.encode()), errors.MalformedResponse, "not JSON"),
        (sse(delta("a"), {"error": {"message": f"key {KEY}"}}), errors.MalformedResponse, "mid-"),
        (sse(delta("a")), errors.RemoteProtocolError, "truncated"),
    ],
)  # fmt: skip
async def test_a_broken_stream_fails_the_reader_scrubbed_and_is_never_stored(
    data: bytes, error: type[errors.CorralError], quoted: str
) -> None:
    cache = Cache(MemoryStore())
    transport = answer(data)
    client = Client("http://h/v1", KEY, model="m", transport=transport, middleware=[cache])
    for _ in range(2):
        texts: list[str] = []
        with pytest.raises(error, match=quoted) as caught:
            async for chunk in client.stream_chat(MESSAGES):
                texts.append(chunk.text)
        assert texts == ["a"] and KEY[4:12] not in str(caught.value)
    assert transport.calls == 2 and cache.hits == 0


async def test_a_request_sent_twice_is_fitted_both_times() -> None:
    sent: list[int] = []

    def handler(request: Request) -> Response:
        sent.append(len(json.loads(request.body)["messages"]))
        return Response(200, Headers(), json.dumps(ANSWER).encode())

    truncate = Truncate(windows={"m": 300})
    client = Client("http://h/v1", KEY, model="m", transport=MemoryTransport(handler),
                    middleware=[truncate])  # fmt: skip
    history = [{"role": "user", "content": f"turn {i} " + "blah " * 40} for i in range(8)]
    body = {"model": "m", "messages": history, "max_tokens": 10}
    request = client.build_request("/chat/completions", body)
    await client.send(request)
    await client.send(request)  # the same Request (and Call): its body is read anew
    assert sent[0] == sent[1] < len(history) and truncate.truncated == 2
