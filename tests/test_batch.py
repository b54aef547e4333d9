"""The batch runner and `corral run`: exactly once, resume, bad input, refusal, summary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral._client import Client, default_middleware
from corral.batch._items import BadLine, BatchItem, IdSet, parse_line
from corral.batch._runner import BatchOptions, BatchRunner, estimate_cost, preflight
from corral.batch._store import scan_output
from corral.cli import main
from corral.core import _errors as errors
from corral.testing.emulator import EmulatorConfig
from corral.testing.server import RunningEmulator, serve_in_thread
from tests.support import CANARY_KEY, read_output, write_input

pytestmark = pytest.mark.anyio


def test_line_parsing_names_the_problem() -> None:
    assert parse_line(3, b"{nope").reason.startswith("not valid JSON")  # type: ignore[union-attr]
    assert "custom_id" in parse_line(1, b'{"custom_id": 5}').reason  # type: ignore[union-attr]
    bad_url = parse_line(2, b'{"custom_id": "a", "url": "/v2/x", "body": {}}')
    assert "url" in bad_url.reason  # type: ignore[union-attr]
    plain = parse_line(7, b'{"model": "m", "messages": []}')
    assert plain.custom_id == "line-7"  # type: ignore[union-attr]
    assert parse_line(1, b"   \n") is None


def test_id_set() -> None:
    ids = IdSet()
    for i in range(1000):
        ids.add(f"id-{i}")
    assert "id-5" in ids and "id-1000" not in ids and len(ids) == 1000
    ids.add("id-5")
    assert len(ids.duplicates()) == 1


async def run(emu: RunningEmulator, options: BatchOptions, **stack: object) -> BatchRunner:
    middleware = default_middleware(**stack)  # type: ignore[arg-type]
    async with Client(emu.base_url, CANARY_KEY, middleware=middleware) as client:
        runner = BatchRunner(client, options)
        await runner.run()
    return runner


async def test_every_custom_id_exactly_once_with_bad_lines(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 50, extra=["{broken", '{"custom_id": "x", "body": 3}'])
    runner = await run(emulator, BatchOptions(source, out, concurrency=8))
    records = read_output(out)
    ids = Counter(r["custom_id"] for r in records)
    assert set(ids.values()) == {1} and len(ids) == 52
    bad = [r for r in records if r["error"] is not None]
    assert len(bad) == 2 and all("in.jsonl:" in r["error"]["message"] for r in bad)
    ok = next(r for r in records if r["custom_id"] == "r0")
    assert ok["response"]["status_code"] == 200 and ok["response"]["body"]["usage"]
    assert runner.report.succeeded == 50 and runner.report.failed["invalid_input"] == 2
    assert CANARY_KEY not in out.read_text() and out.stat().st_mode & 0o777 == 0o600


async def test_resume_skips_done_and_repairs_a_torn_tail(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 30)
    await run(emulator, BatchOptions(source, out))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:10]) + lines[10][: len(lines[10]) // 2])  # crash mid-line
    before = emulator.counts["received"]
    runner = await run(emulator, BatchOptions(source, out))
    assert runner.report.skipped == 10 and runner.report.sent == 20
    assert runner.report.before.repaired_bytes > 0
    assert emulator.counts["received"] - before == 20
    ids = Counter(r["custom_id"] for r in read_output(out))
    assert len(ids) == 30 and set(ids.values()) == {1}


async def test_retry_failed_reruns_only_failures(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 40)
    # A provider whose window is too small for some prompts: 400s about those lines only.
    long = [json.loads(line) for line in source.read_text().splitlines()[:10]]
    for record in long:
        record["body"]["messages"][0]["content"] = "word " * 100
    lines = [json.dumps(r) for r in long] + source.read_text().splitlines()[10:]
    source.write_text("\n".join(lines) + "\n")
    small = EmulatorConfig(context_windows={"gpt-4o-mini": 60})
    with serve_in_thread(small) as emu:
        first = await run(emu, BatchOptions(source, out), max_attempts=1)
        failed = sum(first.report.failed.values())
        assert failed == 10 and set(first.report.failed) == {"context_length_exceeded"}
    with serve_in_thread() as emu:
        second = await run(emu, BatchOptions(source, out, retry_failed=True))
        assert second.report.sent == failed and emu.counts["received"] == failed
    records = read_output(out)
    assert len(records) == 40 and all(r["error"] is None for r in records)


def test_duplicates_and_strict_are_refused_before_sending(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 3, extra=[json.dumps({"custom_id": "r1", "body": {"messages": []}})])
    with pytest.raises(
        errors.InvalidInput, match=r"duplicate custom_id.*in.jsonl:2 \(r1\).*in.jsonl:4"
    ):
        preflight(BatchOptions(source, tmp_path / "out.jsonl"))
    write_input(source, 3, extra=["not json"])
    with pytest.raises(errors.InvalidInput, match=r"--strict.*in\.jsonl:4"):
        preflight(BatchOptions(source, tmp_path / "out.jsonl", strict=True))


def test_a_damaged_middle_line_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(
        '{"custom_id": "a", "error": null}\ngarbage\n{"custom_id": "b", "error": null}\n'
    )
    with pytest.raises(errors.InvalidInput, match=r"out\.jsonl:2"):
        scan_output(out)


def test_dry_run_estimates_without_sending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 10)
    est = estimate_cost(BatchOptions(source, tmp_path / "o.jsonl"))
    assert est.requests == 10 and est.max_output_tokens == 50 and 0 < est.cost_low < est.cost_high
    assert main(["run", str(source), "-o", str(tmp_path / "o.jsonl"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 10
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_run_summary_and_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 20, extra=["{bad"])
    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    with serve_in_thread() as emu:
        args = [
            "run",
            str(source),
            "-o",
            str(out),
            "--base-url",
            emu.base_url,
            "--json",
            "--no-progress",
            "--rpm",
            "6000",
            "--backend",
            "trio",
        ]
        assert main(args) == 1  # the bad line is a failure
        summary = json.loads(capsys.readouterr().out)
        assert summary["this_run"]["succeeded"] == 20 and summary["this_run"]["bad_lines"] == 1
        assert summary["latency_incl_waits_s"]["p50"] > 0
        assert main([*args, "--allow-failures"]) == 0  # resumed: nothing left to send
        assert json.loads(capsys.readouterr().out)["this_run"]["skipped_already_done"] == 21
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    assert main(["run", str(source), "-o", str(out)]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    "choice",
    [
        *(["--transport", name] for name in ("h11", "httpx", "httpx2", "aiohttp")),
        *(["--backend", name] for name in ("asyncio", "uvloop", "trio")),
    ],
    ids=lambda choice: " ".join(choice),
)
def test_cli_runs_on_every_transport_and_event_loop(
    choice: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 10)
    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    with serve_in_thread() as emu:
        args = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", emu.base_url]
        assert main([*args, "--json", "--no-progress", *choice]) == 0
        assert json.loads(capsys.readouterr().out)["this_run"]["succeeded"] == 10
        assert emu.counts["received"] == 10


def test_cli_cache_serves_a_second_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 15)
    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    with serve_in_thread() as emu:
        base = [
            "run",
            str(source),
            "--base-url",
            emu.base_url,
            "--json",
            "--no-progress",
            "--cache",
            str(tmp_path / "cache.db"),
        ]
        assert main([*base, "-o", str(tmp_path / "a.jsonl")]) == 0
        capsys.readouterr()
        assert main([*base, "-o", str(tmp_path / "b.jsonl")]) == 0
        assert json.loads(capsys.readouterr().out)["cache_hit_rate"] == 1.0
        assert emu.counts["received"] == 15
    assert CANARY_KEY.encode() not in (tmp_path / "cache.db").read_bytes()


def test_shards_split_a_file_exactly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 60)
    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    with serve_in_thread() as emu:
        for i in range(3):  # three "machines", one shared quota in Redis
            args = [
                "run",
                str(source),
                "-o",
                str(tmp_path / f"out{i}.jsonl"),
                "--shard",
                f"{i}/3",
                "--base-url",
                emu.base_url,
                "--no-progress",
                "--json",
                "--quota-redis",
                redis_url,
                "--quota-name",
                tmp_path.name,
                "--rpm",
                "60000",
            ]
            assert main(args) == 0
    capsys.readouterr()
    per_shard = [read_output(tmp_path / f"out{i}.jsonl") for i in range(3)]
    assert all(per_shard)  # every shard got work
    ids = Counter(r["custom_id"] for shard in per_shard for r in shard)
    assert len(ids) == 60 and set(ids.values()) == {1}
    with pytest.raises(SystemExit) as refused:  # argparse refuses a shard outside 0..N-1
        main(["run", str(source), "-o", "x", "--shard", "3/3"])
    assert refused.value.code == 2


@given(st.binary(max_size=300))
def test_any_input_line_parses_to_an_item_or_a_named_problem(raw: bytes) -> None:
    item = parse_line(7, raw)
    assert (
        item is None
        or isinstance(item, BatchItem)
        or (isinstance(item, BadLine) and item.line == 7 and item.reason)
    )


@given(st.lists(st.binary(max_size=80), max_size=8))
def test_any_output_file_is_resumed_or_refused_with_its_line(chunks: list[bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        out.write_bytes(b"".join(chunks))
        try:
            scan_output(out)
        except errors.InvalidInput as exc:
            assert "out.jsonl:" in str(exc)


def test_prepare_fills_a_template_from_csv_and_jsonl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_rows = tmp_path / "reviews.csv"
    csv_rows.write_text('id,review\nA1,"Great, fast"\nA2,Broke in a week\n', encoding="utf-8")
    out = tmp_path / "requests.jsonl"
    assert (
        main(
            [
                "prepare",
                str(csv_rows),
                "-o",
                str(out),
                "--template",
                "Sentiment of: {review}",
                "--system",
                "One word.",
                "--model",
                "gpt-4o-mini",
                "--max-tokens",
                "3",
                "--id-field",
                "id",
            ]
        )
        == 0
    )
    lines = read_output(out)
    assert [line["custom_id"] for line in lines] == ["A1", "A2"]
    assert lines[0]["body"]["messages"][1]["content"] == "Sentiment of: Great, fast"
    assert lines[0]["body"]["max_tokens"] == 3
    jsonl_rows = tmp_path / "rows.jsonl"
    jsonl_rows.write_text('{"review": "ok"}\n{"text": "no review field"}\n')
    assert (
        main(["prepare", str(jsonl_rows), "-o", str(out), "--template", "{review}", "--model", "m"])
        == 1
    )
    assert "rows.jsonl:2: no field 'review'" in capsys.readouterr().err
    assert [line["custom_id"] for line in read_output(out)] == ["row-1"]
