"""The emulator's Batch API: ``/v1/files`` and ``/v1/batches``, decided without socket I/O.

Theory of operation. An upload (multipart, purpose ``batch``) is kept on disk, so a benchmark
of a million lines does not live in the emulator's memory. A batch moves along its timeline as
time passes, checked whenever it is read (retrieve, list, cancel): the first tenth of its
duration it is ``validating``, then ``in_progress`` (its lines are answered in order, as
many as the elapsed time says, so ``request_counts`` grow), the last tenth ``finalizing``, then
``completed`` with an output file (status 200 records) and an error file (the others). Each
line is answered by the emulator's own chat or embeddings route, so a batch's answers are the
live answers. A batch still unfinished at ``expires_after`` seconds ``expired``: its
unanswered lines go to the error file as ``batch_expired``. A cancelled batch writes its
unanswered lines there as ``batch_cancelled``. With ``enqueued_token_limit``, a batch whose
tokens (prompt estimate plus ``max_tokens``) with those of the batches in flight exceed it
``failed`` at once with ``token_limit_exceeded``, as OpenAI's queue does. ``line_faults``
fail or drop named lines, the first time each is answered only (a resubmission succeeds).
"""

from __future__ import annotations

import itertools
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from corral.core import _jsonlib as jsonlib

__all__ = ["BATCH_ENDPOINTS", "BatchConfig", "BatchService", "LineAnswer", "Reply"]

#: The endpoints a batch may name (those the emulator answers).
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
#: The line faults ``BatchConfig.line_faults`` may name.
LINE_FAULTS = ("400", "429", "500", "drop")
_TERMINAL = ("completed", "failed", "expired", "cancelled")
_DAY = 24 * 3600


@attrs.frozen
class BatchConfig:
    """How the emulated Batch API behaves (see the module docstring)."""

    #: Seconds from creation to completion, plus ``per_request`` for each line (a big batch
    #: takes longer, so a smaller resubmission can finish where the first expired).
    duration: float = 1.0
    per_request: float = 0.0
    #: Seconds after creation at which an unfinished batch expires; None: never.
    expires_after: float | None = None
    #: custom_id -> fault for that line's first answer: "400", "429", "500" (an error-file
    #: record with that status) or "drop" (in neither file).
    line_faults: Mapping[str, str] = attrs.field(factory=dict)
    #: Most tokens the batches in flight may hold (OpenAI's enqueued token limit); None: no cap.
    enqueued_token_limit: int | None = None
    #: Where files are kept; None: a temporary directory removed with the emulator.
    directory: Path | None = None

    def __attrs_post_init__(self) -> None:
        bad = sorted(set(self.line_faults.values()) - set(LINE_FAULTS))
        if bad:
            raise ValueError(f"line_faults: unknown fault {bad[0]!r}; one of {LINE_FAULTS}")


#: (status, content type, body) of one Batch API answer.
Reply = tuple[int, str, bytes]
#: (status, body, request id) of one line answered by the live routes.
LineAnswer = tuple[int, bytes, str]


@attrs.define(eq=False)
class _File:
    id: str
    filename: str
    purpose: str
    path: Path
    size: int
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@attrs.define(eq=False)
class _Batch:
    id: str
    endpoint: str
    input: _File
    metadata: Mapping[str, str] | None
    authorization: str
    created: float  #: on the server's clock
    created_at: int  #: wall clock, for the wire
    total: int
    status: str = "validating"
    answered: int = 0
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    errors: list[dict[str, Any]] = attrs.field(factory=list)
    stamps: dict[str, int] = attrs.field(factory=dict)
    output: _File | None = None
    error: _File | None = None
    #: Byte offset of the next unanswered line of the input.
    offset: int = 0

    @property
    def active(self) -> bool:
        return self.status not in _TERMINAL

    def to_json(self) -> dict[str, Any]:
        errors = {"object": "list", "data": self.errors} if self.errors else None
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input.id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output.id if self.output else None,
            "error_file_id": self.error.id if self.error else None,
            "created_at": self.created_at,
            "in_progress_at": self.stamps.get("in_progress"),
            "expires_at": self.created_at + _DAY,
            "finalizing_at": self.stamps.get("finalizing"),
            "completed_at": self.stamps.get("completed"),
            "failed_at": self.stamps.get("failed"),
            "expired_at": self.stamps.get("expired"),
            "cancelling_at": self.stamps.get("cancelling"),
            "cancelled_at": self.stamps.get("cancelled"),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": dict(self.metadata) if self.metadata else None,
        }


class _NotFound(Exception):
    pass


class _Invalid(Exception):
    pass


class BatchService:
    """The files and batches of one emulator. Not thread-safe: the server's loop owns it.

    ``answer(now, url, headers, body)`` answers one line as the live route would.
    """

    def __init__(
        self,
        config: BatchConfig,
        answer: Callable[[float, str, Mapping[str, str], bytes], LineAnswer],
    ) -> None:
        self.config = config
        self.counts: Counter[str] = Counter()
        self._answer = answer
        self._tmp = None if config.directory else tempfile.TemporaryDirectory(prefix="corral-emu-")
        self._dir = config.directory or Path(self._tmp.name if self._tmp else ".")
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._faulted: set[str] = set()
        self._ids = itertools.count(1)
        self._wall_offset = time.time() - time.monotonic()

    # -- routing ----------------------------------------------------------------------------

    def handle(
        self, now: float, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> Reply:
        path, _, query = target.partition("?")
        parts = path.rstrip("/").split("/")[2:]  # after "", "v1"
        try:
            match method, parts:
                case "POST", ["files"]:
                    return self._upload(now, headers.get("content-type", ""), body)
                case "GET", ["files", file_id]:
                    return _json(self._file(file_id).to_json())
                case "GET", ["files", file_id, "content"]:
                    return 200, "application/octet-stream", self._file(file_id).path.read_bytes()
                case "POST", ["batches"]:
                    return self._create(now, headers.get("authorization", ""), body)
                case "GET", ["batches"]:
                    return self._list(now, urllib.parse.parse_qs(query))
                case "GET", ["batches", batch_id]:
                    return _json(self._advance(self._batch(batch_id), now).to_json())
                case "POST", ["batches", batch_id, "cancel"]:
                    return _json(self._cancel(self._batch(batch_id), now).to_json())
        except _NotFound as exc:
            return _error(404, str(exc))
        except _Invalid as exc:
            return _error(400, str(exc))
        return _error(404, f"Invalid URL ({method} {path}).")

    def _file(self, file_id: str) -> _File:
        found = self._files.get(file_id)
        if found is None:
            raise _NotFound(f"No such File object: {file_id}")
        return found

    def _batch(self, batch_id: str) -> _Batch:
        found = self._batches.get(batch_id)
        if found is None:
            raise _NotFound(f"No batch found with id '{batch_id}'.")
        return found

    def _wall(self, now: float) -> int:
        return int(self._wall_offset + now)

    # -- files ------------------------------------------------------------------------------

    def _upload(self, now: float, content_type: str, body: bytes) -> Reply:
        fields = parse_multipart(body, content_type)
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if "file" not in fields:
            raise _Invalid("'file' is a required property")
        if purpose != "batch":
            raise _Invalid(f"'{purpose}' is not a purpose this emulator takes; use 'batch'")
        filename, content = fields["file"]
        self.counts["files_uploaded"] += 1
        stored = self._store(now, filename or "upload.jsonl", purpose, content)
        return _json(stored.to_json())

    def _store(self, now: float, filename: str, purpose: str, content: bytes) -> _File:
        file_id = f"file-{next(self._ids):08d}"
        path = self._dir / file_id
        path.write_bytes(content)
        self._files[file_id] = _File(
            file_id, filename, purpose, path, len(content), self._wall(now)
        )
        return self._files[file_id]

    def _new_output(self, now: float, batch: _Batch, kind: str) -> _File:
        return self._store(now, f"{batch.id}_{kind}.jsonl", "batch_output", b"")

    # -- batches ----------------------------------------------------------------------------

    def _create(self, now: float, authorization: str, body: bytes) -> Reply:
        try:
            params = jsonlib.loads(body)
        except jsonlib.JSONDecodeError:
            raise _Invalid("We could not parse the JSON body of your request.") from None
        if not isinstance(params, dict):
            raise _Invalid("expected a JSON object")
        endpoint = params.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise _Invalid(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}")
        if params.get("completion_window") != "24h":
            raise _Invalid("completion_window must be '24h'")
        source = self._file(str(params.get("input_file_id")))
        if source.purpose != "batch":
            raise _Invalid(f"file {source.id} was not uploaded with purpose 'batch'")
        metadata = params.get("metadata")
        total, tokens = _measure(source.path)
        batch = _Batch(
            id=f"batch_{next(self._ids):08d}",
            endpoint=str(endpoint),
            input=source,
            metadata=metadata if isinstance(metadata, dict) else None,
            authorization=authorization,
            created=now,
            created_at=self._wall(now),
            total=total,
            tokens=tokens,
        )
        self.counts["batches_created"] += 1
        self._batches[batch.id] = batch
        limit = self.config.enqueued_token_limit
        if limit is not None:
            queued = sum(b.tokens for b in self._batches.values() if b.active and b is not batch)
            if queued + tokens > limit:
                self.counts["batches_refused"] += 1
                batch.errors.append(
                    {
                        "code": "token_limit_exceeded",
                        "message": f"Enqueued token limit reached for this organization. Limit: "
                        f"{limit:,} enqueued tokens (this batch {tokens:,}, queued "
                        f"{queued:,}). Please try again once some in_progress batches have "
                        "been completed.",
                        "param": None,
                        "line": None,
                    }
                )
                self._enter(batch, "failed", now)
        return _json(batch.to_json())

    def _list(self, now: float, query: Mapping[str, list[str]]) -> Reply:
        try:
            limit = max(1, min(100, int(query.get("limit", ["20"])[0])))
        except ValueError:
            raise _Invalid("limit must be an integer") from None
        newest_first = list(reversed(self._batches.values()))
        after = query.get("after", [None])[0]
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = [self._advance(b, now).to_json() for b in newest_first[:limit]]
        return _json(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(newest_first) > limit,
            }
        )

    def _cancel(self, batch: _Batch, now: float) -> _Batch:
        self._advance(batch, now)
        if batch.active:
            self._enter(batch, "cancelling", now)
            self._finish(batch, now, "cancelled", "batch_cancelled")
        return batch

    def _enter(self, batch: _Batch, status: str, now: float) -> None:
        batch.status = status
        batch.stamps[status] = self._wall(now)

    def _advance(self, batch: _Batch, now: float) -> _Batch:
        """Move ``batch`` along its timeline to ``now``, answering the lines now due."""
        if not batch.active:
            return batch
        duration = self.config.duration + self.config.per_request * batch.total
        expiry = self.config.expires_after
        elapsed = now - batch.created
        ends = min(elapsed, expiry) if expiry is not None else elapsed
        if duration <= 0:
            due = batch.total
        else:
            share = (ends - 0.1 * duration) / (0.8 * duration)
            due = batch.total if share >= 1 else max(0, int(batch.total * share))
        if batch.status == "validating" and elapsed >= 0.1 * duration:
            self._enter(batch, "in_progress", now)
        self._answer_lines(batch, now, due)
        if expiry is not None and expiry < duration and elapsed >= expiry:
            self._finish(batch, now, "expired", "batch_expired")
        elif elapsed >= duration:
            self._finish(batch, now, "completed", None)
        elif elapsed >= 0.9 * duration and batch.status == "in_progress":
            self._enter(batch, "finalizing", now)
        return batch

    def _finish(self, batch: _Batch, now: float, status: str, unanswered: str | None) -> None:
        """End ``batch`` as ``status``; lines not yet answered become ``unanswered`` errors."""
        if unanswered is None:
            self._answer_lines(batch, now, batch.total)
        else:
            message = {
                "batch_expired": "This request could not be executed before the completion "
                "window expired.",
                "batch_cancelled": "This request was not executed because the batch was cancelled.",
            }[unanswered]
            with self._appender(batch, now, "error") as write:
                for line_no, raw in self._unanswered(batch, batch.total):
                    custom_id = _custom_id(raw) or f"line-{line_no}"
                    error = {"code": unanswered, "message": message}
                    write(_record(batch, line_no, custom_id, None, error))
                    batch.failed += 1
        self._enter(batch, status, now)

    def _unanswered(self, batch: _Batch, due: int) -> Iterator[tuple[int, bytes]]:
        """The input's lines from ``batch.answered`` up to ``due``, advancing the cursor."""
        if batch.answered >= due:
            return
        with batch.input.path.open("rb") as f:
            f.seek(batch.offset)
            while batch.answered < due:
                raw = f.readline()
                if not raw:
                    batch.answered = due
                    break
                batch.offset += len(raw)
                if not raw.strip():
                    continue
                batch.answered += 1
                yield batch.answered, raw

    def _answer_lines(self, batch: _Batch, now: float, due: int) -> None:
        if batch.answered >= due:
            return
        out: list[bytes] = []
        err: list[bytes] = []
        for line_no, raw in self._unanswered(batch, due):
            record, ok = self._answer_line(batch, now, line_no, raw)
            if record is None:
                continue
            (out if ok else err).append(record)
            if ok:
                batch.completed += 1
            else:
                batch.failed += 1
        if out:
            with self._appender(batch, now, "output") as write:
                write(b"".join(out))
        if err:
            with self._appender(batch, now, "error") as write:
                write(b"".join(err))

    def _answer_line(
        self, batch: _Batch, now: float, line_no: int, raw: bytes
    ) -> tuple[bytes | None, bool]:
        line = _parsed(raw)
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            error = {"code": "invalid_json_line", "message": f"line {line_no} is not valid"}
            return _record(batch, line_no, f"line-{line_no}", None, error), False
        custom_id = line["custom_id"]
        if line.get("url") != batch.endpoint:
            error = {
                "code": "mismatched_endpoint",
                "message": f"line {line_no}: url {line.get('url')!r} is not the batch's "
                f"endpoint {batch.endpoint}",
            }
            return _record(batch, line_no, custom_id, None, error), False
        fault = self.config.line_faults.get(custom_id)
        if fault is not None and custom_id not in self._faulted:
            self._faulted.add(custom_id)
            self.counts[f"line_fault_{fault}"] += 1
            if fault == "drop":
                return None, False
            status = int(fault)
            body = {"error": {"message": f"injected {fault}", "type": "server_error"}}
            response = {"status_code": status, "request_id": f"req_f{line_no}", "body": body}
            return _record(batch, line_no, custom_id, response, None), False
        headers = {"authorization": batch.authorization, "content-type": "application/json"}
        status, answer, request_id = self._answer(
            now, batch.endpoint, headers, jsonlib.dumps(line.get("body"))
        )
        try:
            parsed = jsonlib.loads(answer)
        except jsonlib.JSONDecodeError:
            status, parsed = 500, {"error": {"message": "malformed", "type": "server_error"}}
        response = {"status_code": status, "request_id": request_id, "body": parsed}
        return _record(batch, line_no, custom_id, response, None), status == 200

    def _appender(self, batch: _Batch, now: float, kind: str) -> _Appender:
        current = batch.output if kind == "output" else batch.error
        if current is None:
            current = self._new_output(now, batch, kind)
            if kind == "output":
                batch.output = current
            else:
                batch.error = current
        return _Appender(current)


class _Appender:
    """``with`` it to append bytes to a stored file, keeping its size right."""

    def __init__(self, stored: _File) -> None:
        self._stored = stored
        self._f: Any = None

    def __enter__(self) -> Callable[[bytes], None]:
        self._f = self._stored.path.open("ab")
        return self._write

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._stored.size += len(data)

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _measure(path: Path) -> tuple[int, int]:
    """Lines of a batch input, and its tokens as the queue counts them (chars / 4 plus
    ``max_tokens``)."""
    lines = tokens = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            lines += 1
            line = _parsed(raw)
            body = line.get("body") if isinstance(line, dict) else None
            if not isinstance(body, dict):
                continue
            text = jsonlib.dumps(body.get("messages") or body.get("input") or "")
            limit = body.get("max_completion_tokens") or body.get("max_tokens") or 0
            tokens += -(-len(text) // 4) + (limit if isinstance(limit, int) else 0)
    return lines, tokens


def _parsed(raw: bytes) -> Any:
    try:
        return jsonlib.loads(raw)
    except jsonlib.JSONDecodeError:
        return None


def _custom_id(raw: bytes) -> str | None:
    line = _parsed(raw)
    found = line.get("custom_id") if isinstance(line, dict) else None
    return found if isinstance(found, str) else None


def _record(batch: _Batch, line_no: int, custom_id: str, response: Any, error: Any) -> bytes:
    record = {
        "id": f"batch_req_{batch.id.removeprefix('batch_')}_{line_no}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return jsonlib.dumps(record) + b"\n"


def _json(data: Mapping[str, Any]) -> Reply:
    return 200, "application/json", jsonlib.dumps(data)


def _error(status: int, message: str) -> Reply:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return status, "application/json", jsonlib.dumps({"error": error})


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name -> (filename, content)."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise _Invalid("expected a multipart/form-data upload")
    boundary = ""
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise _Invalid("the multipart Content-Type has no boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    fields: dict[str, tuple[str | None, bytes]] = {}
    start = body.find(delimiter)
    if start < 0:
        raise _Invalid("the multipart body has no part")
    pos = start + len(delimiter)
    while not body.startswith(b"--", pos):
        head_end = body.find(b"\r\n\r\n", pos)
        end = body.find(b"\r\n" + delimiter, head_end)
        if head_end < 0 or end < 0:
            raise _Invalid("the multipart body is cut short")
        name, filename = _disposition(body[pos:head_end].decode("utf-8", "replace"))
        if name is not None:
            fields[name] = (filename, body[head_end + 4 : end])
        pos = end + 2 + len(delimiter)
    return fields


def _disposition(head: str) -> tuple[str | None, str | None]:
    name = filename = None
    for line in head.split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        for param in value.split(";"):
            k, _, v = param.strip().partition("=")
            if k == "name":
                name = v.strip('"')
            elif k == "filename":
                filename = v.strip('"')
    return name, filename
