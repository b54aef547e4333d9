"""The OpenAI-compatible wire format: build ``Request``s, decode ``Response``s into typed results.

Request bodies pass through untouched (tools, response_format, stream_options, anything a
provider adds); only what corral itself needs is read from them. Decoding keeps the raw JSON
next to the typed fields so nothing the provider sent is lost.

The stream side (``ChatChunk``, ``StreamParse``, ``shared_parse``...) lives in ``_streaming``
and is re-exported from here: it loads with the first use of one of its names, so a program
that never streams never loads it or the SSE parser (issue 15).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs

from corral.core import _jsonlib as jsonlib
from corral.core._classify import classify, snippet
from corral.core._errors import MalformedResponse
from corral.core._headers import Headers
from corral.core._lazy import lazy_exports
from corral.core._models import Request, RequestOptions, Response

if TYPE_CHECKING:
    from corral.core._streaming import (
        ChatAccumulator,
        ChatChunk,
        ChatStreamDecoder,
        ChunkChoice,
        Delta,
        ParsedStream,
        StreamParse,
        UsageWatcher,
        parse_chunk,
        shared_parse,
    )

__all__ = [
    "ChatAccumulator",
    "ChatChunk",
    "ChatCompletion",
    "ChatStreamDecoder",
    "Choice",
    "ChunkChoice",
    "Delta",
    "Embeddings",
    "Message",
    "ParsedStream",
    "StreamParse",
    "Usage",
    "UsageWatcher",
    "api_request",
    "decode_chat",
    "decode_embeddings",
    "decode_json",
    "decode_models",
    "parse_chat",
    "parse_chunk",
    "raise_for_status",
    "response_usage",
    "shared_parse",
]


_UNSET: Any = object()


def _join(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + "/" + path.lstrip("/")


@functools.lru_cache(maxsize=64)
def _prepared(
    base_url: str,
    path: str,
    api_key: str | None,
    extra: tuple[tuple[str, str], ...],
    get: bool,
    stream: bool,
) -> tuple[str, Headers]:
    """The URL and header fields of one kind of request, built once: a client sends the same
    ones on every call, and a shared ``Headers`` checks its wire form once (``Headers.raw``)."""
    headers: list[tuple[str, str]] = [
        ("accept", "text/event-stream" if stream else "application/json")
    ]
    if api_key:
        headers.append(("authorization", f"Bearer {api_key}"))
    if not get:
        headers.append(("content-type", "application/json"))
    headers.extend(extra)
    return _join(base_url, path), Headers(headers)


def api_request(
    base_url: str,
    path: str,
    body: Mapping[str, Any] | None,
    *,
    api_key: str | None,
    extra_headers: Mapping[str, str] | None = None,
    options: RequestOptions | None = None,
) -> Request:
    """A POST (or GET when ``body`` is None) to ``base_url + path`` with JSON and Bearer auth."""
    opts = options or RequestOptions()
    stream = False
    if body is not None:
        stream = bool(body.get("stream"))
        model = body.get("model")
        model = model if isinstance(model, str) else None
        if (stream and not opts.stream) or (model and not opts.model):  # else as it is
            opts = attrs.evolve(opts, stream=stream or opts.stream, model=opts.model or model)
    extra = tuple(extra_headers.items()) if extra_headers else ()
    try:
        url, headers = _prepared(base_url, path, api_key, extra, body is None, stream)
    except TypeError:  # an unhashable header value: built for this call alone
        url, headers = _prepared.__wrapped__(base_url, path, api_key, extra, body is None, stream)
    return Request(
        "GET" if body is None else "POST",
        url,
        headers,
        b"" if body is None else jsonlib.dumps(body),
        opts,
    )


def raise_for_status(
    response: Response, *, secrets: Iterable[str] = (), url: str | None = None
) -> None:
    """Raise the typed error a buffered error response stands for (``classify`` says how
    ``secrets`` and ``url`` are used)."""
    error = classify(response.status, response.headers, response.body, secrets=secrets, url=url)
    if error is not None:
        raise error


def decode_json(response: Response, *, secrets: Iterable[str] = ()) -> Mapping[str, Any]:
    """The JSON object of a buffered success; errors and bad bodies raise typed errors.

    ``secrets``: the request's credentials, scrubbed from any body text an error quotes.
    """
    raise_for_status(response, secrets=secrets)
    try:
        data = response.json()
    except jsonlib.JSONDecodeError as exc:
        preview = snippet(response.body, secrets, 80)
        raise MalformedResponse(
            f"HTTP {response.status} body is not JSON ({exc.__class__.__name__}): {preview}",
            status=response.status,
        ) from None
    if type(data) is not dict and not isinstance(data, Mapping):
        raise MalformedResponse(
            f"HTTP {response.status} body is JSON {type(data).__name__}, expected an object",
            status=response.status,
        )
    return data


class Usage(NamedTuple):
    """Token counts of one call. A NamedTuple: built on every response, so it must be cheap."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    #: Prompt tokens served from the provider's prompt cache (``prompt_tokens_details``); part
    #: of ``prompt_tokens``, often priced lower.
    cached_tokens: int = 0
    #: Hidden reasoning tokens (``completion_tokens_details``); part of ``completion_tokens``.
    reasoning_tokens: int = 0

    @classmethod
    def parse(cls, raw: Any) -> Usage | None:
        """The usage object of a response body, or None when it is missing or not an object:
        providers omit it, and a stream states it only in its last chunk."""
        if type(raw) is not dict and not isinstance(raw, Mapping):  # dict first: ABC checks cost
            return None
        # ``type(x) is int`` rather than isinstance: a bool is not a count (and this is hot).
        prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
        total = raw.get("total_tokens")
        prompt = prompt if type(prompt) is int else 0
        completion = completion if type(completion) is int else 0
        total = total if type(total) is int else prompt + completion
        cached = _detail(raw.get("prompt_tokens_details"), "cached_tokens")
        reasoning = _detail(raw.get("completion_tokens_details"), "reasoning_tokens")
        return cls(prompt, completion, total, cached, reasoning)

    def wire(self) -> dict[str, Any]:
        """The usage object as the API writes it (details only when they are not zero)."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


def _detail(raw: Any, name: str) -> int:
    """One count from a ``*_tokens_details`` object (0 when absent: most answers omit it)."""
    if raw is None or type(raw) is not dict:
        return 0
    value = raw.get(name)
    return value if type(value) is int and value > 0 else 0


def response_usage(response: Response) -> Usage | None:
    """The ``usage`` of a buffered JSON response (parsed once, shared by every layer)."""
    if response.stream is not None or b'"usage"' not in response.body:
        return None
    cache = response._parsed
    if "usage" not in cache:
        try:
            data = response.json()
        except jsonlib.JSONDecodeError:
            data = None
        cache["usage"] = Usage.parse(data.get("usage")) if type(data) is dict else None
    usage: Usage | None = cache["usage"]
    return usage


@attrs.frozen
class Message:
    role: str
    content: str | None
    tool_calls: tuple[Mapping[str, Any], ...] = ()


@attrs.frozen
class Choice:
    index: int
    message: Message
    finish_reason: str | None


@attrs.frozen
class ChatCompletion:
    """A decoded chat completion: its choices and usage, and the raw body for fields corral does
    not model."""

    id: str
    model: str
    choices: tuple[Choice, ...]
    usage: Usage | None
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)

    @property
    def text(self) -> str:
        """The first choice's content, or "" when it has none (a tool call, say)."""
        return (self.choices[0].message.content or "") if self.choices else ""


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _items(value: Any) -> tuple[Mapping[str, Any], ...]:
    return tuple(value) if isinstance(value, list) else ()


def _index(choice: Mapping[str, Any], position: int) -> int:
    index = choice.get("index")
    return index if isinstance(index, int) else position


def _field_error(what: str, field: str) -> MalformedResponse:
    return MalformedResponse(f"{what}: field {field!r} is missing or has the wrong type")


def _choices(raw: Any, what: str) -> list[Mapping[str, Any]]:
    if type(raw) is list:  # decoded JSON: no ABC checks (and a loop, not a generator: hot)
        for c in raw:
            if type(c) is not dict:
                break
        else:
            return raw
    if not isinstance(raw, list) or not all(isinstance(c, Mapping) for c in raw):
        raise _field_error(what, "choices")
    return raw


def parse_chat(data: Mapping[str, Any], usage: Usage | None = _UNSET) -> ChatCompletion:
    """A ``ChatCompletion`` from a decoded body; ``usage``: its ``usage`` already parsed (by
    ``response_usage``, for Metrics), so it is not parsed twice."""
    choices = []
    for i, raw in enumerate(_choices(data.get("choices"), "chat completion")):
        msg = raw.get("message")
        if type(msg) is not dict and not isinstance(msg, Mapping):  # dict first: ABC checks cost
            raise _field_error("chat completion", f"choices[{i}].message")
        content, role, calls = msg.get("content"), msg.get("role"), msg.get("tool_calls")
        index, finish = raw.get("index"), raw.get("finish_reason")
        choices.append(
            Choice(
                index if type(index) is int else _index(raw, i),
                Message(
                    role if type(role) is str else _str(role, "assistant"),
                    content if type(content) is str else _opt_str(content),
                    () if calls is None else _items(calls),
                ),
                finish if type(finish) is str else _opt_str(finish),
            )
        )
    if usage is _UNSET:
        raw_usage = data.get("usage")
        usage = None if raw_usage is None else Usage.parse(raw_usage)
    id_, model = data.get("id"), data.get("model")
    return ChatCompletion(
        id_ if type(id_) is str else _str(id_),
        model if type(model) is str else _str(model),
        tuple(choices),
        usage,
        data,
    )


def decode_chat(response: Response, *, secrets: Iterable[str] = ()) -> ChatCompletion:
    """A chat completion from a response; an error status raises its typed ``APIError``, a body
    that does not decode raises ``MalformedResponse`` (``secrets`` are scrubbed from both)."""
    data = decode_json(response, secrets=secrets)
    return parse_chat(data, response._parsed.get("usage", _UNSET))


@attrs.frozen
class Embeddings:
    """Decoded embeddings: one vector per input, in input order, and the usage."""

    vectors: tuple[tuple[float, ...], ...]
    model: str
    usage: Usage | None


def decode_embeddings(response: Response, *, secrets: Iterable[str] = ()) -> Embeddings:
    """Embeddings from a response; an error status raises its typed ``APIError`` and a vector
    that is not a list of numbers raises ``MalformedResponse``."""
    data = decode_json(response, secrets=secrets)
    items = data.get("data")
    if not isinstance(items, list):
        raise _field_error("embeddings", "data")
    vectors = []
    for i, item in enumerate(items):
        vec = item.get("embedding") if isinstance(item, Mapping) else None
        if not isinstance(vec, list) or not all(isinstance(x, (int, float)) for x in vec):
            raise _field_error("embeddings", f"data[{i}].embedding")
        vectors.append(tuple(float(x) for x in vec))
    return Embeddings(tuple(vectors), _str(data.get("model")), Usage.parse(data.get("usage")))


def decode_models(response: Response, *, secrets: Iterable[str] = ()) -> list[str]:
    """The model ids a ``/models`` response lists, to check a model name before a run."""
    data = decode_json(response, secrets=secrets)
    items = data.get("data")
    if not isinstance(items, list):
        raise _field_error("models", "data")
    return [item["id"] for item in items if isinstance(item, Mapping) and "id" in item]


__getattr__, __dir__ = lazy_exports(
    __name__,
    dict.fromkeys(
        [
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
        ],
        "corral.core._streaming",
    ),
)
