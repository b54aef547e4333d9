"""Routing and the spend cap end to end (issue 16 tests): emulated deployments on real sockets,
one killed mid-run or answering 429s; four processes sharing one budget through a real Redis,
checked against the emulator's own count of what it delivered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from corral import Client
from corral._deployments import read_deployments
from corral.batch._job import BatchJob, ExitCode, run_job
from corral.testing.deployments import RunningDeployment, emulated_deployments, serve_deployments
from tests.support import CHILD, write_input

PRICES = "[deployment.prices]\nas_of = 2026-11-01\ninput = {p}\noutput = {p}\n"


def deployment(name: str, priority: int, emulator: str = "", price: float = 1.0) -> str:
    return (
        f'[[deployment]]\nname = "{name}"\nbase_url = "http://127.0.0.1:0/v1"\n'
        f'api_key_env = "E2E_KEY"\npriority = {priority}\n'
        + PRICES.format(p=price)
        + (f"[deployment.emulator]\n{emulator}" if emulator else "")
    )


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2E_KEY", "sk-e2e-Zq8xW3vT9pL2")


@pytest.fixture
def live(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Path, dict[str, RunningDeployment]]]:
    """The deployments of ``request.param`` served on free ports; the file rewritten to them."""
    text: str = request.param
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    with serve_deployments(emulated_deployments(read_deployments(path))) as running:
        for name, one in running.items():
            text = text.replace(
                f'name = "{name}"\nbase_url = "http://127.0.0.1:0/v1"',
                f'name = "{name}"\nbase_url = "{one.base_url}"',
            )
        path.write_text(text)
        yield path, running


TWO = deployment("cheap", 0, 'latency = "0.01"\n') + deployment("backup", 1, 'latency = "0.01"\n')


@pytest.mark.anyio
@pytest.mark.parametrize("live", [TWO], indirect=True)
async def test_the_preferred_deployment_killed_mid_run_every_line_once_all_succeeded(
    tmp_path: Path, live: tuple[Path, dict[str, RunningDeployment]]
) -> None:
    path, running = live
    source, output, trace = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "t.jsonl"
    write_input(source, 400)
    cheap = running["cheap"]

    def killer() -> None:
        for _ in range(2000):  # bounded: 20 s at most
            if cheap.emulator.counts.get("ok", 0) >= 100:
                cheap.kill()
                return
            threading.Event().wait(0.01)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    job = BatchJob(
        source,
        output,
        deployments=path,
        concurrency=64,
        timeout=30.0,
        trace=trace,
        progress=False,
        handle_signals=False,
    )
    with anyio.fail_after(60):
        result = await run_job(job)
    watcher.join(timeout=5)
    records = [json.loads(line) for line in output.open()]
    ids = Counter(r["custom_id"] for r in records)
    assert result.exit_code == ExitCode.OK
    assert set(ids) == {f"r{i}" for i in range(400)} and set(ids.values()) == {1}
    assert all(r["error"] is None for r in records)
    events = [json.loads(line) for line in trace.open()]
    failovers = [e for e in events if e["event"] == "router.failover"]
    assert failovers and {e["deployment"] for e in failovers} == {"cheap"}
    moved = {e["labels"]["custom_id"] for e in failovers}
    rescued = [
        e
        for e in events
        if e["event"] == "router.chosen"
        and e["reason"] == "failover"
        and e["labels"]["custom_id"] in moved
    ]
    assert {e["deployment"] for e in rescued} == {"backup"}
    assert running["backup"].emulator.counts["ok"] >= 400 - cheap.emulator.counts["ok"]


FLAKY = deployment("flaky", 0, 'faults = { "429" = 1.0 }\nfault_retry_after = 30\n') + deployment(
    "steady", 1
)


@pytest.mark.anyio
@pytest.mark.parametrize("live", [FLAKY], indirect=True)
async def test_a_deployment_answering_429s_loses_its_traffic(
    live: tuple[Path, dict[str, RunningDeployment]],
) -> None:
    path, running = live
    bodies = [
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"q{i}"}],
            "max_tokens": 5,
        }
        for i in range(300)
    ]
    async with Client(deployments=path) as client, client.map(bodies, concurrency=32) as results:
        outcomes = [r async for r in results]
    assert all(r.error is None for r in outcomes)
    flaky, steady = running["flaky"].emulator.counts, running["steady"].emulator.counts
    assert steady["ok"] == 300
    # The first calls in flight met the 429 (at most one each); then the flaky one cooled down
    # for the 30 s its 429 asked for, and took nothing more.
    assert 1 <= flaky["429"] <= 32


@pytest.mark.parametrize("live", [deployment("only", 0, "", price=2.0)], indirect=True)
def test_four_processes_share_one_budget_through_redis(
    tmp_path: Path, live: tuple[Path, dict[str, RunningDeployment]], redis_url: str
) -> None:
    """256 calls in flight in each of four processes: what the emulator delivered, at its
    prices, stays under the shared cap and uses at least 95% of it."""
    path, running = live
    cap = 0.02  # USD: ~400 of these calls (~23 tokens at $2 per million)
    name = f"e2e-{uuid.uuid4().hex}"
    children = []
    for i in range(4):
        source = tmp_path / f"in{i}.jsonl"
        write_input(source, 300, prefix=f"p{i}-")
        argv = [
            "run", str(source), "-o", str(tmp_path / f"out{i}.jsonl"),
            "--deployments", str(path), "--budget-usd", str(cap),
            "--budget-redis", redis_url, "--budget-name", name,
            "--concurrency", "256", "--no-progress",
        ]  # fmt: skip
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "E2E_KEY": "sk-e2e-Zq8xW3vT9pL2"},
            )
        )
    outputs = [child.communicate(timeout=120) for child in children]
    codes = [child.returncode for child in children]
    emulator = running["only"].emulator
    spent = emulator.spent_usd
    assert spent <= cap, (spent, cap)
    assert spent >= 0.95 * cap, (spent, cap)
    lines = [len((tmp_path / f"out{i}.jsonl").read_text().splitlines()) for i in range(4)]
    # A process stops at the cap (exit 3), or ends normally having sent all its 300 lines
    # before the others used the rest (a child that started early on a loaded machine).
    for code, written, (_, err) in zip(codes, lines, outputs, strict=True):
        assert code == ExitCode.BUDGET or (code == 0 and written == 300), err.decode()[-2000:]
    assert ExitCode.BUDGET in codes
    assert sum(lines) == emulator.counts["ok"] < 1200  # nothing written for lines not sent
    assert all(b"spent of the $0.02 cap" in err for _, err in outputs)
