"""Reading a batch input file: one JSONL line in, a ``BatchItem`` or a ``BadLine`` out.

Two line shapes are accepted: the OpenAI Batch API's ``{"custom_id", "method", "url", "body"}``,
or a bare request body (``{"model", "messages", ...}``) whose custom_id becomes ``line-N``.
Bad lines are values, not exceptions, so one bad line never stops the others.
"""

from __future__ import annotations

import codecs
import hashlib
import heapq
import tempfile
from array import array
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import attrs

from corral.core import _jsonlib as jsonlib

__all__ = ["BadLine", "BatchItem", "DuplicateCheck", "IdSet", "id_hash", "read_items"]

_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions")


@attrs.frozen
class BatchItem:
    line: int
    custom_id: str
    url: str
    body: Mapping[str, Any]


@attrs.frozen
class BadLine:
    line: int
    reason: str
    custom_id: str | None = None

    def where(self, path: Path) -> str:
        return f"{path}:{self.line}"

    @property
    def record_id(self) -> str:
        """The custom_id its error record carries: its own, or ``line-N`` like a bare body."""
        return self.custom_id or f"line-{self.line}"


def parse_line(line_no: int, raw: bytes) -> BatchItem | BadLine | None:
    """One line of input; None for a blank line."""
    if not raw.strip():
        return None
    try:
        data = jsonlib.loads(raw)
    except jsonlib.JSONDecodeError as exc:
        return BadLine(line_no, f"not valid JSON ({type(exc).__name__}: {str(exc)[:80]})")
    if not isinstance(data, dict):
        return BadLine(line_no, f"expected a JSON object, got {type(data).__name__}")
    if "custom_id" not in data:
        if "messages" in data:
            return BatchItem(line_no, f"line-{line_no}", "/v1/chat/completions", data)
        if "input" in data:
            return BatchItem(line_no, f"line-{line_no}", "/v1/embeddings", data)
        return BadLine(
            line_no, "neither a Batch API line (custom_id) nor a request body (messages)"
        )
    custom_id = data["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return BadLine(line_no, "field 'custom_id' must be a non-empty string")
    method = data.get("method", "POST")
    if method != "POST":
        return BadLine(line_no, f"field 'method' must be POST, got {method!r}", custom_id)
    url = data.get("url", "/v1/chat/completions")
    if url not in _ENDPOINTS:
        return BadLine(line_no, f"field 'url' must be one of {', '.join(_ENDPOINTS)}", custom_id)
    body = data.get("body")
    if not isinstance(body, dict):
        return BadLine(line_no, "field 'body' must be a JSON object", custom_id)
    if url.endswith("/chat/completions") and not isinstance(body.get("messages"), list):
        return BadLine(line_no, "field 'body.messages' must be an array", custom_id)
    return BatchItem(line_no, custom_id, url, body)


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def read_items(path: Path, *, hasher: _Hasher | None = None) -> Iterator[BatchItem | BadLine]:
    """Stream the file; memory does not grow with its length.

    A UTF-8 byte order mark (editors on Windows write one) is skipped, so line 1 keeps its
    custom_id. ``hasher`` sees every raw byte, for the run manifest's input fingerprint.
    """
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if hasher is not None:
                hasher.update(raw)
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            item = parse_line(line_no, raw)
            if item is not None:
                yield item


def id_hash(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little")


_RUN = 65536


class IdSet:
    """A compact set of custom_ids (8 bytes each) for a million-line batch."""

    def __init__(self) -> None:
        self._pending = array("Q")
        self._runs: list[array[int]] = []
        self._sorted = array("Q")

    def add(self, custom_id: str) -> None:
        self._pending.append(id_hash(custom_id))
        if len(self._pending) >= _RUN:  # sorted as they come: the ids are held twice at most
            self._runs.append(array("Q", sorted(self._pending)))
            self._pending = array("Q")

    def _settle(self) -> None:
        """Merge the sorted runs in: a million ids never become a million Python ints at
        once."""
        if not self._pending and not self._runs:
            return
        runs = [self._sorted, *self._runs, array("Q", sorted(self._pending))]
        self._pending, self._runs = array("Q"), []
        self._sorted = array("Q", heapq.merge(*runs))

    def __contains__(self, custom_id: object) -> bool:
        if not isinstance(custom_id, str):
            return False
        self._settle()
        h = id_hash(custom_id)
        i = bisect_left(self._sorted, h)
        return i < len(self._sorted) and self._sorted[i] == h

    def __len__(self) -> int:
        self._settle()
        return len(self._sorted)

    def duplicates(self) -> set[int]:
        """Hashes seen more than once (custom_ids whose hashes collide count too)."""
        self._settle()
        s = self._sorted
        return {s[i] for i in range(1, len(s)) if s[i] == s[i - 1]}


_MASK = (1 << 64) - 1


def _check_hash(custom_id: str) -> int:
    """The process's own string hash (cached on the string, unlike blake2b), as 64 bits:
    good enough to find suspects, which are then compared exactly."""
    return hash(custom_id) & _MASK


class DuplicateCheck:
    """Finds the custom_ids an input holds more than once, in memory that does not grow with
    the input: 8-byte hashes go to 256 buckets by their top byte, the buckets move to a
    temporary file every ``held`` hashes, and each bucket is checked on its own at the end.
    Equal hashes are suspects, not verdicts: ``duplicates`` compares the suspects' ids."""

    def __init__(self, *, held: int = 1 << 20) -> None:
        self._held = held
        self._buckets = [array("Q") for _ in range(256)]
        self._spilled: list[list[tuple[int, int]]] = [[] for _ in range(256)]
        self._file: IO[bytes] | None = None
        self._count = self._in_memory = 0

    def __len__(self) -> int:
        return self._count

    def add(self, custom_id: str) -> None:
        h = _check_hash(custom_id)
        self._buckets[h >> 56].append(h)
        self._count += 1
        self._in_memory += 1
        if self._in_memory >= self._held:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        for bucket, extents in zip(self._buckets, self._spilled, strict=True):
            if bucket:
                extents.append((self._file.tell(), len(bucket)))
                bucket.tofile(self._file)
                del bucket[:]
        self._in_memory = 0

    def _bucket(self, index: int) -> array[int]:
        hashes = array("Q")
        if self._file is not None:
            for offset, count in self._spilled[index]:
                self._file.seek(offset)
                hashes.fromfile(self._file, count)
        hashes.extend(self._buckets[index])
        return hashes

    def suspects(self) -> set[int]:
        """Hashes seen more than once (equal ids, or rarely unequal ids that collide)."""
        found: set[int] = set()
        for index in range(256):
            hashes = self._bucket(index)
            seen = set(hashes)
            if len(seen) != len(hashes):
                for h in hashes:
                    if h in seen:
                        seen.discard(h)
                    else:
                        found.add(h)
        return found

    def is_suspect(self, custom_id: str, suspects: set[int]) -> bool:
        return _check_hash(custom_id) in suspects

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
