"""The batch output file: scan it to resume, repair a torn tail, append results durably.

Each result is one JSONL line in the OpenAI Batch API output format. Lines are written whole
and fsynced in batches; after a crash at most the last line can be torn, and ``scan_output``
cuts it off. Every custom_id appears exactly once: done ids are skipped on resume, and
``--retry-failed`` first rewrites the file without its failures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import attrs

from corral.batch.items import IdSet
from corral.core import jsonlib
from corral.core.errors import InvalidInput

__all__ = ["OutputWriter", "ScanResult", "is_success", "scan_output"]


def is_success(record: Mapping[str, Any]) -> bool:
    response = record.get("response")
    return (
        record.get("error") is None
        and isinstance(response, Mapping)
        and response.get("status_code") == 200
    )


@attrs.define
class ScanResult:
    done: IdSet
    succeeded: int = 0
    failed: int = 0
    repaired_bytes: int = 0


def scan_output(path: Path, *, drop_failures: bool = False) -> ScanResult:
    """Read what a previous run wrote. Cuts a torn last line; refuses a damaged middle line.

    With ``drop_failures`` the file is rewritten (atomically) without its failed records, so
    those custom_ids run again and still appear exactly once.
    """
    result = ScanResult(IdSet())
    if not path.exists():
        return result
    good_end = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    kept = tmp.open("wb") if drop_failures else None
    try:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                record = _record(raw)
                if record is None:
                    if f.read(1):  # something follows: not a torn tail but a damaged file
                        raise InvalidInput(f"{path}:{line_no}: output line is not a result record")
                    break
                good_end += len(raw)
                success = is_success(record)
                if success:
                    result.succeeded += 1
                else:
                    result.failed += 1
                if drop_failures and not success:
                    continue
                result.done.add(record["custom_id"])
                if kept is not None:
                    kept.write(raw)
        if kept is not None:
            kept.flush()
            os.fsync(kept.fileno())
            kept.close()
            os.replace(tmp, path)
            return result
    finally:
        if kept is not None and not kept.closed:
            kept.close()
            tmp.unlink(missing_ok=True)
    size = path.stat().st_size
    if good_end < size:
        result.repaired_bytes = size - good_end
        with path.open("r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return result


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


class OutputWriter:
    """Appends result lines, one write() each; fsyncs every ``sync_every`` lines or
    ``sync_interval`` seconds."""

    def __init__(self, path: Path, *, sync_every: int = 256, sync_interval: float = 1.0) -> None:
        self.path = path
        # Unbuffered: each line reaches the OS in one write(), so a killed process loses no
        # finished line; fsync (power loss) is what is batched.
        self._file: IO[bytes] = path.open("ab", buffering=0)
        os.chmod(path, 0o600)
        self._sync_every, self._sync_interval = sync_every, sync_interval
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.written = 0

    def write(self, line: bytes) -> None:
        self._file.write(line)
        self.written += 1
        self._unsynced += 1
        if self._unsynced >= self._sync_every or (
            time.monotonic() - self._last_sync >= self._sync_interval
        ):
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()
