"""A provider's view of RPM/TPM: per-minute limits enforced over a sliding window.

OpenAI documents that per-minute limits may be enforced over shorter periods: a limit of
``rpm`` per minute enforced over ``window`` seconds admits at most ``rpm * window / 60`` calls
in *any* ``window``-second span (``window`` 60: the limit itself). The remaining-headers count
what is left in the current window, and the reset-headers the time until it is empty again
("resets to its initial state").

Pure (time is an argument). The emulator and the virtual-time simulator both enforce limits
with this class, so corral is tested against one definition of "over the limit".
"""

from __future__ import annotations

import math
from collections import deque

import attrs

__all__ = ["Admission", "SlidingWindowQuota"]


@attrs.frozen
class Admission:
    admitted: bool
    #: Seconds until the call would fit (0 when admitted).
    retry_after: float
    remaining_requests: int
    remaining_tokens: int
    reset_requests: float
    reset_tokens: float


class SlidingWindowQuota:
    """Admits a call if the last ``window`` seconds, with it, hold at most ``rpm * window / 60``
    calls (at least one) and ``tpm * window / 60`` tokens."""

    def __init__(self, rpm: int | None, tpm: int | None, window: float = 60.0) -> None:
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a positive number of seconds, got {window!r}")
        self.rpm, self.tpm, self.window = rpm, tpm, window
        #: What one window admits.
        self.max_requests = None if rpm is None else max(1, math.floor(rpm * window / 60 + 1e-9))
        self.max_tokens = None if tpm is None else tpm * window / 60
        self._log: deque[tuple[float, int]] = deque()
        self._tokens = 0
        #: Totals over the quota's life, for benchmarks: what was admitted, first and last when.
        self.admitted_requests = 0
        self.admitted_tokens = 0
        self.first_admitted: float | None = None
        self.last_admitted: float | None = None

    def _expire(self, now: float) -> None:
        log = self._log
        while log and log[0][0] <= now - self.window:
            self._tokens -= log.popleft()[1]

    def _token_wait(self, now: float, tokens: int) -> float:
        """Seconds until enough old entries leave the window for ``tokens`` more."""
        assert self.max_tokens is not None
        excess = self._tokens + tokens - self.max_tokens
        if tokens <= self.max_tokens:
            for at, cost in self._log:
                excess -= cost
                if excess <= 0:
                    return max(0.0, at + self.window - now)
        return float("inf")

    def try_admit(self, now: float, tokens: int, *, charge: bool = True) -> Admission:
        """Admit (and, with ``charge``, count) a call of ``tokens`` at ``now``."""
        self._expire(now)
        count = len(self._log)
        req_wait = 0.0
        if self.max_requests is not None and count + 1 > self.max_requests:
            req_wait = self._log[count - self.max_requests][0] + self.window - now
        tok_wait = 0.0
        if self.max_tokens is not None and self._tokens + tokens > self.max_tokens:
            tok_wait = self._token_wait(now, tokens)
        admitted = req_wait <= 0 and tok_wait <= 0
        if admitted and charge:
            self._log.append((now, tokens))
            self._tokens += tokens
            count += 1
            self.admitted_requests += 1
            self.admitted_tokens += tokens
            if self.first_admitted is None:
                self.first_admitted = now
            self.last_admitted = now
        empty_in = max(0.0, self._log[-1][0] + self.window - now) if self._log else 0.0
        return Admission(
            admitted=admitted,
            retry_after=0.0 if admitted else max(req_wait, tok_wait),
            remaining_requests=(
                max(0, self.max_requests - count) if self.max_requests is not None else 1 << 30
            ),
            remaining_tokens=(
                max(0, math.floor(self.max_tokens - self._tokens))
                if self.max_tokens is not None
                else 1 << 30
            ),
            reset_requests=empty_in,
            reset_tokens=empty_in,
        )

    def stats(self) -> dict[str, int]:
        """Admitted totals and the span from first to last admission (ms), for benchmarks."""
        first, last = self.first_admitted, self.last_admitted
        return {
            "admitted_requests": self.admitted_requests,
            "admitted_tokens": self.admitted_tokens,
            "admitted_span_ms": 0 if first is None or last is None else round((last - first) * 1e3),
        }
