"""Pure functions that read what a response means: its error, its retry hints, its quota.

Nothing here reads a clock. An HTTP-date ``Retry-After`` is measured against the response's own
``Date`` header (the server's clock), or against ``now_wall`` when the caller passes one.

Provider text enters corral's errors here and nowhere else, so this is where it is made safe:
``classify`` runs every string it takes from a response (message, code, type, request id, a
non-JSON body's first characters) through ``scrub`` with the credentials the caller sent. A
relay that echoes ``Authorization`` back cannot put the key into an error, a log line or an
output record built from one.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from corral.core._errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ContextLengthExceeded,
    NotFoundError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
)
from corral.core._headers import Headers
from corral.core._lazy import lazy_exports

if TYPE_CHECKING:
    from corral.core._quota import RateLimitHeaders, parse_rate_limit_headers

__all__ = [
    "RateLimitHeaders",
    "classify",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "parse_should_retry",
    "scrub",
    "snippet",
]

#: Any run of this many characters of a secret is masked (a piece that long identifies a key).
SECRET_PIECE = 8
REDACTED = "[redacted]"
#: Bytes of a non-JSON error body read for its message, and characters of it kept.
_BODY_WINDOW = 4096
_SNIPPET = 200
#: Characters of a provider's own message kept (they are short; a hostile one is not).
_MESSAGE = 4000
#: The patterns, compiled on first use (``_compiled``): only an error or a quota header reads
#: them, and compiling the four costs ~0.5 ms (issue 15: import time).
_TAG = r"<[^<>]*>"  # [^<>]: each "<" scans only to the next bracket (linear)
_CONTROL = r"[\x00-\x20\x7f-\x9f]+"  # line breaks, escapes, runs of white space
_DURATION_PART = r"(\d+(?:\.\d+)?)(ms|h|m|s)"
_CONTEXT_NUMBERS = (
    r"(?is)maximum context length is (\d+) tokens.*?(?:resulted in|requested|you requested) (\d+)"
)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI-style reset value: ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``, ``"0.5"``.

    Returns None for anything else (negative, empty, garbage, non-finite).
    """
    text = text.strip()
    if not text:
        return None
    try:
        plain = float(text)
    except ValueError:
        pass
    else:
        return plain if math.isfinite(plain) and plain >= 0 else None
    total, pos = 0.0, 0
    for match in _compiled(_DURATION_PART).finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and math.isfinite(total) else None


def _http_date(value: str) -> float | None:
    import email.utils  # ~13 ms to import, for the rare Retry-After given as a date (issue 15)

    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def parse_retry_after(headers: Headers, now_wall: float | None = None) -> float | None:
    """Seconds to wait according to ``retry-after-ms`` or ``Retry-After``, or None.

    ``Retry-After`` may be delta-seconds or an HTTP-date (RFC 9110 §10.2.3); a date is measured
    against the response's ``Date`` header, else ``now_wall`` (Unix seconds), else ignored.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        value = parse_duration(ms)
        if value is not None:
            return value / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = parse_duration(raw)
    if seconds is not None:
        return seconds
    when = _http_date(raw)
    if when is None:
        return None
    date_header = headers.get("date")
    reference = _http_date(date_header) if date_header else None
    if reference is None:
        reference = now_wall
    if reference is None:
        return None
    return max(0.0, when - reference)


def parse_should_retry(headers: Headers) -> bool | None:
    """The server's explicit ``x-should-retry: true|false`` verdict, if it gave one."""
    value = headers.get("x-should-retry")
    if value is None:
        return None
    value = value.strip().lower()
    return True if value == "true" else False if value == "false" else None


@functools.lru_cache(maxsize=16)
def _piece_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """Finds where a secret, or an ``SECRET_PIECE``-long piece of one, starts (lookahead: the
    matches may overlap, so a run of pieces is found whole)."""
    pieces = {
        s[i : i + SECRET_PIECE] for s in secrets for i in range(len(s) - SECRET_PIECE + 1)
    } | {s for s in secrets if 0 < len(s) < SECRET_PIECE}
    if not pieces:
        return None
    alternatives = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
    return re.compile(f"(?=({alternatives}))")


@functools.lru_cache(maxsize=16)
def _screen(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """Strings one of which any masked run contains: each secret cut into ``SECRET_PIECE // 2``
    long chunks (any ``SECRET_PIECE`` characters of it hold a whole chunk), short ones whole.
    A few ``in`` tests pass over clean text far faster than the pattern (a batch scrubs every
    response body)."""
    half = SECRET_PIECE // 2
    return tuple(
        {
            s[i : i + half]
            for s in secrets
            if len(s) >= SECRET_PIECE
            for i in range(0, len(s) - half + 1, half)
        }
        | {s for s in secrets if 0 < len(s) < SECRET_PIECE}
    )


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and every run of ``SECRET_PIECE`` or more characters of one,
    replaced by ``[redacted]`` (so ``Bearer <key>`` becomes ``Bearer [redacted]``, and a key a
    server half-masks loses what it showed of it). Secrets shorter than that are masked whole.
    """
    key = secrets if type(secrets) is tuple else tuple(sorted(set(secrets)))
    if not text:
        return text
    for chunk in _screen(key):  # a loop, not any(): this runs on every response a batch keeps
        if chunk in text:
            break
    else:
        return text
    pattern = _piece_pattern(key)
    if pattern is None:
        return text
    out: list[str] = []
    kept = end = 0  # text[kept:start] is clean; [start, end) is being masked
    start = -1
    for match in pattern.finditer(text):
        begin, stop = match.start(), match.start() + len(match.group(1))
        if start >= 0 and begin <= end:
            end = max(end, stop)
            continue
        if start >= 0:
            out += (text[kept:start], REDACTED)
            kept = end
        start, end = begin, stop
    if start < 0:
        return text
    out += (text[kept:start], REDACTED, text[end:])
    return "".join(out)


def _bounded(text: str, secrets: tuple[str, ...]) -> str:
    """A provider message, scrubbed and cut to ``_MESSAGE`` characters (scrubbed before the
    cut, so the cut cannot leave the start of a key behind)."""
    if len(text) <= _MESSAGE:
        return scrub(text, secrets)
    longest = max(map(len, secrets), default=0)
    return scrub(text[: _MESSAGE + longest], secrets)[:_MESSAGE] + "..."


def snippet(
    raw: bytes, secrets: Iterable[str], limit: int = _SNIPPET, *, markup: bool = False
) -> str:
    """The first characters of provider bytes, safe to quote in an error: scrubbed of
    ``secrets``, on one line (no line breaks or terminal escapes), at most ``limit`` characters.

    ``markup``: read it as HTML (tags dropped, entities decoded), as a proxy's error page.
    """
    keys = tuple(s for s in secrets if s)
    text = raw[:_BODY_WINDOW].decode("utf-8", "replace")
    if len(raw) > _BODY_WINDOW:
        # A secret cut by the window's end would escape the scrub: drop what could be one.
        text = text[: -max(map(len, keys), default=0) or None]
    if markup:
        import html  # for a proxy's HTML error page only

        text = html.unescape(_compiled(_TAG).sub(" ", text))
    text = scrub(_compiled(_CONTROL).sub(" ", text).strip(), keys)
    return text if len(text) <= limit else text[:limit] + "..."


def _body_text(headers: Headers, body: bytes, secrets: tuple[str, ...]) -> str:
    """A body that is not an OpenAI error, as a message: ``text/html body: 404 Not Found``."""
    if not body:
        return "empty body"
    media = (headers.get("content-type") or "").partition(";")[0].strip().lower()
    markup = "html" in media or body[:_BODY_WINDOW].lstrip()[:1] == b"<"
    text = snippet(body, secrets, markup=markup)
    return f"{media or 'unlabelled'} body: {text}" if text else "blank body"


def _error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(message, code, type) from an OpenAI-style ``{"error": {...}}`` body, best effort."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None, None
    err = data.get("error") if isinstance(data, Mapping) else None
    if isinstance(err, str):
        return err, None, None
    if not isinstance(err, Mapping):
        # FastAPI says {"detail": ...}; vLLM and some proxies {"object": "error", "message": ...}
        for field in ("detail", "message"):
            text = data.get(field) if isinstance(data, Mapping) else None
            if isinstance(text, str):
                return text, None, None
        return None, None, None
    message, code, kind = err.get("message"), err.get("code"), err.get("type")
    return (
        message if isinstance(message, str) else None,
        str(code) if isinstance(code, (str, int)) and not isinstance(code, bool) else None,
        kind if isinstance(kind, str) else None,
    )


def _context_numbers(message: str) -> tuple[int | None, int | None]:
    match = _compiled(_CONTEXT_NUMBERS).search(message)
    if match is None:
        return None, None
    return int(match.group(1)), int(match.group(2))


def _scrubbed(value: str | None, secrets: tuple[str, ...]) -> str | None:
    return None if value is None else scrub(value, secrets)


def classify(
    status: int,
    headers: Headers,
    body: bytes,
    *,
    now_wall: float | None = None,
    secrets: Iterable[str] = (),
    url: str | None = None,
) -> APIError | None:
    """The error a response stands for, or None for a success (1xx-3xx).

    The status decides the class, whatever the body is (JSON, text, an HTML page, nothing).
    The message is the provider's own when its body says one, else the body's first characters.

    Args:
        secrets: credentials the request carried (the API key); no piece of one reaches the
            error, whatever the server echoes.
        url: the request's URL, named (without its query) in a ``NotFoundError``.

    Total over its inputs: any status, any headers, any bytes give an ``APIError`` or None.
    """
    if status < 400:
        return None
    keys = tuple(s for s in secrets if s)
    message, code, error_type = _error_fields(body)
    text = _bounded(message, keys) if message else _body_text(headers, body, keys)
    common: dict[str, Any] = {
        "status": status,
        "request_id": _scrubbed(headers.get("x-request-id") or headers.get("request-id"), keys),
        "code": _scrubbed(code, keys),
        "error_type": _scrubbed(error_type, keys),
        # The retry hints, read here once for every layer that decides on this error.
        "retry_after": parse_retry_after(headers, now_wall),
        "should_retry": parse_should_retry(headers),
    }
    if status == 429:
        return RateLimitError(text, **common)
    if status in (401, 403):
        return AuthenticationError(text, **common)
    if status == 404:
        where = f" (url: {scrub(url.partition('?')[0], keys)})" if url else ""
        return NotFoundError(text + where, **common)
    if status == 408:
        return RequestTimeoutError(text, **common)
    if status == 409:
        return ConflictError(text, **common)
    if status >= 500:
        return ServerError(text, **common)
    lowered = text.lower()
    if code == "context_length_exceeded" or "maximum context length" in lowered:
        max_context, requested = _context_numbers(text)
        common["code"] = code or "context_length_exceeded"
        return ContextLengthExceeded(text, max_context=max_context, requested=requested, **common)
    if status in (400, 413, 422):
        return BadRequestError(text, **common)
    return APIError(text, **common)


__getattr__, __dir__ = lazy_exports(
    __name__, dict.fromkeys(["RateLimitHeaders", "parse_rate_limit_headers"], "corral.core._quota")
)
