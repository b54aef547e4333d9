"""``ChunkedDecoder`` against h11, its reference: the same body bytes, then the same end (and the
same bytes past it) or an error where h11 raises one, for generated chunked bodies, ordinary and
odd, split anywhere."""

from __future__ import annotations

import h11
from hypothesis import example, given, settings
from hypothesis import strategies as st

from corral.core import _errors as errors
from corral.transports._chunked import ChunkedDecoder

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

size_line = st.sampled_from(
    [
        "{:x}\r\n",
        "{:X}\r\n",
        "000{:x}\r\n",
        "{:x};ext=1\r\n",
        '{:x};a="q" \t\r\n',
        "{:x} \t\r\n",
        "{:x};x\r\r\n",
        "{:x}\n",  # a bare LF: no line end for h11
        " {:x}\r\n",
        "{:x}x\r\n",
        "0000000000000000000{:x}\r\n",  # past 20 digits
        "{:x};" + "e" * 17000 + "\r\n",  # a line longer than h11 buffers
        "\r\n",
        "g\r\n",
    ]
)
footer = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"xx", b"\rx", b""])
last = st.sampled_from(
    [
        b"0\r\n\r\n",
        b"0\r\n\r\n",
        b"000;x=1\r\n\r\n",
        b"0\r\n\n",
        b"0\r\nx-trailer: 1\r\n\r\n",
        b"0\r\nbad trailer line\r\n\r\n",
        b"0\r\n continuation\r\n\r\n",
        b"0\r\n\r",
        b"0\r\n",
        b"",
    ]
)
chunk = st.tuples(st.binary(min_size=1, max_size=40), size_line, footer)


def _body(chunks: list[tuple[bytes, str, bytes]], end: bytes, tail: bytes) -> bytes:
    out = b""
    for data, line, foot in chunks:
        out += line.format(len(data)).encode() + data + foot
    return out + end + tail


def _pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    return [p for p in pieces if p]  # b"" is the end of the stream, for h11 and the decoder


def by_h11(pieces: list[bytes], eof: bool) -> tuple[bytes, str, bytes, bool]:
    """(body, outcome, bytes past the end, EOF seen) as h11 reads the response."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(HEAD)
    body, outcome = b"", "need"
    for piece in [*pieces, *([b""] if eof else [])]:
        conn.receive_data(piece)
        while outcome == "need":
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return body, "error", b"", False
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                outcome = "end"
            elif isinstance(event, h11.ConnectionClosed):
                return body, "error", b"", False
    rest, closed = conn.trailing_data
    return body, outcome, (rest if outcome == "end" else b""), closed and outcome == "end"


def by_decoder(pieces: list[bytes], eof: bool) -> tuple[bytes, str, bytes, bool]:
    decoder = ChunkedDecoder()
    body = b""
    for piece in [*pieces, *([b""] if eof else [])]:
        decoder.feed(piece)
        body += decoder.take()
        if decoder.error is not None:
            assert isinstance(decoder.error, errors.RemoteProtocolError)
            return body, "error", b"", False
    if decoder.done:
        return body, "end", decoder.leftover, decoder.eof
    return body, "need", b"", False


@settings(max_examples=400)
@given(
    chunks=st.lists(chunk, max_size=5),
    end=last,
    tail=st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n", b"x"]),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    eof=st.booleans(),
)
@example(chunks=[(b"hello", "{:x}\r\n", b"\r\n")], end=b"0\r\n\r\n", tail=b"", cuts=[], eof=False)
def test_same_as_h11(
    chunks: list[tuple[bytes, str, bytes]], end: bytes, tail: bytes, cuts: list[int], eof: bool
) -> None:
    pieces = _pieces(_body(chunks, end, tail), cuts)
    assert by_decoder(pieces, eof) == by_h11(pieces, eof)


@given(
    datas=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_ordinary_bodies_never_need_h11(datas: list[bytes], cuts: list[int]) -> None:
    """The shape providers send is read without h11, in any split: same bytes, a clean end."""
    raw = b"".join(b"%x\r\n%s\r\n" % (len(d), d) for d in datas) + b"0\r\n\r\n"
    pieces = _pieces(raw, cuts)
    assert by_decoder(pieces, False) == (b"".join(datas), "end", b"", False)
    decoder = ChunkedDecoder()
    for piece in pieces:
        decoder.feed(piece)
    assert decoder.done and decoder._h11 is None
