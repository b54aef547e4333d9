"""The batch output file: scan it to resume, repair a torn tail, append results durably.

Each result is one JSONL line in the OpenAI Batch API output format. Lines are written whole
and fsynced in batches; after a crash at most the last line can be torn, and ``scan_output``
cuts it off. Every custom_id appears exactly once: done ids are skipped on resume, and
``--retry-failed`` first rewrites the file without its failures.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import attrs

from corral.batch._items import IdSet
from corral.batch._paths import replace_atomically
from corral.core import _jsonlib as jsonlib
from corral.core._errors import CorralError, InvalidInput

__all__ = [
    "OutputError",
    "OutputWriter",
    "ScanResult",
    "failure_kind",
    "is_success",
    "scan_output",
]


class OutputError(CorralError):
    """The output file could not take a result (disk full, I/O error, file size limit)."""

    kind = "output_error"

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def is_success(record: Mapping[str, Any]) -> bool:
    response = record.get("response")
    return (
        record.get("error") is None
        and isinstance(response, Mapping)
        and response.get("status_code") == 200
    )


def failure_kind(record: Mapping[str, Any]) -> str:
    """The error kind a failed record carries (``code``), for the summary by kind."""
    error = record.get("error")
    if isinstance(error, Mapping) and isinstance(error.get("code"), str):
        return str(error["code"])
    response = record.get("response")
    status = response.get("status_code") if isinstance(response, Mapping) else None
    return f"http_{status}" if status is not None else "failed"


@attrs.define
class ScanResult:
    """What an output file already holds: the done ids and the outcomes by kind."""

    done: IdSet
    succeeded: int = 0
    failed: Counter[str] = attrs.field(factory=Counter)
    repaired_bytes: int = 0
    #: Failures removed by ``--retry-failed`` (they run again).
    dropped: int = 0

    @property
    def records(self) -> int:
        return self.succeeded + sum(self.failed.values())


def scan_output(path: Path, *, drop_failures: bool = False, repair: bool = True) -> ScanResult:
    """Read what a previous run wrote. Cuts a torn last line; refuses a damaged middle line and
    a file that is not a results file (a requests file given as ``-o``, say).

    With ``drop_failures`` the file is rewritten (atomically, beside it) without its failed
    records, so those custom_ids run again and still appear exactly once. ``repair=False``
    only reads (``--dry-run``).
    """
    result = ScanResult(IdSet())
    if not path.exists():
        return result
    if drop_failures:
        replace_atomically(path, lambda kept: _scan(path, result, kept))
        return result
    good_end = _scan(path, result, None)
    size = path.stat().st_size
    if repair and good_end < size:
        result.repaired_bytes = size - good_end
        with path.open("r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return result


def _scan(path: Path, result: ScanResult, kept: IO[bytes] | None) -> int:
    """Count the records of ``path`` into ``result``; copy the ones to keep into ``kept``."""
    good_end = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            record = _record(raw)
            if record is None:
                if f.read(1):  # something follows: not a torn tail but a damaged file
                    raise InvalidInput(f"{path}:{line_no}: output line is not a result record")
                break
            if not _is_result(record):
                raise InvalidInput(
                    f"{path}:{line_no}: this is a request line, not a result record; "
                    "-o must name a results file (or a new file), not an input"
                )
            good_end += len(raw)
            if is_success(record):
                result.succeeded += 1
            elif kept is not None:
                result.dropped += 1
                continue
            else:
                result.failed[failure_kind(record)] += 1
            result.done.add(record["custom_id"])
            if kept is not None:
                kept.write(raw)
    return good_end


def _record(raw: bytes) -> dict[str, Any] | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        record = jsonlib.loads(raw)
    except jsonlib.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        return None
    return record


def _is_result(record: Mapping[str, Any]) -> bool:
    """A Batch output record has ``response``/``error``; a request line has ``body``/``url``."""
    has_outcome = "response" in record or "error" in record
    return has_outcome and "body" not in record and "url" not in record


class OutputWriter:
    """Appends result lines, every byte of each or an ``OutputError``; fsyncs every
    ``sync_every`` lines or ``sync_interval`` seconds.

    An fsync blocks the event loop (about 2 ms on a virtual disk): every 256 lines it took a
    fifth of a run at 25k lines/s, so a run syncs about once a second (and every 4096 lines).
    """

    def __init__(self, path: Path, *, sync_every: int = 4096, sync_interval: float = 1.0) -> None:
        self.path = path
        # Unbuffered: each line reaches the OS at once, so a killed process loses no finished
        # line; fsync (power loss) is what is batched.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._end = os.fstat(self._fd).st_size
        self._sync_every, self._sync_interval = sync_every, sync_interval
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.written = 0

    def write(self, line: bytes) -> None:
        """Write the whole line or none of it: a short write is finished or cut back off."""
        try:
            written = os.write(self._fd, line)
            if written < len(line):  # rare: finish it (or fail and cut it back)
                view = memoryview(line)[written:]
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._cut_back()
            raise OutputError(
                f"cannot write to {self.path}: {exc.strerror or exc}", errno=exc.errno
            ) from exc
        self._end += len(line)
        self.written += 1
        self._unsynced += 1
        if self._unsynced >= self._sync_every or (
            time.monotonic() - self._last_sync >= self._sync_interval
        ):
            self.sync()

    def _cut_back(self) -> None:
        """Drop a partly written line so the file resumes as is (a rerun would cut it too)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._end)

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(
                f"cannot sync {self.path}: {exc.strerror or exc}", errno=exc.errno
            ) from exc
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self._unsynced:
                os.fsync(fd)
        except OSError:
            pass  # the lines are written; only durability against power loss is lost
        finally:
            os.close(fd)
