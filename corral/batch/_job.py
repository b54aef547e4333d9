"""A batch job as one typed value, and the one function that runs it.

``BatchJob`` holds everything ``corral run`` can be told; ``run_job`` checks the paths, takes
the run lock, checks the manifest, builds the client stack, runs the batch with progress and
signals, and returns a ``JobResult`` with the exit code and the summary. The CLI only turns
arguments into a ``BatchJob``; the demo and scripts build one directly::

    result = anyio.run(run_job, BatchJob(Path("in.jsonl"), Path("out.jsonl"), rpm=500))

Exit codes (``ExitCode``): 0 every line succeeded; 1 the output holds failures, or the run
stopped for an outage or an output error (rerun to resume); 2 refused before sending, or
stopped because every call would fail the same way (a bad key, an unknown model or URL);
3 stopped at the spend cap (``--budget-usd``; rerun with a higher cap to resume);
130 interrupted (rerun to resume).
"""

from __future__ import annotations

import enum
import logging
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.to_thread
import attrs

from corral._client import Client, default_middleware, resolve_api_key
from corral.batch._batch_run import refuse_live_over_batches, run_via_batch_api
from corral.batch._lock import RunLock
from corral.batch._manifest import (
    RECORD_EVERY,
    Manifest,
    RecentSends,
    check_manifest,
    read_recent,
    record_manifest,
)
from corral.batch._paths import check_input, check_output
from corral.batch._progress import ProgressView, format_summary, summary_dict
from corral.batch._routing import (
    budget_outcome,
    endpoint,
    job_budget,
    job_health,
    routed_stack,
    routing_checks,
)
from corral.batch._runner import BatchOptions, BatchReport, BatchRunner, Preflight, preflight
from corral.batch._store import ScanResult, scan_output
from corral.core._errors import InvalidInput
from corral.core._events import EventSink, TransportResent
from corral.core._models import Timeouts
from corral.middleware._cache import Cache
from corral.middleware._ratelimit import RateLimit
from corral.middleware._retry import Retry
from corral.middleware._truncate import Truncate
from corral.observe import TraceFile, fan_out
from corral.transports._base import Transport

__all__ = ["BatchJob", "ExitCode", "JobResult", "run_job"]

log = logging.getLogger("corral.batch")


class ExitCode(enum.IntEnum):
    """The process exit status of ``corral run`` (docs/batch.md): 0 every line succeeded, 1
    failures or a stop to resume from, 2 refused before or instead of sending, 3 stopped at
    the spend cap, 130 interrupted."""

    OK = 0
    FAILED = 1
    REFUSED = 2
    #: stopped at the spend cap (``--budget-usd``); the unsent lines stay resumable
    BUDGET = 3
    INTERRUPTED = 130


TRANSPORTS = ("h11", "httpx", "httpx2", "aiohttp")
#: How the lines go out: live calls, or the provider's Batch API (issue 18).
VIAS = ("live", "batch-api")


@attrs.frozen
class BatchJob:
    """Everything a batch run needs. Keys only by environment variable name, or ``api_key``."""

    input: Path
    output: Path
    base_url: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    #: The environment variable holding the key (default: CORRAL_API_KEY, then OPENAI_API_KEY).
    api_key_env: str | None = None
    model: str | None = None
    shard: tuple[int, int] | None = None
    strict: bool = False
    retry_failed: bool = False
    force_resume: bool = False
    allow_failures: bool = False
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int = 64
    retries: int = 4
    retry_budget: float = 0.2
    timeout: float = 600.0
    max_outage: float = 600.0
    #: Longest pause a 429's Retry-After may impose on the whole quota.
    max_pause: float = 60.0
    cache: Path | None = None
    redis: str | None = None
    cache_ttl: float = 7 * 24 * 3600.0
    truncate: bool = False
    quota_redis: str | None = None
    quota_name: str = "default"
    transport: str = "h11"
    progress: bool = True
    json_summary: bool = False
    handle_signals: bool = True
    #: The command that resumes this run, printed when it stops early (no secrets in it).
    resume_command: str | None = None
    #: Append every decision (waits, retries, pauses, cache, breaker) to this JSONL file.
    trace: Path | None = None
    # Limits as providers count them (issue 14)
    #: Seconds over which the provider enforces the per-minute limits.
    window: float = 60.0
    #: What a call costs once its usage is known: "reserved" (as OpenAI counts) or "usage".
    settle: str = "reserved"
    #: What may be sent at once (None: 2% of what one window admits).
    burst_requests: float | None = None
    burst_tokens: float | None = None
    #: Scale token reservations to the provider's count, learnt from its remaining-tokens.
    calibrate: bool = True
    # Batch API back-end (issue 18): the same file through the provider's Batch API.
    via: str = "live"
    #: Cancel this output's batches at the provider, merge what they finished (batch-api).
    cancel: bool = False
    #: Limits of one batch input file (OpenAI's: 50,000 requests, 200 MB).
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    #: Seconds between polls: ``batch_poll`` after a status change, growing to ``batch_poll_max``.
    batch_poll: float = 5.0
    batch_poll_max: float = 60.0
    #: Rounds in all: the first, then resends of what expired, failed retryably or is missing.
    batch_rounds: int = 3
    # Ray (issue 17): run on a Ray cluster ("local": a new local one) with this many actors.
    ray: str | None = None
    ray_actors: int = 2

    # -- routing and the spend cap (issue 16) --
    #: A TOML deployments file: route every call over its deployments.
    deployments: Path | None = None
    #: Stop admitting when the next call's worst case does not fit under this cap (USD).
    budget_usd: float | None = None
    #: Share the cap with other processes through this Redis, under ``budget_name``.
    budget_redis: str | None = None
    budget_name: str = "default"

    @property
    def options(self) -> BatchOptions:
        """The runner's share of this job: paths, concurrency and resume rules, without the stack
        settings."""
        return BatchOptions(
            input=self.input,
            output=self.output,
            concurrency=self.concurrency,
            strict=self.strict,
            retry_failed=self.retry_failed,
            model=self.model,
            shard=self.shard,
            max_outage=self.max_outage,
        )

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the flag."""
        checks = [
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (self.retries >= 0, "--retries must be 0 or more"),
            (_finite(self.retry_budget) and self.retry_budget >= 0, "--retry-budget must be >= 0"),
            (_finite(self.timeout) and self.timeout > 0, "--timeout must be a positive number"),
            (
                _finite(self.max_outage) and self.max_outage >= 0,
                "--max-outage must be 0 or more seconds",
            ),
            (_finite(self.max_pause) and self.max_pause >= 0, "--max-pause must be >= 0"),
            (self.rpm is None or self.rpm >= 1, "--rpm must be at least 1"),
            (self.tpm is None or self.tpm >= 1, "--tpm must be at least 1"),
            (self.transport in TRANSPORTS, f"--transport must be one of {', '.join(TRANSPORTS)}"),
            *_limit_checks(self),
            *_batch_api_checks(self),
            (self.ray_actors >= 1, "--ray-actors must be at least 1"),
        ]
        checks += routing_checks(self)
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)


def _batch_api_checks(job: BatchJob) -> list[tuple[bool, str]]:
    batch = job.via == "batch-api"
    live_only = job.cache or job.redis or job.truncate or job.quota_redis
    return [
        (job.via in VIAS, f"--via must be one of {', '.join(VIAS)}"),
        (job.via == "batch-api" or not job.cancel, "--cancel needs --via batch-api"),
        (not batch or job.transport == "h11", "--via batch-api uploads with the h11 transport"),
        (not (batch and live_only), "--cache, --redis, --truncate, --quota-redis: --via live only"),
        (job.batch_max_requests >= 1, "--batch-max-requests must be at least 1"),
        (job.batch_max_bytes >= 1024, "--batch-max-bytes must be at least 1024"),
        (_finite(job.batch_poll) and job.batch_poll > 0, "--batch-poll must be a positive number"),
        (_finite(job.batch_poll_max) and job.batch_poll_max > 0, "batch_poll_max must be > 0"),
        (job.batch_rounds >= 1, "--batch-rounds must be at least 1"),
    ]


def _limit_checks(job: BatchJob) -> list[tuple[bool, str]]:
    bursts = (job.burst_requests, job.burst_tokens)
    return [
        (_finite(job.window) and job.window > 0, "--window must be a positive number"),
        (job.settle in ("reserved", "usage"), "--settle must be reserved or usage"),
        (all(b is None or (_finite(b) and b > 0) for b in bursts), "--burst-* must be > 0"),
    ]


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


@attrs.frozen
class JobResult:
    """What ``run_job`` returns: the exit code the CLI would use, the run's counts and the
    summary it printed."""

    exit_code: ExitCode
    report: BatchReport
    summary: dict[str, Any]


@contextmanager
def needs_extra(extra: str, what: str) -> Iterator[None]:
    """Turn the ImportError of a missing optional dependency into the pip command to run."""
    try:
        yield
    except ImportError as exc:
        raise InvalidInput(
            f"{what} needs the {extra!r} extra ({exc.name or exc}): pip install 'corral[{extra}]'"
        ) from None


def _transport(name: str, timeout: float) -> Transport:
    timeouts = Timeouts(connect=10, read=timeout, write=30, pool=timeout)
    if name in ("httpx", "httpx2"):
        with needs_extra(name, f"--transport {name}"):
            from corral.transports._httpx_transport import HttpxTransport

            return HttpxTransport(package=name, timeouts=timeouts, max_connections=1000)
    if name == "aiohttp":
        with needs_extra("aiohttp", "--transport aiohttp"):
            from corral.transports._aiohttp_transport import AiohttpTransport

            return AiohttpTransport(timeouts=timeouts, max_connections=1000)
    from corral.transports._http11 import H11Transport

    return H11Transport(timeouts=timeouts, max_connections=1000)


def _cache(job: BatchJob) -> Cache | None:
    if job.redis:
        with needs_extra("redis", "--redis"):
            from corral.stores.redis import RedisStore

            return Cache(RedisStore(job.redis), ttl=job.cache_ttl)
    if job.cache:
        from corral.stores import SQLiteStore

        _check_sqlite(job.cache)
        return Cache(SQLiteStore(job.cache), ttl=job.cache_ttl)
    return None


def _check_sqlite(path: Path) -> None:
    """A corrupt or foreign --cache file is refused up front, not on the first hit."""
    if not path.exists():
        return
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise InvalidInput(
            f"--cache {path}: not a usable SQLite cache ({exc}); delete it or pick another file"
        ) from None
    finally:
        db.close()


def _middleware(job: BatchJob) -> list[Any]:
    stack: list[Any] = default_middleware(
        concurrency=job.concurrency,
        max_attempts=job.retries + 1,
        timeout=job.timeout,
        retry_budget=job.retry_budget,
        max_pause=job.max_pause,
        cache=_cache(job),
        truncate=Truncate() if job.truncate else None,
    )
    limiter = _limiter(job)
    if limiter is not None:  # where default_middleware puts it: just outside ConcurrencyLimit
        stack.insert(len(stack) - 1, limiter)
    return stack


def _limiter(job: BatchJob) -> Any:
    """The rate limiter: local, or shared through Redis (--quota-redis); None without limits."""
    if job.rpm is None and job.tpm is None:
        return None
    limits: dict[str, Any] = {
        "rpm": job.rpm,
        "tpm": job.tpm,
        "window": job.window,
        "settle": job.settle,
        "burst_requests": job.burst_requests,
        "burst_tokens": job.burst_tokens,
        "max_pause": job.max_pause,
    }
    if job.quota_redis:
        with needs_extra("redis", "--quota-redis"):
            from corral.middleware._shared_ratelimit import SharedRateLimit

            return SharedRateLimit(job.quota_redis, name=job.quota_name, **limits)
    return RateLimit(**limits, calibrate=job.calibrate)


def _local_limiter(client: Client) -> RateLimit | None:
    return next((m for m in client.middleware if isinstance(m, RateLimit)), None)


def _resume_limiter(client: Client, output: Path) -> None:
    """What an earlier run on this output sent within the window (its manifest says) still
    counts at the provider: the limiter starts with no more than the window has room for."""
    limiter = _local_limiter(client)
    recent = read_recent(output) if limiter is not None else None
    if limiter is not None and recent is not None:
        now = time.time()
        limiter.resume(recent.aged(now), missed=min(RECORD_EVERY, max(0.0, now - recent.at)))


async def _record_sends(output: Path, manifest: Manifest, limiter: RateLimit) -> None:
    recent = RecentSends(time.time(), limiter.recent())
    await anyio.to_thread.run_sync(record_manifest, output, attrs.evolve(manifest, recent=recent))


def _sends_recorder(
    output: Path, manifest: Manifest, client: Client
) -> Callable[[], Coroutine[Any, Any, None]] | None:
    """Every ``RECORD_EVERY`` seconds, the limiter's recent sends into the manifest."""
    limiter = _local_limiter(client)
    if limiter is None:
        return None

    async def record() -> None:
        while True:
            await anyio.sleep(RECORD_EVERY)
            await _record_sends(output, manifest, limiter)

    return record


def _api_key(job: BatchJob) -> str:
    if job.api_key is not None:
        return resolve_api_key(job.api_key)
    env = job.api_key_env
    where = f"set {env}" if env else "set OPENAI_API_KEY (or CORRAL_API_KEY)"
    flag = "" if env else ", or name another variable with --api-key-env NAME"
    return resolve_api_key(
        None, env, hint=f"{where}, e.g. `export {env or 'OPENAI_API_KEY'}=sk-...`{flag}"
    )


async def run_job(job: BatchJob, *, stderr: TextIO | None = None) -> JobResult:
    """Run ``job`` to completion (or to a stop); raise ``InvalidInput`` for refused input."""
    err = stderr or sys.stderr
    if job.ray is not None:  # the Ray driver blocks: it runs in a worker thread
        from corral.integrations.ray import run_ray_job

        return await anyio.to_thread.run_sync(lambda: run_ray_job(job, stderr=err))
    job.validate()
    check_input(job.input)
    output = check_output(job.output, input=job.input)
    options = attrs.evolve(job.options, output=output)
    api_key = _api_key(job) if job.deployments is None else ""
    with RunLock(output):
        pre = preflight(options)
        for bad in pre.bad:
            print(f"corral: bad line {bad.where(options.input)}: {bad.reason}", file=err)
        if pre.bad_count > len(pre.bad):
            print(f"corral: ... and {pre.bad_count - len(pre.bad)} more bad lines", file=err)
        if job.via == "batch-api":
            report, summary = await run_via_batch_api(job, options, pre, api_key, err)
            return JobResult(_exit_code(job, report, err), report, summary)
        refuse_live_over_batches(output)
        counted: Counter[str] = Counter()
        trace = TraceFile(job.trace) if job.trace is not None else None
        sinks: list[EventSink] = [lambda event: counted.update((event.name,))]
        budget = job_budget(job)
        stack = routed_stack(job, budget) or _middleware(job) + ([budget] if budget else [])
        client = Client(
            **endpoint(job, api_key, stack),
            transport=_transport(job.transport, job.timeout),
            middleware=stack,
            events=fan_out(*sinks, *([trace] if trace else [])),
        )
        try:
            manifest = Manifest(
                input_digest=pre.digest,
                input_size=pre.size,
                positional_ids=pre.positional_ids,
                model=job.model,
                base_url=client.base_url,
                shard=job.shard,
            )
            resuming = output.exists() and output.stat().st_size > 0
            check_manifest(output, manifest, resuming=resuming, force=job.force_resume)
            scan = scan_output(output, drop_failures=job.retry_failed)
            _resume_limiter(client, output)  # before the record below replaces the manifest
            record_manifest(output, manifest)
        except BaseException:
            await client.aclose()
            if trace is not None:
                trace.close()
            raise
        runner = BatchRunner(client, options, health=job_health(job, budget))
        started = time.monotonic()
        try:
            await _drive(
                job, runner, client, pre, scan, err, _sends_recorder(output, manifest, client)
            )
            limiter = _local_limiter(client)
            if limiter is not None:
                await _record_sends(output, manifest, limiter)
        finally:
            if trace is not None:
                trace.close()
        result = _finish(job, runner, client, counted, time.monotonic() - started, err)
        return await budget_outcome(result, budget, err)


async def _drive(
    job: BatchJob,
    runner: BatchRunner,
    client: Client,
    pre: Preflight,
    scan: ScanResult,
    err: TextIO,
    keep: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> None:
    view = ProgressView(pre.total, enabled=job.progress, stream=err)

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            count = 0
            async for _ in signals:
                count += 1
                if count == 1:
                    print(
                        f"\ncorral: stopping; {runner.in_flight} in flight may finish "
                        "(Ctrl-C again to stop now)",
                        file=err,
                    )
                    runner.stop()
                else:
                    runner.abort()

    async def draw() -> None:
        while True:
            view.update(runner, now=anyio.current_time())
            await anyio.sleep(0.2)

    try:
        async with client, anyio.create_task_group() as tg:
            if job.handle_signals:
                tg.start_soon(watch_signals)
            tg.start_soon(draw)
            if keep is not None:
                tg.start_soon(keep)
            await runner.run(pre, scan)
            tg.cancel_scope.cancel()
    finally:
        view.update(runner, now=anyio.current_time(), force=True)
        view.close()


def _finish(
    job: BatchJob,
    runner: BatchRunner,
    client: Client,
    events: Counter[str],
    elapsed: float,
    err: TextIO,
) -> JobResult:
    report = runner.report
    retry = next((m for m in client.middleware if isinstance(m, Retry)), None)
    limiter_wait = sum(getattr(m, "waited", 0.0) for m in client.middleware)
    resends = events[TransportResent.name]
    summary = summary_dict(
        report,
        client.metrics.snapshot() if client.metrics is not None else None,
        elapsed,
        dict(retry.retries) if retry is not None else {},
        limiter_wait_total=limiter_wait,
        transport_resends=resends,
    )
    if job.json_summary:
        print(_json(summary))
    else:
        print(f"\ncorral run summary ({job.output})\n{format_summary(summary)}", file=err)
    return JobResult(_exit_code(job, report, err), report, summary)


def _json(summary: dict[str, Any]) -> str:
    import json

    return json.dumps(summary, indent=2)


def _exit_code(job: BatchJob, report: BatchReport, err: TextIO) -> ExitCode:
    resume = job.resume_command or f"corral run {job.input} -o {job.output}"
    if report.stopped is not None and report.stopped.fatal:
        print(
            f"corral: stopped: {report.stopped.reason}. Nothing more was sent and no record was "
            f"written for the unsent lines; after the fix, rerun to resume:\n  {resume}",
            file=err,
        )
        return ExitCode.REFUSED
    if report.output_error is not None:
        print(
            f"corral: stopped: {report.output_error}. {report.records_in_file}"
            f" results are safely in {job.output}; free space and rerun to resume:\n  {resume}",
            file=err,
        )
        return ExitCode.FAILED
    if report.stopped is not None:
        print(f"corral: stopped: {report.stopped.reason}; rerun to resume:\n  {resume}", file=err)
        return ExitCode.FAILED
    if report.interrupted:
        print(f"corral: interrupted; rerun the same command to resume:\n  {resume}", file=err)
        return ExitCode.INTERRUPTED
    failed = sum(report.file_failed.values())
    if failed and not job.allow_failures:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.file_failed.items()))
        print(
            f"corral: {job.output} holds {failed} failed request(s) ({kinds}); see their error "
            f"field, then rerun them with --retry-failed:\n  {resume} --retry-failed",
            file=err,
        )
        return ExitCode.FAILED
    return ExitCode.OK
