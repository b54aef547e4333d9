"""``corral run --via batch-api``: the same file, output and guarantees, at the Batch API's price.

Theory of operation. The run goes in rounds (``_batch_state.py``). A round reads the input
once: lines already in the output are skipped, bad lines are written as failure records at
once (as a live run writes them), and the rest go into part files beside the output
(``OUTPUT.batches/``) within the provider's limits. Each part is uploaded (streamed from disk)
and gets its batch; every file and batch id is in the run manifest the moment it exists. The
run then polls the batches with backoff, and merges each finished batch's output and error
files into the output, streamed, by custom_id: a custom_id already in the output is skipped,
so a merge cut short (a kill, a lost connection) is simply done again. A record is written in
the live format (``settle``); an expired, cancelled or retryable one, and a request the
provider never returned, goes into the next round instead, until ``batch_rounds`` rounds,
after which each is written as a failure. A batch the provider refuses because its
enqueued-token limit is full is split in two and resent once a running batch has finished.

Ctrl-C stops the run and leaves the batches running at the provider: the rerun finds them in
the manifest and resumes polling with nothing uploaded or created again. ``--cancel`` cancels
them, merges what they finished, and leaves the rest unsent (a rerun sends it).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import anyio
import anyio.to_thread
import attrs

from corral.batch._batch_api import BatchAPI, collect
from corral.batch._batch_plan import (
    Keep,
    PartLimits,
    PartWriter,
    PollSchedule,
    Resend,
    failed_batch_line,
    missing_line,
    part_ids,
    request_line,
    settle,
    split_part,
)
from corral.batch._batch_state import PartRecord, RemoteState
from corral.batch._batch_wire import RemoteBatch
from corral.batch._health import StopRun
from corral.batch._items import BadLine, IdSet, read_items
from corral.batch._manifest import Manifest, check_manifest, manifest_path, record_manifest
from corral.batch._progress import output_file_row, render_rows
from corral.batch._runner import BatchOptions, BatchReport, Preflight, _error, _item_id, _line
from corral.batch._store import OutputError, OutputWriter, scan_output
from corral.core._errors import CorralError, InvalidInput
from corral.middleware._checks import never

if TYPE_CHECKING:
    from corral.batch._job import BatchJob

__all__ = [
    "BatchApiRun",
    "format_summary",
    "refuse_live_over_batches",
    "run_via_batch_api",
    "work_dir",
]

log = logging.getLogger("corral.batch")


def work_dir(output: Path) -> Path:
    """Where a run keeps its part files: ``OUTPUT.batches/`` beside the output."""
    return output.with_name(output.name + ".batches")


def _previous(output: Path) -> RemoteState:
    """The Batch API state the output's manifest holds (none when there is no readable one)."""
    try:
        return Manifest.from_json(json.loads(manifest_path(output).read_bytes())).remote
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return RemoteState()


def refuse_live_over_batches(output: Path) -> None:
    """A live run must not send lines that batches at the provider are running (they would be
    paid twice), nor forget those batches by rewriting the manifest."""
    parts = _previous(output).at_provider
    if parts:
        raise InvalidInput(
            f"{len(parts)} batch(es) of {output.name} are at the provider "
            f"({', '.join(p.batch_id or '' for p in parts[:3])}); resume them with "
            "--via batch-api, or cancel them with --via batch-api --cancel"
        )


async def run_via_batch_api(
    job: BatchJob, options: BatchOptions, pre: Preflight, api_key: str, err: TextIO
) -> tuple[BatchReport, dict[str, Any]]:
    """Run ``job`` through the Batch API (the caller holds the run lock and checked the
    paths); the report and the summary, printed."""
    output = options.output
    remote = _previous(output)
    async with BatchAPI(job.base_url, api_key) as api:
        manifest = Manifest(
            input_digest=pre.digest,
            input_size=pre.size,
            positional_ids=pre.positional_ids,
            model=job.model,
            base_url=api.base_url,
            shard=job.shard,
            via="batch-api",
            remote=remote,
        )
        resuming = (output.exists() and output.stat().st_size > 0) or bool(remote.parts)
        check_manifest(output, manifest, resuming=resuming, force=job.force_resume)
        scan = scan_output(output, drop_failures=job.retry_failed)
        record_manifest(output, manifest)
        run = BatchApiRun(api, job, options, pre, scan.done, manifest, err)
        run.report.before = scan
        started = time.monotonic()
        await run.drive()
        summary = run.summary(time.monotonic() - started)
    if job.json_summary:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\ncorral run summary ({job.output})\n{format_summary(summary)}", file=err)
    return run.report, summary


class _Halt(Exception):
    """The run cannot go on (``report.stopped`` says why)."""


class BatchApiRun:
    """One ``--via batch-api`` run over an output whose lock the caller holds."""

    def __init__(
        self,
        api: BatchAPI,
        job: BatchJob,
        options: BatchOptions,
        pre: Preflight,
        before: IdSet,
        manifest: Manifest,
        err: TextIO,
    ) -> None:
        self.api, self.job, self.options, self.err = api, job, options, err
        self.manifest = manifest
        self.workdir = work_dir(options.output)
        self.report = BatchReport(total=pre.total, bad_lines=pre.bad_count)
        self.stats: Counter[str] = Counter()
        self.limits = PartLimits(max_requests=job.batch_max_requests, max_bytes=job.batch_max_bytes)
        self.schedule = PollSchedule(
            first=job.batch_poll, cap=max(job.batch_poll, job.batch_poll_max)
        )
        self._before = before
        self._written = IdSet()
        #: Parts refused for the queue limit -> batches running when refused (send again
        #: once fewer run).
        self._held: dict[str, int] = {}
        #: Parts uploaded by this process (a create of theirs cannot have been lost earlier).
        self._fresh: set[str] = set()
        self._seen: dict[str, RemoteBatch] = {}
        self._writer: OutputWriter | None = None
        self._trouble_since: float | None = None

    @property
    def state(self) -> RemoteState:
        return self.manifest.remote

    def _record(self, state: RemoteState) -> None:
        self.manifest = attrs.evolve(self.manifest, remote=state)
        record_manifest(self.options.output, self.manifest)

    # -- the run ----------------------------------------------------------------------------

    async def drive(self) -> None:
        """The run, with Ctrl-C/SIGTERM stopping it (batches keep running at the provider)."""
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        self._writer = OutputWriter(self.options.output)
        self.report.skipped = self.report.before.records
        try:
            async with anyio.create_task_group() as tg:
                if self.job.handle_signals:
                    tg.start_soon(self._watch_signals, tg.cancel_scope)
                try:
                    await (self._cancel_all() if self.job.cancel else self._loop())
                except _Halt:
                    pass
                except CorralError as exc:  # --cancel: no retries beyond the client's own
                    if isinstance(exc, OutputError):
                        raise
                    reason = f"the Batch API refused: {exc.kind}: {self.api.client.scrub(str(exc))}"
                    self.report.stopped = StopRun(reason, fatal=not exc.retryable)
                tg.cancel_scope.cancel()
        finally:
            self._writer.close()
        if self.report.interrupted:
            running = len(self.state.at_provider)
            print(
                f"\ncorral: {running} batch(es) keep running at the provider; rerun the same "
                "command to resume polling (nothing is uploaded again), or add --cancel to "
                "cancel them",
                file=self.err,
            )

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.report.interrupted = True
                scope.cancel()
                return

    async def _loop(self) -> None:
        delay: float | None = None
        while True:
            # A round's pass reads the whole input: in a thread, so signals are still heard.
            if not self.state.parts and not await anyio.to_thread.run_sync(self._next_round):
                break
            finished, changed = await self._guarded(self._step)
            if finished:
                delay = None
                continue
            delay = self.schedule.after(delay, changed=changed)
            await anyio.sleep(delay)
        self._record(RemoteState())
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def _step(self) -> tuple[bool, bool]:
        """Send what is unsent, poll, merge what finished: (something finished, any status
        changed)."""
        await self._submit()
        finished, changed = await self._poll()
        for part, batch in finished:
            await self._merge(part, batch)
        return bool(finished), changed

    async def _guarded(self, step: Callable[[], Awaitable[tuple[bool, bool]]]) -> tuple[bool, bool]:
        """``step()``; a provider fault that may pass is waited out up to ``--max-outage``."""
        try:
            result = await step()
        except CorralError as exc:
            if isinstance(exc, OutputError):
                raise
            message = self.api.client.scrub(str(exc))
            if not exc.retryable:
                self._stop(f"the Batch API refused: {exc.kind}: {message}", fatal=True)
            now = anyio.current_time()
            self._trouble_since = self._trouble_since or now
            if now - self._trouble_since > self.job.max_outage:
                self._stop(f"the Batch API failed for {self.job.max_outage:g} s: {message}")
            log.warning("the Batch API failed (%s: %s); trying again", exc.kind, message)
            return False, False
        self._trouble_since = None
        return result

    def _stop(self, reason: str, *, fatal: bool = False) -> NoReturn:
        self.report.stopped = StopRun(reason, fatal=fatal)
        raise _Halt

    # -- a round ----------------------------------------------------------------------------

    def _next_round(self) -> bool:
        """Write the parts of a new round from the lines with no record yet; False if none."""
        try:
            return self._write_round()
        except OSError as exc:
            self._stop(f"cannot write the batch files in {self.workdir}: {exc.strerror or exc}")

    def _write_round(self) -> bool:
        state = self.state
        number = state.round + 1 if state.round < self.job.batch_rounds else 1
        writer = PartWriter(self.workdir, f"r{number}", self.limits)
        settled: list[str] = []
        source = self.options.input
        for item in read_items(source):
            custom_id = _item_id(item)
            if (
                not self.options.mine(custom_id)
                or custom_id in self._before
                or custom_id in self._written
            ):
                continue
            if isinstance(item, BadLine):
                error = _error("invalid_input", f"{item.where(source)}: {item.reason}")
                self._write(_line(custom_id, None, error), "invalid_input")
                settled.append(custom_id)
                continue
            line = request_line(item, self.options.model)
            if not writer.fits(line):
                error = _error(
                    "request_too_large",
                    f"{source}:{item.line}: {len(line)} bytes, over the "
                    f"{self.limits.max_bytes}-byte batch file limit",
                )
                self._write(_line(custom_id, None, error), "request_too_large")
                settled.append(custom_id)
                continue
            writer.add(item.url, line)
        parts = writer.close()
        for custom_id in settled:  # added after the pass: IdSet sorts once per query burst
            self._written.add(custom_id)
        if not parts:
            return False
        self._record(attrs.evolve(state, round=number, parts=tuple(parts)))
        requests = sum(p.requests for p in parts)
        self._say(f"round {number}: {requests} request(s) in {len(parts)} batch file(s)")
        return True

    async def _submit(self) -> None:
        """Upload and create what has no batch yet (held parts once fewer batches run)."""
        for part in self.state.parts:
            if part.batch_id is not None or not self._released(part):
                continue
            if part.file_id is None:
                uploaded = await self.api.upload(self.workdir / part.name)
                self.stats["files_uploaded"] += 1
                self._fresh.add(part.name)
                part = self._update(part, file_id=uploaded.id)
            assert part.file_id is not None
            token = self.state.token(part)
            batch = None if part.name in self._fresh else await self.api.find(token)
            if batch is None or batch.refused_for_queue:
                batch = await self.api.create(part.file_id, part.endpoint, token=token)
                self.stats["batches_created"] += 1
                self.report.sent += part.requests
            self._update(part, batch_id=batch.id, status=batch.status)
            self._held.pop(part.name, None)
            self._fresh.add(part.name)

    def _update(self, part: PartRecord, **changes: Any) -> PartRecord:
        new = attrs.evolve(part, **changes)
        self._record(self.state.replace(part, new))
        return new

    def _running(self) -> int:
        return sum(1 for p in self.state.at_provider if p.status not in _DONE)

    def _released(self, part: PartRecord) -> bool:
        held = self._held.get(part.name)
        if held is None:
            return True
        running = self._running()
        return running == 0 or running < held

    async def _poll(self) -> tuple[list[tuple[PartRecord, RemoteBatch]], bool]:
        finished = []
        changed = False
        for part in self.state.at_provider:
            assert part.batch_id is not None
            batch = await self.api.retrieve(part.batch_id)
            if batch.status != part.status:
                changed = True
                part = self._update(part, status=batch.status)
            self._seen[part.name] = batch
            if batch.done:
                finished.append((part, batch))
        self._progress()
        return finished, changed

    # -- merging ----------------------------------------------------------------------------

    async def _merge(self, part: PartRecord, batch: RemoteBatch) -> None:
        """Write the results of a finished batch, once each; what may pass goes to the next
        round. The part leaves the manifest once merged."""
        if batch.refused_for_queue and not self.job.cancel:
            self._requeue(part, batch)
            return
        final = self.state.round >= self.job.batch_rounds and not self.job.cancel
        path = self.workdir / part.name
        ids = set(part_ids(path))
        seen: set[str] = set()
        if batch.status == "failed":  # not for the queue: the whole batch was refused
            for custom_id in part_ids(path):
                if custom_id not in self._before:
                    self._write(*failed_batch_line(custom_id, batch), custom_id)
            seen = ids
        async for record in collect(self.api, batch):
            custom_id = record["custom_id"]
            if custom_id not in ids or custom_id in seen:
                self.stats["ignored_records"] += 1
                continue
            seen.add(custom_id)
            if custom_id in self._before:
                continue
            match settle(record, final=final, secrets=self.api.secrets):
                case Keep(line=line, kind=kind):
                    self._write(line, kind, custom_id)
                    if kind is None:
                        self._count_tokens(record)
                case Resend(reason=reason):
                    self.stats[f"resend_{reason}"] += 1
                case other:
                    never(other)
        for custom_id in part_ids(path):
            if custom_id in seen or custom_id in self._before:
                continue
            if final:
                self._write(*missing_line(custom_id, self.state.round), custom_id)
            else:
                self.stats["resend_missing"] += 1
        self._seen.pop(part.name, None)
        self._record(self.state.replace(part))
        path.unlink(missing_ok=True)

    def _requeue(self, part: PartRecord, batch: RemoteBatch) -> None:
        """The queue was full: send the part again in two halves once a running batch ends
        (one request alone: as it is; alone and nothing running: it can never fit)."""
        self.stats["refused_for_queue"] += 1
        self._seen.pop(part.name, None)
        cleared = attrs.evolve(part, batch_id=None, status=None)
        running = self._running()  # the refused batch is done already (its status: failed)
        if part.requests > 1:
            halves = split_part(self.workdir, part)
            self._record(self.state.replace(part, *halves))
            (self.workdir / part.name).unlink(missing_ok=True)
            waiting: tuple[PartRecord, ...] = halves
        elif running > 0:
            self._record(self.state.replace(part, cleared))
            self._fresh.add(part.name)  # its old batch failed: create anew, never look it up
            waiting = (cleared,)
        else:
            custom_id = next(part_ids(self.workdir / part.name))
            if custom_id not in self._before:
                self._write(*failed_batch_line(custom_id, batch), custom_id)
            self._record(self.state.replace(part))
            (self.workdir / part.name).unlink(missing_ok=True)
            return
        for new in waiting:
            self._held[new.name] = running
        problem = batch.errors[0].message if batch.errors else "token_limit_exceeded"
        self._say(
            f"batch {batch.id} refused ({problem}); sending its {part.requests} request(s) "
            f"again in {len(waiting)} part(s) once a running batch finishes"
        )

    def _write(self, line: bytes, kind: str | None, custom_id: str | None = None) -> None:
        """Append ``line``; ``custom_id`` joins the written ids (none while a round's pass
        reads them: that pass adds its ids after it ends)."""
        assert self._writer is not None
        try:
            self._writer.write(line)
        except OutputError as exc:
            self.report.output_error = exc
            self._stop(str(exc))
        if custom_id is not None:
            self._written.add(custom_id)
        if kind is None:
            self.report.succeeded += 1
        else:
            self.report.failed[kind] += 1

    def _count_tokens(self, record: Mapping[str, Any]) -> None:
        body = (record.get("response") or {}).get("body")
        usage = body.get("usage") if isinstance(body, Mapping) else None
        if isinstance(usage, Mapping):
            self.report.tokens_in += int(usage.get("prompt_tokens") or 0)
            self.report.tokens_out += int(usage.get("completion_tokens") or 0)

    # -- --cancel ---------------------------------------------------------------------------

    async def _cancel_all(self) -> None:
        """Cancel every batch of this output, merge what they finished, forget the rest."""
        parts = self.state.at_provider
        for part in parts:
            assert part.batch_id is not None
            batch = await self.api.retrieve(part.batch_id)
            if not batch.done:
                await self.api.cancel(part.batch_id)
                self.stats["batches_cancelled"] += 1
        delay: float | None = None
        while self.state.at_provider:
            finished, changed = await self._poll()
            for part, batch in finished:
                await self._merge(part, batch)
            if not finished:
                delay = self.schedule.after(delay, changed=changed)
                await anyio.sleep(delay)
        self._record(RemoteState())
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._say(
            f"cancelled {self.stats['batches_cancelled']} batch(es) of {len(parts)}; "
            f"{self.report.done} result(s) merged; rerun without --cancel to send the rest"
        )

    # -- telling the user -------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.job.progress:
            print(f"corral: {text}", file=self.err, flush=True)

    def _progress(self) -> None:
        if not self.job.progress or not self._seen:
            return
        by_status = Counter(b.status for b in self._seen.values())
        total = sum(b.counts.total for b in self._seen.values())
        completed = sum(b.counts.completed for b in self._seen.values())
        failed = sum(b.counts.failed for b in self._seen.values())
        states = ", ".join(f"{s} {n}" for s, n in sorted(by_status.items()))
        self._say(
            f"round {self.state.round}: {len(self._seen)} batch(es): {states}; requests "
            f"{completed + failed}/{total} done ({failed} failed); "
            f"{self.report.records_in_file} in {self.options.output.name}"
        )

    def summary(self, elapsed: float) -> dict[str, Any]:
        report = self.report
        file_failed = report.file_failed
        resent = {
            k.removeprefix("resend_"): v for k, v in self.stats.items() if k.startswith("resend_")
        }
        return {
            "output_file": {
                "records": report.records_in_file,
                "succeeded": report.file_succeeded,
                "failed": sum(file_failed.values()),
                "failed_by_kind": dict(file_failed),
                "not_yet_written": report.unsent,
            },
            "this_run": {
                "lines": report.total,
                "skipped_already_done": report.skipped,
                "sent": report.sent,
                "succeeded": report.succeeded,
                "failed": sum(report.failed.values()),
                "failed_by_kind": dict(report.failed),
                "bad_lines": report.bad_lines,
                "resent_by_reason": resent,
            },
            "batch_api": {
                "files_uploaded": self.stats["files_uploaded"],
                "batches_created": self.stats["batches_created"],
                "batches_cancelled": self.stats["batches_cancelled"],
                "refused_for_queue": self.stats["refused_for_queue"],
                "round": self.state.round,
                "batches_at_provider": [p.batch_id for p in self.state.at_provider],
            },
            "interrupted": report.interrupted,
            "stopped": report.stopped.reason if report.stopped is not None else None,
            "elapsed_s": round(elapsed, 3),
            "tokens": {"input": report.tokens_in, "output": report.tokens_out},
        }


_DONE = ("completed", "failed", "expired", "cancelled")


def format_summary(summary: Mapping[str, Any]) -> str:
    run, api = summary["this_run"], summary["batch_api"]
    rows = [
        output_file_row(summary["output_file"]),
        (
            "this run",
            f"{run['sent']} sent by batch, {run['succeeded']} succeeded, {run['failed']} failed"
            f" ({run['skipped_already_done']} already done)",
        ),
        ("bad input lines", str(run["bad_lines"])),
        ("sent again", str(run["resent_by_reason"] or 0)),
        (
            "batches",
            f"{api['files_uploaded']} file(s) uploaded, {api['batches_created']} created, "
            f"{api['refused_for_queue']} refused for the queue limit, "
            f"{len(api['batches_at_provider'])} at the provider",
        ),
        ("elapsed", f"{summary['elapsed_s']} s"),
        ("tokens in/out", f"{summary['tokens']['input']} / {summary['tokens']['output']}"),
    ]
    return render_rows(rows, summary["stopped"])
