"""What a ``--via batch-api`` run has at the provider, as kept in the run manifest.

A run sends its lines in rounds: round 1 holds every line not yet in the output, and each
later round the lines the provider did not settle (expired, a retryable error, missing). A
round is split into parts (one input file, one batch each). A part is recorded in the manifest
when its file is written, again the moment its file is uploaded (``file_id``) and again the
moment its batch is created (``batch_id``), so a run killed at any point resumes without
uploading or creating anything twice; a part leaves the manifest once its results are merged.
``token`` goes into the batch's metadata, so a create whose answer was lost is found again by
listing the batches instead of being created twice.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["PartRecord", "RemoteState"]


@attrs.frozen
class PartRecord:
    """One part of a round: a local input file, its upload and its batch."""

    #: The part's file name in the run's work directory (``OUTPUT.batches/``).
    name: str
    endpoint: str
    requests: int
    size: int
    file_id: str | None = None
    batch_id: str | None = None
    #: The status last seen, for the progress line of a resumed run.
    status: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartRecord:
        return cls(
            name=str(data["name"]),
            endpoint=str(data["endpoint"]),
            requests=int(data["requests"]),
            size=int(data["size"]),
            file_id=data.get("file_id") or None,
            batch_id=data.get("batch_id") or None,
            status=data.get("status") or None,
        )


def _new_run_id() -> str:
    return secrets.token_hex(6)


@attrs.frozen
class RemoteState:
    """The round in progress and its parts not yet merged into the output."""

    #: 0 before the first round; the round the parts belong to otherwise.
    round: int = 0
    parts: tuple[PartRecord, ...] = ()
    #: Names this run's batches in their metadata (with the part's name).
    run_id: str = attrs.field(factory=_new_run_id)

    def token(self, part: PartRecord) -> str:
        return f"{self.run_id}/{part.name}"

    def replace(self, old: PartRecord, *new: PartRecord) -> RemoteState:
        """``old`` swapped for ``new`` (none: removed), in place."""
        parts: list[PartRecord] = []
        for part in self.parts:
            parts.extend(new if part.name == old.name else (part,))
        return attrs.evolve(self, parts=tuple(parts))

    @property
    def at_provider(self) -> tuple[PartRecord, ...]:
        """Parts with a batch created (running, or finished and not yet merged)."""
        return tuple(p for p in self.parts if p.batch_id is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "run_id": self.run_id,
            "parts": [p.to_json() for p in self.parts],
        }

    @classmethod
    def from_json(cls, data: Any) -> RemoteState:
        """The state of a manifest; a manifest without one (a live run's) has none."""
        if not data:
            return cls()
        return cls(
            round=int(data["round"]),
            parts=tuple(PartRecord.from_json(p) for p in data["parts"]),
            run_id=str(data["run_id"]),
        )
