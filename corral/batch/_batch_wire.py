"""The Batch API's objects as corral reads them, and the multipart upload read from disk.

``RemoteFile`` and ``RemoteBatch`` are frozen views of OpenAI's ``file`` and ``batch`` objects
(the fields corral acts on); a body that is not one raises ``MalformedResponse``.
``MultipartFile`` is a ``multipart/form-data`` body (``purpose`` and ``file``) whose file part
is read from disk piece by piece as it is sent, so an upload of any size costs one piece.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs

from corral.core._errors import InvalidInput, MalformedResponse

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "BatchProblem",
    "MultipartFile",
    "RemoteBatch",
    "RemoteFile",
    "RequestCounts",
]

#: Statuses of a batch still at work (``cancelling`` ends as ``cancelled``).
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
#: Statuses a batch never leaves.
TERMINAL = ("completed", "failed", "expired", "cancelled")
_PIECE = 1024 * 1024


@attrs.frozen
class RemoteFile:
    """An uploaded file (OpenAI's ``file`` object)."""

    id: str
    bytes: int
    filename: str
    purpose: str

    @classmethod
    def from_json(cls, data: Any) -> RemoteFile:
        """Read a ``file`` object; ``MalformedResponse`` if it is not one."""
        try:
            return cls(
                str(data["id"]), int(data["bytes"]), str(data["filename"]), str(data["purpose"])
            )
        except (KeyError, TypeError, ValueError):
            raise MalformedResponse("the provider's file object lacks id/bytes/purpose") from None


@attrs.frozen
class RequestCounts:
    """How many of a batch's requests there are, finished well, and failed."""

    total: int = 0
    completed: int = 0
    failed: int = 0


@attrs.frozen
class BatchProblem:
    """One entry of a batch's ``errors`` (why it failed)."""

    code: str
    message: str
    line: int | None = None


@attrs.frozen
class RemoteBatch:
    """A batch as the provider last described it (OpenAI's ``batch`` object)."""

    id: str
    status: str
    endpoint: str
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: RequestCounts = RequestCounts()
    errors: tuple[BatchProblem, ...] = ()
    metadata: Mapping[str, str] = attrs.field(factory=dict, eq=False)

    @property
    def done(self) -> bool:
        """The batch is finished: ``completed``, ``failed``, ``expired`` or ``cancelled``."""
        return self.status in TERMINAL

    @property
    def refused_for_queue(self) -> bool:
        """Failed because the provider's enqueued-token limit was full (wait, then resend)."""
        return self.status == "failed" and any(
            p.code == "token_limit_exceeded" for p in self.errors
        )

    @classmethod
    def from_json(cls, data: Any) -> RemoteBatch:
        """Read a ``batch`` object; ``MalformedResponse`` if it is not one."""
        try:
            counts = data.get("request_counts") or {}
            errors = (data.get("errors") or {}).get("data") or []
            return cls(
                id=str(data["id"]),
                status=str(data["status"]),
                endpoint=str(data.get("endpoint") or ""),
                input_file_id=str(data.get("input_file_id") or ""),
                output_file_id=data.get("output_file_id") or None,
                error_file_id=data.get("error_file_id") or None,
                counts=RequestCounts(
                    int(counts.get("total") or 0),
                    int(counts.get("completed") or 0),
                    int(counts.get("failed") or 0),
                ),
                errors=tuple(
                    BatchProblem(
                        str(e.get("code") or "batch_failed"),
                        str(e.get("message") or ""),
                        e.get("line") if isinstance(e.get("line"), int) else None,
                    )
                    for e in errors
                    if isinstance(e, Mapping)
                ),
                metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise MalformedResponse("the provider's batch object lacks id/status") from None


class MultipartFile:
    """``multipart/form-data`` with ``purpose`` and the file at ``path``, streamed from disk.

    Its ``length`` is fixed when built; a file that changes size before it is sent makes the
    transport refuse the upload (``InvalidInput``) rather than send a wrong body.
    """

    def __init__(self, path: Path, *, purpose: str = "batch", piece: int = _PIECE) -> None:
        self.path = path
        self._piece = piece
        boundary = "corral-" + secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        name = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        self._head = (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="purpose"\r\n\r\n'
            f"{purpose}\r\n"
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        try:
            self._size = path.stat().st_size
        except OSError as exc:
            raise InvalidInput(f"cannot read {path} to upload it: {exc.strerror}") from None

    @property
    def length(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        yield self._head
        try:
            async with await anyio.open_file(self.path, "rb") as f:
                while piece := await f.read(self._piece):
                    yield piece
        except OSError as exc:
            raise InvalidInput(f"cannot read {self.path} to upload it: {exc.strerror}") from None
        yield self._tail
