"""Prompt templates over a table: one chat request per row of a CSV or JSONL file.

For the "analyse these 1000 reviews" job: a template such as ``"Sentiment of: {review}"`` is
filled from each row's fields and written as a Batch API JSONL line that ``corral run`` takes.
A row missing a field is reported with its file and line, and the other rows proceed. Mistakes
that would spoil the whole file (a malformed template, an unknown column or id field, duplicate
ids, an undecodable file, the output being the rows file) are refused before anything is written.
"""

from __future__ import annotations

import csv
import json
import os
import string
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from corral.core._errors import InvalidInput

__all__ = ["Template", "read_rows", "write_requests"]

_ESCAPING = "write {{ and }} for literal braces"


def _fields(text: str) -> frozenset[str]:
    """The field names a template uses; ``InvalidInput`` says what is malformed."""
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:  # "{review", a lone "}"
        raise InvalidInput(f"template {text!r}: {exc}; {_ESCAPING}") from None
    names = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
        field += "}"
        if not name or name.isdigit():
            problem = f"has a positional field {field}; name a column instead, e.g. {{review}}"
        elif spec or conversion or "." in name or "[" in name:
            problem = f"has {field}; only plain {{column}} fields are supported"
        else:
            names.add(name)
            continue
        raise InvalidInput(f"template {text!r} {problem}; {_ESCAPING}")
    return frozenset(names)


@attrs.frozen
class Template:
    """A chat request with ``{column}`` fields filled from each row.

    ``user`` and ``system`` are ``str.format`` templates restricted to plain field names:
    ``"Sentiment of: {review}"``. Literal braces are doubled: ``"Answer as {{\\"label\\": ...}}"``
    sends ``Answer as {"label": ...}``. A malformed template (``"{review"``, ``"{0}"``,
    ``"{a.b}"``) raises ``InvalidInput`` when the template is made.
    """

    user: str
    model: str
    system: str | None = None
    #: Extra body fields (max_tokens, temperature, response_format, ...).
    params: Mapping[str, Any] = attrs.field(factory=dict)
    #: Every field the templates use.
    fields: frozenset[str] = attrs.field(init=False)

    @fields.default
    def _fields_default(self) -> frozenset[str]:
        return _fields(self.user) | _fields(self.system or "")

    def body(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The request body for one row; ``KeyError`` names a missing field."""
        missing = sorted(f for f in self.fields if row.get(f) is None)
        if missing:
            raise KeyError(missing[0])
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system.format_map(row)})
        messages.append({"role": "user", "content": self.user.format_map(row)})
        return {"model": self.model, "messages": messages, **self.params}


def _not_utf8(path: Path, exc: UnicodeDecodeError | None = None) -> InvalidInput:
    with path.open("rb") as f:
        start = f.read(4096)
    if start[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in start:
        found = "it looks like UTF-16"
    else:
        found = f"it holds byte 0x{exc.object[exc.start]:02x}, not UTF-8" if exc else "it is not"
    how = " (in Excel: Save As, CSV UTF-8)" if _is_csv(path) else ""
    return InvalidInput(f"{path}: expected UTF-8 text but {found}; save it as UTF-8{how}")


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) from a CSV (with a header) or a JSONL file of objects.

    Both are read as UTF-8, with or without the byte-order mark Excel writes. ``InvalidInput``
    names a missing, unreadable or undecodable file, or a JSONL line that is not an object.
    """
    try:
        with path.open(newline="" if _is_csv(path) else None, encoding="utf-8-sig") as f:
            if _is_csv(path):
                reader = csv.DictReader(f)
                for row in reader:
                    if any("\x00" in v for v in row.values() if isinstance(v, str)):
                        raise _not_utf8(path)
                    yield reader.line_num, dict(row)
                return
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if "\x00" in line:
                    raise _not_utf8(path)
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise InvalidInput(f"{path}:{line_no}: expected a JSON object")
                yield line_no, row
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the rows ({exc.strerror})") from None


def _csv_columns(path: Path) -> list[str] | None:
    """The header of a CSV file (None for JSONL, whose rows may differ)."""
    if not _is_csv(path):
        return None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the rows ({exc.strerror})") from None
    if any("\x00" in name for name in header):
        raise _not_utf8(path)
    return header


def _check_ids(rows: Path, id_field: str) -> None:
    """Refuse a row without an id, an empty id or an id used twice (naming the lines)."""
    first: dict[str, int] = {}
    duplicates: list[str] = []
    for line_no, row in read_rows(rows):
        if id_field not in row:
            have = ", ".join(map(str, row)) or "none"
            raise InvalidInput(
                f"{rows}:{line_no}: no field {id_field!r} for --id-field (fields: {have})"
            )
        custom_id = str(row[id_field])
        if not custom_id:
            raise InvalidInput(f"{rows}:{line_no}: empty id in field {id_field!r}")
        if custom_id in first:
            duplicates.append(f"{custom_id!r} on lines {first[custom_id]} and {line_no}")
        else:
            first[custom_id] = line_no
    if duplicates:
        shown = "; ".join(duplicates[:5])
        more = f" (and {len(duplicates) - 5} more)" if len(duplicates) > 5 else ""
        raise InvalidInput(
            f"{rows}: {len(duplicates)} duplicate id(s) in field {id_field!r}: {shown}{more}; "
            "every custom_id must be unique"
        )


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # the output does not exist yet
        return False


def write_requests(
    template: Template, rows: Path, out: Path, *, id_field: str | None = None
) -> tuple[int, list[str]]:
    """Write one Batch API line per row; returns (lines written, problems as file:line).

    Raises:
        InvalidInput: before writing anything, for an output that is the rows file, an unreadable
            or undecodable rows file, a template field or ``id_field`` that is not a CSV column,
            or ids that are missing, empty or not unique.
    """
    if _same_file(rows, out):
        raise InvalidInput(
            f"{out}: the output is the rows file {rows}; writing it would erase the rows, "
            "choose another output path"
        )
    columns = _csv_columns(rows)
    if columns is not None:
        listed = ", ".join(columns) or "none"
        unknown = sorted(template.fields - set(columns))
        if unknown:
            raise InvalidInput(
                f"{rows}: the template uses {{{unknown[0]}}} but there is no such column "
                f"(columns: {listed})"
            )
        if id_field is not None and id_field not in columns:
            raise InvalidInput(
                f"{rows}: --id-field {id_field!r} is not a column (columns: {listed})"
            )
    if id_field is not None:
        _check_ids(rows, id_field)
    written, problems = 0, []
    try:
        f = out.open("w", encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{out}: cannot write the output ({exc.strerror})") from None
    with f:
        for line_no, row in read_rows(rows):
            try:
                body = template.body(row)
            except KeyError as exc:
                problems.append(f"{rows}:{line_no}: no field {exc.args[0]!r} for the template")
                continue
            custom_id = str(row[id_field]) if id_field is not None else f"row-{line_no}"
            line = {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
    return written, problems
