"""The chat stream side of the wire format: SSE bytes in, ``ChatChunk``s out, parsed once per
call for every layer that watches the stream (``StreamParse``, ``shared_parse``).

Only a streamed call needs any of this (and the SSE parser under it), so it loads with the
first use of one of its names from ``corral.core._wire``, which re-exports them, rather than
with ``import corral`` (issue 15).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import attrs

from corral.core import _jsonlib as jsonlib
from corral.core._call import Call
from corral.core._classify import snippet
from corral.core._errors import (
    CorralError,
    MalformedResponse,
    RemoteProtocolError,
    ResponseTooLarge,
)
from corral.core._models import ByteStream
from corral.core._sse import SSEParser
from corral.core._wire import (
    ChatCompletion,
    Choice,
    Message,
    Usage,
    _choices,
    _index,
    _items,
    _opt_str,
    _str,
)

__all__ = [
    "ChatAccumulator",
    "ChatChunk",
    "ChatStreamDecoder",
    "ChunkChoice",
    "Delta",
    "ParsedStream",
    "StreamParse",
    "UsageWatcher",
    "parse_chunk",
    "shared_parse",
]


@attrs.frozen
class Delta:
    role: str | None = None
    content: str | None = None
    tool_calls: tuple[Mapping[str, Any], ...] = ()


@attrs.frozen
class ChunkChoice:
    index: int
    delta: Delta
    finish_reason: str | None


class ChatChunk:
    """One decoded chunk of a streamed chat completion; ``usage`` is set only on the chunk that
    carries it.

    Immutable, compared by ``id``, ``model``, ``choices`` and ``usage`` (not ``raw``). A chunk
    from a stream builds its ``choices`` on first use: ``text`` reads the event's JSON
    directly, so a caller that only wants the text pays for one object per chunk, not three.
    """

    __slots__ = ("_choices", "id", "model", "raw", "usage")

    id: str
    model: str
    usage: Usage | None
    raw: Mapping[str, Any]
    _choices: tuple[ChunkChoice, ...] | None

    def __init__(
        self,
        id: str,
        model: str,
        choices: tuple[ChunkChoice, ...] | None,
        usage: Usage | None,
        raw: Mapping[str, Any],
    ) -> None:
        _set(self, "id", id)
        _set(self, "model", model)
        _set(self, "_choices", choices)
        _set(self, "usage", usage)
        _set(self, "raw", raw)

    @property
    def choices(self) -> tuple[ChunkChoice, ...]:
        """The chunk's choices, each with its delta (built on first use)."""
        choices = self._choices
        if choices is None:
            choices = _chunk_choices(self.raw.get("choices", []), checked=True)
            _set(self, "_choices", choices)
        return choices

    @property
    def text(self) -> str:
        """The content this chunk adds, all choices joined ("" for a role-only or usage-only
        chunk)."""
        if self._choices is not None:
            return "".join(c.delta.content or "" for c in self._choices)
        texts = []
        for choice in self.raw.get("choices", ()):
            delta = choice.get("delta")
            if type(delta) is dict or isinstance(delta, Mapping):
                content = delta.get("content")
                if content and isinstance(content, str):
                    texts.append(content)
        return texts[0] if len(texts) == 1 else "".join(texts)

    def _key(self) -> tuple[Any, ...]:
        return (self.id, self.model, self.choices, self.usage)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not ChatChunk:
            return NotImplemented
        assert isinstance(other, ChatChunk)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"ChatChunk(id={self.id!r}, model={self.model!r}, choices={self.choices!r}, "
            f"usage={self.usage!r})"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise attrs.exceptions.FrozenInstanceError

    def __delattr__(self, name: str) -> None:
        raise attrs.exceptions.FrozenInstanceError


_set = object.__setattr__


def _chunk_choices(raw_choices: Any, *, checked: bool) -> tuple[ChunkChoice, ...]:
    choices = []
    for i, raw in enumerate(raw_choices if checked else _choices(raw_choices, "chat chunk")):
        delta = raw.get("delta")
        if type(delta) is not dict and not isinstance(delta, Mapping):
            delta = {}
        index = raw.get("index")
        calls = delta.get("tool_calls")
        choices.append(
            ChunkChoice(
                index if type(index) is int else _index(raw, i),
                Delta(
                    _opt_str(delta.get("role")),
                    _opt_str(delta.get("content")),
                    () if calls is None else _items(calls),
                ),
                _opt_str(raw.get("finish_reason")),
            )
        )
    return tuple(choices)


def parse_chunk(data: Mapping[str, Any], *, checked: bool = False) -> ChatChunk:
    """A ``ChatChunk`` from one decoded event. ``checked``: the event's choices were validated
    (by the stream's parse), so they are built only when asked for."""
    usage = data.get("usage")
    return ChatChunk(
        _str(data.get("id")),
        _str(data.get("model")),
        None if checked else _chunk_choices(data.get("choices", []), checked=False),
        None if usage is None else Usage.parse(usage),
        data,
    )


class StreamParse:
    """One chat stream's SSE, parsed once for every layer that watches it and for the caller.

    Sans-IO: ``ParsedStream`` feeds it the bytes as they pass. Watchers subscribe before the
    first byte flows (layers do so on the way out, the caller before it reads): ``on_usage``
    (rate-limit settlement, metrics; ``call.usage`` is set too), ``keep_chunks`` (the caller's
    decoder: events kept as decoded JSON until ``take``), ``check_events`` (the cache: is every
    event a JSON object?). Without the last two only events that mention ``"usage"`` are
    decoded. Each event is JSON-decoded at most once, however many watch.

    Feeding never raises: a stream it cannot read still reaches whoever reads the bytes. What
    was wrong is kept, and ``error(secrets)`` turns it into the typed error for the reader.
    """

    __slots__ = ("_bad", "_call", "_chunks", "_listeners", "_sse", "_strict", "done", "usage")

    def __init__(self, call: Call | None = None) -> None:
        self._sse: SSEParser | None = SSEParser()
        self._call = call
        self._listeners: list[Callable[[Usage], None]] = []
        self._chunks: list[dict[str, Any]] | None = None
        self._strict = False
        #: What was wrong: an error quoting nothing, or (what, provider text to quote).
        self._bad: CorralError | tuple[str, str] | None = None
        #: ``data: [DONE]`` arrived: the stream is complete (if nothing was wrong).
        self.done = False
        self.usage: Usage | None = None

    def on_usage(self, listener: Callable[[Usage], None]) -> None:
        """Call ``listener`` once, when the stream states its usage."""
        self._listeners.append(listener)

    def keep_chunks(self) -> None:
        """Keep every event for ``take`` (the caller reading chunks)."""
        self._strict = True
        if self._chunks is None:
            self._chunks = []

    def check_events(self) -> None:
        """Decode every event, so ``complete`` also means each one was a JSON object."""
        self._strict = True

    @property
    def complete(self) -> bool:
        """The stream reached ``[DONE]`` and nothing in it was wrong."""
        return self.done and self._bad is None

    def feed(self, data: bytes) -> None:
        sse = self._sse
        if sse is None:
            return
        try:
            events = sse.feed_data(data)
        except ResponseTooLarge as exc:
            self._sse, self._bad = None, exc
            return
        for event in events:
            if not self._event(event):
                self._sse = None  # [DONE], or a stream it cannot read: nothing more to parse
                return

    def close(self) -> None:
        """The bytes ended (an event with no blank line after it is dropped, as SSE says)."""
        sse, self._sse = self._sse, None
        if sse is not None:
            for event in sse.close_data():
                if not self._event(event):
                    return

    def _event(self, data: str) -> bool:
        """Take one event; False when parsing should stop."""
        if data == "[DONE]":
            self.done = True
            return False
        mentions_usage = '"usage"' in data
        if not (self._strict or mentions_usage):
            return True
        try:
            payload = jsonlib.loads(data)
        except jsonlib.JSONDecodeError:
            return self._refuse("stream event is not JSON", data)
        if type(payload) is not dict:
            return self._refuse("stream event is not a JSON object", "")
        if "error" in payload:
            message = payload["error"]
            if isinstance(message, Mapping):
                message = message.get("message")
            return self._refuse("provider sent an error mid-stream", str(message))
        if self._strict:
            try:
                _choices(payload.get("choices", []), "chat chunk")
            except MalformedResponse as exc:
                self._bad = exc
                return False
        if mentions_usage and self.usage is None:
            usage = Usage.parse(payload.get("usage"))
            if usage is not None:
                self.usage = usage
                if self._call is not None:
                    self._call.usage = usage
                for listener in self._listeners:
                    listener(usage)
        if self._chunks is not None:
            self._chunks.append(payload)
        return True

    def _refuse(self, what: str, text: str) -> bool:
        if not self._strict:
            return True  # only the usage was wanted: an unreadable event is not ours to judge
        self._bad = (what, text)
        return False

    def take(self) -> list[ChatChunk]:
        """The chunks decoded since the last ``take`` (``keep_chunks`` must have been called)."""
        pending = self._chunks
        if not pending:
            return []
        self._chunks = []
        return [parse_chunk(payload, checked=True) for payload in pending]

    def error(self, secrets: Iterable[str] = ()) -> CorralError | None:
        """What was wrong with the stream, as the reader's typed error, or None.

        ``secrets`` are scrubbed from any provider text it quotes. Once the bytes have ended, a
        stream without ``[DONE]`` is an error too: a truncated stream must not pass for a
        complete answer.
        """
        bad = self._bad
        if isinstance(bad, CorralError):
            return bad
        if bad is not None:
            what, text = bad
            limit = 200 if what.startswith("provider") else 80
            quoted = f": {snippet(text.encode(), secrets, limit)}" if text else ""
            return MalformedResponse(what + quoted)
        if self._sse is None and not self.done:
            return RemoteProtocolError(
                "chat stream ended before 'data: [DONE]' (truncated)", request_sent=True
            )
        return None


class ParsedStream:
    """Passes a byte stream through, feeding each piece to the call's one ``StreamParse``."""

    __slots__ = ("_inner", "parse")

    def __init__(self, inner: ByteStream, parse: StreamParse) -> None:
        self._inner, self.parse = inner, parse

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        feed = self.parse.feed
        async for chunk in self._inner:
            feed(chunk)
            yield chunk
        self.parse.close()

    def bound_waits(self, **limit: Any) -> bool:
        """Pass a time limit on the waits for pieces down (this stream never waits itself)."""
        offer = getattr(self._inner, "bound_waits", None)
        return offer is not None and bool(offer(**limit))

    async def aclose(self) -> None:
        await self._inner.aclose()


def shared_parse(
    call: Call, stream: ByteStream, mark: StreamParse | None
) -> tuple[ByteStream, StreamParse]:
    """The call's one parse of an answer's ``stream``, and the stream to pass on.

    ``mark`` is ``call.stream`` as it was before the call went further in. If a layer inside
    installed a parse since, this is it and ``stream`` already feeds it; otherwise a new parse
    is installed on the call and the returned stream feeds it. The first watcher on the way
    out (the innermost) installs it, so it sits inside every other layer's wrapper: whoever
    sees a piece of the stream sees it parsed.
    """
    parse = call.stream
    if parse is not None and parse is not mark:
        return stream, parse
    parse = call.stream = StreamParse(call)
    return ParsedStream(stream, parse), parse


class UsageWatcher:
    """Finds the ``usage`` a chat stream reports (with stream_options.include_usage); sans-IO.

    A ``StreamParse`` on its own, for a reader of bytes that has no call to share one with.
    """

    def __init__(self) -> None:
        self._parse = StreamParse()

    @property
    def usage(self) -> Usage | None:
        return self._parse.usage

    def feed(self, data: bytes) -> Usage | None:
        """The usage, the first time a fed piece completes the event that carries it."""
        if self._parse.usage is not None:
            return None
        self._parse.feed(data)
        return self._parse.usage


class ChatStreamDecoder:
    """Bytes of a chat-completions SSE stream in, ``ChatChunk``s out; sans-IO.

    A ``StreamParse`` read by one reader. ``close()`` raises ``RemoteProtocolError`` if the
    stream ended before ``data: [DONE]``. ``secrets`` are scrubbed from any event text an error
    quotes.
    """

    def __init__(self, *, secrets: Iterable[str] = ()) -> None:
        self._parse = StreamParse()
        self._parse.keep_chunks()
        self._secrets = tuple(secrets)

    @property
    def done(self) -> bool:
        """Whether ``data: [DONE]`` arrived: the stream ended whole rather than being cut off."""
        return self._parse.done

    def feed(self, data: bytes) -> list[ChatChunk]:
        """The chunks these bytes complete (any split of the stream gives the same chunks);
        raises the stream's typed error as soon as an event is malformed or reports one."""
        self._parse.feed(data)
        return self._read()

    def close(self) -> list[ChatChunk]:
        """The bytes ended: the chunks still pending; raises ``RemoteProtocolError`` if
        ``[DONE]`` never came, so a truncated answer is never taken for a whole one."""
        self._parse.close()
        return self._read()

    def _read(self) -> list[ChatChunk]:
        chunks = self._parse.take()
        error = self._parse.error(self._secrets)
        if error is not None:
            raise error
        return chunks


@attrs.define(eq=False, repr=False)
class ChatAccumulator:
    """Folds stream chunks into the ``ChatCompletion`` a non-streamed call would have given
    (mutable, so equal only to itself)."""

    id: str = ""
    model: str = ""
    usage: Usage | None = None
    _texts: dict[int, list[str]] = attrs.field(factory=dict)
    _finish: dict[int, str | None] = attrs.field(factory=dict)
    _roles: dict[int, str] = attrs.field(factory=dict)

    def add(self, chunk: ChatChunk) -> None:
        self.id = self.id or chunk.id
        self.model = self.model or chunk.model
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            self._texts.setdefault(choice.index, [])
            if choice.delta.content:
                self._texts[choice.index].append(choice.delta.content)
            if choice.delta.role:
                self._roles[choice.index] = choice.delta.role
            if choice.finish_reason is not None:
                self._finish[choice.index] = choice.finish_reason

    def result(self) -> ChatCompletion:
        choices = tuple(
            Choice(
                index=i,
                message=Message(self._roles.get(i, "assistant"), "".join(self._texts[i])),
                finish_reason=self._finish.get(i),
            )
            for i in sorted(self._texts)
        )
        raw: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "model": self.model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": c.message.role, "content": c.message.content},
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
        }
        if self.usage is not None:
            raw["usage"] = self.usage.wire()
        return ChatCompletion(self.id, self.model, choices, self.usage, raw)
