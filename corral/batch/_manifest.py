"""The run manifest: what an output file was made from, so a resume cannot mix two jobs.

Written beside the output (``OUTPUT.manifest.json``) when a run starts. A rerun compares the
input's fingerprint and the options that change answers (model override, base URL, shard);
if any differ, resuming would put answers on the wrong ids (a bare-body input numbers its ids
by line) or mix two models in one file, so the rerun is refused and told what changed.

While a live run goes, the manifest also keeps what its rate limiter sent in the last window
(``RecentSends``, rewritten every ``RECORD_EVERY`` seconds): a provider keeps counting those
calls after the run is killed, so its successor starts with no more than that window has room
for instead of a full burst.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from corral.batch._batch_state import RemoteState
from corral.batch._paths import replace_atomically
from corral.core._errors import InvalidInput

__all__ = [
    "RECORD_EVERY",
    "Manifest",
    "RecentSends",
    "check_manifest",
    "manifest_path",
    "read_recent",
    "record_manifest",
]

_VERSION = 1


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


#: Seconds between two records of the recent sends (a killed run may have sent that long
#: unrecorded: its successor counts that much more).
RECORD_EVERY = 0.5

#: (seconds before ``at``, requests, tokens) slices, per rate-limit key.
Slices = Mapping[str, tuple[tuple[float, int, int], ...]]


@attrs.frozen
class RecentSends:
    """What the run's rate limiter sent in its last window, per key, as of ``at`` (seconds
    since the epoch: the reader is another process)."""

    at: float
    keys: Slices

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "keys": {k: [list(s) for s in v] for k, v in self.keys.items()}}

    @classmethod
    def from_json(cls, data: Any) -> RecentSends | None:
        """None when absent or not understood (an older manifest): nothing is assumed sent."""
        try:
            keys = {
                str(key): tuple((float(age), int(r), int(t)) for age, r, t in slices)
                for key, slices in data["keys"].items()
            }
            return cls(float(data["at"]), keys)
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def aged(self, now: float) -> dict[str, tuple[tuple[float, int, int], ...]]:
        """The slices with their ages counted from ``now`` instead of ``at``."""
        late = max(0.0, now - self.at)
        return {k: tuple((age + late, r, t) for age, r, t in v) for k, v in self.keys.items()}


@attrs.frozen
class Manifest:
    input_digest: str
    input_size: int
    #: Some ids are ``line-N`` (bare bodies or id-less bad lines): they move if lines move.
    positional_ids: bool
    model: str | None
    base_url: str
    shard: tuple[int, int] | None
    # -- the Batch API back-end (issue 18); neither changes answers, so ``changes`` skips them
    #: ``live`` or ``batch-api``: how the lines are sent.
    via: str = "live"
    #: Every file and batch the run has at the provider, recorded the moment it is made.
    remote: RemoteState = attrs.field(factory=RemoteState)
    #: Rate-limit history for a resume (issue 14); not a setting, so ``changes`` skips it.
    recent: RecentSends | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "corral_manifest": _VERSION,
            "input": {"blake2b": self.input_digest, "size": self.input_size},
            "positional_ids": self.positional_ids,
            "model": self.model,
            "base_url": self.base_url,
            "shard": list(self.shard) if self.shard else None,
            "recent_sends": self.recent.to_json() if self.recent is not None else None,
            "via": self.via,
            "batch_api": self.remote.to_json() if self.remote.round else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        shard = data["shard"]
        return cls(
            input_digest=str(data["input"]["blake2b"]),
            input_size=int(data["input"]["size"]),
            positional_ids=bool(data["positional_ids"]),
            model=data["model"],
            base_url=str(data["base_url"]),
            shard=(int(shard[0]), int(shard[1])) if shard else None,
            recent=RecentSends.from_json(data.get("recent_sends")),
            via=str(data.get("via", "live")),
            remote=RemoteState.from_json(data.get("batch_api")),
        )

    def changes(self, new: Manifest) -> list[str]:
        """What differs from ``new``, in words a user recognises."""
        found = []
        if (self.input_digest, self.input_size) != (new.input_digest, new.input_size):
            found.append("the input file's contents")
        if self.model != new.model:
            found.append(f"--model ({self.model or 'none'} -> {new.model or 'none'})")
        if self.base_url.rstrip("/") != new.base_url.rstrip("/"):
            found.append(f"the base URL ({self.base_url} -> {new.base_url})")
        if self.shard != new.shard:
            found.append(f"--shard ({_shard(self.shard)} -> {_shard(new.shard)})")
        return found


def _shard(shard: tuple[int, int] | None) -> str:
    return "none" if shard is None else f"{shard[0]}/{shard[1]}"


def read_recent(output: Path) -> RecentSends | None:
    """The recent sends the manifest beside ``output`` holds (None: none, or unreadable)."""
    try:
        data = json.loads(manifest_path(output).read_bytes())
    except (OSError, ValueError):
        return None
    return RecentSends.from_json(data.get("recent_sends")) if isinstance(data, dict) else None


def record_manifest(output: Path, current: Manifest) -> None:
    """Write ``current`` beside ``output`` (atomically)."""
    payload = json.dumps(current.to_json(), indent=2).encode() + b"\n"
    replace_atomically(manifest_path(output), lambda f: f.write(payload))


def check_manifest(output: Path, current: Manifest, *, resuming: bool, force: bool = False) -> None:
    """Refuse a resume whose job differs from the one that wrote ``output``.

    ``resuming``: the output already holds results. ``force`` accepts changed options, and a
    changed input only when every id is an explicit custom_id (positional ids would move).
    """
    path = manifest_path(output)
    if resuming and path.exists():
        try:
            previous = Manifest.from_json(json.loads(path.read_bytes()))
        except (ValueError, KeyError, TypeError, IndexError):
            if not force:
                raise InvalidInput(
                    f"{path}: the run manifest is damaged, so corral cannot tell whether "
                    f"{output.name} came from this input; rerun with --force-resume if it did"
                ) from None
        else:
            changed = previous.changes(current)
            input_moved = "the input file's contents" in changed
            positional = previous.positional_ids or current.positional_ids
            if changed and input_moved and positional:
                raise InvalidInput(
                    f"{output} was written from a different input, and its ids are line numbers "
                    f"(line-N), so resumed answers would land on the wrong lines; changed: "
                    f"{', '.join(changed)}. Write to a new output file"
                )
            if changed and not force:
                raise InvalidInput(
                    f"{output} was written by a run with different settings; changed: "
                    f"{', '.join(changed)}. Restore them to resume, use a new output file, "
                    "or pass --force-resume to continue with the new settings"
                )
