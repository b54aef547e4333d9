"""Shared fixtures: both async backends, every transport, a live emulator, a Redis server.

Fixtures only; the helpers and constants tests import live in ``tests/support.py``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

# Imported up front: imported late, inside pytest's failure summary, hypothesis hits a CPython
# 3.11.7 compiler bug ("AST constructor recursion depth mismatch") that hides the real failure.
import hypothesis  # noqa: F401
import pytest

from corral.core._models import Timeouts
from corral.testing.server import RunningEmulator, serve_in_thread
from corral.transports._base import Transport
from tests.support import TRANSPORTS, TransportFactory, make_transport


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def emulator() -> Iterator[RunningEmulator]:
    with serve_in_thread() as running:
        yield running


@pytest.fixture(params=TRANSPORTS)
def transport_name(request: pytest.FixtureRequest, anyio_backend: str) -> str:
    name = str(request.param)
    if name == "aiohttp" and anyio_backend == "trio":
        pytest.skip("aiohttp runs only on asyncio (its trio error is tested on its own)")
    return name


@pytest.fixture
async def transport_factory(transport_name: str) -> AsyncIterator[TransportFactory]:
    made: list[Transport] = []

    def factory(**kwargs: Any) -> Transport:
        kwargs.setdefault("timeouts", Timeouts(connect=5, read=5, write=5, pool=5))
        t = make_transport(transport_name, **kwargs)
        made.append(t)
        return t

    yield factory
    for t in made:
        await t.aclose()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the session. Missing Redis fails."""
    import shutil
    import socket
    import subprocess
    import time

    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server); .ci/run does it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def peer() -> Iterator[tuple[int, list[socket.socket]]]:
    """A listening socket; the connection it accepts is handed to the test to drive by hand."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted: list[socket.socket] = []

    def accept() -> None:
        conn, _ = server.accept()
        accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    thread.join(timeout=5)
    for conn in accepted:
        conn.close()
    server.close()
