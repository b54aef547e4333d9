"""One quota shared by several processes through Redis; what happens when Redis goes away."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis

from corral.core import Headers, Request, Response, api_request, build_stack, errors
from corral.middleware._shared_ratelimit import RateLimitUnavailable, SharedRateLimit
from corral.testing.emulator import EmulatorConfig
from corral.testing.server import serve_in_thread
from corral.transports import MemoryTransport
from tests.support import CANARY_KEY, as_bytes

pytestmark = pytest.mark.anyio

CHILD = """
import sys, time, anyio
from corral.core import api_request, build_stack
from corral.middleware._shared_ratelimit import SharedRateLimit
from corral.transports import H11Transport

redis_url, name, base_url, start_at, end_at = sys.argv[1:6]
start_at, end_at = float(start_at), float(end_at)

async def main():
    limiter = SharedRateLimit(redis_url, name=name, rpm=1200, window=3.0, burst_requests=3)
    transport = H11Transport()
    stack = build_stack([limiter], transport)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    await anyio.sleep(max(0.0, start_at - time.time()))
    async def worker():
        while time.time() < end_at:
            request = api_request(base_url, "/chat/completions", body, api_key="sk-shared-test-key")
            with anyio.move_on_after(max(0.01, end_at - time.time())):
                await stack(request)
    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(worker)
    await transport.aclose()

anyio.run(main)
"""


def test_four_processes_share_one_quota(redis_url: str) -> None:
    """Every process is judged by Redis's clock (test_gcra.py: the scripts read TIME); the
    provider enforces 1200 RPM over 3 s windows (60 calls in any 3 s)."""
    limit, window, duration = 1200, 3.0, 9.0
    name = uuid.uuid4().hex
    with serve_in_thread(EmulatorConfig(rpm=limit, window=window)) as emu:
        start_at = time.time() + 5.0  # after every child has started its interpreter
        end_at = start_at + duration
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    redis_url,
                    name,
                    emu.base_url,
                    str(start_at),
                    str(end_at),
                ]
            )
            for _ in range(4)
        ]
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
        counts = emu.counts
    assert counts.get("rate_limited", 0) == 0  # within the limit in every sliding window
    capacity = limit * duration / 60
    assert counts["ok"] >= 0.9 * capacity, counts


def ok(_: Request) -> Response:
    return Response(200, Headers(), b'{"usage": {"total_tokens": 3}}')


def request() -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        api_key=CANARY_KEY,
    )


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, object]]:
    """A redis-server we may stop and start again on the same port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = shutil.which("redis-server")
    assert server is not None
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [
                    server,
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp_path),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop() -> None:
        procs[-1].terminate()
        procs[-1].wait()

    start()
    yield f"redis://127.0.0.1:{port}/0", (start, stop)
    if procs[-1].poll() is None:
        stop()


async def test_redis_down_fails_closed_or_falls_back_then_recovers(
    private_redis: tuple[str, tuple[object, object]],
) -> None:
    url, (start, stop) = private_redis
    closed = SharedRateLimit(url, name="c", rpm=600, on_unavailable="fail", recheck=0.0)
    local = SharedRateLimit(
        url, name="l", rpm=600, on_unavailable="local", processes=4, recheck=0.0
    )
    closed_stack = build_stack([closed], MemoryTransport(ok))
    local_stack = build_stack([local], MemoryTransport(ok))
    assert (await closed_stack(request())).status == 200
    stop()  # type: ignore[operator]
    with pytest.raises(RateLimitUnavailable):
        await closed_stack(request())
    assert (await local_stack(request())).status == 200  # the local share (600/4 RPM) serves
    start()  # type: ignore[operator]
    assert (await closed_stack(request())).status == 200
    assert (await local_stack(request())).status == 200
    keys = redis.Redis.from_url(url).keys("corral:rl:l:*")
    assert keys  # the fallback limiter handed back to Redis


async def test_redis_keys_hold_no_secret(redis_url: str) -> None:
    limiter = SharedRateLimit(redis_url, name="secret-check", rpm=600, tpm=100_000)
    await build_stack([limiter], MemoryTransport(ok))(request())
    client = redis.Redis.from_url(redis_url)
    keys = client.keys("corral:rl:secret-check:*")
    blob = b"".join(as_bytes(k) + as_bytes(client.get(k) or b"") for k in keys)
    assert blob and CANARY_KEY[:8].encode() not in blob and CANARY_KEY[-8:].encode() not in blob


@pytest.mark.parametrize("retry_after", ["99999999", "1e308", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_hostile_retry_after_pauses_every_process_at_most_max_pause(
    redis_url: str, retry_after: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = uuid.uuid4().hex
    date = "Thu, 01 Jan 2026 00:00:00 GMT"  # what an HTTP-date Retry-After is measured from
    replies = iter([Response(429, Headers({"retry-after": retry_after, "date": date}), b"{}")])

    def handler(request: Request) -> Response:
        return next(replies, None) or ok(request)

    limiter = SharedRateLimit(redis_url, name=name, rpm=6_000, max_pause=0.3)
    with caplog.at_level("WARNING", logger="corral.ratelimit"):
        assert (await build_stack([limiter], MemoryTransport(handler))(request())).status == 429
    assert any("capped" in r.getMessage() for r in caplog.records)
    ttl_ms = redis.Redis.from_url(redis_url).pttl(f"corral:rl:{name}:pause")
    assert 0 < ttl_ms <= 1_300  # max_pause plus the script's one-second margin
    other = SharedRateLimit(redis_url, name=name, rpm=6_000)  # another process, default cap
    with anyio.fail_after(5):  # admitted once the 0.3 s pause ends, not in 3 years
        assert (await build_stack([other], MemoryTransport(ok))(request())).status == 200


async def test_a_pause_stored_without_a_cap_is_capped_when_read(redis_url: str) -> None:
    """A pause key poisoned by an older version blocks a new process for max_pause at most."""
    name = uuid.uuid4().hex
    client = redis.Redis.from_url(redis_url)
    now = float(client.time()[0])
    client.set(f"corral:rl:{name}:pause", str(now + 1e8), px=10**11)
    limiter = SharedRateLimit(redis_url, name=name, rpm=6_000, max_pause=0.2)
    with anyio.fail_after(5):
        assert (await build_stack([limiter], MemoryTransport(ok))(request())).status == 200
    assert client.pttl(f"corral:rl:{name}:pause") <= 1_200


def test_max_pause_must_be_finite() -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(errors.InvalidInput, match="max_pause"):
            SharedRateLimit("redis://127.0.0.1:1/0", rpm=1, max_pause=bad)


async def test_a_streamed_answer_settles_its_usage_too(redis_url: str) -> None:
    """A stream's ``usage`` settles the shared token cell as a plain answer's does: with
    ``settle="usage"`` a 1,000-token ``max_tokens`` reservation answered in ~30 tokens is
    refunded, so the next such call goes at once instead of after ~10 minutes of refill."""
    from corral import Client

    name = uuid.uuid4().hex
    with serve_in_thread() as emu:
        limiter = SharedRateLimit(
            redis_url, name=name, tpm=1_200, burst_tokens=1_100, settle="usage"
        )
        async with Client(
            base_url=emu.base_url, api_key="sk-test", model="m", middleware=[limiter]
        ) as client:
            for _ in range(2):
                with anyio.fail_after(10):
                    chunks = [
                        c
                        async for c in client.stream_chat(
                            [{"role": "user", "content": "hi"}],
                            max_tokens=1_000,
                            stream_options={"include_usage": True},
                        )
                    ]
                assert chunks
