"""``_fast_http`` against h11, its reference: a request written byte for byte as h11 writes it,
and a response read as the transport reads it (fast head, else h11 from the same bytes) giving
the same head, body, end, bytes past the end and reuse verdict as h11 alone, or an error where
h11 raises one; for generated responses, ordinary and odd, split anywhere. Then the transport:
an ordinary exchange never reaches h11, and odd answers still read as h11 reads them."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Iterator

import anyio
import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from corral.core import _errors as errors
from corral.core import api_request
from corral.core._headers import Headers
from corral.transports._fast_http import (
    FALLBACK,
    MAX_HEAD,
    NEED_DATA,
    Head,
    LengthDecoder,
    parse_head,
    request_bytes,
)
from corral.transports._http11 import H11Transport
from tests import hostile

# -- requests -------------------------------------------------------------------------------

FAST_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
token = st.text(
    "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=12
)
field_value = st.sampled_from(
    [
        "application/json",
        "Bearer sk-1234",
        "",
        "a b\tc",
        "\x80\xff",
        "chunked",
        "close",
        "100-continue",
        "0",
        "5",
    ]
)
ordinary_name = token.filter(
    lambda n: (
        n.lower()
        not in {
            "host",
            "content-length",
            "connection",
            "expect",
            "upgrade",
            "transfer-encoding",
            "te",
        }
    )
)


def _fields(method: str, fields: Headers, body: bytes) -> list[tuple[bytes, bytes]]:
    """What H11Transport hands the writer: host, identity, a content-length, then the fields."""
    out = [(b"host", b"127.0.0.1:8000"), (b"accept-encoding", b"identity")]
    if body or method in ("POST", "PUT", "PATCH"):
        out.append((b"content-length", str(len(body)).encode()))
    return out + list(fields.raw())


def by_h11_writer(
    method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method=method, target=target, headers=fields, _parsed=True))
    if body:
        data += conn.send(h11.Data(data=body))
    return data + conn.send(h11.EndOfMessage())


@settings(max_examples=300)
@given(
    method=st.sampled_from([*FAST_METHODS, "HEAD", "CONNECT", "TRACE", "BREW"]),
    target=st.sampled_from(["/v1/chat/completions", "/", "/a?b=c&d=%20", "*", "/\x7f", "/a b", ""]),
    names=st.lists(
        st.one_of(
            token,
            st.sampled_from(
                [
                    "Host",
                    "Connection",
                    "Expect",
                    "TE",
                    "Upgrade",
                    "Transfer-Encoding",
                    "Content-Length",
                ]
            ),
        ),
        max_size=6,
    ),
    values=st.lists(field_value, min_size=6, max_size=6),
    body=st.binary(max_size=40),
    host_at=st.integers(min_value=0, max_value=8),
)
def test_requests_are_written_as_h11_writes_them(
    method: str, target: str, names: list[str], values: list[str], body: bytes, host_at: int
) -> None:
    """Same bytes as h11 (which writes host first, wherever it is), or None and h11 writes it."""
    fields = _fields(method, Headers(zip(names, values, strict=False)), body)
    fields.insert(host_at, fields.pop(0))
    fast = request_bytes(method.encode(), target.encode(), fields, body)
    try:
        reference = by_h11_writer(method.encode(), target.encode(), fields, body)
    except h11.LocalProtocolError:
        assert fast is None  # h11 refuses it: it goes through h11, which says why
        return
    assert fast is None or fast == reference
    names_lower = {n.lower() for n in names}
    if "content-length" in names_lower:  # a second length is written when it agrees: h11 too
        return
    ordinary = method in FAST_METHODS and not names_lower & {
        "host",
        "connection",
        "expect",
        "te",
        "upgrade",
        "transfer-encoding",
    }
    assert (fast is not None) == ordinary


@given(
    names=st.lists(ordinary_name, max_size=8),
    values=st.lists(field_value, min_size=8, max_size=8),
    body=st.binary(max_size=200),
)
def test_ordinary_requests_never_need_h11(names: list[str], values: list[str], body: bytes) -> None:
    fields = _fields("POST", Headers(zip(names, values, strict=False)), body)
    fast = request_bytes(b"POST", b"/v1/chat/completions", fields, body)
    assert fast == by_h11_writer(b"POST", b"/v1/chat/completions", fields, body)


# -- responses ------------------------------------------------------------------------------


def _pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    """``raw`` split at ``cuts`` (taken modulo its length), no empty piece (b"" is the end)."""
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    return [p for p in pieces if p]


Outcome = tuple[object, bytes, str, bytes, bool]


def _sent(method: str) -> h11.Connection:
    """A client h11 connection in the state the transport's request leaves it."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method=method, target="/", headers=[("host", "x"), ("content-length", "0")])
    )
    conn.send(h11.EndOfMessage())
    return conn


def _drain(conn: h11.Connection, stream: list[bytes]) -> Outcome:
    """(head, body, need/end/error, bytes past the end, reusable) as h11 reads ``stream``."""
    head: object = None
    body, outcome = b"", "need"
    for piece in stream:
        conn.receive_data(piece)
        while outcome == "need":
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return head, body, "error", b"", False
            if event is h11.NEED_DATA:
                break
            if type(event) is h11.Response:
                head = (event.status_code, list(event.headers))
            elif type(event) is h11.Data:
                body += bytes(event.data)
            elif type(event) is h11.EndOfMessage:
                outcome = "end"
            elif type(event) is h11.ConnectionClosed:
                return head, body, "error", b"", False
    if outcome != "end":
        return head, body, outcome, b"", False
    rest, closed = conn.trailing_data
    return head, body, "end", rest, conn.their_state is h11.DONE and not rest and not closed


def by_h11(method: str, stream: list[bytes]) -> Outcome:
    return _drain(_sent(method), stream)


def by_transport(method: str, stream: list[bytes]) -> tuple[Outcome, bool]:
    """The outcome as H11Transport reads ``stream``, and whether h11 was needed."""
    buf = b""
    for i, piece in enumerate(stream):
        buf += piece
        head = parse_head(buf, eof=not piece)
        if head is NEED_DATA:
            continue
        if not isinstance(head, Head):
            assert head is FALLBACK
            rest = stream[i + 1 :] if piece else [b"", *stream[i + 1 :]]
            return _drain(_sent(method), [buf, *rest]), True
        decoder = head.decoder(buf[head.end :])
        body = decoder.take()
        fields = (head.status, head.fields)
        for later in stream[i + 1 :]:
            if decoder.error is not None:
                break
            decoder.feed(later)
            body += decoder.take()
        if decoder.error is not None:
            assert isinstance(decoder.error, errors.RemoteProtocolError)
            return (fields, body, "error", b"", False), False
        if not decoder.done:
            return (fields, body, "need", b"", False), False
        reusable = head.keep_alive and not decoder.eof and not decoder.leftover
        return (fields, body, "end", decoder.leftover, reusable), False
    return (None, b"", "need", b"", False), False


version = st.sampled_from(
    [b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1", b" HTTP/1.1", b""]
)
status = st.sampled_from(
    [b"200"] * 6
    + [
        b"201",
        b"204",
        b"304",
        b"404",
        b"429",
        b"500",
        b"599",
        b"100",
        b"101",
        b"199",
        b"600",
        b"099",
        b"2x0",
        b"20",
        b"2000",
    ]
)
reason = st.sampled_from(
    [
        b" OK",
        b" OK",
        b"",
        b" ",
        b" Not Found",
        b" a\tb",
        b" \x80\xff",
        b" \x01",
        b"\tOK",
        b" a\x00b",
    ]
)
eol = st.sampled_from([b"\r\n"] * 10 + [b"\n", b"\r", b"\r\r\n", b"\n\r"])
name = st.sampled_from(
    [
        b"content-type",
        b"Content-Type",
        b"x-request-id",
        b"Date",
        b"X-Odd_Name!",
        b"bad name",
        b"",
        b"na\x80me",
        b"connection",
        b"Connection",
        b" indented",
    ]
)
value = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"",
            b" padded \t",
            b"a  b",
            b"close",
            b"keep-alive",
            b"Keep-Alive, Close",
            b"x\x01y",
            b"\x80\xfe",
            b"a\x00b",
            b"tab\tinside",
            b"v" * 9000,
            b"v" * 17000,
        ]
    ),
    st.binary(max_size=8),
)
sep = st.sampled_from([b": ", b": ", b":", b":\t", b" : ", b": \t "])
ordinary_field = st.tuples(
    st.sampled_from([b"content-type", b"Date", b"x-request-id", b"Server", b"Connection"]),
    st.sampled_from([b": ", b":"]),
    st.sampled_from([b"application/json", b"keep-alive", b"close", b"a b", b""]),
    st.just(b"\r\n"),
)
odd_field = st.tuples(name, sep, value, eol)
field = st.one_of(ordinary_field, ordinary_field, ordinary_field, ordinary_field, odd_field)
ordinary_start = st.tuples(
    st.just(b"HTTP/1.1"),
    st.sampled_from([b"200", b"201", b"204", b"304", b"404", b"429", b"500", b"599"]),
    st.sampled_from([b" OK", b"", b" "]),
    st.just(b"\r\n"),
)
start = st.one_of(
    ordinary_start, ordinary_start, ordinary_start, st.tuples(version, status, reason, eol)
)
FRAMINGS = [
    "length",
    "length",
    "length",
    "chunked",
    "chunked",
    "none",
    "both",
    "length-twice",
    "length-conflict",
    "length-list",
    "length-bad",
    "length-digits",
    "te-Chunked",
    "te-gzip",
    "te-twice",
]
framing = st.one_of(st.sampled_from(["length", "chunked"]), st.sampled_from(FRAMINGS))


def _response(
    start: tuple[bytes, bytes, bytes, bytes],
    fields: list[tuple[bytes, bytes, bytes, bytes]],
    framing: str,
    delta: int,
    body: bytes,
    tail: bytes,
    interim: bool,
) -> bytes:
    ver, code, why, end = start
    lines = [b"".join(f) for f in fields]
    n = str(max(0, len(body) + delta)).encode()
    framed = body
    if framing.startswith("length") or framing == "both":
        values = {
            "length-twice": [n, n],
            "length-conflict": [n, n + b"1"],
            "length-list": [n + b", " + n],
            "length-bad": [b"1x"],
            "length-digits": [b"0" * 21],
        }
        lines += [b"Content-Length: " + v + b"\r\n" for v in values.get(framing, [n])]
    if framing in ("chunked", "both", "te-Chunked", "te-twice", "te-gzip"):
        te = {"te-Chunked": b"Chunked", "te-gzip": b"gzip"}.get(framing, b"chunked")
        lines += [b"Transfer-Encoding: " + te + b"\r\n"] * (2 if framing == "te-twice" else 1)
        framed = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    head = ver + b" " + code + why + end + b"".join(lines) + b"\r\n"
    first = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    return first + head + framed + tail


@settings(max_examples=600)
@given(
    method=st.sampled_from(["POST", "POST", "GET"]),
    start=start,
    fields=st.lists(field, max_size=5),
    framing=framing,
    delta=st.sampled_from([0, 0, 0, -1, 1, 4]),
    body=st.binary(max_size=40),
    tail=st.sampled_from([b"", b"", b"", b"HTTP/1.1 200 OK\r\n", b"x"]),
    interim=st.booleans(),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    eof=st.booleans(),
)
@example(
    method="POST",
    start=(b"HTTP/1.1", b"200", b" OK", b"\r\n"),
    fields=[(b"content-type", b": ", b"application/json", b"\r\n")],
    framing="length",
    delta=0,
    body=b"{}",
    tail=b"",
    interim=False,
    cut=None,
    cuts=[],
    eof=False,
)
def test_responses_read_as_h11_reads_them(
    method: str,
    start: tuple[bytes, bytes, bytes, bytes],
    fields: list[tuple[bytes, bytes, bytes, bytes]],
    framing: str,
    delta: int,
    body: bytes,
    tail: bytes,
    interim: bool,
    cut: int | None,
    cuts: list[int],
    eof: bool,
) -> None:
    raw = _response(start, fields, framing, delta, body, tail, interim)
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    stream = [*_pieces(raw, cuts), *([b""] if eof else [])]
    assert by_transport(method, stream)[0] == by_h11(method, stream)


@pytest.mark.parametrize("framing", sorted(set(FRAMINGS)))
@pytest.mark.parametrize("code", [b"200", b"204", b"304", b"101"])
def test_every_framing_reads_as_h11_reads_it(framing: str, code: bytes) -> None:
    """Each framing, ordinary head or not, too little or too much body, split at a few places."""
    start = (b"HTTP/1.1", code, b" OK", b"\r\n")
    for body, delta, tail, eof in itertools.product(
        (b"", b"abc"), (0, 1, -1), (b"", b"x"), (False, True)
    ):
        raw = _response(start, [], framing, delta, body, tail, False)
        for cut in range(0, len(raw) + 1, 7):
            stream = [*_pieces(raw, [cut]), *([b""] if eof else [])]
            assert by_transport("GET", stream)[0] == by_h11("GET", stream), (raw, cut, eof)


@given(
    code=st.sampled_from([b"200", b"201", b"400", b"429", b"500", b"503"]),
    fields=st.lists(ordinary_field, max_size=6),
    chunked=st.booleans(),
    body=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_ordinary_responses_never_need_h11(
    code: bytes,
    fields: list[tuple[bytes, bytes, bytes, bytes]],
    chunked: bool,
    body: bytes,
    cuts: list[int],
) -> None:
    start = (b"HTTP/1.1", code, b" Whatever", b"\r\n")
    raw = _response(start, fields, "chunked" if chunked else "length", 0, body, b"", False)
    stream = _pieces(raw, cuts)
    outcome, needed_h11 = by_transport("POST", stream)
    assert not needed_h11
    assert outcome == by_h11("POST", stream)
    assert outcome[1:3] == (body, "end")


def test_a_head_past_the_limit_goes_to_h11_before_h11_would_refuse_it() -> None:
    buf = b"HTTP/1.1 200 OK\r\nx: " + b"v" * MAX_HEAD
    assert parse_head(buf) is FALLBACK
    assert parse_head(buf[:MAX_HEAD]) is NEED_DATA


def test_a_cut_off_length_body_is_h11s_error() -> None:
    decoder = LengthDecoder(5)
    decoder.feed(b"abc")
    decoder.feed(b"")
    assert decoder.take() == b"abc"
    assert isinstance(decoder.error, errors.RemoteProtocolError)
    assert "received 3 bytes, expected 5" in str(decoder.error)


# -- the transport --------------------------------------------------------------------------


class _Answers:
    """A server answering every request on a connection with ``response``; counts connections."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def __call__(self, conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        while head and not stop.is_set():
            conn.sendall(self.response)
            head = hostile.read_request(conn)


@contextlib.contextmanager
def _serving(response: bytes) -> Iterator[tuple[str, hostile.HostileServer]]:
    server = hostile.HostileServer(_Answers(response))
    try:
        yield f"http://127.0.0.1:{server.port}/v1", server
    finally:
        server.close()


def _no_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("h11 was used for an ordinary exchange")

    monkeypatch.setattr(h11.Connection, "send", refuse)
    monkeypatch.setattr(h11.Connection, "next_event", refuse)


JSON = b'{"ok": true}'
ORDINARY = [
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n" + JSON,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n"
    + JSON[:5]
    + b"\r\n7\r\n"
    + JSON[5:]
    + b"\r\n0\r\n\r\n",
]


@pytest.mark.anyio
@pytest.mark.parametrize("response", ORDINARY, ids=["length", "chunked"])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "streamed"])
async def test_an_ordinary_exchange_never_reaches_h11(
    monkeypatch: pytest.MonkeyPatch, response: bytes, stream: bool
) -> None:
    """Items 1-2: request written and head and body read past h11; the connection is reused."""
    with _serving(response) as (base_url, server):
        _no_h11(monkeypatch)
        async with H11Transport() as transport:
            for _ in range(3):
                request = api_request(base_url, "/chat/completions", {"a": 1}, api_key="sk-test-1")
                request = request.with_options(stream=True) if stream else request
                with anyio.fail_after(10):
                    response_ = await transport(request)
                    data = (await response_.aread()).body if stream else response_.body
                assert (response_.status, data) == (200, JSON)
            assert server.connections == 1


ODD = [
    # bare LF line ends, HTTP/1.0 with keep-alive off, obs-fold, a 100 first, a 204, read-to-close
    (b"HTTP/1.1 200 OK\ncontent-length: 12\n\n" + JSON, 1),
    (b"HTTP/1.0 200 OK\r\ncontent-length: 12\r\n\r\n" + JSON, 3),
    (b"HTTP/1.1 200 OK\r\nx-a: 1\r\n  folded\r\ncontent-length: 12\r\n\r\n" + JSON, 1),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n" + JSON, 1),
    (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 12\r\n\r\n" + JSON, 3),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "connections"), ODD, ids=["lf", "http10", "fold", "100", "close"]
)
async def test_odd_answers_read_as_h11_reads_them(response: bytes, connections: int) -> None:
    """What the fast head does not take, h11 reads from the same bytes; a connection h11 would
    close (HTTP/1.0, ``Connection: close``) is never reused."""
    with _serving(response) as (base_url, server):
        async with H11Transport() as transport:
            for _ in range(3):
                request = api_request(base_url, "/chat/completions", {"a": 1}, api_key="sk-test-1")
                with anyio.fail_after(10):
                    answer = await transport(request)
                assert (answer.status, answer.body) == (200, JSON)
            assert server.connections == connections


@pytest.mark.anyio
async def test_a_bad_status_line_is_h11s_error() -> None:
    with _serving(b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n") as (base_url, _):
        async with H11Transport() as transport:
            request = api_request(base_url, "/chat/completions", {"a": 1}, api_key="sk-test-1")
            with (
                anyio.fail_after(10),
                pytest.raises(errors.RemoteProtocolError, match="bad response head"),
            ):
                await transport(request)


def test_a_length_that_is_not_the_bodys_goes_to_h11() -> None:
    """h11 refuses to end such a request; the writer leaves it to h11 to say so."""
    assert request_bytes(b"GET", b"/", [(b"host", b"x"), (b"content-length", b"5")], b"") is None
    assert request_bytes(b"POST", b"/", [(b"host", b"x")], b"body") is None
