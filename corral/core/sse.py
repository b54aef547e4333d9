"""An incremental Server-Sent Events parser (WHATWG HTML §9.2.6), sans-IO.

Feed it bytes as they arrive, in any split, and it returns the complete events. Line ends may be
LF, CR or CRLF, including a CRLF split across two feeds. UTF-8 is decoded incrementally, so a
multi-byte character split across feeds is fine; invalid UTF-8 is replaced, as the spec says.
"""

from __future__ import annotations

import codecs

import attrs

__all__ = ["SSEEvent", "SSEParser"]


@attrs.frozen
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Turns a byte stream into ``SSEEvent``s; one instance per stream."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._first = True  # a leading BOM is stripped once
        self._pending_cr = False  # the last feed ended in CR: a following LF belongs to it
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._decoder.decode(chunk)
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._pending_cr and text:
            self._pending_cr = False
            if text.startswith("\n"):
                text = text[1:]
        self._buffer += text
        return self._drain()

    def close(self) -> list[SSEEvent]:
        """End of stream: flushes the decoder. An event with no blank line after it is dropped."""
        self._buffer += self._decoder.decode(b"", final=True)
        events = self._drain()
        self._buffer = ""
        self._data = []
        self._event = ""
        return events

    def _drain(self) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        buf = self._buffer
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find("\n", start)
            cr = buf.find("\r", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                end = cr
                if cr + 1 < n:
                    nxt = cr + 2 if buf[cr + 1] == "\n" else cr + 1
                else:
                    self._pending_cr = True
                    nxt = cr + 1
            else:
                end, nxt = lf, lf + 1
            event = self._line(buf[start:end])
            if event is not None:
                events.append(event)
            start = nxt
        self._buffer = buf[start:]
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent(
            data="\n".join(data), event=event or "message", id=self._last_id, retry=self._retry
        )
