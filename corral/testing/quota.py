"""A provider's view of RPM/TPM: a sliding 60-second window over what it admitted.

Pure (time is an argument). The emulator and the virtual-time simulator both enforce limits
with this class, so corral is tested against one definition of "over the limit".
"""

from __future__ import annotations

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
    """Admits a call if the last ``window`` seconds, with it, hold <= rpm calls, <= tpm tokens."""

    def __init__(self, rpm: int | None, tpm: int | None, window: float = 60.0) -> None:
        self.rpm, self.tpm, self.window = rpm, tpm, window
        self._log: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def _expire(self, now: float) -> None:
        log = self._log
        while log and log[0][0] <= now - self.window:
            self._tokens -= log.popleft()[1]

    def _token_wait(self, now: float, tokens: int) -> float:
        """Seconds until enough old entries leave the window for ``tokens`` more."""
        assert self.tpm is not None
        excess = self._tokens + tokens - self.tpm
        if tokens <= self.tpm:
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
        if self.rpm is not None and count + 1 > self.rpm:
            req_wait = self._log[count - self.rpm][0] + self.window - now
        tok_wait = 0.0
        if self.tpm is not None and self._tokens + tokens > self.tpm:
            tok_wait = self._token_wait(now, tokens)
        admitted = req_wait <= 0 and tok_wait <= 0
        if admitted and charge:
            self._log.append((now, tokens))
            self._tokens += tokens
            count += 1
        oldest = self._log[0][0] + self.window - now if self._log else 0.0
        return Admission(
            admitted=admitted,
            retry_after=0.0 if admitted else max(req_wait, tok_wait),
            remaining_requests=max(0, (self.rpm or 0) - count) if self.rpm else 1 << 30,
            remaining_tokens=max(0, (self.tpm or 0) - self._tokens) if self.tpm else 1 << 30,
            reset_requests=max(0.0, oldest),
            reset_tokens=max(0.0, oldest),
        )
