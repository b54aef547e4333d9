"""What ``x-ratelimit-*`` headers say about the remaining quota: only a rate limiter reads them,
so this loads with the first use of one of its names from ``corral.core._classify``, which
re-exports them, rather than with ``import corral`` (issue 15)."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from corral.core._classify import parse_duration
from corral.core._headers import Headers

__all__ = ["RateLimitHeaders", "parse_rate_limit_headers"]


@attrs.frozen
class RateLimitHeaders:
    """What ``x-ratelimit-*`` headers say about the remaining quota (None: not stated)."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None

    @property
    def present(self) -> bool:
        """Whether the response stated any quota at all, so a limiter can tell silence from zero."""
        return (
            self.remaining_requests is not None
            or self.remaining_tokens is not None
            or self.limit_requests is not None
            or self.limit_tokens is not None
            or self.reset_requests is not None
            or self.reset_tokens is not None
        )


def _int_value(raw: str) -> int | None:
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


#: The ``x-ratelimit-*`` fields ``RateLimitHeaders`` holds, and how each value is read.
_RATE_FIELDS: dict[str, tuple[str, Callable[[str], int | float | None]]] = {
    "x-ratelimit-limit-requests": ("limit_requests", _int_value),
    "x-ratelimit-limit-tokens": ("limit_tokens", _int_value),
    "x-ratelimit-remaining-requests": ("remaining_requests", _int_value),
    "x-ratelimit-remaining-tokens": ("remaining_tokens", _int_value),
    "x-ratelimit-reset-requests": ("reset_requests", parse_duration),
    "x-ratelimit-reset-tokens": ("reset_tokens", parse_duration),
}


def parse_rate_limit_headers(headers: Headers) -> RateLimitHeaders:
    """The ``x-ratelimit-*`` quota a response states; a missing or unparseable header is None
    rather than an error, since providers differ in which they send. One pass over the
    fields (a response carries a dozen; this runs once per call); the first of a name wins."""
    found: dict[str, int | float | None] = {}
    for name, raw in headers.items():
        if name.startswith("x-ratelimit-"):
            field = _RATE_FIELDS.get(name)
            if field is not None and field[0] not in found:
                found[field[0]] = field[1](raw)
    return RateLimitHeaders(**found) if found else RateLimitHeaders()  # type: ignore[arg-type]
