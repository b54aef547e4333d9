"""The SSE parser: WHATWG rules, and any split of the bytes gives the same events."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core import _errors as errors
from corral.core._sse import DEFAULT_MAX_EVENT_SIZE, SSEEvent, SSEParser
from corral.core._wire import UsageWatcher


def parse_all(chunks: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.close()


def test_basic_fields_comments_and_multiline_data() -> None:
    stream = (
        b": a comment\n"
        b"event: delta\nid: 7\nretry: 1500\ndata: first\ndata:second\n\n"
        b'data: {"x": 1}\n\n'
        b"data: [DONE]\n\n"
    )
    assert parse_all([stream]) == [
        SSEEvent("first\nsecond", "delta", "7", 1500),
        SSEEvent('{"x": 1}', "message", "7", 1500),
        SSEEvent("[DONE]", "message", "7", 1500),
    ]


def test_cr_lf_and_crlf_line_ends_and_bom() -> None:
    for sep in (b"\n", b"\r", b"\r\n"):
        stream = b"\xef\xbb\xbfdata: a" + sep + b"data: b" + sep + sep + b"data: c" + sep + sep
        assert [e.data for e in parse_all([stream])] == ["a\nb", "c"]


def test_event_without_data_is_not_dispatched_and_unfinished_event_is_dropped() -> None:
    assert parse_all([b"event: ping\n\n", b"data: no blank line after"]) == []


def test_bad_id_and_retry_are_ignored() -> None:
    events = parse_all([b"id: a\x00b\nretry: 12x\ndata: d\n\n"])
    assert events == [SSEEvent("d")]


field_value = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"),
    max_size=20,
)
an_event = st.tuples(
    st.lists(field_value, min_size=1, max_size=3),
    st.one_of(st.none(), field_value.filter(lambda s: s != "")),
    st.one_of(st.none(), field_value),
)


@given(
    events=st.lists(an_event, max_size=8),
    newline=st.sampled_from(["\n", "\r", "\r\n"]),
    comments=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_any_split_gives_the_same_events(
    events: list[tuple[list[str], str | None, str | None]],
    newline: str,
    comments: bool,
    cuts: list[int],
) -> None:
    text = ""
    for data_lines, event, ident in events:
        if comments:
            text += ": keep-alive" + newline
        if event is not None:
            text += f"event: {event}{newline}"
        if ident is not None:
            text += f"id: {ident}{newline}"
        text += "".join(f"data: {line}{newline}" for line in data_lines)
        text += newline
    raw = text.encode()
    whole = parse_all([raw])
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert parse_all(pieces) == whole
    assert [e.data for e in whole] == ["\n".join(lines) for lines, _, _ in events]


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=10))
def test_garbage_bytes_never_raise(raw: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert parse_all(pieces) == parse_all([raw])


def test_a_line_over_the_cap_raises_a_typed_error_whatever_the_split() -> None:
    line = b"data: " + b"x" * 1000
    for size in (1, 7, 100, len(line) + 1):
        parser = SSEParser(max_event_size=500)
        with pytest.raises(errors.ResponseTooLarge, match="500") as caught:
            for i in range(0, len(line), size):
                parser.feed(line[i : i + size])
        assert caught.value.limit == 500 and not caught.value.retryable
        assert isinstance(caught.value, errors.MalformedResponse)


def test_an_event_of_many_lines_over_the_cap_raises() -> None:
    parser = SSEParser(max_event_size=500)
    with pytest.raises(errors.ResponseTooLarge):
        for _ in range(100):
            parser.feed(b"data: " + b"y" * 20 + b"\n")


def test_lines_and_events_at_the_cap_pass() -> None:
    parser = SSEParser(max_event_size=30)
    events = parser.feed(b"data: " + b"a" * 24 + b"\n\n" + b": " + b"c" * 28 + b"\r\n")
    assert events == [SSEEvent("a" * 24)]


def test_a_stream_without_newlines_stops_at_the_default_cap_in_bounded_work() -> None:
    """75 MB of one line in 64 KB chunks: refused once the line passes the cap."""
    chunk = b"z" * 65536
    parser = SSEParser()
    fed = 0
    with pytest.raises(errors.ResponseTooLarge):
        while fed < 75_000_000:
            parser.feed(chunk)
            fed += len(chunk)
    assert fed <= DEFAULT_MAX_EVENT_SIZE
    assert fed + len(chunk) > DEFAULT_MAX_EVENT_SIZE


def _cpu_seconds(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def test_one_large_feed_is_linear() -> None:
    """8 MB of short events in one feed (the whole-stream case): the old parser rescanned the
    rest of the buffer for each line (~quadratic: 1.2 s for 2 MB here, ~18 s for 8 MB); a
    linear one needs well under 10 s."""
    event = b'data: {"choices":[{"delta":{"content":"token"}}]}\n\n'
    stream = event * (8_000_000 // len(event))
    parser = SSEParser()
    events: list[SSEEvent] = []
    assert _cpu_seconds(lambda: events.extend(parser.feed(stream))) < 10
    assert len(events) == 8_000_000 // len(event)


def test_a_long_line_in_small_feeds_is_linear() -> None:
    """An 8 MB line (under the cap) fed 512 bytes at a time: the old parser copied and rescanned
    the whole buffer on every feed (33 s here); a linear one needs well under 10 s."""
    parser = SSEParser()
    piece = b"q" * 512
    events: list[SSEEvent] = []

    def feed_all() -> None:
        events.extend(parser.feed(b"data: "))
        for _ in range(16 * 1024):
            events.extend(parser.feed(piece))
        events.extend(parser.feed(b"\n\n"))

    assert _cpu_seconds(feed_all) < 10
    assert [len(e.data) for e in events] == [8 * 1024 * 1024]


@given(
    raw=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    cap=st.integers(min_value=1, max_value=40),
)
def test_with_a_cap_any_split_raises_alike_and_agrees_before_it(
    raw: bytes, cuts: list[int], cap: int
) -> None:
    """Under a cap, every split raises or none does, and events before the error agree."""
    whole = parse_all([raw])
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    outcomes = []
    for split in ([raw], pieces):
        parser = SSEParser(max_event_size=cap)
        got: list[SSEEvent] = []
        try:
            for piece in split:
                got += parser.feed(piece)
            got += parser.close()
        except errors.ResponseTooLarge:
            outcomes.append(("too large", got))
        else:
            outcomes.append(("ok", got))
    (kind_a, got_a), (kind_b, got_b) = outcomes
    assert kind_a == kind_b
    if kind_a == "ok":
        assert got_a == got_b == whole
    else:
        assert whole[: len(got_a)] == got_a and whole[: len(got_b)] == got_b


def test_a_usage_watcher_lets_a_stream_its_parser_refuses_pass() -> None:
    """Layers that only watch a stream for ``usage`` must not fail it (nor hold the line)."""
    watcher = UsageWatcher()
    for _ in range(DEFAULT_MAX_EVENT_SIZE // 65536 + 2):
        assert watcher.feed(b"w" * 65536) is None
    assert watcher.feed(b'\n\ndata: {"usage": {"prompt_tokens": 1}}\n\n') is None
