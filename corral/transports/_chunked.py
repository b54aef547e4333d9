"""A chunked response body decoded without an h11 event per chunk; h11 takes over for anything
unusual. Sans-IO.

h11 makes one ``Data`` event per chunk, and a provider streaming SSE sends one chunk per event,
so a burst of 300 events costs 300 passes through h11's state machine. ``ChunkedDecoder`` reads
the ordinary shape itself (``<hex size>[;ext] CRLF <data> CRLF`` ... ``0 CRLF CRLF``) with h11's
own chunk-header grammar. At the first byte it would have to judge otherwise (a header that does
not match, a footer that is not CRLF, trailers, a size line longer than h11 buffers), it hands
the rest of the body to a fresh h11 connection put in the very state the real one would be in
there (a response head, plus a one-byte chunk when a footer is due), so whatever happens next,
data, end or error, is h11's verdict. tests/test_chunked.py checks it against h11 on generated
bodies, split anywhere.
"""

from __future__ import annotations

import re

import h11

from corral.core import _errors as errors

__all__ = ["ChunkedDecoder"]

# h11's chunk-header grammar (h11/_abnf.py), matched against the line with its CRLF.
_HEADER = re.compile(rb"(?P<size>[0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")
# h11's default max_incomplete_event_size (0.14-0.16): past it, h11 refuses a size line.
_MAX_LINE = 16 * 1024
_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
_PROBLEM = "response body cut short or malformed"


class ChunkedDecoder:
    """Feed it what the socket gives (``b""`` for its end); ``take`` the body bytes decoded.

    ``done``: the body ended; ``leftover``/``eof`` then say whether anything followed it (a
    connection with either is not reused). ``error``: the body is broken (after ``take`` has
    returned the bytes before the break).
    """

    __slots__ = ("_buf", "_h11", "_left", "_out", "_pos", "_skip", "_state", "done", "eof", "error")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._left = 0  # bytes of the current chunk still to come
        self._state = 0  # 0: size line due, 1: in data, 2: footer due, 3: after the last chunk
        self._out: list[bytes] = []
        self._h11: h11.Connection | None = None  # h11, once it has taken over
        self._skip = 0  # bytes of data h11 gives that we put there ourselves
        self.done = self.eof = False
        self.error: errors.RemoteProtocolError | None = None

    @property
    def leftover(self) -> bytes:
        """Bytes received past the body's end."""
        if self._h11 is not None:
            return self._h11.trailing_data[0]
        return self._buf[self._pos :]

    def feed(self, data: bytes) -> None:
        if self.done or self.error is not None:
            if not data:
                self.eof = True
            elif self._h11 is not None:
                self._h11.receive_data(data)
            else:
                self._buf += data  # past the end: leftover
            return
        if self._h11 is not None:
            self._h11.receive_data(data)
            self._drain_h11()
            return
        if not data:
            self.eof = True
            self._buf = self._buf[self._pos :]
            self._pos = 0
            self._run()
            if not self.done and self._h11 is None and self.error is None:
                self._hand_over()  # h11 says how a cut-off body ends (its error)
            return
        self._buf = self._buf[self._pos :] + data if self._pos < len(self._buf) else data
        self._pos = 0
        self._run()

    def take(self) -> bytes:
        """The body bytes decoded since the last call (b"" if none)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _run(self) -> None:
        buf, pos, end = self._buf, self._pos, len(self._buf)
        out = self._out
        while pos < end:
            state = self._state
            if state == 1:  # data
                stop = pos + self._left
                piece = buf[pos:stop]
                out.append(piece)
                self._left -= len(piece)
                pos += len(piece)
                if self._left == 0:
                    self._state = 2
            elif state == 2:  # the CRLF after a chunk's data
                if buf[pos : pos + 2] == b"\r\n":
                    pos += 2
                    self._state = 0
                elif end - pos == 1 and buf[pos] == 13 and not self.eof:  # b"\r": wait
                    break
                else:
                    self._pos = pos
                    return self._hand_over()
            elif state == 0:  # a size line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > _MAX_LINE or self.eof:
                        self._pos = pos
                        return self._hand_over()
                    break
                match = _HEADER.fullmatch(buf, pos, eol + 2)
                if match is None:
                    self._pos = pos
                    return self._hand_over()
                size = int(match["size"], 16)
                pos = eol + 2
                self._left, self._state = size, 1 if size else 3
            else:  # after the last chunk: no trailers, only the blank line
                if buf[pos : pos + 2] == b"\r\n":
                    self._pos = pos + 2
                    self.done = True
                    return None
                if end - pos == 1 and buf[pos] == 13 and not self.eof:
                    break
                self._pos = pos
                return self._hand_over()
        self._pos = pos
        return None

    def _hand_over(self) -> None:
        """Give h11 the rest of the body, in the state the real connection's h11 would be in."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        prefix = _HEAD
        if self._state == 2:  # a footer is due: a one-byte chunk whose footer is what came
            prefix += b"1\r\n\0"
            self._skip = 1
        elif self._state == 3:  # trailers: the last chunk's size line, then what came
            prefix += b"0\r\n"
        conn.receive_data(prefix + self._buf[self._pos :])
        if self.eof:
            conn.receive_data(b"")
        self._buf, self._pos = b"", 0
        self._h11 = conn
        self._drain_h11()

    def _drain_h11(self) -> None:
        conn = self._h11
        assert conn is not None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.error = errors.RemoteProtocolError(f"{_PROBLEM}: {exc}", request_sent=True)
                return
            if event is h11.NEED_DATA:
                return
            if type(event) is h11.Data:
                data = bytes(event.data)
                if self._skip:
                    data, self._skip = data[self._skip :], 0
                if data:
                    self._out.append(data)
            elif type(event) is h11.EndOfMessage:
                self.done = True
                return
            elif type(event) is not h11.Response:  # ConnectionClosed: the body was cut short
                self.error = errors.RemoteProtocolError(
                    f"connection closed before the body ended ({type(event).__name__})",
                    request_sent=True,
                )
                return
