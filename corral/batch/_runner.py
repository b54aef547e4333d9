"""The batch runner: stream a JSONL file through a Client, write every result exactly once.

Flow: ``concurrency`` workers take lines from one source (lines to send again first, then the
input, read lazily) and send each through the client's stack; each worker writes its own
finished line (writes are synchronous, so they never interleave). Memory is bounded by the
in-flight work, not by the file.

What a failure becomes is decided by ``ProviderHealth`` (health.py): a record for a failure
about its line; nothing (and a stop) for a failure that would repeat on every line; a requeue
and a paused admission for an outage. ``stop()`` (first Ctrl-C) stops admitting and lets
in-flight calls finish; ``abort()`` (second Ctrl-C) cancels them; either way a rerun resumes
from the output file.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs

from corral._client import Client
from corral._clock import current_time
from corral.batch._health import Hold, ProviderHealth, Requeue, StopRun, WriteFailure
from corral.batch._items import BadLine, BatchItem, DuplicateCheck, IdSet, id_hash, read_items
from corral.batch._store import OutputError, OutputWriter, ScanResult, scan_output
from corral.core import _jsonlib as jsonlib
from corral.core._errors import CorralError, InvalidInput, MalformedResponse
from corral.core._models import Request, Response
from corral.core._tokens import (
    EstimatingCounter,
    TokenCounter,
    estimate_request_tokens,
    max_output_tokens,
)
from corral.core._wire import Usage, response_usage
from corral.middleware._metrics import DEFAULT_PRICES, Price

__all__ = [
    "BatchOptions",
    "BatchReport",
    "BatchRunner",
    "CostEstimate",
    "Preflight",
    "estimate_cost",
    "preflight",
]

log = logging.getLogger("corral.batch")


@attrs.frozen
class BatchOptions:
    """What the runner needs to know about the files and the pace; the stack is the client's."""

    input: Path
    output: Path
    concurrency: int = 64
    strict: bool = False
    retry_failed: bool = False
    model: str | None = None
    #: Seconds in-flight calls get to finish after ``stop()`` before they are cancelled.
    grace: float = 60.0
    #: (i, n): run only the custom_ids whose hash falls in shard i of n, so n machines can
    #: split one file (each with its own output) while sharing a Redis quota and cache.
    shard: tuple[int, int] | None = None
    #: Seconds an outage may last (admission paused, probing) before the run stops.
    max_outage: float = 600.0

    def mine(self, custom_id: str) -> bool:
        """Whether ``custom_id`` belongs to this shard, so machines sharing one input never send
        a line twice."""
        if self.shard is None:
            return True
        index, count = self.shard
        return id_hash(custom_id) % count == index


@attrs.frozen
class Preflight:
    total: int
    bad: tuple[BadLine, ...]
    bad_count: int
    #: blake2b of the input's bytes, for the run manifest.
    digest: str = ""
    size: int = 0
    #: Some custom_ids are ``line-N`` (they move if lines are inserted).
    positional_ids: bool = False


def preflight(options: BatchOptions, *, keep_bad: int = 20) -> Preflight:
    """One streaming pass before anything is sent: count, validate, refuse duplicate ids."""
    if not options.input.exists():
        raise InvalidInput(f"{options.input}: no such input file")
    ids = DuplicateCheck()
    total = bad_count = size = 0
    positional = False
    bad: list[BadLine] = []
    hasher = hashlib.blake2b(digest_size=16)
    try:
        for item in read_items(options.input, hasher=hasher):
            custom_id = item.record_id if isinstance(item, BadLine) else item.custom_id
            positional = positional or custom_id == f"line-{item.line}"
            if options.mine(custom_id):
                total += 1
            ids.add(custom_id)
            if isinstance(item, BadLine):
                bad_count += 1
                if len(bad) < keep_bad:
                    bad.append(item)
        size = options.input.stat().st_size
        suspects = ids.suspects()
        if suspects:
            _refuse_duplicates(options.input, ids, suspects)
    finally:
        ids.close()
    if options.strict and bad_count:
        first = "; ".join(f"{b.where(options.input)}: {b.reason}" for b in bad[:5])
        raise InvalidInput(f"--strict: {bad_count} bad line(s), nothing was sent: {first}")
    if len(ids) == 0:
        raise InvalidInput(f"{options.input}: the input holds no requests (it is empty)")
    return Preflight(total, tuple(bad), bad_count, hasher.hexdigest(), size, positional)


def _refuse_duplicates(source: Path, ids: DuplicateCheck, suspects: set[int]) -> None:
    """Compare the ids whose hashes collided (a second pass); refuse the input if any are
    equal. Unequal ids that merely share a hash pass."""
    lines: dict[str, list[int]] = {}
    for item in read_items(source):
        custom_id = _item_id(item)
        if ids.is_suspect(custom_id, suspects):
            lines.setdefault(custom_id, []).append(item.line)
    twice = {cid for cid, found in lines.items() if len(found) > 1}
    if not twice:
        return
    where = [
        f"{source}:{line} ({cid})"
        for line, cid in sorted((n, cid) for cid in twice for n in lines[cid])
    ]
    raise InvalidInput(
        f"duplicate custom_id values, nothing was sent: {', '.join(where[:10])}"
        + (f" and {len(where) - 10} more" if len(where) > 10 else "")
    )


def _item_id(item: BatchItem | BadLine) -> str:
    return item.record_id if isinstance(item, BadLine) else item.custom_id


@attrs.define
class BatchReport:
    """This run's counts, and what the output held before it (``before``)."""

    total: int = 0
    skipped: int = 0
    sent: int = 0
    #: Sends of lines requeued after an outage (each also counted in ``sent``).
    resent: int = 0
    succeeded: int = 0
    failed: Counter[str] = attrs.field(factory=Counter)
    bad_lines: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    interrupted: bool = False
    #: Why the run stopped early on its own (fatal error, outage, output error), if it did.
    stopped: StopRun | None = None
    output_error: OutputError | None = None
    before: ScanResult = attrs.field(factory=lambda: ScanResult(IdSet()))

    @property
    def done(self) -> int:
        """Lines this run settled, as a success or a typed failure."""
        return self.succeeded + sum(self.failed.values())

    @property
    def file_failed(self) -> Counter[str]:
        """Failures the output file holds now, by kind (earlier runs and this one)."""
        return self.before.failed + self.failed

    @property
    def file_succeeded(self) -> int:
        """Success records the output file holds now (earlier runs and this one)."""
        return self.before.succeeded + self.succeeded

    @property
    def records_in_file(self) -> int:
        """Records of any outcome in the output now: what a resume will skip."""
        return self.file_succeeded + sum(self.file_failed.values())

    @property
    def unsent(self) -> int:
        """Lines with no record in the output yet (resumable)."""
        return max(0, self.total - self.records_in_file)


def _record_id(custom_id: str) -> str:
    return "batch_req_" + hashlib.blake2b(custom_id.encode(), digest_size=12).hexdigest()


def _line(
    custom_id: str, response: Mapping[str, Any] | None, error: Mapping[str, str] | None
) -> bytes:
    record = {
        "id": _record_id(custom_id),
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return jsonlib.dumps(record) + b"\n"


def _error(kind: str, message: str) -> dict[str, str]:
    return {"code": kind, "message": message}


class BatchRunner:
    """Sends each input line the output lacks through a client and appends its result exactly
    once; ``stop`` and ``abort`` end it early without losing a written line."""

    def __init__(
        self, client: Client, options: BatchOptions, *, health: ProviderHealth | None = None
    ) -> None:
        self.client = client
        self.options = options
        self.report = BatchReport()
        self.health = health or ProviderHealth(max_outage=options.max_outage)
        self.in_flight = 0
        #: Set while admission waits for the provider to come back (for the progress line).
        self.waiting_since: float | None = None
        #: Lines to send again, with the time of their strike (a failure while others
        #: succeeded), if they took one.
        self._requeued: collections.deque[tuple[BatchItem, float | None]] = collections.deque()
        self._strikes: dict[str, float] = {}
        self._held: list[tuple[bytes, str]] = []
        #: One worker at a time probes during an outage: ``_prober`` from its backoff wait
        #: until its call (``_probe``) ends.
        self._prober = False
        self._probe: BatchItem | None = None
        self._stopping = False
        self._changed = anyio.Event()
        #: Workers waiting on ``_changed``: with none, a finished line wakes nobody.
        self._waiters = 0
        self._paths: dict[str, str] = {}
        self._stop_event = anyio.Event()
        self._run_scope: anyio.CancelScope | None = None
        self._workers_scope: anyio.CancelScope | None = None
        self._writer: OutputWriter | None = None
        self._source: Iterator[BatchItem | BadLine] = iter(())
        self._done = IdSet()

    def stop(self) -> None:
        """Stop admitting new requests; in-flight ones finish (within ``grace``)."""
        self.report.interrupted = True
        self._halt()

    def abort(self) -> None:
        """Cancel in-flight requests too; what was written stays valid."""
        self.report.interrupted = True
        self._halt()
        if self._run_scope is not None:
            self._run_scope.cancel()

    def _halt(self) -> None:
        self._stopping = True
        self._stop_event.set()
        self._notify()
        if self._workers_scope is not None:
            self._workers_scope.deadline = anyio.current_time() + self.options.grace

    def _notify(self) -> None:
        if self._waiters:
            self._changed.set()
            self._changed = anyio.Event()

    async def _wait_for_change(self) -> None:
        self._waiters += 1
        try:
            await self._changed.wait()
        finally:
            self._waiters -= 1

    def _path(self, url: str) -> str:
        path = self._paths.get(url)
        if path is None:
            path = url
            if self.client.base_url.rstrip("/").endswith("/v1") and url.startswith("/v1/"):
                path = url[3:]
            self._paths[url] = path
        return path

    async def run(
        self, pre: Preflight | None = None, scan: ScanResult | None = None
    ) -> BatchReport:
        """Send what the output lacks. ``pre`` and ``scan`` (of the input and the output) are
        made here unless the caller made them already."""
        options = self.options
        pre = pre or preflight(options)
        report = self.report
        report.before = scan or scan_output(options.output, drop_failures=options.retry_failed)
        report.total, report.bad_lines = pre.total, pre.bad_count
        self._done = report.before.done
        self._source = read_items(options.input)
        self._writer = OutputWriter(options.output)
        try:
            with anyio.CancelScope() as self._run_scope:
                with anyio.CancelScope() as self._workers_scope:
                    async with anyio.create_task_group() as workers:
                        for _ in range(options.concurrency):
                            workers.start_soon(self._worker)
                if not self._stopping:
                    stop = self.health.end_of_input()
                    if stop is not None:
                        report.stopped = stop
                    else:
                        self._release_held()
        finally:
            self._writer.close()
        return report

    async def _worker(self) -> None:
        while (item := await self._next()) is not None:
            await self._send(item)

    async def _next(self) -> BatchItem | None:
        """The next line to send, or None when there is nothing more for this worker."""
        while not self._stopping:
            if self.health.in_outage:
                if not await self._take_probe_turn():
                    continue
                self._probe = self._pop_requeued() or self._next_input()
                if self._probe is None:
                    self._prober = False
                    self._notify()
                return self._probe
            item = self._pop_requeued() or self._next_input()
            if item is not None:
                return item
            if self.in_flight == 0:
                self._notify()  # wake the others: nothing more will come
                return None
            await self._wait_for_change()
        return None

    def _pop_requeued(self) -> BatchItem | None:
        if not self._requeued:
            return None
        self.report.resent += 1
        item, struck_at = self._requeued.popleft()
        if struck_at is not None:
            self._strikes[item.custom_id] = struck_at
        return item

    async def _take_probe_turn(self) -> bool:
        """In an outage one worker at a time waits out the backoff and sends a probe."""
        if self._prober:
            await self._wait_for_change()
            return False
        expired = self.health.outage_expired(anyio.current_time())
        if expired is not None:
            self.report.stopped = expired
            self._halt()
            return False
        self._prober = True
        if self.waiting_since is None:
            self.waiting_since = anyio.current_time()
        with anyio.move_on_after(self.health.next_probe_delay()):
            await self._stop_event.wait()
        if self._stopping or not self.health.in_outage:
            self._prober = False
            self._notify()
            return False
        return True

    def _next_input(self) -> BatchItem | None:
        report, source, options = self.report, self.options.input, self.options
        sharded, done = options.shard is not None, self._done if len(self._done) else None
        for item in self._source:
            if type(item) is BatchItem and not sharded and done is None:
                return item  # the common case, without a look-up
            custom_id = _item_id(item)
            if sharded and not options.mine(custom_id):
                continue
            if done is not None and custom_id in done:
                report.skipped += 1
                continue
            if isinstance(item, BadLine):
                message = f"{item.where(source)}: {item.reason}"
                log.debug("bad input line %s", message)  # preflight() lists them for the user
                error = _error("invalid_input", message)
                self._write(_line(custom_id, None, error), "invalid_input")
                continue
            return item
        return None

    def _body(self, item: BatchItem) -> Mapping[str, Any]:
        """The body to send: the line's own, unless it asks for a stream or ``--model`` swaps
        the model (then a copy, so a requeued line is sent as written)."""
        body = item.body
        if "stream" not in body and not self.options.model:
            return body
        copy = dict(body)
        if copy.pop("stream", None):
            # A Batch output record holds one chat.completion; a stream would be paid for
            # and then not fit, so the line is sent whole.
            copy.pop("stream_options", None)
        if self.options.model:
            copy["model"] = self.options.model
        return copy

    async def _send(self, item: BatchItem) -> None:
        request = self.client.build_request(
            self._path(item.url), self._body(item), labels={"custom_id": item.custom_id}
        )
        self.report.sent += 1
        struck_at = self._strikes.pop(item.custom_id, None) if self._strikes else None
        started = current_time()
        self.in_flight += 1
        error: CorralError | None = None
        try:
            response = await self.client.send(request)
            if response.stream is not None:
                response = await response.aread()
            line, error = self._result(item.custom_id, request, response)
        except CorralError as exc:
            message = self.client.scrub(str(exc))
            line, error = _line(item.custom_id, None, _error(exc.kind, message)), exc
        except Exception as exc:  # a bug must not lose the request: record it, log it
            log.exception("internal error on %s", item.custom_id)
            line = _line(item.custom_id, None, _error("internal_error", repr(exc)))
            self._write(line, "internal_error")
            return
        finally:
            self.in_flight -= 1
            if item is self._probe:
                self._probe, self._prober = None, False
            self._notify()
        self._settle(item, line, error, started, struck_at)

    def _settle(
        self,
        item: BatchItem,
        line: bytes,
        error: CorralError | None,
        started: float,
        struck_at: float | None,
    ) -> None:
        now = current_time()
        if error is None:
            if self.health.on_success(now, started):
                self.waiting_since = None
                if not self._stopping:
                    self._release_held()
            self._write(line, None)
            return
        match self.health.on_failure(error, started, now, struck_at):
            case WriteFailure():
                self._write(line, error.kind)
            case Hold():
                self._held.append((line, error.kind))
            case Requeue(strike=strike):
                if not self._stopping:
                    self._requeued.append((item, now if strike else struck_at))
            case StopRun() as stop:
                if self.report.stopped is None:
                    self.report.stopped = stop
                self._halt()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for line, kind in held:
            self._write(line, kind)

    def _write(self, line: bytes, kind: str | None) -> None:
        if self.report.output_error is not None or self._writer is None:
            return
        try:
            self._writer.write(line)
        except OutputError as exc:
            self.report.output_error = exc
            self.report.stopped = StopRun(str(exc), fatal=False)
            self._halt()
            if self._run_scope is not None:  # nothing more can be written: stop paying
                self._run_scope.cancel()
            return
        if kind is None:
            self.report.succeeded += 1
        else:
            self.report.failed[kind] += 1

    def _result(
        self, custom_id: str, request: Request, response: Response
    ) -> tuple[bytes, CorralError | None]:
        line, error, usage = result_record(self.client, custom_id, request, response)
        if usage is not None:
            self.report.tokens_in += usage.prompt_tokens
            self.report.tokens_out += usage.completion_tokens
        return line, error


def result_record(
    client: Client, custom_id: str, request: Request, response: Response
) -> tuple[bytes, CorralError | None, Usage | None]:
    """The output line for ``response``: what the provider sent, scrubbed of the client's
    credentials (a relay may echo them), the error it stands for, if any, and the usage of a
    success (also for the Ray actors, corral.integrations.ray)."""
    request_id = response.request_id and client.scrub(response.request_id)
    error: CorralError | None = client.error_for(request, response)
    try:
        body = _scrubbed_json(client, response)
    except jsonlib.JSONDecodeError:
        if error is None:
            error = MalformedResponse(f"HTTP {response.status} body is not JSON")
        payload = {"status_code": response.status, "request_id": request_id, "body": None}
        return _line(custom_id, payload, _error(error.kind, error.message)), error, None
    payload = {"status_code": response.status, "request_id": request_id, "body": body}
    if error is None:
        return _line(custom_id, payload, None), None, response_usage(response)
    return _line(custom_id, payload, _error(error.kind, error.message)), error, None


def _scrubbed_json(client: Client, response: Response) -> Any:
    parsed = response.json()
    text = response.body.decode("utf-8", "replace")
    clean = client.scrub(text)
    return parsed if clean is text else jsonlib.loads(clean)


@attrs.frozen
class CostEstimate:
    requests: int
    input_tokens: int
    max_output_tokens: int
    cost_low: float
    cost_high: float
    unpriced_models: tuple[str, ...]


def estimate_cost(
    options: BatchOptions,
    *,
    done: IdSet | None = None,
    counter: TokenCounter | None = None,
    prices: Mapping[str, Price] = DEFAULT_PRICES,
) -> CostEstimate:
    """``--dry-run``: tokens and a cost range (no output .. max output) without sending.

    Ids in ``done`` (already in the output) and other shards' ids are left out.
    """
    counter = counter or EstimatingCounter()
    requests = input_tokens = output_tokens = 0
    low = high = 0.0
    unpriced: set[str] = set()
    for item in read_items(options.input):
        if isinstance(item, BadLine) or not options.mine(item.custom_id):
            continue
        if done is not None and item.custom_id in done:
            continue
        body = item.body
        model = options.model or str(body.get("model", ""))
        total = estimate_request_tokens(body, counter)
        out = max_output_tokens(body) if "messages" in body else 0
        requests += 1
        input_tokens += total - out
        output_tokens += out
        price = prices.get(model)
        if price is None:
            unpriced.add(model)
            continue
        low += (total - out) * price.input / 1e6
        high += ((total - out) * price.input + out * price.output) / 1e6
    return CostEstimate(requests, input_tokens, output_tokens, low, high, tuple(sorted(unpriced)))
