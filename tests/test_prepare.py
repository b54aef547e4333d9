"""``corral prepare``: refused mistakes are refused before anything is written (issue 11, item 16).

Each case is checked on the functions and through ``corral.cli.main``: exit 2, one ``corral:``
line on stderr, no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corral.batch._templates import Template, write_requests
from corral.cli import main
from corral.core._errors import InvalidInput

ROWS = "id,review\nA1,Great and fast\nA2,Broke in a week\n"


def prepare(rows: Path, out: Path, *extra: str, template: str = "Sentiment: {review}") -> int:
    argv = ["prepare", str(rows), "-o", str(out), "--template", template, "--model", "m"]
    return main([*argv, *extra])


def assert_refused(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def ids(out: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]


def test_bom_csv_keeps_its_first_column(tmp_path: Path) -> None:
    rows = tmp_path / "excel.csv"
    rows.write_bytes(b"\xef\xbb\xbf" + ROWS.encode())
    out = tmp_path / "requests.jsonl"
    assert prepare(rows, out, "--id-field", "id") == 0
    assert ids(out) == ["A1", "A2"]


def test_bom_jsonl_rows_are_read(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'\xef\xbb\xbf{"id": "x", "review": "ok"}\n')
    written, problems = write_requests(
        Template("{review}", "gpt-4o-mini"), rows, tmp_path / "o.jsonl", id_field="id"
    )
    assert (written, problems) == (1, [])


def test_unknown_id_field_lists_the_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text(ROWS)
    out = tmp_path / "requests.jsonl"
    with pytest.raises(InvalidInput, match=r"'ID' is not a column \(columns: id, review\)"):
        write_requests(Template("{review}", "m"), rows, out, id_field="ID")
    assert_refused(capsys, prepare(rows, out, "--id-field", "ID"), "'ID'", "columns: id, review")
    assert not out.exists()


def test_jsonl_row_without_the_id_field_is_named(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "review": "a"}\n{"review": "b"}\n')
    out = tmp_path / "o.jsonl"
    with pytest.raises(InvalidInput, match=r"rows.jsonl:2: no field 'id'.*fields: review"):
        write_requests(Template("{review}", "m"), rows, out, id_field="id")
    assert not out.exists()


def test_duplicate_ids_are_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("id,review\nA1,a\nA2,b\nA1,c\n7,d\n7,e\n")
    out = tmp_path / "requests.jsonl"
    out.write_text("previous contents\n")
    with pytest.raises(InvalidInput, match="2 duplicate id"):
        write_requests(Template("{review}", "m"), rows, out, id_field="id")
    line = assert_refused(capsys, prepare(rows, out, "--id-field", "id"), "duplicate")
    assert "'A1' on lines 2 and 4" in line and "'7' on lines 5 and 6" in line
    assert out.read_text() == "previous contents\n"


def test_empty_id_is_refused(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("id,review\nA1,a\n,b\n")
    with pytest.raises(InvalidInput, match=r"rows.csv:3: empty id"):
        write_requests(Template("{review}", "m"), rows, tmp_path / "o.jsonl", id_field="id")


def test_output_that_is_the_rows_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text(ROWS)
    template = Template("{review}", "m")
    same_spelled_otherwise = tmp_path / "sub" / ".." / "rows.csv"
    (tmp_path / "sub").mkdir()
    hard_link = tmp_path / "link.csv"
    os.link(rows, hard_link)
    for out in (rows, same_spelled_otherwise, hard_link):
        with pytest.raises(InvalidInput, match="the output is the rows file"):
            write_requests(template, rows, out)
        assert_refused(capsys, prepare(rows, out), "the output is the rows file")
    assert rows.read_text() == ROWS


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("Sentiment: {review", "expected '}' before end of string"),
        ("Sentiment: {0}", "positional field {0}"),
        ("Sentiment: {}", "positional field {}"),
        ("Sentiment: review}", "Single '}'"),
        ("Sentiment: {review.upper}", "{review.upper}"),
        ("Sentiment: {review!r}", "{review!r}"),
    ],
)
def test_malformed_template_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str, needle: str
) -> None:
    with pytest.raises(InvalidInput, match="literal braces") as info:
        Template(template, "m")
    assert needle in str(info.value)
    rows = tmp_path / "rows.csv"
    rows.write_text(ROWS)
    out = tmp_path / "o.jsonl"
    assert_refused(capsys, prepare(rows, out, template=template), needle, "{{")
    assert not out.exists()


def test_template_field_that_is_not_a_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text(ROWS)
    out = tmp_path / "o.jsonl"
    code = prepare(rows, out, template="Sentiment: {reveiw}")
    assert_refused(capsys, code, "{reveiw}", "columns: id, review")
    assert not out.exists()


def test_literal_braces_are_doubled(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text(ROWS)
    out = tmp_path / "o.jsonl"
    template = Template('Answer as {{"label": ...}} for: {review}', "m")
    assert template.fields == {"review"}
    assert write_requests(template, rows, out) == (2, [])
    first = json.loads(out.read_text().splitlines()[0])
    assert first["body"]["messages"][0]["content"] == 'Answer as {"label": ...} for: Great and fast'


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_utf16_csv_names_the_file_and_the_encoding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_bytes(ROWS.encode(encoding))
    out = tmp_path / "o.jsonl"
    with pytest.raises(InvalidInput, match="expected UTF-8 text but it looks like UTF-16"):
        write_requests(Template("{review}", "m"), rows, out)
    assert_refused(capsys, prepare(rows, out), str(rows), "UTF-8", "UTF-16")
    assert not out.exists()


def test_undecodable_jsonl_names_the_byte(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"review": "caf\xe9"}\n')
    with pytest.raises(
        InvalidInput, match=r"rows.jsonl: expected UTF-8 text but it holds byte 0xe9"
    ):
        write_requests(Template("{review}", "m"), rows, tmp_path / "o.jsonl")


def test_missing_rows_file_and_unwritable_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(capsys, prepare(tmp_path / "nope.csv", tmp_path / "o.jsonl"), "nope.csv")
    rows = tmp_path / "rows.csv"
    rows.write_text(ROWS)
    out = tmp_path / "no-such-dir" / "o.jsonl"
    assert_refused(capsys, prepare(rows, out), "cannot write the output")
