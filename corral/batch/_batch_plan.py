"""The Batch API back-end's decisions: lines into parts, results into records, polling pace.

Pure, or plain file I/O: no network and no clock. ``PartWriter`` cuts the lines to send into
part files within the provider's limits (requests and bytes per file, one endpoint per file);
``settle`` decides what one record of a batch's output or error file becomes: a line of the
output (``Keep``), or a request to send again in the next round (``Resend``) when it expired,
was cancelled, or failed with an error that may pass (429, 5xx, timeouts), unless the round is
the last. ``PollSchedule`` paces the polling.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import attrs

from corral.batch._batch_state import PartRecord
from corral.batch._batch_wire import RemoteBatch
from corral.batch._items import BatchItem
from corral.batch._runner import _line
from corral.core import _jsonlib as jsonlib
from corral.core._classify import classify, scrub
from corral.core._errors import MalformedResponse
from corral.core._headers import Headers
from corral.middleware._checks import at_least, finite

__all__ = [
    "Keep",
    "PartLimits",
    "PartWriter",
    "PollSchedule",
    "Resend",
    "failed_batch_line",
    "missing_line",
    "part_ids",
    "request_line",
    "settle",
    "split_part",
]

#: Error codes of records the provider never ran: worth sending again.
_NOT_RUN = ("batch_expired", "batch_cancelled")


@attrs.frozen(kw_only=True)
class PartLimits:
    """The provider's limits on one batch input file (OpenAI's: 50,000 requests, 200 MB)."""

    max_requests: int = attrs.field(default=50_000, validator=at_least(1))
    max_bytes: int = attrs.field(default=200 * 1024 * 1024, validator=at_least(1))


@attrs.frozen(kw_only=True)
class PollSchedule:
    """Seconds between polls: ``first`` after a status changes, growing by ``factor`` up to
    ``cap`` while nothing does (a batch may take 24 hours)."""

    first: float = attrs.field(default=5.0, validator=finite(minimum=0.0))
    cap: float = attrs.field(default=60.0, validator=finite(minimum=0.0))
    factor: float = attrs.field(default=1.5, validator=finite(minimum=1.0))

    def after(self, previous: float | None, *, changed: bool) -> float:
        """The wait before the next poll, given the last wait (None: none yet)."""
        if previous is None or changed:
            return min(self.first, self.cap)
        return min(self.cap, previous * self.factor)


def request_line(item: BatchItem, model: str | None) -> bytes:
    """The Batch API line for ``item``, sent as a live run sends it: ``--model`` applied, and
    without ``stream`` (a Batch output record holds one ``chat.completion``)."""
    body = dict(item.body)
    if body.pop("stream", None):
        body.pop("stream_options", None)
    if model:
        body["model"] = model
    line = {"custom_id": item.custom_id, "method": "POST", "url": item.url, "body": body}
    return jsonlib.dumps(line) + b"\n"


class PartWriter:
    """Writes request lines into part files ``{prefix}-NNNN.jsonl`` in ``directory``, a new
    file when one would pass ``limits`` or the endpoint differs (one open file per endpoint)."""

    def __init__(self, directory: Path, prefix: str, limits: PartLimits) -> None:
        self.directory, self.prefix, self.limits = directory, prefix, limits
        self._open: dict[str, tuple[PartRecord, IO[bytes]]] = {}
        self._closed: list[PartRecord] = []
        self._count = 0

    def fits(self, line: bytes) -> bool:
        """Whether ``line`` alone fits a file (a longer one can never be sent as a batch)."""
        return len(line) <= self.limits.max_bytes

    def add(self, endpoint: str, line: bytes) -> None:
        current = self._open.get(endpoint)
        if current is not None:
            part, f = current
            if (
                part.requests + 1 > self.limits.max_requests
                or part.size + len(line) > self.limits.max_bytes
            ):
                self._close(endpoint)
                current = None
        if current is None:
            self._count += 1
            name = f"{self.prefix}-{self._count:04d}.jsonl"
            part = PartRecord(name=name, endpoint=endpoint, requests=0, size=0)
            current = (part, (self.directory / name).open("wb"))
        part, f = current
        f.write(line)
        self._open[endpoint] = (
            attrs.evolve(part, requests=part.requests + 1, size=part.size + len(line)),
            f,
        )

    def _close(self, endpoint: str) -> None:
        part, f = self._open.pop(endpoint)
        f.close()
        self._closed.append(part)

    def close(self) -> list[PartRecord]:
        """Close every file; the parts in the order they were started."""
        for endpoint in list(self._open):
            self._close(endpoint)
        return sorted(self._closed, key=lambda p: p.name)


def part_ids(path: Path) -> Iterator[str]:
    """The custom_ids of a part file, in order."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                yield str(jsonlib.loads(raw)["custom_id"])


def split_part(directory: Path, part: PartRecord) -> tuple[PartRecord, PartRecord]:
    """Two parts holding the first and the second half of ``part``'s lines (at least 2)."""
    stem = part.name.removesuffix(".jsonl")
    halves = (
        PartRecord(name=f"{stem}a.jsonl", endpoint=part.endpoint, requests=0, size=0),
        PartRecord(name=f"{stem}b.jsonl", endpoint=part.endpoint, requests=0, size=0),
    )
    first = part.requests // 2
    counts = [0, 0]
    sizes = [0, 0]
    with (
        (directory / part.name).open("rb") as source,
        (directory / halves[0].name).open("wb") as a,
        (directory / halves[1].name).open("wb") as b,
    ):
        for i, raw in enumerate(line for line in source if line.strip()):
            half = 0 if i < first else 1
            (a if half == 0 else b).write(raw)
            counts[half] += 1
            sizes[half] += len(raw)
    return (
        attrs.evolve(halves[0], requests=counts[0], size=sizes[0]),
        attrs.evolve(halves[1], requests=counts[1], size=sizes[1]),
    )


@attrs.frozen
class Keep:
    """Write ``line`` to the output; ``kind`` is the failure's kind, None for a success."""

    line: bytes
    kind: str | None


@attrs.frozen
class Resend:
    """Send the request again in the next round; ``reason`` is why (an error kind)."""

    reason: str


Settlement = Keep | Resend


def _clean(line: bytes, secrets: tuple[str, ...]) -> bytes:
    """``line`` with none of the caller's credentials (a relay may echo them)."""
    if not secrets:
        return line
    text = line.decode("utf-8", "replace")
    clean = scrub(text, secrets)
    return line if clean == text else clean.encode()


def settle(record: Mapping[str, Any], *, final: bool, secrets: tuple[str, ...] = ()) -> Settlement:
    """What one output- or error-file record of the provider becomes, in the live format.

    ``final``: the last round, so nothing is sent again and every outcome is written.
    """
    custom_id = str(record["custom_id"])
    response = record.get("response")
    error = record.get("error")
    if isinstance(response, Mapping) and isinstance(response.get("status_code"), int):
        status = response["status_code"]
        body = response.get("body")
        payload = {"status_code": status, "request_id": response.get("request_id"), "body": body}
        if status == 200 and not error:
            return Keep(_clean(_line(custom_id, payload, None), secrets), None)
        raw = b"" if body is None else jsonlib.dumps(body)
        problem = classify(status, Headers(), raw, secrets=secrets) or MalformedResponse(
            f"HTTP {status} with an error record", status=status
        )
        if problem.retryable and not final:
            return Resend(problem.kind)
        fields = {"code": problem.kind, "message": problem.message}
        return Keep(_clean(_line(custom_id, payload, fields), secrets), problem.kind)
    code, message = "batch_error", "the provider reported an error without details"
    if isinstance(error, Mapping):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    if code in _NOT_RUN and not final:
        return Resend(code)
    fields = {"code": code, "message": message}
    return Keep(_clean(_line(custom_id, None, fields), secrets), code)


def failed_batch_line(custom_id: str, batch: RemoteBatch) -> tuple[bytes, str]:
    """The record of a request whose whole batch failed (not for the queue limit)."""
    problem = batch.errors[0] if batch.errors else None
    code = problem.code if problem else "batch_failed"
    message = f"batch {batch.id} failed" + (f": {problem.message}" if problem else "")
    return _line(custom_id, None, {"code": code, "message": message}), code


def missing_line(custom_id: str, rounds: int) -> tuple[bytes, str]:
    """The record of a request the provider never returned, after the last round."""
    message = f"the provider returned no result for this request in {rounds} batch round(s)"
    return _line(custom_id, None, {"code": "batch_missing", "message": message}), "batch_missing"
