"""Progress while a batch runs, and the summary after it: rich when installed, plain text else.

rich (the ``cli`` extra) draws the live bar and the summary table; without it a line is
printed to stderr every few seconds, which also suits logs and CI.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from corral.batch.runner import BatchReport

__all__ = ["ProgressView", "format_summary", "summary_dict"]


def summary_dict(
    report: BatchReport,
    metrics: dict[str, Any] | None,
    limiter_wait: float,
    elapsed: float,
    retries: dict[str, int],
) -> dict[str, Any]:
    latency = (metrics or {}).get("latency_s", {})
    ttfb = (metrics or {}).get("time_to_first_byte_s", {})
    return {
        "total_lines": report.total,
        "skipped_already_done": report.skipped,
        "sent": report.sent,
        "succeeded": report.succeeded,
        "failed": sum(report.failed.values()),
        "errors_by_kind": dict(report.failed),
        "bad_lines": report.bad_lines,
        "retries_by_kind": retries,
        "interrupted": report.interrupted,
        "elapsed_s": round(elapsed, 3),
        "requests_per_second": round(report.done / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_s": {k: round(latency.get(k, 0.0), 4) for k in ("p50", "p95", "p99", "max")},
        "time_to_first_byte_s": {k: round(ttfb.get(k, 0.0), 4) for k in ("p50", "p99")},
        "tokens": {"input": report.tokens_in, "output": report.tokens_out},
        "cost_usd": (metrics or {}).get("cost_usd", 0.0),
        "cache_hit_rate": (metrics or {}).get("cache_hit_rate", 0.0),
        "limiter_wait_s": round(limiter_wait, 3),
        "repaired_bytes": report.repaired_bytes,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table (used when rich is absent, and in logs)."""
    rows = [
        (
            "succeeded",
            f"{summary['succeeded']} of {summary['sent']} sent"
            f" ({summary['skipped_already_done']} already done)",
        ),
        ("failed", f"{summary['failed']} {summary['errors_by_kind'] or ''}".strip()),
        ("bad input lines", str(summary["bad_lines"])),
        ("retries", str(summary["retries_by_kind"] or 0)),
        ("throughput", f"{summary['requests_per_second']} req/s over {summary['elapsed_s']} s"),
        (
            "latency p50/p95/p99",
            " / ".join(f"{summary['latency_s'][k] * 1000:.0f} ms" for k in ("p50", "p95", "p99")),
        ),
        ("time to first byte p50", f"{summary['time_to_first_byte_s']['p50'] * 1000:.0f} ms"),
        ("tokens in/out", f"{summary['tokens']['input']} / {summary['tokens']['output']}"),
        ("cost", f"${summary['cost_usd']:.4f}"),
        ("cache hit rate", f"{summary['cache_hit_rate']:.1%}"),
        (
            "rate-limit wait",
            f"{summary['limiter_wait_s'] / max(1, summary['sent']):.2f} s per call "
            f"(waiting for quota instead of getting 429s)",
        ),
    ]
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
                    TextColumn("[bold]corral"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[stats]}"),
                    transient=False,
                )
                self._task = self._rich.add_task("run", total=total, stats="")
                self._rich.start()

    def update(self, report: BatchReport, limiter_wait: float, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < (self._interval if self._rich else 2.0):
            return
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        done = report.done + report.skipped
        rate = report.done / elapsed
        tokens = (report.tokens_in + report.tokens_out) / elapsed
        errors = sum(report.failed.values())
        stats = (
            f"{rate:.0f} req/s  {tokens:.0f} tok/s  errors {errors}  "
            f"limiter wait {limiter_wait:.0f}s"
        )
        if self._rich is not None:
            self._rich.update(self._task, completed=done, stats=stats)
        else:
            eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "-"
            print(
                f"corral: {done}/{self.total}  {stats}  ETA {eta}",
                file=self._stream,
                flush=True,
            )

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
