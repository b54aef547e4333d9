"""Pure response classification and header parsing, over generated inputs."""

from __future__ import annotations

import email.utils
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core import _errors as errors
from corral.core._classify import (
    classify,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
    parse_should_retry,
    scrub,
)
from corral.core._headers import Headers
from corral.testing.emulator import format_duration
from tests.support import CANARY_KEY


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5", 0.5),
        ("1s", 1.0),
        ("", None),
        ("-1", None),
        ("abc", None),
        ("5x", None),
        ("nan", None),
        ("1m 2s", None),
    ],
)
def test_parse_duration_examples(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


@given(st.integers(0, 100), st.integers(0, 59), st.integers(0, 999))
def test_parse_duration_of_generated_reset_values(m: int, s: int, ms: int) -> None:
    text = (f"{m}m" if m else "") + f"{s}.{ms:03d}s"
    assert parse_duration(text) == pytest.approx(m * 60 + s + ms / 1000)


@given(st.floats(0, 10_000, allow_nan=False))
def test_emulator_reset_format_round_trips(seconds: float) -> None:
    parsed = parse_duration(format_duration(seconds))
    assert parsed is not None
    assert parsed == pytest.approx(seconds, rel=0.01, abs=0.001)


@given(st.text(max_size=30))
def test_parse_duration_is_total(text: str) -> None:
    value = parse_duration(text)
    assert value is None or value >= 0


@given(st.integers(0, 86_400))
def test_retry_after_seconds_and_http_date(delta: int) -> None:
    assert parse_retry_after(Headers({"retry-after": str(delta)})) == delta
    now = 1_700_000_000
    headers = Headers(
        {
            "retry-after": email.utils.formatdate(now + delta, usegmt=True),
            "date": email.utils.formatdate(now, usegmt=True),
        }
    )
    assert parse_retry_after(headers) == pytest.approx(delta)
    no_date = Headers({"retry-after": email.utils.formatdate(now + delta, usegmt=True)})
    assert parse_retry_after(no_date) is None
    assert parse_retry_after(no_date, now_wall=now) == pytest.approx(delta)


@given(st.integers(0, 10**7))
def test_retry_after_ms_wins(ms: int) -> None:
    headers = Headers({"retry-after-ms": str(ms), "retry-after": "999"})
    assert parse_retry_after(headers) == pytest.approx(ms / 1000)


@given(st.text(max_size=40), st.text(max_size=40))
def test_retry_after_is_total(a: str, b: str) -> None:
    value = parse_retry_after(Headers({"retry-after": a, "retry-after-ms": b}))
    assert value is None or value >= 0


def test_rate_limit_headers_and_should_retry() -> None:
    parsed = parse_rate_limit_headers(
        Headers(
            {
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "499",
                "x-ratelimit-remaining-tokens": "x",
                "x-ratelimit-reset-tokens": "6m0s",
            }
        )
    )
    assert parsed.limit_requests == 500 and parsed.remaining_requests == 499
    assert parsed.remaining_tokens is None and parsed.reset_tokens == 360.0
    assert parse_should_retry(Headers({"x-should-retry": "False"})) is False
    assert parse_should_retry(Headers({"x-should-retry": "maybe"})) is None


def error_body(message: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "x", "code": code}}).encode()


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, errors.BadRequestError),
        (401, errors.AuthenticationError),
        (403, errors.AuthenticationError),
        (404, errors.NotFoundError),
        (408, errors.RequestTimeoutError),
        (409, errors.ConflictError),
        (429, errors.RateLimitError),
        (500, errors.ServerError),
        (503, errors.ServerError),
        (418, errors.APIError),
    ],
)
def test_classify_by_status(status: int, kind: type[errors.APIError]) -> None:
    error = classify(status, Headers({"x-request-id": "req_1"}), error_body("boom"))
    assert type(error) is kind
    assert error.status == status and error.request_id == "req_1" and error.message == "boom"


def test_classify_context_length_with_numbers() -> None:
    body = error_body(
        "This model's maximum context length is 8192 tokens. However, your messages resulted "
        "in 9000 tokens. Please reduce the length of the messages.",
        "context_length_exceeded",
    )
    error = classify(400, Headers(), body)
    assert isinstance(error, errors.ContextLengthExceeded)
    assert (error.max_context, error.requested) == (8192, 9000)
    assert not error.retryable


def test_classify_rate_limited_carries_retry_after() -> None:
    error = classify(429, Headers({"retry-after-ms": "1500"}), b"not json")
    assert isinstance(error, errors.RateLimitError) and error.retry_after == 1.5
    assert error.retryable


@given(
    st.integers(100, 599),
    st.dictionaries(st.text(max_size=10), st.text(max_size=20)),
    st.binary(max_size=200),
)
def test_classify_is_total(status: int, headers: dict[str, str], body: bytes) -> None:
    error = classify(status, Headers(headers), body)
    assert (error is None) == (status < 400)
    if error is not None:
        assert error.status == status and isinstance(str(error), str)


@given(
    st.integers(400, 599),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=10,
    ),
)
def test_classify_survives_any_json_shape(status: int, value: object) -> None:
    body = json.dumps({"error": value}).encode()
    assert isinstance(classify(status, Headers(), body), errors.APIError)


NGINX_404 = (
    b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
URL = "http://127.0.0.1:8080/v1/chat/completions"


@pytest.mark.parametrize(
    ("status", "content_type", "body", "kind", "shown"),
    [
        (500, "text/plain", b"Internal Server Error", errors.ServerError, "Internal Server Error"),
        (404, "text/html", NGINX_404, errors.NotFoundError, "404 Not Found 404 Not Found nginx"),
        (502, "text/html; charset=utf-8", b"<h1>Bad Gateway</h1>", errors.ServerError, "Bad"),
        (401, "text/plain", b"Unauthorized", errors.AuthenticationError, "Unauthorized"),
        (429, "", b"slow\tdown", errors.RateLimitError, "unlabelled body: slow down"),
        (403, "text/html", b"<p>Forbidden &amp; logged</p>", errors.AuthenticationError, "& l"),
        (400, "application/json", b'{"object": "error"}', errors.BadRequestError, "object"),
    ],
)
def test_non_json_error_bodies_are_classified_by_status_and_keep_their_text(
    status: int, content_type: str, body: bytes, kind: type[errors.APIError], shown: str
) -> None:
    error = classify(status, Headers({"content-type": content_type}), body, url=URL)
    assert type(error) is kind
    assert shown in error.message
    assert "<" not in error.message and "with no error message" not in error.message


def test_not_found_names_the_url_without_its_query() -> None:
    error = classify(404, Headers({"content-type": "text/html"}), NGINX_404, url=URL + "?k=v")
    assert isinstance(error, errors.NotFoundError)
    assert URL in str(error) and "k=v" not in str(error)
    json_404 = classify(404, Headers(), error_body("The model `m` does not exist"), url=URL)
    assert json_404 is not None and URL in json_404.message


def test_error_text_is_bounded_and_one_line() -> None:
    body = b"Internal\r\nServer\x1b[31m Error " + b"x" * 100_000
    error = classify(500, Headers({"content-type": "text/plain"}), body)
    assert error is not None
    assert error.message.startswith("text/plain body: Internal Server")
    assert len(error.message) < 300 and "\n" not in error.message and "\x1b" not in error.message


def test_empty_error_body_says_so() -> None:
    error = classify(503, Headers(), b"")
    assert error is not None and "empty body" in error.message


def test_vllm_style_top_level_message() -> None:
    body = json.dumps({"object": "error", "message": "bad temperature", "code": 400}).encode()
    error = classify(400, Headers(), body)
    assert error is not None and error.message == "bad temperature"


def key_pieces(text: str) -> list[str]:
    return [
        CANARY_KEY[i : i + 8] for i in range(len(CANARY_KEY) - 7) if CANARY_KEY[i : i + 8] in text
    ]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", error_body(f"Invalid key Bearer {CANARY_KEY}", code=CANARY_KEY)),
        ("application/json", json.dumps({"detail": f"bad auth: {CANARY_KEY[:20]}..."}).encode()),
        ("text/plain", f"Authorization: Bearer {CANARY_KEY}\r\n".encode()),
        ("text/html", f"<pre>authorization={CANARY_KEY}</pre>".encode()),
        ("text/plain", b"x" * 4090 + f"Bearer {CANARY_KEY}".encode()),
        # the key across the end of the window read (4 KiB), tags stripped before it
        *[("text/html", b"<a>" * n + CANARY_KEY.encode()) for n in range(1355, 1366)],
    ],
)
def test_the_key_never_reaches_an_error(content_type: str, body: bytes) -> None:
    headers = Headers({"content-type": content_type, "x-request-id": f"echo {CANARY_KEY}"})
    error = classify(401, headers, body, secrets=(CANARY_KEY,), url=URL)
    assert isinstance(error, errors.AuthenticationError)
    for text in (str(error), repr(error), repr(error.args), error.message, error.request_id):
        assert key_pieces(text or "") == [], text
    assert error.code is None or key_pieces(error.code) == []


def test_scrub_masks_the_key_and_any_long_piece_of_it() -> None:
    text = f"Bearer {CANARY_KEY}; prefix {CANARY_KEY[:12]}**** suffix ***{CANARY_KEY[-9:]}."
    clean = scrub(text, (CANARY_KEY,))
    assert key_pieces(clean) == []
    assert clean.startswith("Bearer [redacted]; prefix [redacted]**** suffix ***[redacted].")
    assert scrub("nothing here", (CANARY_KEY,)) == "nothing here"
    assert scrub("short abc key", ("abc", "")) == "short [redacted] key"


key_alphabet = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


@given(
    key=st.text(key_alphabet, min_size=8, max_size=60),
    parts=st.lists(st.text(max_size=30) | st.tuples(st.integers(0, 60), st.integers(0, 60))),
)
def test_scrub_leaves_no_eight_character_piece(
    key: str, parts: list[str | tuple[int, int]]
) -> None:
    text = "".join(p if isinstance(p, str) else key[p[0] : p[1]] for p in parts)
    clean = scrub(text, (key,))
    assert all(key[i : i + 8] not in clean for i in range(len(key) - 7))


def test_a_huge_provider_message_is_cut_after_the_scrub() -> None:
    for pad in range(3970, 4000, 3):  # the key across the 4000-character cut
        body = error_body("m" * pad + CANARY_KEY + "tail" * 1000)
        error = classify(500, Headers(), body, secrets=(CANARY_KEY,))
        assert error is not None and len(error.message) < 4100
        assert key_pieces(error.message) == [] and error.message[pad] == "["
