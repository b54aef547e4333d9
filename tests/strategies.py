"""Hypothesis strategies shared by the test modules (a support module, not a test module).

Add to it; do not change what is here without checking who uses it.
"""

from __future__ import annotations

from hypothesis import strategies as st

from corral.core import _errors as errors

#: Seconds between two events on a policy's clock.
steps = st.floats(0, 30, allow_nan=False)

#: What a server may put in Retry-After once parsed: nothing, any float (hostile ones too).
retry_after_values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))


def rate_limited(
    retry_after: st.SearchStrategy[float | None] = retry_after_values,
) -> st.SearchStrategy[errors.RateLimitError]:
    """A classified 429."""
    return st.builds(
        lambda seconds: errors.RateLimitError("slow down", retry_after=seconds), retry_after
    )


#: Classified outcomes of an attempt: None (success), what a response classifies as, and the
#: exceptions an attempt may raise below a layer.
outcomes: st.SearchStrategy[errors.CorralError | None] = st.one_of(
    st.none(),
    rate_limited(),
    st.sampled_from(
        [
            errors.ServerError("x", status=500),
            errors.ServerError("x", status=502),
            errors.ServerError("x", status=503),
            errors.BadRequestError("x", status=400),
            errors.AuthenticationError("x", status=401),
            errors.NotFoundError("x", status=404),
            errors.ConflictError("x", status=409),
            errors.RequestTimeoutError("x", status=408),
            errors.ContextLengthExceeded("x"),
            errors.ConnectError("refused"),
            errors.ReadTimeout("slow"),
            errors.PoolTimeout("busy"),
            errors.ReadError("reset"),
            errors.MalformedResponse("garbled"),
            errors.DeadlineExceeded("late"),
            errors.RequestTooLarge("big"),
        ]
    ),
)


# -- retry, cache and truncation (issue 13: the call context's layers) ---------------------------

#: A jitter draw: the fraction of the backoff ceiling a retry waits.
jitters = st.floats(0, 1)

#: Failed attempts as Retry sees them: classified responses (with the server's hints) and the
#: exceptions an attempt raises.
retry_hints = st.one_of(st.none(), st.floats(0, 200, allow_nan=False))
should_retry = st.one_of(st.none(), st.booleans())


def api_errors(
    retry_after: st.SearchStrategy[float | None] = retry_hints,
) -> st.SearchStrategy[errors.APIError]:
    """A classified error response of any status, with or without the server's hints."""
    statuses = st.sampled_from([400, 401, 403, 404, 408, 409, 418, 429, 500, 502, 503])

    def build(status: int, seconds: float | None, verdict: bool | None) -> errors.APIError:
        from corral.core._classify import classify
        from corral.core._headers import Headers

        headers = {} if seconds is None else {"retry-after": repr(seconds)}
        if verdict is not None:
            headers["x-should-retry"] = str(verdict).lower()
        error = classify(status, Headers(headers), b'{"error": {"message": "x"}}')
        assert error is not None
        return error

    return st.builds(build, statuses, retry_after, should_retry)


#: Chat messages: roles and short texts in several scripts (token counts differ by script).
message_words = st.lists(
    st.sampled_from(["alpha", "beta", "gamma", "สวัสดี", "数据", "x" * 30]), max_size=60
)


def _message(role: str, words: list[str]) -> dict[str, str]:
    return {"role": role, "content": " ".join(words)}


chat_messages: st.SearchStrategy[list[dict[str, str]]] = st.lists(
    st.builds(
        _message,
        st.sampled_from(["user", "assistant", "system"]),
        message_words,
    ),
    min_size=1,
    max_size=12,
)
