"""corral on Ray Data: one Client per actor, one quota, cache and budget shared through Redis.

Theory of operation. ``Dataset.map_batches(CorralActor, ...)`` runs a pool of actors. Each actor
owns, for its whole life, one event loop in a thread (an anyio blocking portal) and one corral
``Client`` on that loop. A batch is handed to the loop and every row of it is sent at once,
bounded by ``concurrency`` calls in flight per actor. The loop, its connection pool, its retry
budget and its breaker outlive each batch; ``anyio.run`` per batch would drop the connections
and the state at every batch. When Ray calls one actor with several batches at the same time
(``calls_per_actor``), they share that loop and that bound, so the actor keeps sending while a
batch waits for its slowest row.

Every actor's stack holds a ``SharedRateLimit`` on the same Redis key, so the actors of every
machine together stay within one RPM/TPM quota (without Redis each actor gets ``1/actors`` of
it), and a ``Cache`` on a ``RedisStore`` shares answers: a task Ray runs again after an actor
died costs nothing the second time.

A row never fails its batch: each output row carries the answer's text and usage, or an error
kind, message and scope (``line``: this row's own fault; ``fatal``: every row would fail the
same way, e.g. a bad key; ``outage``: the provider was failing, a rerun may succeed;
``budget``: the spend cap, shared through Redis like the quota, refused it and it was not sent).

Exactly once across reruns: rows are keyed by ``custom_id``; ``skip_done`` drops the ids already
in the written output (Parquet or JSONL written by Ray's writers) before the next run.
``run_ray_job`` is ``corral run --ray``: the JSONL-to-JSONL job, with the output contract of a
local run (one Batch API record per id, written by the driver, resumable).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import anyio.from_thread
import attrs

from corral._client import DEFAULT_BASE_URL, Client, default_middleware
from corral.batch._health import StopRun, classify_failure
from corral.batch._items import BadLine, IdSet, read_items
from corral.batch._job import (
    BatchJob,
    JobResult,
    _api_key,
    _exit_code,
    _json,
    _transport,
    needs_extra,
)
from corral.batch._lock import RunLock
from corral.batch._manifest import Manifest, check_manifest, record_manifest
from corral.batch._paths import check_input, check_output
from corral.batch._progress import format_summary, summary_dict
from corral.batch._runner import BatchReport, _error, _line, preflight, result_record
from corral.batch._store import OutputWriter, scan_output
from corral.batch._templates import Template
from corral.core import _jsonlib as jsonlib
from corral.core._compose import Middleware
from corral.core._errors import CorralError, InvalidInput
from corral.core._models import Response
from corral.core._wire import response_usage
from corral.middleware._buckets import one_of
from corral.middleware._cache import Cache
from corral.middleware._checks import at_least, finite, optional
from corral.middleware._ratelimit import RateLimit

if TYPE_CHECKING:
    import pyarrow
    import ray.data

__all__ = [
    "RESULT_COLUMNS",
    "ActorConfig",
    "CorralActor",
    "Template",
    "done_ids",
    "map_requests",
    "run_ray_job",
    "skip_done",
]

log = logging.getLogger("corral.ray")

#: The columns every output row gets (besides the input's, minus the body column).
RESULT_COLUMNS = (
    "response",
    "prompt_tokens",
    "completion_tokens",
    "error_kind",
    "error_message",
    "error_scope",
)

#: CPUs each actor asks Ray for: an actor mostly waits on the network, and whole CPUs per actor
#: on a small node leave none for Ray Data's read tasks (the pipeline then hangs).
ACTOR_CPUS = 0.25


@attrs.frozen
class ActorConfig:
    """What each actor builds its Client from; sent to every actor, so keep secrets out of it.

    The key is read in each actor from ``api_key_env`` (default CORRAL_API_KEY, then
    OPENAI_API_KEY): a local Ray passes the driver's environment to its workers; on a cluster,
    set it on the nodes. ``api_key`` works too, but travels with the actor's arguments.

    Rows hold a request body in ``body_column`` (a JSON string, or a struct whose null fields
    are dropped, since Arrow fills every key any row has), or, with ``template``, the fields
    its ``{column}`` placeholders name. ``id_column`` keys every row (``custom_id``).
    """

    base_url: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    api_key_env: str | None = None
    #: Send every request to this model instead of its own.
    model: str | None = None
    template: Template | None = None
    body_column: str = "body"
    id_column: str = "custom_id"
    #: Path (under base_url) of rows without a ``url`` column of their own.
    endpoint: str = "/chat/completions"
    #: Calls in flight at most, per actor.
    concurrency: int = attrs.field(default=64, validator=at_least(1))
    #: The quota of all actors together: shared through ``quota_redis``, or else split evenly.
    rpm: int | None = attrs.field(default=None, validator=optional(at_least(1)))
    tpm: int | None = attrs.field(default=None, validator=optional(at_least(1)))
    quota_redis: str | None = None
    quota_name: str = "default"
    #: Seconds over which the provider enforces the per-minute limits.
    window: float = attrs.field(default=60.0, validator=finite(open_below=True))
    #: What a call costs once its usage is known ("reserved" or "usage"; see ``RateLimit``).
    settle: str = attrs.field(default="reserved", validator=one_of("reserved", "usage"))
    #: What the actors together may send at once (None: 2% of a window), and whether a local
    #: quota scales token reservations to the provider's count (``RateLimit(calibrate=)``).
    burst_requests: float | None = None
    burst_tokens: float | None = None
    calibrate: bool = True
    #: Share cached answers between actors through this Redis.
    cache_redis: str | None = None
    cache_ttl: float = attrs.field(default=7 * 24 * 3600.0, validator=finite(open_below=True))
    retries: int = attrs.field(default=4, validator=at_least(0))
    retry_budget: float = attrs.field(default=0.2, validator=finite())
    timeout: float = attrs.field(default=600.0, validator=finite(open_below=True))
    max_pause: float = attrs.field(default=60.0, validator=finite())
    transport: str = "h11"
    #: How many actors share the quota (``map_requests`` sets it): divides a local quota, and
    #: the shared one's fallback when Redis is down.
    actors: int = attrs.field(default=1, validator=at_least(1))
    #: Add a ``record`` column: the Batch API output line (what ``corral run`` writes).
    record: bool = False
    #: A spend cap in USD for all actors together, held in ``budget_redis`` under
    #: ``budget_name`` (``Budget``); a call past it fails with ``budget_exceeded``, unsent.
    budget_usd: float | None = attrs.field(default=None, validator=optional(finite()))
    budget_redis: str | None = None
    budget_name: str = "default"
    #: Called in each actor for more middleware, placed after the cache (so a hit is free) and
    #: before the retries. Must be picklable.
    extra_middleware: Callable[[], Sequence[Middleware]] | None = None

    def __attrs_post_init__(self) -> None:
        if self.budget_usd is not None and self.budget_redis is None and self.actors > 1:
            raise InvalidInput(
                "ActorConfig.budget_usd over several actors needs budget_redis: a cap per actor "
                "would multiply it"
            )

    def middleware(self) -> list[Middleware]:
        """This actor's stack, outermost first (the default stack with shared limits)."""
        stack = default_middleware(
            concurrency=self.concurrency,
            max_attempts=self.retries + 1,
            timeout=self.timeout,
            retry_budget=self.retry_budget,
            max_pause=self.max_pause,
            cache=self._cache(),
        )
        if self.extra_middleware is not None:
            at = 2 if self.cache_redis else 1
            stack[at:at] = list(self.extra_middleware())
        if self.rpm is not None or self.tpm is not None:
            # outside ConcurrencyLimit, as corral run
            stack.insert(len(stack) - 1, self._limiter())
        if self.budget_usd is not None:  # innermost, as corral run: held just before sending
            from corral.middleware._budget import Budget

            stack.append(Budget(self.budget_usd, redis=self.budget_redis, name=self.budget_name))
        return stack

    def _cache(self) -> Cache | None:
        if self.cache_redis is None:
            return None
        with needs_extra("redis", "cache_redis"):
            from corral.stores.redis import RedisStore

        return Cache(RedisStore(self.cache_redis), ttl=self.cache_ttl)

    def _limiter(self) -> Middleware:
        """One quota for all actors: in Redis, or else split evenly between them."""
        limits: dict[str, Any] = {"window": self.window, "settle": self.settle}
        limits["max_pause"] = self.max_pause
        if self.quota_redis is None:
            n = self.actors
            return RateLimit(
                rpm=_share(self.rpm, n),
                tpm=_share(self.tpm, n),
                burst_requests=None if self.burst_requests is None else self.burst_requests / n,
                burst_tokens=None if self.burst_tokens is None else self.burst_tokens / n,
                calibrate=self.calibrate,
                **limits,
            )
        with needs_extra("redis", "quota_redis"):
            from corral.middleware._shared_ratelimit import SharedRateLimit

        return SharedRateLimit(
            self.quota_redis,
            name=self.quota_name,
            rpm=self.rpm,
            tpm=self.tpm,
            burst_requests=self.burst_requests,
            burst_tokens=self.burst_tokens,
            processes=self.actors,
            **limits,
        )


def _share(limit: int | None, actors: int) -> int | None:
    return None if limit is None else max(1, limit // actors)


class CorralActor:
    """The callable class for ``Dataset.map_batches`` (``batch_format="pyarrow"``).

    One per actor: its own event loop thread and Client (see the module docstring). Returns the
    input's columns (minus the body column) plus ``RESULT_COLUMNS`` (and ``record``).
    """

    def __init__(self, config: ActorConfig) -> None:
        self.config = config
        self._exit = contextlib.ExitStack()
        self._portal = self._exit.enter_context(anyio.from_thread.start_blocking_portal())
        try:
            self._client = self._portal.call(self._open)
        except BaseException:
            self._exit.close()
            raise

    async def _open(self) -> Client:
        config = self.config
        return Client(
            config.base_url,
            config.api_key,
            api_key_env=config.api_key_env,
            transport=_transport(config.transport, config.timeout),
            middleware=config.middleware(),
        )

    def __call__(self, batch: pyarrow.Table) -> pyarrow.Table:
        import pyarrow as pa

        rows = batch.to_pylist()
        results = self._portal.call(self._run, rows)
        keep = [name for name in batch.column_names if name != self.config.body_column]
        table = batch.select(keep)
        for name, kind in _result_types(self.config.record):
            values = [result.get(name) for result in results]
            table = table.append_column(name, pa.array(values, type=getattr(pa, kind)()))
        return table

    def close(self) -> None:
        """Close the Client and stop the loop (an actor's process ending does it too)."""
        with contextlib.suppress(Exception):
            self._portal.call(self._client.aclose)
        self._exit.close()

    async def _run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in rows]

        async def one(i: int, row: dict[str, Any]) -> None:
            results[i] = await self._call(row)

        async with anyio.create_task_group() as tg:
            for i, row in enumerate(rows):
                tg.start_soon(one, i, row)
        return results

    async def _call(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One row's outcome; never raises (a failed row must not fail the batch)."""
        client, config = self._client, self.config
        custom_id = str(row.get(config.id_column) or "")
        try:
            if not custom_id:
                raise InvalidInput(f"the row has no {config.id_column!r}")
            body = self._body(row)
        except InvalidInput as exc:
            return _failed(custom_id, exc.kind, str(exc), "line", config.record)
        labels = {"custom_id": custom_id}
        request = client.build_request(_path(client, row.get("url")), body, labels=labels)
        try:
            response = await client.send(request)
            if response.stream is not None:
                response = await response.aread()
            line, error, _ = result_record(client, custom_id, request, response)
        except CorralError as exc:
            scope = _scope(exc)
            return _failed(custom_id, exc.kind, client.scrub(str(exc)), scope, config.record)
        except Exception as exc:  # a bug must not fail the batch: record it, log it
            log.exception("internal error on %s", custom_id)
            return _failed(custom_id, "internal_error", repr(exc), "line", config.record)
        if error is not None:
            result = _failed(custom_id, error.kind, error.message, _scope(error), False)
        else:
            result = _success(response)
        if config.record:
            result["record"] = line.decode().rstrip("\n")
        return result

    def _body(self, row: Mapping[str, Any]) -> dict[str, Any]:
        config = self.config
        if config.template is not None:
            try:
                body = config.template.body(row)
            except KeyError as exc:
                raise InvalidInput(f"no field {exc.args[0]!r} for the template") from None
        else:
            body = _parse_body(row.get(config.body_column), config.body_column)
        body.pop("stream", None)  # one record holds one completion: send it whole
        body.pop("stream_options", None)
        if config.model:
            body["model"] = config.model
        return body


def _scope(exc: CorralError) -> str:
    """Whom a failure is about: ``line``, ``fatal`` or ``outage`` (``corral.batch._health``),
    or ``budget`` (the spend cap refused it; it was not sent)."""
    from corral.middleware._budget import BudgetError

    return "budget" if isinstance(exc, BudgetError) else classify_failure(exc)


def _result_types(record: bool) -> list[tuple[str, str]]:
    kinds = ["string", "int64", "int64", "string", "string", "string"]
    return list(zip(RESULT_COLUMNS, kinds, strict=True)) + (
        [("record", "string")] if record else []
    )


def _parse_body(value: Any, column: str) -> dict[str, Any]:
    if isinstance(value, str | bytes):
        try:
            value = jsonlib.loads(value)
        except jsonlib.JSONDecodeError as exc:
            raise InvalidInput(f"column {column!r} is not valid JSON ({exc})") from None
    elif isinstance(value, Mapping):
        value = _drop_nulls(value)
    if not isinstance(value, dict):
        raise InvalidInput(f"column {column!r} must hold a request body (a JSON object)")
    return value


def _drop_nulls(value: Any) -> Any:
    """Arrow gives every struct row every key any row has, as null: drop those again."""
    if isinstance(value, Mapping):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _path(client: Client, url: Any) -> str:
    """A row's Batch API ``url`` (``/v1/chat/completions``) relative to a ``/v1`` base URL."""
    if not isinstance(url, str) or not url:
        return "/chat/completions"
    if client.base_url.rstrip("/").endswith("/v1") and url.startswith("/v1/"):
        return url[3:]
    return url


def _success(response: Response) -> dict[str, Any]:
    usage = response_usage(response)
    return {
        "response": _text(response),
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
    }


def _text(response: Response) -> str | None:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return content if isinstance(content, str) else None


def _failed(custom_id: str, kind: str, message: str, scope: str, record: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"error_kind": kind, "error_message": message, "error_scope": scope}
    if record:
        result["record"] = _line(custom_id, None, _error(kind, message)).decode().rstrip("\n")
    return result


def map_requests(
    ds: ray.data.Dataset,
    config: ActorConfig,
    *,
    actors: int = 2,
    batch_size: int = 256,
    calls_per_actor: int = 2,
    num_cpus: float = ACTOR_CPUS,
) -> ray.data.Dataset:
    """``ds.map_batches(CorralActor, ...)`` on a pool of ``actors`` that share ``config``'s
    quota; each actor asks for ``num_cpus`` (a fraction: see ``ACTOR_CPUS``) and works on up to
    ``calls_per_actor`` batches at once."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        CorralActor,
        fn_constructor_kwargs={"config": attrs.evolve(config, actors=actors)},
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        compute=ActorPoolStrategy(
            size=actors,
            max_concurrent_calls_per_actor=calls_per_actor,
            enable_true_multi_threading=True,
        ),
    )


def done_ids(output: str | Path, *, format: str = "parquet", id_column: str = "custom_id") -> IdSet:
    """The ids already in an output written by Ray (``write_parquet`` or ``write_json``), as a
    compact set (8 bytes per id); empty when nothing was written yet."""
    import ray.data

    found = IdSet()
    path = Path(output)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return found
    if format == "parquet":
        ds = ray.data.read_parquet(str(path)).select_columns([id_column])
    elif format == "json":
        ds = ray.data.read_json(str(path)).select_columns([id_column])
    else:
        raise InvalidInput(f"format must be 'parquet' or 'json', got {format!r}")
    batch: pyarrow.Table
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        for custom_id in batch.column(id_column).to_pylist():
            found.add(str(custom_id))
    return found


def skip_done(
    ds: ray.data.Dataset,
    output: str | Path,
    *,
    format: str = "parquet",
    id_column: str = "custom_id",
) -> ray.data.Dataset:
    """``ds`` without the rows whose id is already in ``output``: run this, then write to the
    same ``output`` (Ray's writers append new files), and every id lands there exactly once."""
    done = done_ids(output, format=format, id_column=id_column)
    if not len(done):
        return ds
    return ds.filter(_NotDone(done, id_column))


@attrs.frozen
class _NotDone:
    """A picklable row filter (the id set travels to each task once, 8 bytes per id)."""

    done: IdSet
    column: str

    def __call__(self, row: Mapping[str, Any]) -> bool:
        return str(row[self.column]) not in self.done


# -- corral run --ray ---------------------------------------------------------------------------


def run_ray_job(job: BatchJob, *, stderr: TextIO | None = None) -> JobResult:
    """``corral run --ray``: send what the output lacks through a Ray actor pool; the driver
    writes every record, so the output is the one a local run writes (same lock, manifest,
    resume and exit codes). Starts a local Ray when ``job.ray`` is ``"local"`` and Ray is not
    running in this process yet."""
    err = stderr or sys.stderr
    job.validate()
    _refuse_local_only(job)
    check_input(job.input)
    output = check_output(job.output, input=job.input)
    options = attrs.evolve(job.options, output=output)
    _api_key(job)  # refuse a missing key here, not in every actor
    with RunLock(output):
        pre = preflight(options)
        for bad in pre.bad:
            print(f"corral: bad line {bad.where(options.input)}: {bad.reason}", file=err)
        base_url = (
            job.base_url
            or os.environ.get("CORRAL_BASE_URL")
            or os.environ.get("OPENAI_BASE_URL")
            or DEFAULT_BASE_URL
        )
        manifest = Manifest(
            pre.digest, pre.size, pre.positional_ids, job.model, base_url, job.shard
        )
        resuming = output.exists() and output.stat().st_size > 0
        check_manifest(output, manifest, resuming=resuming, force=job.force_resume)
        scan = scan_output(output, drop_failures=job.retry_failed)
        record_manifest(output, manifest)
        report = BatchReport(total=pre.total, bad_lines=pre.bad_count, before=scan)
        writer = OutputWriter(output)
        started = time.monotonic()
        try:
            rows = list(_pending(job, report, writer))
            if rows:
                with _ray_session(job.ray or "local"):
                    _Collector(job, report, writer).run(_dataset(job, base_url, rows))
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            writer.close()
    elapsed = time.monotonic() - started
    summary = summary_dict(report, None, elapsed, {})
    if job.json_summary:
        print(_json(summary))
    else:
        print(f"\ncorral run summary ({job.output})\n{format_summary(summary)}", file=err)
    return JobResult(_exit_code(job, report, err), report, summary)


def _refuse_local_only(job: BatchJob) -> None:
    if job.cache is not None:
        raise InvalidInput("--cache is a file on one machine; with --ray share one with --redis")
    if job.trace is not None:
        raise InvalidInput("--trace writes one file from one process; it does not work with --ray")
    if job.deployments is not None:
        raise InvalidInput("--deployments does not run on --ray yet; give one --base-url")


def _pending(job: BatchJob, report: BatchReport, writer: OutputWriter) -> Iterator[dict[str, Any]]:
    """The lines the output lacks, as rows; a bad line's failure record is written here."""
    options, done = job.options, report.before.done
    for item in read_items(job.input):
        custom_id = item.record_id if isinstance(item, BadLine) else item.custom_id
        if not options.mine(custom_id):
            continue
        if custom_id in done:
            report.skipped += 1
            continue
        if isinstance(item, BadLine):
            message = f"{item.where(job.input)}: {item.reason}"
            writer.write(_line(custom_id, None, _error("invalid_input", message)))
            report.failed["invalid_input"] += 1
            continue
        body = jsonlib.dumps(item.body).decode()
        yield {"custom_id": custom_id, "url": item.url, "body": body}


@contextlib.contextmanager
def _ray_session(address: str) -> Iterator[None]:
    """Ray for this run: the one this process already runs, else ``address`` (``local``: a new
    local Ray, shut down afterwards)."""
    with needs_extra("ray", "--ray"):
        import ray
    if ray.is_initialized():
        yield
        return
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def _actor_config(job: BatchJob, base_url: str) -> ActorConfig:
    """What each actor of ``corral run --ray`` is told: the run's flags."""
    return ActorConfig(
        base_url=base_url,
        api_key=job.api_key,
        api_key_env=job.api_key_env,
        model=job.model,
        concurrency=job.concurrency,
        rpm=job.rpm,
        tpm=job.tpm,
        window=job.window,
        settle=job.settle,
        burst_requests=job.burst_requests,
        burst_tokens=job.burst_tokens,
        calibrate=job.calibrate,
        quota_redis=job.quota_redis,
        quota_name=job.quota_name,
        cache_redis=job.redis,
        cache_ttl=job.cache_ttl,
        retries=job.retries,
        retry_budget=job.retry_budget,
        timeout=job.timeout,
        max_pause=job.max_pause,
        transport=job.transport,
        budget_usd=job.budget_usd,
        budget_redis=job.budget_redis,
        budget_name=job.budget_name,
        record=True,
    )


def _dataset(job: BatchJob, base_url: str, rows: list[dict[str, Any]]) -> ray.data.Dataset:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    config = _actor_config(job, base_url)
    batch_size = max(1, min(job.concurrency * 4, math.ceil(len(rows) / (4 * job.ray_actors))))
    blocks = max(1, math.ceil(len(rows) / batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    return map_requests(ds, config, actors=job.ray_actors, batch_size=batch_size)


_FATAL_CONFIRMATIONS = 3


@attrs.define
class _Collector:
    """The driver's side: writes each record as its row comes back, exactly once, and decides
    what a failure becomes as a local run does (``corral.batch._health``): a line's own failure
    is written; an outage's is not (a rerun sends it again); fatal failures are held until a
    success shows they were about their lines, and three in a row with none stop the run."""

    job: BatchJob
    report: BatchReport
    writer: OutputWriter
    held: list[tuple[str, str]] = attrs.Factory(list)
    fatal_streak: int = 0
    succeeded_once: bool = False
    outages: Counter[str] = attrs.Factory(Counter)

    def run(self, ds: ray.data.Dataset) -> None:
        columns = ["record", "error_kind", "error_message", "error_scope"]
        columns += ["prompt_tokens", "completion_tokens"]
        batch: pyarrow.Table
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.select(columns).to_pylist():
                self.report.sent += 1
                stop = self._settle(row)
                if stop is not None:
                    self.report.stopped = stop
                    return
        if self.held and not self.succeeded_once:
            self.report.stopped = StopRun(
                "every request was refused the same way; see the error above", fatal=True
            )
            return
        self._release()
        if self.outages:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.outages.items()))
            self.report.stopped = StopRun(
                f"{sum(self.outages.values())} request(s) met a provider outage ({kinds}) and "
                "were not written",
                fatal=False,
            )

    def _settle(self, row: Mapping[str, Any]) -> StopRun | None:
        kind, scope, record = row["error_kind"], row["error_scope"], row["record"]
        if scope is None:
            self._write(record, None)
            self.report.tokens_in += row["prompt_tokens"] or 0
            self.report.tokens_out += row["completion_tokens"] or 0
            self.succeeded_once, self.fatal_streak = True, 0
            self._release()
        elif scope == "line":
            self._write(record, kind)
        elif scope == "outage":
            self.outages[kind] += 1
        elif scope == "budget":
            self.outages[kind] += 1
            return StopRun(f"the spend cap refused a call ({row['error_message']})", fatal=False)
        else:
            self.held.append((record, kind))
            self.fatal_streak += 1
            if self.fatal_streak >= _FATAL_CONFIRMATIONS:
                message = row["error_message"]
                return StopRun(f"every request was refused ({kind}: {message})", fatal=True)
        return None

    def _release(self) -> None:
        held, self.held = self.held, []
        for record, kind in held:
            self._write(record, kind)

    def _write(self, record: str, kind: str | None) -> None:
        self.writer.write(record.encode() + b"\n")
        if kind is None:
            self.report.succeeded += 1
        else:
            self.report.failed[kind] += 1
