"""Where events go: a stack's sink, as structured logs, a JSONL trace file, or several at once.

``LogSink`` writes each event at DEBUG to the ``corral.events`` logger, the fields in
``record.corral_event`` for structured handlers. ``TraceFile`` appends one JSON line per event
(``corral run --trace FILE``); ``story`` reads such a file back and tells one call's story
(``corral trace FILE --id X``): why line 1234 took 40 s. ``fan_out`` joins sinks.
OpenTelemetry span events are in ``corral.integrations.otel.span_events``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.core import _jsonlib as jsonlib
from corral.core._errors import InvalidInput
from corral.core._events import Event, EventSink, event_fields

__all__ = ["LogSink", "TraceFile", "fan_out", "format_story", "read_trace"]


class LogSink:
    """Events as DEBUG log records of ``corral.events`` (cheap when DEBUG is off)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("corral.events")

    def __call__(self, event: Event) -> None:
        """Log ``event`` at DEBUG with its fields in ``record.corral_event``; nothing is
        formatted when DEBUG is off."""
        if self._log.isEnabledFor(logging.DEBUG):
            fields = event_fields(event)
            self._log.debug("%s %s", event.name, _brief(fields), extra={"corral_event": fields})


def _brief(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("event", "labels") and v)


class TraceFile:
    """Append every event to a JSONL file, one line each, written whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InvalidInput(f"--trace {path}: cannot write it ({exc.strerror})") from None

    def __call__(self, event: Event) -> None:
        """Append ``event`` as one JSON line in a single write, so concurrent calls never
        interleave lines."""
        if self._fd >= 0:
            os.write(self._fd, jsonlib.dumps(event_fields(event)) + b"\n")

    def close(self) -> None:
        """Close the file; later events are dropped rather than raising in the middle of a call."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def fan_out(*sinks: EventSink) -> EventSink:
    """One sink that hands every event to each of ``sinks`` in turn."""

    def sink(event: Event) -> None:
        for each in sinks:
            each(event)

    return sink


def read_trace(path: Path, custom_id: str | None = None) -> Iterator[dict[str, Any]]:
    """The events of a trace file, optionally only those of one custom_id."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the trace file ({exc.strerror})") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                event = jsonlib.loads(raw)
            except jsonlib.JSONDecodeError:
                if raw.endswith(b"\n"):
                    raise InvalidInput(f"{path}:{line_no}: not a trace event") from None
                return  # a torn last line of a trace still being written
            if custom_id is None or event.get("labels", {}).get("custom_id") == custom_id:
                yield event


def format_story(events: list[dict[str, Any]]) -> str:
    """One line per event, times relative to the first: what happened to a call, and when."""
    if not events:
        return "no events"
    start = events[0]["time"]
    lines = []
    for event in events:
        rest = {k: v for k, v in event.items() if k not in ("event", "time", "labels", "attempt")}
        detail = " ".join(f"{k}={_short(v)}" for k, v in rest.items() if v is not None)
        attempt = f" attempt {event['attempt']}" if event.get("attempt") else ""
        lines.append(f"+{event['time'] - start:8.3f}s  {event['event']}{attempt}  {detail}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
