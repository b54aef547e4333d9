"""The batch runner: stream a JSONL file through a Client, write every result exactly once.

Flow: a producer reads input lines lazily and starts one task per request while fewer than
``concurrency`` are in flight; each task sends its request through the client's stack and
hands one finished output line to a single writer task. Memory is bounded by in-flight work,
not by the file. ``stop()`` (first Ctrl-C) stops admitting and lets in-flight calls finish;
``abort()`` (second Ctrl-C) cancels them; either way the writer flushes what it has and a
rerun resumes from the output file.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from corral.batch.items import BadLine, BatchItem, IdSet, id_hash, read_items
from corral.batch.store import OutputWriter, scan_output
from corral.client import Client
from corral.core import jsonlib
from corral.core.classify import classify
from corral.core.errors import CorralError, InvalidInput
from corral.core.tokens import (
    EstimatingCounter,
    TokenCounter,
    estimate_request_tokens,
    max_output_tokens,
)
from corral.core.wire import response_usage
from corral.middleware.metrics import DEFAULT_PRICES, Price

__all__ = ["BatchOptions", "BatchReport", "BatchRunner", "Preflight", "estimate_cost", "preflight"]

log = logging.getLogger("corral.batch")


@attrs.frozen
class BatchOptions:
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

    def mine(self, custom_id: str) -> bool:
        if self.shard is None:
            return True
        index, count = self.shard
        return id_hash(custom_id) % count == index


@attrs.frozen
class Preflight:
    total: int
    bad: tuple[BadLine, ...]
    bad_count: int


def preflight(options: BatchOptions, *, keep_bad: int = 20) -> Preflight:
    """One streaming pass before anything is sent: count, validate, refuse duplicate ids."""
    if not options.input.exists():
        raise InvalidInput(f"{options.input}: no such input file")
    ids = IdSet()
    total = bad_count = 0
    bad: list[BadLine] = []
    for item in read_items(options.input):
        if options.mine(item.custom_id or f"line-{item.line}"):
            total += 1
        if isinstance(item, BadLine):
            bad_count += 1
            if len(bad) < keep_bad:
                bad.append(item)
            if item.custom_id is not None:
                ids.add(item.custom_id)
            continue
        ids.add(item.custom_id)
    dupes = ids.duplicates()
    if dupes:
        where = [
            f"{options.input}:{item.line} ({item.custom_id})"
            for item in read_items(options.input)
            if item.custom_id is not None and id_hash(item.custom_id) in dupes
        ]
        raise InvalidInput(
            f"duplicate custom_id values, nothing was sent: {', '.join(where[:10])}"
            + (f" and {len(where) - 10} more" if len(where) > 10 else "")
        )
    if options.strict and bad_count:
        first = "; ".join(f"{b.where(options.input)}: {b.reason}" for b in bad[:5])
        raise InvalidInput(f"--strict: {bad_count} bad line(s), nothing was sent: {first}")
    return Preflight(total, tuple(bad), bad_count)


@attrs.define
class BatchReport:
    total: int = 0
    skipped: int = 0
    sent: int = 0
    succeeded: int = 0
    failed: Counter[str] = attrs.field(factory=Counter)
    bad_lines: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    repaired_bytes: int = 0
    interrupted: bool = False

    @property
    def done(self) -> int:
        return self.succeeded + sum(self.failed.values())


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
    def __init__(self, client: Client, options: BatchOptions) -> None:
        self.client = client
        self.options = options
        self.report = BatchReport()
        self._admit_scope: anyio.CancelScope | None = None
        self._run_scope: anyio.CancelScope | None = None
        self._workers_scope: anyio.CancelScope | None = None
        self.in_flight = 0

    def stop(self) -> None:
        """Stop admitting new requests; in-flight ones finish (within ``grace``)."""
        self.report.interrupted = True
        if self._admit_scope is not None:
            self._admit_scope.cancel()
        if self._workers_scope is not None:
            self._workers_scope.deadline = anyio.current_time() + self.options.grace

    def abort(self) -> None:
        """Cancel in-flight requests too; what was written stays valid."""
        self.report.interrupted = True
        if self._run_scope is not None:
            self._run_scope.cancel()

    def _path(self, url: str) -> str:
        if self.client.base_url.rstrip("/").endswith("/v1") and url.startswith("/v1/"):
            return url[3:]
        return url

    async def run(self, pre: Preflight | None = None) -> BatchReport:
        options = self.options
        pre = pre or preflight(options)
        scan = scan_output(options.output, drop_failures=options.retry_failed)
        report = self.report
        report.total, report.bad_lines, report.repaired_bytes = (
            pre.total,
            pre.bad_count,
            scan.repaired_bytes,
        )
        done = scan.done
        writer = OutputWriter(options.output)
        # No buffer: a result is either written or still held by its (in-flight) task, so a
        # crash loses at most the in-flight calls.
        send, receive = anyio.create_memory_object_stream[tuple[bytes, str | None]](0)
        slots = anyio.Semaphore(options.concurrency)
        try:
            with anyio.CancelScope() as self._run_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._write, receive, writer)
                    async with send:
                        with anyio.CancelScope() as self._workers_scope:
                            async with anyio.create_task_group() as workers:
                                with anyio.CancelScope() as self._admit_scope:
                                    await self._admit(done, send, slots, workers)
        finally:
            writer.close()
        return report

    async def _admit(
        self,
        done: IdSet,
        send: MemoryObjectSendStream[tuple[bytes, str | None]],
        slots: anyio.Semaphore,
        workers: anyio.abc.TaskGroup,
    ) -> None:
        report, source = self.report, self.options.input
        for item in read_items(source):
            # A bad line without an id is recorded as line-N, so a rerun finds it done too.
            custom_id = item.custom_id or f"line-{item.line}"
            if not self.options.mine(custom_id):
                continue
            if custom_id in done:
                report.skipped += 1
                continue
            if isinstance(item, BadLine):
                message = f"{item.where(source)}: {item.reason}"
                log.debug("bad input line %s", message)  # preflight() lists them for the user
                line = _line(custom_id, None, _error("invalid_input", message))
                await send.send((line, "invalid_input"))
                continue
            await slots.acquire()
            self.in_flight += 1
            report.sent += 1
            workers.start_soon(self._one, item, send.clone(), slots)

    async def _one(
        self,
        item: BatchItem,
        send: MemoryObjectSendStream[tuple[bytes, str | None]],
        slots: anyio.Semaphore,
    ) -> None:
        body = dict(item.body)
        if self.options.model:
            body["model"] = self.options.model
        request = self.client.request(
            self._path(item.url), body, labels={"custom_id": item.custom_id}
        )
        try:
            async with send:
                try:
                    response = await self.client.send(request)
                    if response.stream is not None:
                        response = await response.aread()
                    line, kind = self._result(item.custom_id, response)
                except CorralError as exc:
                    line, kind = _line(item.custom_id, None, _error(exc.kind, str(exc))), exc.kind
                except Exception as exc:  # a bug must not lose the request: record it, log it
                    log.exception("internal error on %s", item.custom_id)
                    line, kind = (
                        _line(item.custom_id, None, _error("internal_error", repr(exc))),
                        "internal_error",
                    )
                await send.send((line, kind))
        finally:
            self.in_flight -= 1
            slots.release()

    def _result(self, custom_id: str, response: Any) -> tuple[bytes, str | None]:
        request_id = response.request_id
        try:
            body = response.json()
        except jsonlib.JSONDecodeError:
            message = f"HTTP {response.status} body is not JSON"
            payload = {"status_code": response.status, "request_id": request_id, "body": None}
            return _line(
                custom_id, payload, _error("malformed_response", message)
            ), "malformed_response"
        payload = {"status_code": response.status, "request_id": request_id, "body": body}
        error = classify(response.status, response.headers, response.body)
        if error is None:
            usage = response_usage(response)
            if usage is not None:
                self.report.tokens_in += usage.prompt_tokens
                self.report.tokens_out += usage.completion_tokens
            return _line(custom_id, payload, None), None
        return _line(custom_id, payload, _error(error.kind, error.message)), error.kind

    async def _write(
        self, receive: MemoryObjectReceiveStream[tuple[bytes, str | None]], writer: OutputWriter
    ) -> None:
        report = self.report
        async with receive:
            async for line, kind in receive:
                writer.write(line)
                if kind is None:
                    report.succeeded += 1
                else:
                    report.failed[kind] += 1


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
    counter: TokenCounter | None = None,
    prices: Mapping[str, Price] = DEFAULT_PRICES,
) -> CostEstimate:
    """``--dry-run``: tokens and a cost range (no output .. max output) without sending."""
    counter = counter or EstimatingCounter()
    requests = input_tokens = output_tokens = 0
    low = high = 0.0
    unpriced: set[str] = set()
    for item in read_items(options.input):
        if isinstance(item, BadLine):
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
