"""Pure response classification and header parsing, over generated inputs."""

from __future__ import annotations

import email.utils
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core import errors
from corral.core.classify import (
    classify,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
    parse_should_retry,
)
from corral.core.headers import Headers
from corral.testing.emulator import format_duration


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
        (429, errors.RateLimited),
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
    assert isinstance(error, errors.RateLimited) and error.retry_after == 1.5
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
