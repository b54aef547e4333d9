"""``corral run --via batch-api`` end to end against the emulator, and its decisions alone.

The issue's 120k-line split (three files of 50,000) is scaled down here: 1,200 lines with
``--batch-max-requests 500`` make the same three files in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from corral.batch import BatchAPI, PartLimits, PollSchedule, collect, poll, submit
from corral.batch._batch_plan import Keep, PartWriter, Resend, settle, split_part
from corral.batch._batch_run import work_dir
from corral.batch._batch_state import PartRecord, RemoteState
from corral.batch._manifest import Manifest, manifest_path
from corral.cli import main
from corral.core import _errors as errors
from corral.core._models import Request, Response
from corral.testing.batches import BatchConfig
from corral.testing.emulator import EmulatorConfig
from corral.testing.server import RunningEmulator, serve_in_thread
from corral.transports import H11Transport
from tests.support import (
    CANARY_KEY,
    batch_line,
    corral_child,
    read_output,
    wait_until,
    write_input,
)


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)


@pytest.fixture
def emu(request: pytest.FixtureRequest) -> Iterator[RunningEmulator]:
    config = getattr(request, "param", BatchConfig(duration=0.2))
    with serve_in_thread(EmulatorConfig(batches=config)) as running:
        yield running


def run(emu: RunningEmulator, source: Path, out: Path, *extra: str, progress: bool = False) -> int:
    return main(
        [
            "run",
            str(source),
            "-o",
            str(out),
            "--base-url",
            emu.base_url,
            *([] if progress else ["--no-progress"]),
            "--via",
            "batch-api",
            "--batch-poll",
            "0.02",
            *extra,
        ]
    )


def uploads(emu: RunningEmulator) -> list[list[str]]:
    """The custom_ids of every uploaded batch input, in upload order."""
    service = emu.emulator.batches
    files = [f for f in service._files.values() if f.purpose == "batch"]
    return [[json.loads(x)["custom_id"] for x in f.path.read_bytes().splitlines()] for f in files]


def by_id(path: Path) -> dict[str, dict[str, Any]]:
    records = read_output(path)
    ids = Counter(r["custom_id"] for r in records)
    assert set(ids.values()) == {1}, "every custom_id exactly once"
    return {r["custom_id"]: r for r in records}


@pytest.mark.parametrize("emu", [BatchConfig(duration=1.0)], indirect=True)
def test_the_input_is_split_into_three_batches_and_merged_exactly_once(
    tmp_path: Path, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 1200, extra=["{broken"])
    flags = ("--batch-max-requests", "500", "--allow-failures")
    assert run(emu, source, out, *flags, progress=True) == 0
    progress = capsys.readouterr().err
    assert "round 1: 1200 request(s) in 3 batch file(s)" in progress
    assert re.search(r"round 1: 3 batch\(es\): in_progress \d; requests \d+/1200 done", progress)
    assert "completed 3; requests 1200/1200 done (0 failed)" in progress
    assert [len(ids) for ids in uploads(emu)] == [500, 500, 200]
    counts = emu.emulator.batches.counts
    assert counts["files_uploaded"] == 3 and counts["batches_created"] == 3
    records = by_id(out)
    assert len(records) == 1201
    assert records["line-1201"]["error"]["code"] == "invalid_input"
    assert all(records[f"r{i}"]["response"]["status_code"] == 200 for i in range(1200))
    manifest = json.loads(manifest_path(out).read_bytes())
    assert manifest["via"] == "batch-api" and manifest["batch_api"] is None
    assert not work_dir(out).exists()
    assert CANARY_KEY not in out.read_text()


def test_parts_keep_to_the_byte_limit_and_one_endpoint_each(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, "r1", PartLimits(max_requests=100, max_bytes=250))
    for _ in range(5):
        writer.add("/v1/chat/completions", b"x" * 99 + b"\n")
        writer.add("/v1/embeddings", b"y" * 9 + b"\n")
    parts = writer.close()
    chat = [p for p in parts if p.endpoint == "/v1/chat/completions"]
    embed = [p for p in parts if p.endpoint == "/v1/embeddings"]
    assert [p.requests for p in chat] == [2, 2, 1] and all(p.size <= 250 for p in chat)
    assert [p.requests for p in embed] == [5]
    assert all((tmp_path / p.name).stat().st_size == p.size for p in parts)
    first, second = split_part(tmp_path, chat[0])
    assert (first.requests, second.requests) == (1, 1) and first.size + second.size == 200


@pytest.mark.parametrize(
    "emu",
    [BatchConfig(duration=0.1, line_faults={"r4": "500", "r7": "drop", "r9": "429"})],
    indirect=True,
)
def test_only_retryable_failures_and_missing_ids_are_sent_again(
    tmp_path: Path, emu: RunningEmulator
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 20)
    assert run(emu, source, out) == 0
    first, second = uploads(emu)
    assert len(first) == 20 and sorted(second) == ["r4", "r7", "r9"]
    records = by_id(out)
    assert all(r["response"]["status_code"] == 200 for r in records.values())


@pytest.mark.parametrize(
    "emu",
    [BatchConfig(duration=0.1, per_request=0.01, expires_after=0.6)],
    indirect=True,
)
def test_an_expired_batch_sends_again_only_what_it_did_not_finish(
    tmp_path: Path, emu: RunningEmulator
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 100)
    assert run(emu, source, out) == 0
    batches = list(emu.emulator.batches._batches.values())
    assert [b.status for b in batches] == ["expired", "completed"]
    finished_first = batches[0].completed
    first, second = uploads(emu)
    assert 0 < finished_first < 100 and len(second) == 100 - finished_first
    assert set(second) == set(first) - set(first[:finished_first])
    assert len(by_id(out)) == 100


@pytest.mark.parametrize(
    "emu", [BatchConfig(duration=0.1, line_faults={"r2": "400", "r5": "500"})], indirect=True
)
def test_the_error_file_is_merged_in_the_live_format(tmp_path: Path, emu: RunningEmulator) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 10)
    assert run(emu, source, out, "--batch-rounds", "1") == 1  # failures: exit 1, as live
    records = by_id(out)
    assert records["r2"]["response"]["status_code"] == 400
    assert records["r2"]["error"] == {"code": "bad_request", "message": "injected 400"}
    assert records["r5"]["error"]["code"] == "server_error"  # the last round: written
    assert sum(r["error"] is None for r in records.values()) == 8


def test_the_output_is_identical_in_format_to_a_live_run(
    tmp_path: Path, emu: RunningEmulator
) -> None:
    source = tmp_path / "in.jsonl"
    too_long = batch_line("long", "word " * 5000, model="small-model")
    write_input(source, 30, extra=[too_long, "{broken"])
    live, batch = tmp_path / "live.jsonl", tmp_path / "batch.jsonl"
    live_code = main(
        ["run", str(source), "-o", str(live), "--base-url", emu.base_url, "--no-progress"]
    )
    assert live_code == run(emu, source, batch) == 1  # a context-length failure, a bad line

    def shape(record: dict[str, Any]) -> dict[str, Any]:
        response = record["response"]
        if response is not None:
            response = {**response, "request_id": "-"}
            if response["status_code"] == 200:
                response["body"] = {**response["body"], "id": "-"}
        return {**record, "response": response}

    live_records, batch_records = by_id(live), by_id(batch)
    assert live_records.keys() == batch_records.keys() and len(live_records) == 32
    for custom_id, record in live_records.items():
        assert shape(batch_records[custom_id]) == shape(record), custom_id
    assert live_records["long"]["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "emu", [BatchConfig(duration=0.3, enqueued_token_limit=500)], indirect=True
)
def test_a_batch_refused_for_the_queue_waits_and_goes_again_in_smaller_parts(
    tmp_path: Path, emu: RunningEmulator
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 40)  # ~15 tokens a line: two files of 20 cannot queue together
    assert run(emu, source, out, "--batch-max-requests", "20") == 0
    counts = emu.emulator.batches.counts
    assert counts["batches_refused"] >= 1
    sizes = [len(ids) for ids in uploads(emu)]
    assert sizes[:2] == [20, 20] and all(size < 20 for size in sizes[2:]) and len(sizes) > 2
    assert len(by_id(out)) == 40


def manifest_parts(out: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(manifest_path(out).read_bytes())
    except (OSError, ValueError):
        return []
    return list((data.get("batch_api") or {}).get("parts") or [])


@pytest.mark.parametrize("emu", [BatchConfig(duration=3.0)], indirect=True)
def test_sigkill_while_polling_then_a_rerun_resumes_polling_without_uploading(
    tmp_path: Path, emu: RunningEmulator
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 60)
    args = ["run", str(source), "-o", str(out), "--base-url", emu.base_url, "--no-progress"]
    args += ["--via", "batch-api", "--batch-poll", "0.05", "--batch-max-requests", "25"]
    child = subprocess.Popen(corral_child(*args), env=os.environ, stderr=subprocess.PIPE)
    try:
        polling = wait_until(
            lambda: len(p := manifest_parts(out)) == 3 and all(x["batch_id"] for x in p),
            child=child,
        )
        assert polling, child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    before = Counter(emu.emulator.batches.counts)
    assert before["files_uploaded"] == before["batches_created"] == 3
    assert run(emu, source, out, "--batch-max-requests", "25") == 0
    after = emu.emulator.batches.counts
    assert after["files_uploaded"] == 3 and after["batches_created"] == 3
    assert len(by_id(out)) == 60


@pytest.mark.parametrize("emu", [BatchConfig(duration=3.0)], indirect=True)
def test_ctrl_c_leaves_the_batches_running_and_cancel_cancels_them(
    tmp_path: Path, emu: RunningEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 30)
    args = ["run", str(source), "-o", str(out), "--base-url", emu.base_url, "--no-progress"]
    args += ["--via", "batch-api", "--batch-poll", "0.05", "--batch-max-requests", "10"]
    child = subprocess.Popen(corral_child(*args), env=os.environ, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(
            lambda: len(p := manifest_parts(out)) == 3 and all(x["batch_id"] for x in p),
            child=child,
        )
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130 and "keep running at the provider" in stderr
    service = emu.emulator.batches
    assert all(b.active for b in service._batches.values())  # Ctrl-C cancelled nothing
    live = main(["run", str(source), "-o", str(out), "--base-url", emu.base_url])
    assert live == 2 and "--via batch-api" in capsys.readouterr().err
    assert run(emu, source, out, "--cancel") == 0
    assert [b.status for b in service._batches.values()] == ["cancelled"] * 3
    assert manifest_parts(out) == [] and not work_dir(out).exists()
    assert run(emu, source, out) == 0  # the rest goes in new batches
    assert len(by_id(out)) == 30 and service.counts["batches_created"] == 4


class LosesCreateAnswers(H11Transport):
    """Sends every request, but loses the answer to the first batch create."""

    lost = 0

    async def __call__(self, request: Request) -> Response:
        response = await super().__call__(request)
        if request.method == "POST" and request.url.endswith("/batches") and not self.lost:
            self.lost += 1
            raise errors.ReadError("connection lost after the create went out", request_sent=True)
        return response


@pytest.mark.anyio
async def test_a_create_whose_answer_was_lost_is_found_not_made_twice(
    tmp_path: Path, emu: RunningEmulator
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 5)
    transport = LosesCreateAnswers()
    async with BatchAPI(emu.base_url, transport=transport) as api:
        uploaded = await api.upload(source)
        batch = await api.create(uploaded.id, "/v1/chat/completions", token="run/part-1")
    assert transport.lost == 1 and emu.emulator.batches.counts["batches_created"] == 1
    assert batch.metadata["corral_part"] == "run/part-1"


@pytest.mark.anyio
async def test_the_library_submits_polls_and_collects(tmp_path: Path, emu: RunningEmulator) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 12)
    seen: list[list[str]] = []
    records: list[dict[str, Any]] = []
    async with BatchAPI(emu.base_url) as api:
        batches = await submit(api, source, tmp_path / "parts", limits=PartLimits(max_requests=5))
        assert [b.status for b in batches] == ["validating"] * 3
        with anyio.fail_after(10):
            async for now in poll(api, [b.id for b in batches], schedule=PollSchedule(first=0.02)):
                seen.append([b.status for b in now])
        for batch in now:
            records += [r async for r in collect(api, batch)]
    assert seen[-1] == ["completed"] * 3 and len(seen) > 1
    assert sorted(r["custom_id"] for r in records) == sorted(f"r{i}" for i in range(12))


# -- the decisions alone --------------------------------------------------------------------


def record(status: int | None, body: Any = None, error: Any = None) -> dict[str, Any]:
    response = None if status is None else {"status_code": status, "request_id": "q", "body": body}
    return {"id": "batch_req_x", "custom_id": "c1", "response": response, "error": error}


def test_settle_keeps_what_is_settled_and_sends_again_what_may_pass() -> None:
    ok = settle(record(200, {"choices": []}), final=False)
    assert isinstance(ok, Keep) and ok.kind is None
    assert json.loads(ok.line)["response"]["body"] == {"choices": []}
    server = record(500, {"error": {"message": "boom", "type": "server_error"}})
    assert settle(server, final=False) == Resend("server_error")
    last = settle(server, final=True)
    assert isinstance(last, Keep) and last.kind == "server_error"
    bad = settle(
        record(400, {"error": {"message": "no", "type": "invalid_request_error"}}), final=False
    )
    assert isinstance(bad, Keep) and bad.kind == "bad_request"
    expired = record(None, error={"code": "batch_expired", "message": "late"})
    assert settle(expired, final=False) == Resend("batch_expired")
    written = settle(expired, final=True)
    assert (
        isinstance(written, Keep) and json.loads(written.line)["error"]["code"] == "batch_expired"
    )
    echoed = record(400, {"error": {"message": f"bad key {CANARY_KEY}"}})
    kept = settle(echoed, final=True, secrets=(CANARY_KEY,))
    assert isinstance(kept, Keep) and CANARY_KEY not in kept.line.decode()


def test_polling_backs_off_while_nothing_changes() -> None:
    schedule = PollSchedule(first=1.0, cap=4.0, factor=2.0)
    delays = [schedule.after(None, changed=False)]
    for _ in range(4):
        delays.append(schedule.after(delays[-1], changed=False))
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert schedule.after(4.0, changed=True) == 1.0
    with pytest.raises(errors.InvalidInput, match="factor"):
        PollSchedule(factor=0.5)


def test_the_manifest_keeps_its_old_form_and_the_remote_state() -> None:
    old = {
        "corral_manifest": 1,
        "input": {"blake2b": "ab", "size": 3},
        "positional_ids": False,
        "model": None,
        "base_url": "http://x/v1",
        "shard": None,
    }
    parsed = Manifest.from_json(old)
    assert parsed.via == "live" and parsed.remote == RemoteState(run_id=parsed.remote.run_id)
    part = PartRecord(name="r1-0001.jsonl", endpoint="/v1/embeddings", requests=3, size=9)
    state = RemoteState(round=2, parts=(part,), run_id="abc")
    full = Manifest("ab", 3, False, None, "http://x/v1", None, via="batch-api", remote=state)
    again = Manifest.from_json(json.loads(json.dumps(full.to_json())))
    assert again.remote == state and again.via == "batch-api"
    assert parsed.changes(again) == []  # how lines are sent changes no answer
