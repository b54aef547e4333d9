"""Each row of issue 14's table, reproduced against the emulator as a strict provider: a true
sliding window over ``window`` seconds, charging each call its prompt estimate (characters / 4)
plus ``max_tokens`` at admission (``count="reserved"``). Windows and line counts are shortened
and time is virtual (trio's MockClock), except for the restart row, which kills a real
``corral run``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import trio.testing

from corral.core import Headers, Request, Response, api_request, build_stack
from corral.middleware import ConcurrencyLimit, RateLimit, Retry
from corral.testing.emulator import EmulatorConfig, Fault, Latency
from corral.testing.server import serve_in_thread
from corral.testing.simulator import SimulatedProvider
from tests.support import corral_child, read_output, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


def strict(**limits: Any) -> SimulatedProvider:
    return SimulatedProvider(
        EmulatorConfig(count="reserved", latency=Latency.uniform(0.02, 0.3), **limits)
    )


def line(i: int, max_tokens: int | None = 32) -> Request:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": f"Review {i}: works well, arrived late."}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return api_request("http://sim/v1", "/chat/completions", body, api_key="sk-test")


async def run(
    provider: SimulatedProvider | Quiet, limiter: RateLimit, requests: list[Request]
) -> tuple[int, float]:
    """(429s the provider's limits gave, seconds the run took) for these calls, 64 at a time."""
    stack = build_stack([Retry(max_attempts=8), limiter, ConcurrencyLimit(64)], provider)
    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for request in requests:
            tg.start_soon(stack, request)  # type: ignore[arg-type]
    assert provider.counts["ok"] == len(requests)
    return provider.counts.get("rate_limited", 0), anyio.current_time() - start


async def test_row_1_unused_max_tokens_stay_charged() -> None:
    """60 s window, TPM binds, max_tokens 32, ~10 tokens used: the provider keeps what the
    answers did not use, so refunding it fills the window early."""
    calls = [line(i) for i in range(900)]
    kept, _ = await run(strict(tpm=12_000), RateLimit(tpm=12_000), calls)
    assert kept == 0
    refunded, _ = await run(strict(tpm=12_000), RateLimit(tpm=12_000, settle="usage"), calls)
    assert refunded > 0  # the row's cause, still there under settle="usage"


class Quiet:
    """The provider without its x-ratelimit-* headers (many OpenAI-compatible servers send
    none): the limiter must hold the window on its own."""

    def __init__(self, provider: SimulatedProvider) -> None:
        self.provider = provider
        self.counts = provider.counts

    async def __call__(self, request: Request) -> Response:
        response = await self.provider(request)
        kept = [(k, v) for k, v in response.headers.items() if not k.startswith("x-ratelimit")]
        self.counts = self.provider.counts
        return attrs.evolve(response, headers=Headers(kept))


async def test_row_2_a_ten_second_window_and_429_pauses() -> None:
    """Per-minute limits enforced over 10 s windows, with 429s injected (they use no quota)
    and no headers to learn from: no burst at window boundaries and none after a pause."""
    calls = [line(i) for i in range(1_200)]
    limits: dict[str, Any] = {"tpm": 40_000, "rpm": 900, "window": 10.0}

    def provider(faults: float) -> Quiet:
        config = EmulatorConfig(
            count="reserved",
            latency=Latency.uniform(0.02, 0.3),
            faults={Fault.RATE_LIMIT: faults},
            **limits,
        )
        return Quiet(SimulatedProvider(config))

    inside, _ = await run(provider(0.01), RateLimit(**limits), calls)
    assert inside == 0
    # Shaped for 60 s windows with a burst of 10% of a minute: a 10 s window overflows.
    blind = RateLimit(tpm=40_000, rpm=900, burst_tokens=4_000, cold_start=1.0)
    outside, _ = await run(provider(0.0), blind, calls)
    assert outside > 0


async def test_row_4_no_max_tokens_runs_as_fast_as_max_tokens_16() -> None:
    """Without max_tokens the reservation follows what the model returns (~10 tokens), not a
    fixed 1024: the run is no slower than the same file with max_tokens 16."""
    limits: dict[str, Any] = {"tpm": 30_000, "window": 10.0}
    bare, t_bare = await run(
        strict(**limits), RateLimit(**limits), [line(i, None) for i in range(800)]
    )
    capped, t_capped = await run(
        strict(**limits), RateLimit(**limits), [line(i, 16) for i in range(800)]
    )
    assert bare == capped == 0
    assert t_bare <= t_capped * 1.05
    # A fixed 1024-token output reservation (what every call reserved before) is far slower.
    fixed = [line(i, None).with_options(estimated_tokens=1_040) for i in range(200)]
    _, t_fixed = await run(strict(**limits), RateLimit(**limits), fixed)
    assert t_fixed > 3 * t_bare * 200 / 800


async def test_both_limits_bind_without_429s() -> None:
    limits: dict[str, Any] = {"tpm": 30_000, "rpm": 600, "window": 10.0}
    got, took = await run(strict(**limits), RateLimit(**limits), [line(i, 16) for i in range(600)])
    assert got == 0
    assert took >= 600 / 10 * 0.9  # paced by the 600 RPM, not sent at once


def utilisation(provider: SimulatedProvider, tpm: int) -> float:
    """Tokens the provider admitted between its first and last admission over what ``tpm``
    allows in that time."""
    stats = provider.emulator.quota.stats()
    return stats["admitted_tokens"] / (tpm / 60 * stats["admitted_span_ms"] / 1000)


@pytest.mark.parametrize("max_tokens", [32, None])
async def test_calibrated_to_the_providers_count_the_limit_is_used(
    max_tokens: int | None,
) -> None:
    """The provider counts these prompts as 12 tokens where corral's estimate says 19; its
    remaining-tokens teach the limiter the ratio: >= 97% of TPM used, no 429 (>= 95% without
    ``max_tokens``: before the first answer a call reserves the conservative 1,024 output
    tokens, which grows the burst and slows the first window). Without the headers (or
    ``calibrate=False``) the over-estimate stays and costs about a sixth."""
    limits: dict[str, Any] = {"tpm": 60_000, "window": 10.0}
    calls = [line(i, max_tokens) for i in range(3_000)]
    provider, limiter = strict(**limits), RateLimit(**limits)
    got, _ = await run(provider, limiter, calls)
    assert got == 0
    assert utilisation(provider, limits["tpm"]) >= (0.97 if max_tokens else 0.95)
    calibration = limiter.policy("m").calibration
    assert calibration is not None
    if max_tokens:  # the provider charges 12 + 32 where corral reserves 19 + 32
        assert 44 / 51 <= calibration.factor <= 44 / 51 * 1.01
    blind = strict(**limits)
    got, _ = await run(blind, RateLimit(calibrate=False, **limits), calls)
    assert got == 0
    assert utilisation(blind, limits["tpm"]) < 0.9


# -- row 3: a real corral run, killed and resumed ---------------------------------------------


def write_lines(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": "m",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": f"Review {i}: works well, arrived late."}],
            }
            f.write(json.dumps({"custom_id": f"r{i}", "body": body}) + "\n")


def test_row_3_a_restart_after_sigkill_does_not_burst_into_the_full_window(
    tmp_path: Path,
) -> None:
    """A run is killed mid-way while the provider's window is full; its successor reads what it
    sent from the run manifest (and the first answers' headers) and gets no 429."""
    source, out, trace = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "trace"
    write_lines(source, 150)
    # 48,000 TPM over 5 s windows: 4,000 tokens (~75 lines) per window, ~10 s for the file.
    # (Over 2 s windows the limiter's headroom for the delay between admission and arrival,
    # its 2% burst, was 40 ms: a loaded machine overran it.)
    config = EmulatorConfig(tpm=48_000, window=5.0, count="reserved")
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-row3"}
    with serve_in_thread(config) as emu:
        flags = ["run", str(source), "-o", str(out), "--base-url", emu.base_url, "--no-progress"]
        flags += ["--tpm", "48000", "--window", "5"]
        first = subprocess.Popen(corral_child(*flags), env=env, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: emu.counts.get("ok", 0) >= 60, timeout=60, child=first)
        finally:
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        second = subprocess.run(
            corral_child(*flags, "--trace", str(trace)),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 0, second.stderr[-2000:]
        assert emu.counts.get("rate_limited", 0) == 0
    ids = [record["custom_id"] for record in read_output(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(150))  # every line exactly once
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    [cold] = [e for e in events if e["event"] == "ratelimit.cold_start"]
    assert cold["resumed"] is True  # the killed run's sends, from its manifest
