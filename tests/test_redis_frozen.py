"""A Redis that stops answering (SIGSTOP on a real redis-server): cache, quota and Ctrl-C.

Each test starts its own server so freezing it never touches the session's shared one. A
watchdog thread resumes a frozen server after ``THAW_AFTER`` seconds, so code that waits on
Redis without a bound fails these tests instead of hanging the suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import attrs
import pytest
import redis
import trio.lowlevel
from trio.testing import MockClock

from corral.core import Headers, Request, Response, api_request, build_stack, errors
from corral.middleware._cache import Cache
from corral.middleware._deadline import Deadline
from corral.middleware._shared_ratelimit import RateLimitUnavailable, SharedRateLimit
from corral.stores.redis import RedisStore
from corral.transports import MemoryTransport
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio

THAW_AFTER = 15.0
#: Generous: a frozen Redis must cost about a second (0.5 s timeouts); redis-py's own
#: defaults wait 5 s (6.x+) or forever (5.x), and an unbounded wait lasts THAW_AFTER.
BOUND = 3.0


@attrs.define
class FrozenRedis:
    url: str
    proc: subprocess.Popen[bytes]
    _timer: threading.Timer | None = None

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self._timer = threading.Timer(THAW_AFTER, self.thaw)
        self._timer.daemon = True
        self._timer.start()

    def thaw(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def frozen_redis(tmp_path: Path) -> Iterator[FrozenRedis]:
    """A private redis-server that the test may freeze; always resumed and stopped after."""
    server = shutil.which("redis-server")
    assert server is not None, "redis-server is not installed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            redis.Redis(port=port, socket_timeout=1).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    running = FrozenRedis(f"redis://127.0.0.1:{port}/0", proc)
    yield running
    running.thaw()
    proc.terminate()
    proc.wait(timeout=10)


def ok_json(_: Request) -> Response:
    return Response(200, Headers({"content-type": "application/json"}), b'{"answer": 1}')


def chat(content: str = "hi") -> Request:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return api_request("http://h/v1", "/chat/completions", body, api_key=CANARY_KEY)


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(rate=1.0)}), id="trio")]
)
async def test_a_frozen_cache_is_a_miss_then_skipped_then_used_again(
    frozen_redis: FrozenRedis,
) -> None:
    """On trio's MockClock at real speed (Redis's timeouts are real), jumped past ``recheck``."""
    store = RedisStore(frozen_redis.url, prefix="frozen:")
    cache = Cache(store, recheck=0.5)
    transport = MemoryTransport(ok_json)
    stack = build_stack([cache], transport)
    assert not (await stack(chat())).from_cache
    assert (await stack(chat())).from_cache
    frozen_redis.freeze()
    try:
        with anyio.fail_after(BOUND):
            missed = await stack(chat())  # the read times out: a miss, answered upstream
            assert not missed.from_cache and missed.status == 200
            for _ in range(50):  # the store is skipped for `recheck` seconds: no more waits
                assert not (await stack(chat())).from_cache
        assert transport.calls == 52
    finally:
        frozen_redis.thaw()
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, MockClock)
    clock.jump(0.6)
    with anyio.fail_after(BOUND):
        await stack(chat())  # a probe after `recheck`: Redis answers again
        assert (await stack(chat())).from_cache
    await store.aclose()


async def test_store_calls_stay_inside_the_calls_deadline(frozen_redis: FrozenRedis) -> None:
    """A deadline outside the cache (or on the request) bounds a frozen store's call too."""
    store = RedisStore(frozen_redis.url, prefix="deadline:", timeout=30.0)  # a lax store
    stack = build_stack([Deadline(0.3), Cache(store)], MemoryTransport(ok_json))
    await stack(chat())
    frozen_redis.freeze()
    try:
        with anyio.fail_after(BOUND):
            with pytest.raises(errors.DeadlineExceeded):
                await stack(chat())
            inner_first = build_stack([Cache(store)], MemoryTransport(ok_json))
            request = chat().with_deadline(anyio.current_time() + 0.3)
            assert (await inner_first(request)).status == 200  # a miss at the deadline
    finally:
        frozen_redis.thaw()
    await store.aclose()


async def test_a_frozen_quota_falls_back_to_local_or_fails_closed(
    frozen_redis: FrozenRedis,
) -> None:
    local = SharedRateLimit(frozen_redis.url, name="l", rpm=600, recheck=60.0)
    closed = SharedRateLimit(frozen_redis.url, name="c", rpm=600, on_unavailable="fail")
    local_stack = build_stack([local], MemoryTransport(ok_json))
    closed_stack = build_stack([closed], MemoryTransport(ok_json))
    assert (await local_stack(chat())).status == 200
    assert (await closed_stack(chat())).status == 200
    frozen_redis.freeze()
    try:
        with anyio.fail_after(BOUND):
            for _ in range(5):  # the local limiter at the same limits serves
                assert (await local_stack(chat())).status == 200
            with pytest.raises(RateLimitUnavailable):
                await closed_stack(chat())
        lax = SharedRateLimit(frozen_redis.url, name="x", rpm=600, timeout=30.0)
        with anyio.fail_after(BOUND):
            with pytest.raises(errors.DeadlineExceeded):
                await build_stack([Deadline(0.3), lax], MemoryTransport(ok_json))(chat())
    finally:
        frozen_redis.thaw()


# The child takes Ctrl-C as a process in a terminal does: a command started in the background
# by a non-interactive shell (as a CI script may be) inherits SIGINT ignored, and then neither
# Python nor the event loop installs the KeyboardInterrupt handler.
CHILD = """
import signal, sys, anyio
signal.signal(signal.SIGINT, signal.default_int_handler)
from corral.core import Headers, Response, api_request, build_stack
from corral.middleware._cache import Cache
from corral.middleware._shared_ratelimit import SharedRateLimit
from corral.stores.redis import RedisStore
from corral.transports import MemoryTransport

url, backend = sys.argv[1:3]

def ok(_):
    return Response(200, Headers({"content-type": "application/json"}), b'{"a": 1}')

async def main():
    layers = [Cache(RedisStore(url), recheck=0.0), SharedRateLimit(url, rpm=6000, recheck=0.0)]
    stack = build_stack(layers, MemoryTransport(ok))
    n = 0
    while True:
        body = {"model": "m", "messages": [{"role": "user", "content": str(n)}]}
        await stack(api_request("http://h/v1", "/chat/completions", body, api_key="sk-x"))
        n += 1
        if n == 3:
            print("ready", flush=True)

anyio.run(main, backend=backend)
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ctrl_c_stops_a_process_waiting_on_a_frozen_redis(
    frozen_redis: FrozenRedis, backend: str
) -> None:
    """One Ctrl-C ends a process whose every call waits on a frozen Redis."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, frozen_redis.url, backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        frozen_redis.freeze()
        time.sleep(0.5)  # the child is now stuck in a Redis call
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
            message = f"still running {BOUND} s after Ctrl-C: {err[-3000:]!r}"
            raise AssertionError(message) from None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        frozen_redis.thaw()
    assert b"KeyboardInterrupt" in (child.stderr.read() if child.stderr else b"")
