"""The SSE parser: WHATWG rules, and any split of the bytes gives the same events."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.core.sse import SSEEvent, SSEParser


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
    alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)),
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
