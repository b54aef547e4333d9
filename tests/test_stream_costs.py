"""What a streamed chunk costs, counted rather than timed (issue 15): events that arrive together
leave H11Transport as one piece, a stream arms timers per wait rather than per chunk, and the
asyncio stream's read timeout is one timer that moves."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral import Client, Deadline
from corral.core import Response, api_request
from corral.core import _errors as errors
from corral.core._models import Timeouts
from corral.core._sse import SSEParser
from corral.core._wire import parse_chunk
from corral.transports._asyncio_stream import open_asyncio_stream
from corral.transports._http11 import H11Transport
from corral.transports._lean_stream import ReadTimedOut
from corral.transports._memory import MemoryTransport
from tests import hostile
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio

EVENTS = 200


def _sse_events(count: int) -> list[bytes]:
    chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "w"}}]}
    return [b"data: " + json.dumps(chunk).encode() + b"\n\n" for _ in range(count)] + [
        b"data: [DONE]\n\n"
    ]


def _chunked(events: list[bytes]) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


@pytest.fixture
def burst_server() -> Iterator[str]:
    """Answers each request with a chunked SSE stream of ``EVENTS`` events in one write (one
    chunked-encoding chunk per event, as providers send them); keep-alive."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()
    answer = _chunked(_sse_events(EVENTS))

    def handle(conn: socket.socket) -> None:
        with conn:
            while not stop.is_set() and hostile.read_request(conn):
                conn.sendall(answer)

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    stop.set()
    thread.join(timeout=5)
    server.close()


async def test_events_that_arrive_together_leave_as_one_piece(burst_server: str) -> None:
    """h11 makes one event per chunked-encoding chunk; the body joins those already received,
    so every layer above handles a read, not an SSE event."""
    body = {"model": "m", "messages": [], "stream": True}
    async with H11Transport() as transport:
        for _ in range(2):
            request = api_request(burst_server, "/chat", body, api_key=CANARY_KEY)
            response = await transport(request)
            assert response.stream is not None
            with anyio.fail_after(10):
                pieces = [piece async for piece in response.stream]
            assert b"".join(pieces) == b"".join(_sse_events(EVENTS))
            assert len(pieces) < EVENTS // 4  # one per read (the old body: one per event, 201)
        assert transport.open_connections == 1  # the decoded body gave its connection back


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_stream_chat_arms_no_timer_per_chunk(burst_server: str) -> None:
    """``stream_chat`` through the default stack over H11Transport arms a bounded number of
    timers for a stream whose events arrive together (the old code: ~3 per chunk, from a fresh
    cancel scope in stream_chat, in the Deadline's stream and in the body's read).

    asyncio only: counted by wrapping the loop's ``call_at``, which every timeout arms."""
    loop = asyncio.get_running_loop()
    armed = 0
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal armed
        armed += 1
        return call_at(when, callback, *args, **kwargs)

    async with Client(burst_server, CANARY_KEY, model="m") as client:
        with anyio.fail_after(10):
            async for _ in client.stream_chat([]):  # warm: the connection is open
                pass
            loop.call_at = counting  # type: ignore[method-assign,assignment]
            try:
                texts = [chunk.text async for chunk in client.stream_chat([])]
            finally:
                del loop.call_at
    assert texts == ["w"] * EVENTS
    assert armed < 20, f"{armed} timers for {EVENTS} chunks"


@pytest.mark.parametrize("anyio_backend", ["asyncio", ("asyncio", {"use_uvloop": True})])
async def test_asyncio_receive_until_times_out_and_keeps_a_moving_deadline() -> None:
    """``receive_until``: ReadTimedOut when nothing comes in time; data arriving inside each
    wait's limit never times out, although the one timer was armed for an earlier wait."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    stream = await open_asyncio_stream("127.0.0.1", port, None)
    loop = asyncio.get_running_loop()
    peer, _ = server.accept()
    try:
        with anyio.fail_after(10):
            with pytest.raises(ReadTimedOut):
                await stream.receive_until(65536, loop.time() + 0.05)

            def trickle() -> None:  # 6 pieces 0.25 s apart: past the first wait's timer
                for i in range(6):
                    time.sleep(0.25)
                    peer.sendall(b"%d" % i)

            sender = threading.Thread(target=trickle, daemon=True)
            sender.start()
            got = b""
            while len(got) < 6:
                got += await stream.receive_until(65536, loop.time() + 1.0)
            sender.join(timeout=5)
            assert got == b"012345"
            peer.sendall(b"late")
            assert (
                await stream.receive_until(65536, loop.time() + 5) == b"late"
            )  # the timer was re-armed
    finally:
        await stream.aclose()
        peer.close()
        server.close()


async def test_body_read_timeout_still_fires_on_a_stalled_stream() -> None:
    """The body's read timeout (moved, not recreated, on asyncio) still ends a stream that
    stops sending: ``ReadTimeout``, not a hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            hostile.read_request(conn)
            conn.sendall(_chunked(_sse_events(3))[:-200])  # some events, then silence
            stop.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    body = {"model": "m", "messages": [], "stream": True}
    try:
        async with H11Transport(timeouts=Timeouts(read=0.3)) as transport:
            response = await transport(api_request(url, "/chat", body, api_key=CANARY_KEY))
            assert response.stream is not None
            with anyio.fail_after(10), pytest.raises(errors.ReadTimeout):
                async for _ in response.stream:
                    pass
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=10))
def test_feed_data_gives_the_data_of_the_events_feed_gives(raw: bytes, cuts: list[int]) -> None:
    """A chat stream's parse takes only each event's data (no ``SSEEvent`` per event): for any
    bytes in any split, the same data as the full events carry."""
    raw = raw.replace(b"\x00", b"data: x\n\n")  # make events likely among the noise
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    full, bare = SSEParser(), SSEParser()
    events = [e for piece in pieces for e in full.feed(piece)] + full.close()
    data = [d for piece in pieces for d in bare.feed_data(piece)] + bare.close_data()
    assert data == [e.data for e in events]


def test_chunks_built_from_checked_events_equal_the_checked_path() -> None:
    """``parse_chunk`` trusting a stream's validation builds what the checking path builds."""
    payload = {
        "id": "c",
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None},
            {"index": 1, "delta": {"tool_calls": [{"id": "t"}]}, "finish_reason": "stop"},
            {"delta": None},
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    }
    assert parse_chunk(payload, checked=True) == parse_chunk(payload)
    assert parse_chunk(payload).choices[2].index == 2


def test_a_streamed_chunk_builds_its_choices_only_when_asked() -> None:
    """``text`` reads the event's JSON: one object per chunk for a caller that wants the text;
    ``choices`` are built on first use, equal to the eager ones, and the chunk stays frozen."""
    payload = {
        "id": "c",
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": "a"}},
            {"index": 1, "delta": {"content": "b", "role": "assistant"}},
            {"index": 2, "delta": {"content": None}},
        ],
    }
    lazy = parse_chunk(payload, checked=True)
    assert lazy.text == "ab" and lazy._choices is None
    assert lazy.choices == parse_chunk(payload).choices and lazy._choices is not None
    assert lazy.text == "ab" and lazy == parse_chunk(payload)
    assert hash(lazy) == hash(parse_chunk(payload))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        lazy.id = "other"


@pytest.fixture
def paced_server() -> Iterator[str]:
    """Answers one request with 30 SSE events, each in its own write 5 ms apart (a read each)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    events = _sse_events(30)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            hostile.read_request(conn)
            whole = _chunked(events)
            head_end = whole.index(b"\r\n\r\n") + 4
            conn.sendall(whole[:head_end])
            for event in events:
                time.sleep(0.005)
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            conn.sendall(b"0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    thread.join(timeout=5)
    server.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_paced_stream_chat_arms_no_timer_per_read(paced_server: str) -> None:
    """Events one per read: the idle timeout of ``stream_chat`` and the call's deadline are
    handed down to the body's read, whose one timer moves (the old code: two cancel scopes,
    and their timers, per read). Counted on the loop's ``call_at``, so asyncio only."""
    loop = asyncio.get_running_loop()
    armed = 0
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal armed
        armed += 1
        return call_at(when, callback, *args, **kwargs)

    async with Client(paced_server, CANARY_KEY, model="m") as client:
        with anyio.fail_after(10):
            loop.call_at = counting  # type: ignore[method-assign,assignment]
            try:
                texts = [chunk.text async for chunk in client.stream_chat([])]
            finally:
                del loop.call_at
    assert texts == ["w"] * 30
    assert armed <= 6, f"{armed} timers for 30 events"


class _Stalling:
    """A stream that takes no limit from above (no ``bound_waits``): one event, then silence."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        yield _sse_events(1)[0]
        await anyio.sleep(30)

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(
    ("middleware", "idle", "error", "text"),
    [
        (None, 0.2, errors.ReadTimeout, "no stream data"),  # the Deadline's scope carries it
        ([], 0.2, errors.ReadTimeout, "no stream data"),  # no layer below takes it
        ([Deadline(0.2)], 30, errors.DeadlineExceeded, "deadline"),
    ],
)
async def test_limits_no_layer_below_takes_still_end_the_stream(
    middleware: list[Any] | None, idle: float, error: type[Exception], text: str
) -> None:
    """Over a stream that takes no limit, the idle timeout and the deadline are timed by a
    scope (the Deadline's, or stream_chat's own): the same errors, within bounds."""

    def answer(request: object) -> Response:
        return Response(200, [("content-type", "text/event-stream")], stream=_Stalling())

    client = Client(
        "http://memory/v1",
        CANARY_KEY,
        model="m",
        transport=MemoryTransport(answer),
        middleware=middleware,
    )
    async with client:
        with anyio.fail_after(10), pytest.raises(error, match=text):
            async for _ in client.stream_chat([], idle_timeout=idle):
                pass


def test_parse_chat_reads_any_mapping_as_it_reads_a_dict() -> None:
    """The decoders check ``type(x) is dict`` first (ABC checks cost) and fall back to
    ``Mapping``: a completion given as other mappings decodes to the same result."""
    from types import MappingProxyType

    from corral.core._wire import parse_chat

    message = {"role": "assistant", "content": "hi", "tool_calls": [{"id": "t"}]}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    data = {"id": "c", "model": "m", "choices": [choice], "usage": {"prompt_tokens": 2}}
    proxied = {
        **data,
        "choices": [MappingProxyType({**choice, "message": MappingProxyType(message)})],
    }
    assert parse_chat(MappingProxyType(proxied)) == parse_chat(data)
    assert parse_chat(data).choices[0].message.tool_calls == ({"id": "t"},)
