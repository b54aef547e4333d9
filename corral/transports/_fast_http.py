"""The ordinary HTTP/1.1 exchange without h11's state machine; h11 decides anything else. Sans-IO.

h11 costs a small request about 47 us (issue 15): building and checking events, its state
tables, a regex per header line. Most exchanges are the same shape: a request whose headers
``Headers.raw`` has already checked, answered by ``HTTP/1.1 <2xx-5xx>`` with CRLF lines, a
``Content-Length`` or ``Transfer-Encoding: chunked`` and nothing else unusual.

- ``request_bytes`` writes such a request exactly as h11 would (host first, then the rest in
  order), or returns None for anything else (the caller sends it through h11).
- ``parse_head`` reads such a response head from the bytes received so far, with a subset of
  h11's grammar (``h11/_abnf.py``), and returns the head, ``NEED_DATA``, or ``FALLBACK`` at the
  first byte it would have to judge (bare LF, obs-fold, 1xx, 204/304, HTTP/1.0, a framing it
  does not take, an odd size, a cut-off head). It waits only where h11 would wait too, so on
  ``FALLBACK`` the caller gives h11 (in the state the request left it) every byte received and
  h11's verdict, event or error, is the same as if h11 had read them all along.
- ``LengthDecoder`` reads a ``Content-Length`` body as ``ChunkedDecoder`` reads a chunked one.

tests/test_fast_http.py checks all three against h11 on generated requests and responses,
split at every byte.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from corral.core import _errors as errors
from corral.transports._chunked import ChunkedDecoder

__all__ = [
    "FALLBACK",
    "NEED_DATA",
    "Head",
    "LengthDecoder",
    "parse_head",
    "request_bytes",
]

# h11's token and request-target (h11/_abnf.py).
_TARGET = re.compile(rb"[\x21-\x7e]+")
# Methods whose response framing is the headers' alone (h11 reads HEAD/CONNECT answers apart).
_FAST_METHODS = frozenset((b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"))
# Request fields that change h11's state for the response (keep-alive, 100-continue, upgrade)
# or its framing of the request: such a request goes through h11.
_STATEFUL = frozenset((b"connection", b"expect", b"upgrade", b"transfer-encoding", b"te"))

# A head in h11's grammar with a narrower alphabet: visible ASCII or obs-text in values (h11
# takes any byte but NUL and whitespace), CRLF line ends only, no obs-fold.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VALUE = rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?"
_FIELD = rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n"
_HEAD = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: [ \t\x21-\x7e\x80-\xff]*)?\r\n((?:"
    + _TOKEN
    + rb":[ \t]*"
    + _VALUE
    + rb"[ \t]*\r\n)*)\r\n"
)
_FIELDS = re.compile(_FIELD)
_BARE_LF = re.compile(rb"(?<!\r)\n")
_START = b"HTTP/1.1 "
# Past this many bytes without a head, h11 judges (its own limit is 16 KiB).
MAX_HEAD = 8192
_MAX_DIGITS = 20  # h11's CONTENT_LENGTH_MAX_DIGITS
_PROBLEM = "response body cut short or malformed"


class _Signal:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Signal("NEED_DATA")
FALLBACK: Final = _Signal("FALLBACK")


@attrs.frozen
class Head:
    """An ordinary response head: ``fields`` as h11's ``Response.headers`` lists them (names
    lower-cased); ``length`` the Content-Length, or None for a chunked body; ``keep_alive``
    False when the server said ``Connection: close``; ``end`` the offset of the body."""

    status: int
    fields: list[tuple[bytes, bytes]]
    length: int | None
    keep_alive: bool
    end: int

    def decoder(self, rest: bytes) -> ChunkedDecoder | LengthDecoder:
        """A decoder for the body, fed ``rest`` (the bytes received past the head)."""
        body: ChunkedDecoder | LengthDecoder = (
            ChunkedDecoder() if self.length is None else LengthDecoder(self.length)
        )
        if rest:
            body.feed(rest)
        return body


def request_bytes(
    method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], body: bytes
) -> bytes | None:
    """The request as h11 writes it, or None if it is not an ordinary one.

    ``fields`` come from ``Headers.raw`` (already checked against RFC 9110) plus the host and
    content-length the transport adds; exactly one host, and a content-length iff a body.
    """
    if method not in _FAST_METHODS or _TARGET.fullmatch(target) is None:
        return None
    host = None
    parts = [method, b" ", target, b" HTTP/1.1\r\n", b"", b"", b"", b""]
    has_length = False
    for name, value in fields:
        lower = name.lower()
        if lower == b"host":
            if host is not None:
                return None
            host = value
            parts[4:8] = (name, b": ", value, b"\r\n")
            continue
        if lower in _STATEFUL:
            return None
        if lower == b"content-length":
            if has_length or value != str(len(body)).encode():
                return None
            has_length = True
        parts += (name, b": ", value, b"\r\n")
    if host is None or (body and not has_length):
        return None
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def parse_head(buf: bytes, eof: bool = False) -> Head | _Signal:
    """The head at the start of ``buf`` (every byte received for this response so far), or
    ``NEED_DATA`` (h11 would wait too), or ``FALLBACK`` (let h11 judge ``buf``)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if (
            eof
            or len(buf) > MAX_HEAD
            or not (buf.startswith(_START) or _START.startswith(buf))
            or _BARE_LF.search(buf) is not None
        ):
            return FALLBACK
        return NEED_DATA
    end += 4
    if end > MAX_HEAD:
        return FALLBACK
    match = _HEAD.match(buf, 0, end)
    if match is None or match.end() != end:
        return FALLBACK
    status = int(match[1])
    if status in (204, 304):
        return FALLBACK
    fields = []
    length: int | None = None
    chunked = False
    keep_alive = True
    for name, value in _FIELDS.findall(match[2]):
        lower = name.lower()
        if lower == b"content-length":
            if length is not None or not value.isdigit() or len(value) > _MAX_DIGITS:
                return FALLBACK
            length = int(value)
        elif lower == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                return FALLBACK
            chunked, value = True, b"chunked"
        elif lower == b"connection":
            tokens = [t.strip() for t in value.lower().split(b",")]
            keep_alive = keep_alive and b"close" not in tokens
        fields.append((lower, value))
    if chunked == (length is not None):  # both (h11 reads chunked) or neither (read to close)
        return FALLBACK
    return Head(status, fields, length, keep_alive, end)


class LengthDecoder:
    """A ``Content-Length`` body, with ``ChunkedDecoder``'s interface: ``feed`` what the socket
    gives (``b""`` for its end), ``take`` the body bytes; ``done``, ``leftover``, ``eof`` and
    ``error`` as there (the error is h11's for a cut-off body)."""

    __slots__ = ("_expected", "_left", "_out", "done", "eof", "error", "leftover")

    def __init__(self, length: int) -> None:
        self._expected = self._left = length
        self._out: list[bytes] = []
        self.done = length == 0
        self.eof = False
        self.error: errors.RemoteProtocolError | None = None
        self.leftover = b""

    def feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
            if not self.done and self.error is None:
                got = self._expected - self._left
                self.error = errors.RemoteProtocolError(
                    f"{_PROBLEM}: peer closed connection without sending complete message body "
                    f"(received {got} bytes, expected {self._expected})",
                    request_sent=True,
                )
            return
        if self.done or self.error is not None:
            self.leftover += data
            return
        left = self._left
        if len(data) > left:
            data, self.leftover = data[:left], data[left:]
        self._out.append(data)
        self._left = left = left - len(data)
        self.done = left == 0

    def take(self) -> bytes:
        """The body bytes received since the last call (b"" if none)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)
