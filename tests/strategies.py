"""Hypothesis strategies shared by the test modules (a support module, not a test module).

Add to it; do not change what is here without checking who uses it.
"""

from __future__ import annotations

from hypothesis import strategies as st

from corral.core import errors

#: Seconds between two events on a policy's clock.
steps = st.floats(0, 30, allow_nan=False)

#: What a server may put in Retry-After once parsed: nothing, any float (hostile ones too).
retry_after_values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))


def rate_limited(
    retry_after: st.SearchStrategy[float | None] = retry_after_values,
) -> st.SearchStrategy[errors.RateLimited]:
    """A classified 429."""
    return st.builds(
        lambda seconds: errors.RateLimited("slow down", retry_after=seconds), retry_after
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
