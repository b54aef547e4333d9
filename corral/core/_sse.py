"""An incremental Server-Sent Events parser (WHATWG HTML §9.2.6), sans-IO.

Feed it bytes as they arrive, in any split, and it returns the complete events. Line ends may be
LF, CR or CRLF, including a CRLF split across two feeds. UTF-8 is decoded incrementally, so a
multi-byte character split across feeds is fine; invalid UTF-8 is replaced, as the spec says.

Linear in the bytes fed, however they are split: each feed is split into lines once (one regex
pass over the new text only), and an unfinished line is kept as a list of pieces, joined once
when its end arrives. A line, or the data of one event, longer than ``max_event_size``
characters raises ``ResponseTooLarge``, so a stream that never ends a line cannot grow memory
without bound. Whether it raises does not depend on the split.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

import attrs

from corral.core._errors import ResponseTooLarge

__all__ = ["DEFAULT_MAX_EVENT_SIZE", "SSEEvent", "SSEParser"]

#: Characters one line, or the joined data of one event, may hold (16 Mi: far above any chat
#: chunk, and a bound on what one stream can make the parser hold).
DEFAULT_MAX_EVENT_SIZE = 16 * 1024 * 1024

_LINE_END = re.compile(r"\r\n|\r|\n")


@attrs.frozen
class SSEEvent:
    """One server-sent event as the spec defines it: its data lines joined, its type, id and
    reconnection time."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Turns a byte stream into ``SSEEvent``s; one instance per stream."""

    def __init__(self, *, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self._max = max_event_size
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial: list[str] = []  # pieces of the line whose end has not arrived
        self._partial_size = 0
        self._first = True  # a leading BOM is stripped once
        self._pending_cr = False  # the last feed ended in CR: a following LF belongs to it
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events this chunk completes.

        Raises:
            ResponseTooLarge: a line or an event's data passed ``max_event_size``.
        """
        return self._text(self._decoder.decode(chunk), full=True)

    def feed_data(self, chunk: bytes) -> list[str]:
        """The data of each event this chunk completes, for a reader that needs nothing else
        (a chat stream): the same events as ``feed``, without an object per event."""
        return self._text(self._decoder.decode(chunk), full=False)

    def close(self) -> list[SSEEvent]:
        """End of stream: flushes the decoder. An event with no blank line after it is dropped."""
        return self._close(full=True)

    def close_data(self) -> list[str]:
        """``close`` for a ``feed_data`` reader."""
        return self._close(full=False)

    def _close(self, *, full: bool) -> list[Any]:
        events = self._text(self._decoder.decode(b"", final=True), full=full)
        self._partial, self._partial_size = [], 0
        self._data, self._data_size, self._event = [], 0, ""
        return events

    def _text(self, text: str, *, full: bool) -> list[Any]:
        """The events ``text`` completes: ``SSEEvent``s if ``full``, else their data."""
        if not text:
            return []
        if self._first:
            self._first = False
            if text[0] == "\ufeff":
                text = text[1:]
        if self._pending_cr:
            self._pending_cr = False
            if text[:1] == "\n":
                text = text[1:]
        if "\r" in text:
            lines = _LINE_END.split(text)
            self._pending_cr = text[-1] == "\r"
        else:  # the common case, and str.split is faster than a regex
            lines = text.split("\n")
        tail = lines.pop()  # after the last line end: the start of an unfinished line
        events: list[Any] = []
        if lines:
            if self._partial:
                self._partial.append(lines[0])
                lines[0] = "".join(self._partial)
                self._partial, self._partial_size = [], 0
            limit = self._max
            for line in lines:
                if len(line) > limit:
                    raise self._too_large("line")
                if not line:  # dispatch
                    data = self._data
                    if data:
                        joined = data[0] if len(data) == 1 else "\n".join(data)
                        if full:
                            kind, last_id, retry = self._event, self._last_id, self._retry
                            events.append(SSEEvent(joined, kind or "message", last_id, retry))
                        else:
                            events.append(joined)
                        self._data, self._data_size = [], 0
                    self._event = ""
                elif line[:6] == "data: ":  # the common field, without partition
                    self._add_data(line[6:])
                else:
                    self._line(line)
        if tail:
            self._partial.append(tail)
            self._partial_size += len(tail)
            if self._partial_size > self._max:
                raise self._too_large("line")
        return events

    def _too_large(self, what: str) -> ResponseTooLarge:
        self._partial, self._data = [], []  # let the memory go: the stream is refused
        return ResponseTooLarge(
            f"an SSE {what} over max_event_size ({self._max} characters)", limit=self._max
        )

    def _add_data(self, value: str) -> None:
        self._data.append(value)
        self._data_size += len(value) + 1  # the "\n" that joins it to the next line
        if self._data_size > self._max + 1:
            raise self._too_large("event")

    def _line(self, line: str) -> None:
        """A field line other than ``data: ...`` (or a comment)."""
        if line[0] == ":":
            return
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._add_data(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
