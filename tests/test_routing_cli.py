"""The command line of issue 16: ``corral run --budget-usd`` stops at the cap with its own exit
code and resumes; ``--dry-run`` projects the cost against the cap at the preferred
deployment's prices; ``corral serve --deployments`` serves every deployment of a file."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from corral.batch._job import BatchJob, ExitCode, run_job
from corral.cli import main
from corral.core._errors import InvalidInput
from corral.testing.server import RunningEmulator
from tests.support import CHILD, write_input

pytestmark = pytest.mark.anyio


async def test_the_cap_stops_the_run_unsent_lines_stay_resumable(
    tmp_path: Path, emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-budget-test-Zq8xW3")
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 50)
    # gpt-4o-mini at $0.15/$0.60 per M: each line may cost ~5e-6 (prompt + 5 output tokens).
    job = BatchJob(
        source,
        output,
        base_url=emulator.base_url,
        budget_usd=5e-5,
        concurrency=4,
        progress=False,
        handle_signals=False,
        trace=tmp_path / "trace.jsonl",
    )
    err = io.StringIO()
    result = await run_job(job, stderr=err)
    assert result.exit_code == ExitCode.BUDGET and int(ExitCode.BUDGET) == 3
    events = Counter(json.loads(line)["event"] for line in (tmp_path / "trace.jsonl").open())
    assert events["budget.reserved"] == events["budget.settled"] >= 5
    assert events["budget.refused"] >= 1
    written = [json.loads(line) for line in output.open()]
    assert 5 <= len(written) < 50 and all(r["error"] is None for r in written)
    assert len(written) == emulator.counts["ok"]  # nothing written for a line not sent
    budget = result.summary["budget"]
    assert budget["stopped"] and budget["spent_usd"] <= budget["cap_usd"] == 5e-5
    assert f"spent of the $5e-05 cap; stopped at the cap, {50 - len(written)} line(s)" in (
        err.getvalue()
    )
    # A higher cap resumes where the run stopped: every line once in the end.
    resumed = await run_job(
        BatchJob(
            source,
            output,
            base_url=emulator.base_url,
            budget_usd=1.0,
            progress=False,
            handle_signals=False,
        ),
        stderr=io.StringIO(),
    )
    assert resumed.exit_code == ExitCode.OK
    ids = [json.loads(line)["custom_id"] for line in output.open()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(50))


def test_dry_run_projects_the_cost_against_the_cap_at_the_preferred_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 10)
    config = tmp_path / "d.toml"
    config.write_text(
        '[[deployment]]\nname = "backup"\nbase_url = "http://b/v1"\napi_key_env = "NOT_SET_X"\n'
        "priority = 2\n[deployment.prices]\ninput = 100.0\noutput = 100.0\n"
        '[[deployment]]\nname = "cheap"\nbase_url = "http://a/v1"\napi_key_env = "NOT_SET_X"\n'
        "priority = 1\n[deployment.prices]\nas_of = 2026-11-01\ninput = 1.0\noutput = 1.0\n"
    )
    argv = ["run", str(source), "-o", str(tmp_path / "o.jsonl"), "--dry-run"]
    assert main([*argv, "--deployments", str(config), "--budget-usd", "0.00005"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["priced_at"] == {"deployment": "cheap", "prices_as_of": "2026-11-01"}
    tokens = shown["input_tokens_estimate"] + shown["max_output_tokens"]
    assert tokens > 50  # ten lines: more than $0.00005 at the cheap deployment's $1 per M
    assert shown["cost_usd_range"][1] == pytest.approx(tokens * 1.0 / 1e6, abs=1e-4)
    assert shown["budget_usd"] == 0.00005 and shown["within_budget"] is False
    assert main([*argv, "--budget-usd", "1000"]) == 0
    assert json.loads(capsys.readouterr().out)["within_budget"] is True


def test_budget_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 1)
    argv = ["run", str(source), "-o", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--budget-redis", "redis://x"]) == ExitCode.REFUSED
    assert "--budget-redis needs --budget-usd" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--budget-usd", "-1"])
    assert exited.value.code == ExitCode.REFUSED
    assert "--budget-usd: must be at least 0" in capsys.readouterr().err


def test_serve_deployments_serves_each_at_its_base_url(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "d.toml"
    config.write_text(
        f'[[deployment]]\nname = "a"\nbase_url = "http://127.0.0.1:{port}/a/v1"\n'
        'api_key_env = "UNSET_A"\n[deployment.emulator]\nfaults = { "500" = 1.0 }\n'
        f'[[deployment]]\nname = "b"\nbase_url = "http://127.0.0.1:{port}/b/v1"\n'
        'api_key_env = "UNSET_B"\n'
    )
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "serve", "--deployments", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline().decode().strip() for _ in range(2)]
        assert lines == [f"a: http://127.0.0.1:{port}/a/v1", f"b: http://127.0.0.1:{port}/b/v1"]
        statuses = {}
        for name in ("a", "b"):
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(
                    f"POST /{name}/v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                    f"authorization: Bearer k\r\ncontent-length: {len(body)}\r\n"
                    "connection: close\r\n\r\n".encode()
                    + body
                )
                reply = b""
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and (chunk := conn.recv(65536)):
                    reply += chunk
            statuses[name] = reply.split(b" ", 2)[1]
        assert statuses == {"a": b"500", "b": b"200"}
    finally:
        child.terminate()
        child.wait(timeout=10)


async def test_client_deployments_from_a_file(
    tmp_path: Path, emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral import Client

    monkeypatch.setenv("FILE_KEY", "sk-file-key-Zq8x")
    config = tmp_path / "d.toml"
    config.write_text(
        f'[[deployment]]\nname = "only"\nbase_url = "{emulator.base_url}"\n'
        'api_key_env = "FILE_KEY"\n[deployment.models]\n"small" = "gpt-4o-mini"\n'
    )
    async with Client(deployments=config) as client:
        answer = await client.chat([{"role": "user", "content": "hi"}], model="small")
        assert answer.model == "gpt-4o-mini"
        assert client.scrub("echo sk-file-key-Zq8x") == "echo [redacted]"
    with pytest.raises(InvalidInput, match="takes URLs and keys"):
        Client(deployments=config, base_url="http://x/v1")
