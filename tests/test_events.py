"""Event sinks: structured logs, a trace file, OpenTelemetry span events; and the cost of none."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from corral._client import Client, default_middleware
from corral.core._call import Call
from corral.core._errors import CorralError, InvalidInput
from corral.core._events import Event, RetryScheduled, TransportResent
from corral.integrations.otel import Tracing, span_events
from corral.observe import LogSink, TraceFile, fan_out, format_story, read_trace
from corral.testing.emulator import EmulatorConfig, Fault
from corral.testing.server import serve_in_thread
from tests.support import CANARY_KEY

MESSAGES = [{"role": "user", "content": "hi"}]


def retry(labels: dict[str, str], time: float = 1.0) -> RetryScheduled:
    return RetryScheduled(time=time, labels=labels, attempt=1, kind="server_error", delay=0.5)


def test_a_call_builds_no_event_without_a_sink() -> None:
    built: list[object] = []

    class Spy(Event):
        def __init__(self, **fields: object) -> None:
            built.append(fields)

    Call().emit(Spy, 1.0)
    assert built == []
    seen: list[Event] = []
    call = Call(sink=seen.append, labels={"custom_id": "a"}, attempt=2)
    call.emit(TransportResent, 3.0, reason="stale connection")
    assert seen == [
        TransportResent(time=3.0, labels={"custom_id": "a"}, attempt=2, reason="stale connection")
    ]


def test_trace_file_round_trip_and_story(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    sink = TraceFile(path)
    fan_out(sink)(retry({"custom_id": "a"}, 10.0))
    sink(retry({"custom_id": "b"}, 11.0))
    sink(TransportResent(time=12.5, labels={"custom_id": "a"}, reason="reset"))
    sink.close()
    story = list(read_trace(path, "a"))
    assert [e["event"] for e in story] == ["retry.scheduled", "transport.resent"]
    text = format_story(story)
    assert (
        "+   0.000s  retry.scheduled attempt 1" in text and "+   2.500s  transport.resent" in text
    )
    path.write_bytes(path.read_bytes() + b'{"torn')  # a trace still being written
    assert len(list(read_trace(path))) == 3
    path.write_bytes(b"not json\n")
    with pytest.raises(InvalidInput, match=r"trace\.jsonl:1"):
        list(read_trace(path))


def test_log_sink_is_structured(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="corral.events"):
        LogSink()(retry({"custom_id": "x"}))
    (record,) = caplog.records
    assert record.getMessage().startswith("retry.scheduled")
    assert record.corral_event["labels"] == {"custom_id": "x"}  # type: ignore[attr-defined]
    assert json.dumps(record.corral_event)  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_span_events_show_each_retry() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = EmulatorConfig(faults={Fault.SERVER_ERROR: 1.0})
    with serve_in_thread(config) as emu:
        stack = [Tracing(provider.get_tracer("t")), *default_middleware(max_attempts=3)]
        async with Client(emu.base_url, CANARY_KEY, middleware=stack, events=span_events) as c:
            with pytest.raises(CorralError):
                await c.chat(MESSAGES, model="gpt-4o-mini")
    (span,) = exporter.get_finished_spans()
    names = [e.name for e in span.events]
    assert names.count("retry.scheduled") == 2 and "retry.gave_up" in names
    first = next(e for e in span.events if e.name == "retry.scheduled")
    assert first.attributes is not None and first.attributes["corral.kind"] == "server_error"
    assert CANARY_KEY[:8] not in str([e.attributes for e in span.events])


def _drop_second_request_server() -> tuple[socket.socket, threading.Thread]:
    """Answers the first request on each connection and closes at the second, unanswered: a
    keep-alive connection the server dropped while the client pooled it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    def serve_one(conn: socket.socket) -> None:
        with conn:
            buffer = b""
            for answered in (True, False):
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(re.search(rb"content-length: *(\d+)", head, re.I)[1])  # type: ignore[index]
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                if answered:
                    conn.sendall(reply)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.anyio
async def test_a_resend_on_a_stale_connection_is_an_event() -> None:
    from corral.transports._http11 import H11Transport

    listener, _ = _drop_second_request_server()
    seen: list[Event] = []
    base = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        async with Client(
            base, CANARY_KEY, middleware=[], transport=H11Transport(), events=seen.append
        ) as client:
            for i in range(2):
                request = client.build_request("/x", {"n": i}, labels={"custom_id": f"c{i}"})
                assert (await client.send(request)).status == 200
    finally:
        listener.close()
    resent = [e for e in seen if isinstance(e, TransportResent)]
    assert [e.labels["custom_id"] for e in resent] == ["c1"]
