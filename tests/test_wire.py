"""Wire-format decoding and the core value types: typed results, typed errors, no secrets."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core import (
    ChatStreamDecoder,
    Headers,
    Request,
    Response,
    Timeouts,
    api_request,
    decode_chat,
    decode_embeddings,
    errors,
)
from corral.core._errors import InvalidInput
from corral.core._wire import ChatAccumulator
from tests.support import CANARY_KEY


def ok(body: bytes) -> Response:
    return Response(200, Headers({"content-type": "application/json"}), body)


def test_request_body_passes_every_field_through() -> None:
    body = {
        "model": "m",
        "messages": [],
        "tools": [{"type": "function"}],
        "stream": True,
        "response_format": {"type": "json_object"},
        "stream_options": {"include_usage": True},
        "vendor_extension": 1,
    }
    request = api_request("http://h/v1/", "/chat/completions", body, api_key=CANARY_KEY)
    assert request.url == "http://h/v1/chat/completions"
    assert json.loads(request.body) == body
    assert request.options.stream and request.options.model == "m"
    assert request.headers.get("Authorization") == f"Bearer {CANARY_KEY}"


def test_secrets_are_redacted_in_every_repr() -> None:
    request = api_request("http://h/v1", "/chat/completions", {"model": "m"}, api_key=CANARY_KEY)
    for text in (repr(request), str(request), repr(request.headers), str(request.headers)):
        assert CANARY_KEY not in text and CANARY_KEY[-8:] not in text
        assert "Bearer [redacted]" in text


def test_headers_are_case_insensitive_and_immutable() -> None:
    h = Headers([("X-A", "1"), ("x-a", "2")])
    assert h.get("x-A") == "1" and h.get_all("X-a") == ["1", "2"] and "X-A" in h
    h2 = h.with_("X-A", "3")
    assert h.get_all("x-a") == ["1", "2"] and h2.get_all("x-a") == ["3"]
    assert Headers({"A": "1"}) == Headers({"a": "1"})


def test_decode_chat_and_embeddings() -> None:
    chat = decode_chat(
        ok(
            json.dumps(
                {
                    "id": "c1",
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {
                                "role": "assistant",
                                "content": "hi",
                                "tool_calls": [{"id": "t"}],
                            },
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                }
            ).encode()
        )
    )
    assert chat.text == "hi" and chat.usage is not None and chat.usage.total_tokens == 4
    assert chat.choices[0].message.tool_calls == ({"id": "t"},)
    emb = decode_embeddings(ok(b'{"data": [{"embedding": [1, 0.5]}], "model": "e"}'))
    assert emb.vectors == ((1.0, 0.5),)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>502</html>",
        b'{"id": "x", "choi',
        b"[1, 2]",
        b'{"choices": "no"}',
        b'{"choices": [{"message": 3}]}',
    ],
)
def test_bad_success_bodies_are_malformed_response(body: bytes) -> None:
    with pytest.raises(errors.MalformedResponse):
        decode_chat(ok(body))


@given(st.binary(max_size=200))
def test_decoding_garbage_raises_only_typed_errors(body: bytes) -> None:
    for status in (200, 400, 429, 500):
        try:
            decode_chat(Response(status, Headers(), body))
            decode_embeddings(Response(status, Headers(), body))
        except errors.CorralError:
            pass


def stream_bytes(words: list[str], done: bool = True) -> bytes:
    events: list[dict[str, object]] = [
        {
            "id": "c",
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
        }
        for w in words
    ]
    events.append(
        {
            "id": "c",
            "model": "m",
            "choices": [],
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": len(words),
                "total_tokens": 1 + len(words),
            },
        }
    )
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def test_stream_decoder_accumulates_and_detects_truncation() -> None:
    decoder = ChatStreamDecoder()
    acc = ChatAccumulator()
    for chunk in decoder.feed(stream_bytes(["a", "b"])) + decoder.close():
        acc.add(chunk)
    result = acc.result()
    assert result.text == "ab" and result.usage is not None and result.usage.completion_tokens == 2
    cut = ChatStreamDecoder()
    cut.feed(stream_bytes(["a"], done=False))
    with pytest.raises(errors.RemoteProtocolError, match="truncated"):
        cut.close()


@given(st.binary(max_size=200))
def test_stream_decoder_garbage_raises_only_typed_errors(raw: bytes) -> None:
    decoder = ChatStreamDecoder()
    try:
        decoder.feed(raw)
        decoder.close()
    except errors.CorralError:
        pass


def test_request_and_response_are_immutable() -> None:
    request = Request("GET", "http://h/")
    with pytest.raises(AttributeError):
        request.url = "x"  # type: ignore[misc]
    assert request.with_options(model="m").options.model == "m" and request.options.model is None


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_usage_watcher_finds_usage_in_any_split(cuts: list[int]) -> None:
    from corral.core._wire import UsageWatcher

    raw = stream_bytes(["a", "b", "c"])
    points = sorted({c % (len(raw) + 1) for c in cuts})
    watcher = UsageWatcher()
    found = [
        u
        for a, b in zip([0, *points], [*points, len(raw)], strict=True)
        if (u := watcher.feed(raw[a:b])) is not None
    ]
    assert len(found) == 1 and found[0].total_tokens == 4


@given(st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_a_shared_stream_parse_is_the_same_in_any_split(cuts: list[int], strict: bool) -> None:
    """One parse per stream: the chunks, the usage (on the call too, its listener called once)
    and completeness do not depend on where the bytes were cut."""
    from corral.core._call import Call
    from corral.core._wire import StreamParse

    raw = stream_bytes(["a", "b", "c"])
    points = sorted({c % (len(raw) + 1) for c in cuts})
    call = Call()
    parse = StreamParse(call)
    heard: list[object] = []
    parse.on_usage(heard.append)
    if strict:
        parse.keep_chunks()
    texts: list[str] = []
    for a, b in zip([0, *points], [*points, len(raw)], strict=True):
        parse.feed(raw[a:b])
        texts += [c.text for c in parse.take()]
    parse.close()
    assert texts == (["a", "b", "c", ""] if strict else [])
    assert heard == [call.usage] and call.usage is not None and call.usage.total_tokens == 4
    assert parse.complete and parse.error() is None


def test_a_stream_parse_judges_events_only_when_asked() -> None:
    from corral.core._wire import StreamParse

    for bad in (b'{"choices": 5}', b"not json", b'{"error": "x"}'):
        raw = b"data: " + bad + b"\n\ndata: [DONE]\n\n"
        lenient, strict = StreamParse(), StreamParse()
        strict.check_events()
        for parse in (lenient, strict):
            parse.feed(raw)
            parse.close()
        assert lenient.complete  # nobody asked: only usage events are decoded
        assert not strict.complete and isinstance(strict.error(), errors.MalformedResponse)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, "5", True])
@pytest.mark.parametrize("phase", ["connect", "read", "write", "pool"])
def test_a_timeout_not_positive_seconds_is_refused_by_name(phase: str, value: object) -> None:
    with pytest.raises(InvalidInput, match=f"Timeouts.{phase} must be seconds > 0"):
        Timeouts(**{phase: value})  # type: ignore[arg-type]
    assert Timeouts(**{phase: None}) != Timeouts(**{phase: 2.5})
