"""Progress while a batch runs, and the summary after it: rich when installed, plain text else.

rich (the ``cli`` extra) draws the live bar and the summary table; without it a line is
printed to stderr every few seconds, which also suits logs and CI.

The summary counts what the output file holds (earlier runs and this one), because that is
what the user has; this run's own counts come beside it. Latency is shown three ways: the
whole call as the caller saw it, the answering attempt's time on the wire, and the waits in
between (quota, concurrency slots, backoff, earlier attempts), each per call.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from corral.batch._runner import BatchReport, BatchRunner

__all__ = ["ProgressView", "format_summary", "summary_dict"]

_QUANTILES = ("p50", "p95", "max", "mean")


def _seconds(
    values: dict[str, float] | None, keys: tuple[str, ...] = _QUANTILES
) -> dict[str, float]:
    values = values or {}
    return {k: round(values.get(k, 0.0), 4) for k in keys}


def summary_dict(
    report: BatchReport,
    metrics: dict[str, Any] | None,
    elapsed: float,
    retries: dict[str, int],
    *,
    limiter_wait_total: float = 0.0,
    transport_resends: int = 0,
) -> dict[str, Any]:
    metrics = metrics or {}
    calls = max(1, metrics.get("count", 0))
    file_failed = report.file_failed
    return {
        "output_file": {
            "records": report.file_succeeded + sum(file_failed.values()),
            "succeeded": report.file_succeeded,
            "failed": sum(file_failed.values()),
            "failed_by_kind": dict(file_failed),
            "not_yet_written": report.unsent,
        },
        "this_run": {
            "lines": report.total,
            "skipped_already_done": report.skipped,
            "sent": report.sent,
            "resent_after_outage": report.resent,
            "succeeded": report.succeeded,
            "failed": sum(report.failed.values()),
            "failed_by_kind": dict(report.failed),
            "bad_lines": report.bad_lines,
            "retries_by_kind": retries,
            "transport_resends": transport_resends,
        },
        "interrupted": report.interrupted,
        "stopped": report.stopped.reason if report.stopped is not None else None,
        "elapsed_s": round(elapsed, 3),
        "requests_per_second": round(report.done / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_incl_waits_s": _seconds(metrics.get("latency_s")),
        "service_latency_s": _seconds(metrics.get("service_latency_s")),
        "wait_per_call_s": _seconds(metrics.get("wait_per_call_s")),
        "rate_limit_wait_per_call_s": round(limiter_wait_total / calls, 4),
        "time_to_first_byte_s": _seconds(metrics.get("time_to_first_byte_s"), ("p50", "p99")),
        "tokens": {"input": report.tokens_in, "output": report.tokens_out},
        "cost_usd": metrics.get("cost_usd", 0.0),
        "cache_hit_rate": metrics.get("cache_hit_rate", 0.0),
        "repaired_bytes": report.before.repaired_bytes,
    }


def _ms(values: dict[str, float]) -> str:
    return " / ".join(f"{values[k] * 1000:.0f}" for k in ("p50", "p95", "max")) + " ms"


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table (used when rich is absent, and in logs)."""
    run = summary["this_run"]
    rows = [
        output_file_row(summary["output_file"]),
        (
            "this run",
            f"{run['sent']} sent, {run['succeeded']} succeeded, {run['failed']} failed"
            f" ({run['skipped_already_done']} already done)",
        ),
        ("bad input lines", str(run["bad_lines"])),
        ("retries", str(run["retries_by_kind"] or 0)),
        (
            "re-sends",
            f"{run['transport_resends']} by the transport (stale connections), "
            f"{run['resent_after_outage']} after an outage",
        ),
        ("throughput", f"{summary['requests_per_second']} req/s over {summary['elapsed_s']} s"),
        ("latency p50/p95/max", f"{_ms(summary['latency_incl_waits_s'])} per call, waits included"),
        ("  on the wire", f"{_ms(summary['service_latency_s'])} (the answering attempt)"),
        (
            "  waiting",
            f"{_ms(summary['wait_per_call_s'])} per call (quota, slots, backoff); "
            f"rate limit {summary['rate_limit_wait_per_call_s']:.3f} s per call on average",
        ),
        ("tokens in/out", f"{summary['tokens']['input']} / {summary['tokens']['output']}"),
        ("cost", f"${summary['cost_usd']:.4f}"),
        ("cache hit rate", f"{summary['cache_hit_rate']:.1%}"),
    ]
    return render_rows(rows, summary["stopped"])


def output_file_row(held: Mapping[str, Any]) -> tuple[str, str]:
    """What the output file holds, as the summary's first row (live and Batch API runs)."""
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(held["failed_by_kind"].items()))
    return (
        "output file",
        f"{held['succeeded']} succeeded, {held['failed']} failed"
        + (f" ({kinds})" if kinds else "")
        + (f", {held['not_yet_written']} not yet written" if held["not_yet_written"] else ""),
    )


def render_rows(rows: list[tuple[str, str]], stopped: str | None) -> str:
    """Rows as an aligned two-column table, with why the run stopped last."""
    if stopped:
        rows = [*rows, ("stopped", stopped)]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


class ProgressView:
    """Call ``update`` often; it redraws at most every ``interval`` seconds."""

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO = sys.stderr,
        interval: float = 0.2,
    ) -> None:
        self.total = total
        self.enabled = enabled
        self._stream = stream
        self._interval = interval
        self._start = time.monotonic()
        self._last = 0.0
        self._rich: Any = None
        if enabled and stream.isatty():
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            except ImportError:
                pass
            else:
                self._rich = Progress(
                    TextColumn("corral", markup=False),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[stats]}", markup=False),
                    transient=False,
                )
                self._task = self._rich.add_task("run", total=total, stats="")
                self._rich.start()

    def update(self, runner: BatchRunner, *, now: float, force: bool = False) -> None:
        """Redraw from the runner; ``now`` is the run's clock (for the outage wait)."""
        if not self.enabled:
            return
        wall = time.monotonic()
        if not force and wall - self._last < (self._interval if self._rich else 2.0):
            return
        self._last = wall
        report = runner.report
        elapsed = max(wall - self._start, 1e-9)
        done = report.done + report.skipped
        rate = report.done / elapsed
        tokens = (report.tokens_in + report.tokens_out) / elapsed
        errors = sum(report.failed.values())
        stats = (
            f"{rate:.0f} req/s  {tokens:.0f} tok/s  errors {errors}  in flight {runner.in_flight}"
        )
        if runner.waiting_since is not None:
            stats += f"  waiting for the provider ({now - runner.waiting_since:.0f} s)"
        if self._rich is not None:
            self._rich.update(self._task, completed=done, stats=stats)
        else:
            eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "-"
            print(f"corral: {done}/{self.total}  {stats}  ETA {eta}", file=self._stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
