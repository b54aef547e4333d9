"""Prompt templates over a table: one chat request per row of a CSV or JSONL file.

For the "analyse these 1000 reviews" job: a template such as ``"Sentiment of: {review}"`` is
filled from each row's fields and written as a Batch API JSONL line that ``corral run`` takes.
A row missing a field is reported with its file and line, and the other rows proceed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from corral.core.errors import InvalidInput

__all__ = ["Template", "read_rows", "write_requests"]


@attrs.frozen
class Template:
    user: str
    model: str
    system: str | None = None
    #: Extra body fields (max_tokens, temperature, response_format, ...).
    params: Mapping[str, Any] = attrs.field(factory=dict)

    def body(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The request body for one row; ``KeyError`` names a missing field."""
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system.format_map(row)})
        messages.append({"role": "user", "content": self.user.format_map(row)})
        return {"model": self.model, "messages": messages, **self.params}


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) from a CSV (with a header) or a JSONL file of objects."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, dict(row)
        return
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise InvalidInput(f"{path}:{line_no}: expected a JSON object")
            yield line_no, row


def write_requests(
    template: Template, rows: Path, out: Path, *, id_field: str | None = None
) -> tuple[int, list[str]]:
    """Write one Batch API line per row; returns (lines written, problems as file:line)."""
    written, problems = 0, []
    with out.open("w", encoding="utf-8") as f:
        for line_no, row in read_rows(rows):
            try:
                body = template.body(row)
            except KeyError as exc:
                problems.append(f"{rows}:{line_no}: no field {exc.args[0]!r} for the template")
                continue
            custom_id = str(row[id_field]) if id_field and id_field in row else f"row-{line_no}"
            line = {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
    return written, problems
