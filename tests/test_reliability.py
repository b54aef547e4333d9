"""Reliability: a fault soak through the batch runner, SIGKILL-and-resume, secrets in logs."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from corral._client import Client, default_middleware
from corral.batch._runner import BatchOptions, BatchRunner
from corral.core._models import Timeouts
from corral.testing.emulator import EmulatorConfig, Fault, Latency
from corral.testing.server import serve_in_thread
from corral.transports import H11Transport
from tests.support import CANARY_KEY, read_output, write_input

pytestmark = pytest.mark.anyio

KNOWN_KINDS = {
    "rate_limited",
    "server_error",
    "read_error",
    "read_timeout",
    "malformed_response",
    "remote_protocol_error",
    "write_error",
    "connect_error",
    "invalid_input",
}
SOAK_FAULTS = {
    Fault.RATE_LIMIT: 0.0125,
    Fault.SERVER_ERROR: 0.0125,
    Fault.UNAVAILABLE: 0.0125,
    Fault.RESET: 0.0125,
    Fault.RESET_AFTER_FIRST_BYTE: 0.0125,
    Fault.HANG: 0.0125,
    Fault.TRUNCATE: 0.0125,
    Fault.MALFORMED: 0.0125,
}  # 10% in all


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_fault_soak_every_id_once_errors_typed_load_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, record_property: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    n, budget = 5_000, 0.2
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, n)
    config = EmulatorConfig(faults=SOAK_FAULTS, fault_retry_after=0.05, hang_seconds=30, seed=42)
    with serve_in_thread(config) as emu:
        transport = H11Transport(
            timeouts=Timeouts(connect=2, read=1.0, write=2, pool=10), max_connections=128
        )
        stack = default_middleware(concurrency=128, max_attempts=4, retry_budget=budget, seed=1)
        async with Client(
            emu.base_url, CANARY_KEY, transport=transport, middleware=stack
        ) as client:
            runner = BatchRunner(client, BatchOptions(source, out, concurrency=128))
            with anyio.fail_after(240):  # a hang detector, not a speed check
                await runner.run()
        received = emu.counts["received"]
    records = read_output(out)
    ids = Counter(r["custom_id"] for r in records)
    assert len(ids) == n and set(ids.values()) == {1}
    kinds = Counter(r["error"]["code"] for r in records if r["error"])
    assert set(kinds) <= KNOWN_KINDS, kinds
    assert runner.report.succeeded + sum(kinds.values()) == n
    assert runner.report.succeeded > 0.95 * n
    assert received <= n * (1 + budget) + 10  # + the budget's initial reserve
    record_property("received", received)
    record_property("succeeded", runner.report.succeeded)
    record_property("failed", dict(kinds))
    assert transport.open_connections <= 128
    text = caplog.text + out.read_text()
    assert all(CANARY_KEY[i : i + 8] not in text for i in range(len(CANARY_KEY) - 7))


def wait_for_progress(out: Path, child: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until the child has written a new result line (or exited): a bounded poll."""
    before = out.read_bytes().count(b"\n") if out.exists() else 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") > before:
            return
        time.sleep(0.02)


def corral_run(source: Path, out: Path, base_url: str, *flags: str) -> list[str]:
    """The command line of a `corral run` child process."""
    return [
        sys.executable,
        "-c",
        CHILD,
        "run",
        str(source),
        "-o",
        str(out),
        "--base-url",
        base_url,
        "--no-progress",
        *flags,
    ]


CHILD = """
import sys
from corral.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_at_twenty_moments_then_resume_exactly_once(
    tmp_path: Path, record_property: Any
) -> None:
    n, concurrency, kills = 1_000, 16, 20
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, n)
    rng = random.Random(2026)
    env = {**os.environ, "OPENAI_API_KEY": CANARY_KEY}
    progress: list[int] = []
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(0.1))) as emu:
        cmd = corral_run(source, out, emu.base_url, "--json", "--concurrency", str(concurrency))
        for _ in range(kills):
            child = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            # Into the run (however slow the machine starts Python), then a seeded moment.
            wait_for_progress(out, child)
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait()
            lines = out.read_bytes().splitlines(keepends=True) if out.exists() else []
            for line in lines:  # every complete line parses, whatever the moment of the kill
                if line.endswith(b"\n"):
                    json.loads(line)
            progress.append(len(lines))
        final = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        assert final.returncode == 0, final.stderr.decode()[-2000:]
        received = emu.counts["received"]
    ids = Counter(r["custom_id"] for r in read_output(out))
    assert len(ids) == n and set(ids.values()) == {1}
    assert received - n <= kills * concurrency  # re-sends only for what was in flight
    assert sum(0 < p < n for p in progress) >= 5, progress  # the kills did land mid-run
    record_property("resends", received - n)
    record_property("kills_mid_run", sum(0 < p < n for p in progress))


async def test_no_secret_in_errors_or_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    import traceback

    from corral.core import _errors as errors

    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with serve_in_thread(EmulatorConfig(api_keys=frozenset({"sk-only-this-one-works"}))) as emu:
        async with Client(emu.base_url, CANARY_KEY, model="m") as client:
            for call in (client.chat([{"role": "user", "content": "hi"}]), client.models()):
                try:
                    await call
                except errors.AuthenticationError as exc:
                    texts.append("".join(traceback.format_exception(exc)) + repr(exc) + str(exc))
            texts.append(
                repr(client) + repr(client.build_request("/chat/completions", {"model": "m"}))
            )
    async with Client(
        "http://127.0.0.1:9/v1",
        CANARY_KEY,
        model="m",
        middleware=default_middleware(max_attempts=1),
    ) as client:
        with pytest.raises(errors.ConnectError) as info:
            await client.chat([{"role": "user", "content": "hi"}])
        texts.append("".join(traceback.format_exception(info.value)))
    blob = "\n".join(texts) + caplog.text
    assert len(texts) == 4
    assert all(CANARY_KEY[i : i + 8] not in blob for i in range(len(CANARY_KEY) - 7))


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_drains_or_stops_then_resumes(tmp_path: Path, presses: int) -> None:
    n = 200
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, n)
    env = {**os.environ, "OPENAI_API_KEY": CANARY_KEY}
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(0.5))) as emu:
        cmd = corral_run(source, out, emu.base_url, "--concurrency", "10")
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_progress(out, child)
        time.sleep(0.5)
        for _ in range(presses):
            child.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _, err = child.communicate(timeout=30)
        assert child.returncode == 130, err.decode()[-1000:]
        assert b"rerun the same command to resume" in err
        written = len(read_output(out))
        assert 0 < written < n
        if presses == 1:  # drained: everything in flight at the first press was written
            assert emu.counts["received"] == written
        final = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        assert final.returncode == 0
    ids = Counter(r["custom_id"] for r in read_output(out))
    assert len(ids) == n and set(ids.values()) == {1}
