"""The batch runner at scale (issue 15): flat memory for the duplicate check, exact verdicts on
hash collisions, fsyncs in large batches. No timing is asserted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.batch import _items
from corral.batch._items import DuplicateCheck, IdSet
from corral.batch._runner import BatchOptions, preflight
from corral.batch._store import OutputWriter
from corral.core import _errors as errors
from tests.support import batch_line, write_input


def test_ids_that_only_share_a_hash_are_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_items, "_check_hash", lambda custom_id: 7)  # every id collides
    source = tmp_path / "in.jsonl"
    write_input(source, 50)
    assert preflight(BatchOptions(source, tmp_path / "out.jsonl")).total == 50


def test_equal_ids_among_colliding_ones_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_items, "_check_hash", lambda custom_id: 7)
    source = tmp_path / "in.jsonl"
    write_input(source, 5, extra=[batch_line("r3", "again")])
    with pytest.raises(errors.InvalidInput) as refused:
        preflight(BatchOptions(source, tmp_path / "out.jsonl"))
    message = str(refused.value)
    assert "in.jsonl:4 (r3)" in message and "in.jsonl:6 (r3)" in message
    assert "(r1)" not in message and "more" not in message


def test_the_duplicate_check_holds_a_bounded_number_of_hashes() -> None:
    check = DuplicateCheck(held=1000)
    try:
        for i in range(20_000):
            check.add(f"id-{i}")
            assert sum(map(len, check._buckets)) < 1000
        for again in ("id-0", "id-19999", "id-7000"):
            check.add(again)
        suspects = check.suspects()
        assert len(check) == 20_003 and len(suspects) == 3
        assert all(check.is_suspect(f"id-{i}", suspects) for i in (0, 19999, 7000))
        assert not check.is_suspect("id-1", suspects)
    finally:
        check.close()


def test_id_set_over_several_sorted_runs() -> None:
    ids = IdSet()
    for i in range(150_000):
        ids.add(f"id-{i}")
    assert "id-0" in ids and "id-149999" in ids and "id-150000" not in ids
    ids.add("id-70000")
    ids.add("new")
    assert len(ids) == 150_002 and len(ids.duplicates()) == 1 and "new" in ids


def test_the_output_is_fsynced_in_batches_of_thousands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fsync", syncs.append)  # _store calls os.fsync, time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: 100.0)  # within one interval
    writer = OutputWriter(tmp_path / "out.jsonl")
    for i in range(5000):
        writer.write(b'{"custom_id": "r%d"}\n' % i)
    assert len(syncs) == 1  # at line 4096; 256 lines a sync blocked a fast run 20% of it
    writer.close()
    assert len(syncs) == 2 and (tmp_path / "out.jsonl").read_bytes().count(b"\n") == 5000
