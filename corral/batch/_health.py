"""Is a failure about its line, or about the provider? The batch runner's fail-fast policy.

Theory of operation. A failed call ends in one of three ways:

- **about the line** (400, context length, a bad body, or a failure while other calls kept
  succeeding): written to the output as a failure record;
- **fatal for the run** (401/403, 404 for the model or endpoint, https:// to a plain-HTTP
  server): the same would happen to
  every line. After ``confirmations`` such failures with no success between them the run
  stops, and nothing is written for them, so the same command resumes after the fix. Fewer
  than that are held: a later success shows they were about their lines after all;
- **an outage** (connect errors, timeouts, 5xx, an open circuit, with no success since the call
  started): the line is requeued, admission pauses, and one probe is sent at a time with
  backoff until one succeeds or the outage has lasted ``max_outage`` seconds. The same kinds
  of failure when a call sent after this one succeeded are a strike against the line: it is
  requeued once more, and written as a failure at a second such failure (an outage that
  starts between the two only requeues it). An open circuit is never a line's fault.

Pure: no clock, no I/O. The runner passes ``now`` and carries out the ``Decision``.
"""

from __future__ import annotations

import attrs

from corral.core import _errors as errors

__all__ = [
    "Decision",
    "Hold",
    "ProviderHealth",
    "Requeue",
    "StopRun",
    "WriteFailure",
    "classify_failure",
]

_FATAL = (errors.AuthenticationError, errors.NotFoundError, errors.WrongScheme)
_OUTAGE = (
    errors.TransportError,
    errors.ServerError,
    errors.CircuitOpen,
    errors.RateLimitError,
    errors.RequestTimeoutError,
    errors.DeadlineExceeded,
)


def classify_failure(exc: errors.CorralError) -> str:
    """``"fatal"``, ``"outage"`` or ``"line"``: whom the failure is about."""
    if isinstance(exc, _FATAL):
        return "fatal"
    if isinstance(exc, _OUTAGE):
        return "outage"
    return "line"


@attrs.frozen
class WriteFailure:
    """Write the failure record: it is about this line."""


@attrs.frozen
class Hold:
    """Keep the record aside: written if a later success shows it was about its line."""


@attrs.frozen
class Requeue:
    """Send the line again once the provider is back; ``strike``: the failure counts
    against the line (other calls succeeded meanwhile)."""

    strike: bool = False


@attrs.frozen
class StopRun:
    """Stop admitting; what was not written stays resumable."""

    reason: str
    fatal: bool


Decision = WriteFailure | Hold | Requeue | StopRun


#: Failures no line can cause (nothing of it had been sent, or the breaker refused it): never
#: a strike, however many calls succeed meanwhile, e.g. at the edge of an outage.
_NEVER_THE_LINES = (
    errors.CircuitOpen,
    errors.ConnectError,
    errors.ConnectTimeout,
    errors.PoolTimeout,
)


@attrs.define
class ProviderHealth:
    confirmations: int = 3
    max_outage: float = 600.0
    probe_initial: float = 1.0
    probe_max: float = 30.0
    fatal_streak: int = 0
    last_success: float | None = None
    #: When the latest-started successful call was sent: a success sent after a line's strike
    #: proves the provider answered after it (a success sent before may only finish after).
    last_success_sent: float | None = None
    outage_since: float | None = None
    probes: int = 0

    @property
    def in_outage(self) -> bool:
        return self.outage_since is not None

    def on_success(self, now: float, started: float | None = None) -> bool:
        """Record a success of a call sent at ``started`` (default ``now``); True if it ends
        an outage or proves held failures were per line."""
        ended = self.outage_since is not None or self.fatal_streak > 0
        self.last_success = now
        sent = now if started is None else started
        if self.last_success_sent is None or sent > self.last_success_sent:
            self.last_success_sent = sent
        self.fatal_streak = 0
        self.outage_since = None
        self.probes = 0
        return ended

    def on_failure(
        self,
        exc: errors.CorralError,
        started: float,
        now: float,
        struck_at: float | None = None,
    ) -> Decision:
        """Decide for a call that started at ``started`` and failed at ``now``; ``struck_at``:
        when the line took its strike, if it has one."""
        kind = classify_failure(exc)
        if kind == "fatal":
            self.fatal_streak += 1
            if self.fatal_streak >= self.confirmations:
                return StopRun(_fatal_reason(exc), fatal=True)
            return Hold()
        if kind == "line":
            return WriteFailure()
        sent = self.last_success_sent
        if sent is not None and sent >= started and not isinstance(exc, _NEVER_THE_LINES):
            # A call sent after this one succeeded: perhaps this line's own trouble. Written
            # off at its second such failure (its strike is ``struck_at``).
            return Requeue(strike=True) if struck_at is None else WriteFailure()
        if self.outage_since is None:
            self.outage_since = now
        if now - self.outage_since >= self.max_outage:
            return StopRun(
                f"the provider has been unreachable or failing for {now - self.outage_since:.0f}"
                f" s (--max-outage {self.max_outage:g}); last error: {exc.kind}: {exc}",
                fatal=False,
            )
        return Requeue()

    def end_of_input(self) -> StopRun | None:
        """At the end: fatal failures no success ever contradicted stop the run too."""
        if self.fatal_streak and self.last_success is None:
            return StopRun(
                "every request was refused the same way; see the error above", fatal=True
            )
        return None

    def outage_expired(self, now: float) -> StopRun | None:
        if self.outage_since is not None and now - self.outage_since >= self.max_outage:
            return StopRun(
                f"the provider has been unreachable or failing for {now - self.outage_since:.0f}"
                f" s (--max-outage {self.max_outage:g})",
                fatal=False,
            )
        return None

    def next_probe_delay(self) -> float:
        """Seconds to wait before the next probe: doubling from ``probe_initial``, capped."""
        delay = min(self.probe_max, self.probe_initial * 2.0 ** min(self.probes, 30))
        self.probes += 1
        return delay


def _fatal_reason(exc: errors.CorralError) -> str:
    if isinstance(exc, errors.AuthenticationError):
        return f"the provider refused the credentials ({exc}); check the API key"
    if isinstance(exc, errors.WrongScheme):
        return f"{exc}; fix --base-url"
    return f"the provider does not know the endpoint or model ({exc}); check --base-url and --model"
