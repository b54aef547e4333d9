"""A ``Deadline`` over layers and a transport that end their own waits at the call's deadline
enters no cancel scope, and the deadline still ends the call: in the read phase, in a wait for a
slot, and before a retry's sleep. Real H11 transport and emulator, on asyncio and trio."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import anyio
import pytest

from corral import Client
from corral.core import (
    DeadlineExceeded,
    Handler,
    Middleware,
    Request,
    Response,
    build_stack,
    honours_deadline,
)
from corral.core._models import Timeouts
from corral.middleware import CircuitBreaker, ConcurrencyLimit, Deadline, Metrics, Retry
from corral.testing import EmulatorConfig, Latency
from corral.testing.server import RunningEmulator, serve_in_thread
from corral.transports import H11Transport, MemoryTransport
from tests.support import ScopeCount

pytestmark = pytest.mark.anyio

KEY = "sk-test-deadline-down-1234"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def slow() -> Iterator[RunningEmulator]:
    """Answers after 5 s: longer than any deadline here, far shorter than the read timeout."""
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(5.0))) as running:
        yield running


def stack(deadline: float, limit: int = 64) -> list[Middleware]:
    return [Metrics(), Deadline(deadline), Retry(), CircuitBreaker(), ConcurrencyLimit(limit)]


def test_the_default_layers_over_h11_pass_the_deadline_down() -> None:
    inner: list[Middleware] = [Retry(), CircuitBreaker(), ConcurrencyLimit(4)]
    assert honours_deadline(build_stack(inner, H11Transport()))
    assert not honours_deadline(build_stack(inner, MemoryTransport(lambda r: Response(200))))

    async def plain_layer(request: Request, call_next: Handler) -> Response:
        return await call_next(request)

    assert not honours_deadline(build_stack([*inner, plain_layer], H11Transport()))


async def test_the_deadline_ends_a_slow_answer_in_the_read_phase(slow: RunningEmulator) -> None:
    async with Client(slow.base_url, KEY, middleware=stack(0.3), model="m") as client:
        started = anyio.current_time()
        with pytest.raises(DeadlineExceeded, match="read phase"):
            await client.chat(MESSAGES)
        assert 0.25 <= anyio.current_time() - started < 3


async def test_a_wait_for_a_slot_ends_at_the_deadline(slow: RunningEmulator) -> None:
    """One slot, held by a call with a long deadline; a call with a short one waits for it."""
    layers: list[Middleware] = [Deadline(None), Retry(), CircuitBreaker(), ConcurrencyLimit(1)]
    async with Client(slow.base_url, KEY, middleware=layers, model="m") as client:
        body = {"model": "m", "messages": MESSAGES}

        def request(seconds: float) -> Request:
            built = client.build_request("/chat/completions", body)
            return built.with_deadline(anyio.current_time() + seconds)

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, request(30))
                await anyio.sleep(0.1)  # the holder has the slot
                started = anyio.current_time()
                with pytest.raises(DeadlineExceeded, match="waited for a slot"):
                    await client.send(request(0.3))
                assert 0.25 <= anyio.current_time() - started < 2
                tg.cancel_scope.cancel()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_asyncio_an_ordinary_call_enters_no_cancel_scope(
    monkeypatch: pytest.MonkeyPatch, emulator: RunningEmulator
) -> None:
    scopes = ScopeCount(monkeypatch)
    async with Client(emulator.base_url, KEY, middleware=stack(60), model="m") as client:
        await client.chat(MESSAGES)  # the connect has a scope of its own
        scopes.start()
        for _ in range(20):
            await client.chat(MESSAGES)
        assert scopes.entered == 0  # (closing the client below shields its socket closes)


@pytest.fixture
def trickled_error() -> Iterator[int]:
    """Answers every request with a 500 head, then its 40-byte body one byte every 0.2 s."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            head = b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
            conn.sendall(head + b"content-length: 40\r\n\r\n")
            for _ in range(40):
                if stop.wait(0.2):
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(b" ")

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    server.close()


async def test_the_deadline_ends_retry_s_read_of_a_trickled_error_body(trickled_error: int) -> None:
    """Retry reads a streamed error answer whole before deciding; that read ends at the deadline
    too, not at the read timeout between bytes."""
    layers: list[Middleware] = [Deadline(0.5), Retry(max_attempts=1), ConcurrencyLimit(4)]
    async with H11Transport(timeouts=Timeouts(read=5.0)) as transport:
        handler = build_stack(layers, transport)
        url = f"http://127.0.0.1:{trickled_error}/v1/chat/completions"
        request = Request("POST", url, body=b"{}").with_options(stream=True)
        started = anyio.current_time()
        with anyio.fail_after(5), pytest.raises(DeadlineExceeded):
            await handler(request)
        assert anyio.current_time() - started < 3


async def test_a_wait_for_quota_ends_at_the_call_s_deadline() -> None:
    """One request a minute: the second call waits for quota, and stops at its own deadline."""
    from corral.middleware import RateLimit

    limiter = RateLimit(rpm=1, cold_start=1.0)  # the first call goes at once
    assert honours_deadline(build_stack([limiter, ConcurrencyLimit(4)], H11Transport()))
    handler = build_stack([limiter], MemoryTransport(lambda r: Response(200)))
    request = Request("POST", "http://provider.test/v1/chat/completions", body=b"{}")
    assert (await handler(request)).status == 200
    started = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(DeadlineExceeded, match="waited for quota"):
        await handler(request.with_deadline(started + 0.3))
    assert 0.25 <= anyio.current_time() - started < 3
