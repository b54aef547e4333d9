"""The trio stream under H11Transport: timed reads, trio's checkpoint rules, back-pressure,
closes; and the transport choosing it for plain HTTP on trio only."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator

import anyio
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from corral import _pacing as pacing
from corral.core import _errors as errors
from corral.core import api_request
from corral.core._models import Timeouts
from corral.testing.server import RunningEmulator
from corral.transports._http11 import H11Transport
from corral.transports._lean_stream import ReadTimedOut
from corral.transports._trio_stream import TrioStream, _watchdog, open_trio_stream
from tests import hostile
from tests.support import until

pytestmark = pytest.mark.anyio

BIG = bytes(range(256)) * (16 * 1024)  # 4 MiB


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.fixture
async def connected(
    peer: tuple[int, list[socket.socket]],
) -> AsyncIterator[tuple[TrioStream, socket.socket]]:
    """Our stream and the peer's end of the same connection."""
    port, accepted = peer
    stream = await open_trio_stream("127.0.0.1", port)
    await until(lambda: bool(accepted))
    yield stream, accepted[0]
    await stream.aclose()


async def test_a_timed_read_returns_what_comes_in_time_and_ends_at_its_deadline(
    connected: tuple[TrioStream, socket.socket],
) -> None:
    """No cancel scope: the run's watchdog ends the read (and closes the stream, which the
    transport would drop anyway)."""
    stream, conn = connected
    conn.sendall(b"soon")
    assert await stream.receive_until(1024, trio.current_time() + 5) == b"soon"
    started = trio.current_time()
    with anyio.fail_after(5), pytest.raises(ReadTimedOut):
        await stream.receive_until(1024, started + 0.1)
    assert trio.current_time() - started >= 0.1
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()


@pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio")]
)
async def test_the_watchdog_times_out_each_read_at_its_own_deadline(
    peer: tuple[int, list[socket.socket]],
) -> None:
    """Reads with deadlines in any order: each ends at its own deadline (an earlier deadline
    moves the watchdog's wake-up), none early, none late. Virtual time: the clock jumps to the
    watchdog's wake-up while every read waits."""
    port, accepted = peer
    del accepted  # the peer accepts one; the others wait in its backlog, connected all the same
    streams = [await open_trio_stream("127.0.0.1", port) for _ in range(4)]
    start = trio.current_time()
    delays = [0.4, 0.1, 0.3, 0.2]
    ended: dict[int, float] = {}

    async def read(i: int) -> None:
        with pytest.raises(ReadTimedOut):
            await streams[i].receive_until(1024, start + delays[i])
        ended[i] = trio.current_time() - start

    with anyio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(read, i)
    assert ended == pytest.approx(dict(enumerate(delays)), abs=1e-6)
    assert not _watchdog().waiting


async def test_a_cancelled_scope_is_seen_even_when_bytes_are_waiting(
    connected: tuple[TrioStream, socket.socket],
) -> None:
    stream, conn = connected
    conn.sendall(b"ready")
    await until(lambda: _readable(stream))
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive()
    assert scope.cancelled_caught
    assert await stream.receive() == b"ready"  # nothing was taken by the cancelled read


async def test_a_reader_whose_bytes_keep_coming_lets_other_tasks_run(
    connected: tuple[TrioStream, socket.socket],
) -> None:
    """Reads served without a wait skip trio's scheduler, but not for long (``Pacer``)."""
    stream, conn = connected
    conn.sendall(b"x" * 64 * 1024)
    await until(lambda: _readable(stream))
    others = 0

    async def other() -> None:
        nonlocal others
        while True:
            others += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()  # let it start
        before = others
        for _ in range(pacing.DEFAULT_EVERY * 3):
            assert len(await stream.receive(16)) == 16
        ran = others - before
        nursery.cancel_scope.cancel()
    # three checkpoints in 48 reads (none would give 0, one per read 48); trio runs a batch
    # of ready tasks in random order, so the last turn may come after ``ran`` is counted
    assert 2 <= ran <= 4


async def test_write_hands_over_what_fits_and_drain_waits_for_the_rest(
    connected: tuple[TrioStream, socket.socket],
) -> None:
    stream, conn = connected
    assert stream.write(b"small") is False  # the kernel took it at once
    payload = BIG * 8  # 32 MiB: more than the kernel buffers hold
    assert stream.write(payload) is True
    with anyio.move_on_after(0.3) as waited:
        await stream.drain()
    assert waited.cancelled_caught  # nobody reads: drain keeps waiting, and can be cancelled
    got = bytearray()

    def read_all() -> None:
        while len(got) < 5 + len(payload):
            got.extend(conn.recv(1 << 20))

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    with anyio.fail_after(10):
        await stream.drain()
    reader.join(timeout=10)
    assert bytes(got) == b"small" + payload


async def test_peer_close_is_seen_when_idle_and_ends_the_stream(
    connected: tuple[TrioStream, socket.socket],
) -> None:
    stream, conn = connected
    assert not stream.looks_closed()
    conn.sendall(b"tail")
    conn.close()
    await until(stream.looks_closed)
    assert await stream.receive() == b"tail"
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(b"x")


async def test_closing_wakes_a_waiting_reader_with_anyios_error(
    connected: tuple[TrioStream, socket.socket],
) -> None:
    stream, _ = connected
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await stream.receive()
        except BaseException as exc:  # what it raises is the point
            errors.append(exc)

    with anyio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
    assert [type(e) for e in errors] == [anyio.ClosedResourceError]


async def test_a_read_cancelled_just_as_it_times_out_still_closes_the_stream(
    connected: tuple[TrioStream, socket.socket],
) -> None:
    """A cancel (a user's ``move_on_at``, say) and the watchdog can wake a waiting read in the
    same batch, which trio runs in either order. When the watchdog goes first the read ends
    with ``Cancelled``: its socket must still be closed (trio's rule after ``notify_closing``),
    not left open with the time-out pending for the next read, which has no deadline at all."""
    stream, conn = connected
    scope = trio.CancelScope()

    async def read() -> None:
        with scope:
            await stream.receive_until(1024, trio.current_time() + 60)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # the read is rescheduled with Cancelled...
        stream.time_out()  # ...and the watchdog runs before it resumes
    assert scope.cancelled_caught
    conn.sendall(b"late")
    with anyio.fail_after(5), pytest.raises(anyio.ClosedResourceError):
        await stream.receive()


def test_the_watchdog_never_notifies_a_socket_closed_under_a_waiting_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another task closes the stream at the read's deadline: in that batch the watchdog may
    find the read still registered (it has not resumed yet). Closed is closed: trio on Windows
    raises for a closed socket in ``notify_closing``, and an error in the watchdog (a system
    task) would crash the whole run with ``TrioInternalError``."""
    notify_closing = trio.lowlevel.notify_closing

    def strict(sock: socket.socket) -> None:
        if sock.fileno() == -1:
            raise OSError("not a socket")  # trio on Windows (WSAENOTSOCK)
        notify_closing(sock)

    monkeypatch.setattr(trio.lowlevel, "notify_closing", strict)

    async def read(stream: TrioStream, deadline: float) -> None:
        with contextlib.suppress(ReadTimedOut, anyio.ClosedResourceError):
            await stream.receive_until(1024, deadline)

    async def close_at(stream: TrioStream, deadline: float) -> None:
        await trio.sleep_until(deadline)
        await stream.aclose()

    async def main() -> None:
        for _ in range(30):  # the batch runs in either order: the race comes every other time
            ours, theirs = socket.socketpair()
            stream = TrioStream(ours)
            deadline = trio.current_time() + 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, stream, deadline)
                nursery.start_soon(close_at, stream, deadline)
            theirs.close()

    trio.run(main, clock=MockClock(autojump_threshold=0))


async def test_h11_transport_on_trio_uses_it_for_plain_http(emulator: RunningEmulator) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    request = api_request(emulator.base_url, "/chat/completions", body, api_key="sk-test-trio-1")
    async with H11Transport(max_connections=1) as transport:
        for _ in range(3):
            assert (await transport(request)).status == 200
        (conn,) = transport._idle.values()
        assert type(conn[0].stream) is TrioStream
        assert transport.open_connections == 1


def _trickle_head(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 100_000:
        if stop.wait(0.02):
            return
        conn.sendall(bytes([byte]))


async def test_a_head_trickled_a_byte_at_a_time_gets_one_read_timeout_in_all() -> None:
    """Each byte ends a wait in time; every wait registers again with the same deadline, and
    the watchdog still ends the head at one read timeout (not one per byte: 2000 s here)."""
    server = hostile.HostileServer(_trickle_head)
    try:
        url = f"http://127.0.0.1:{server.port}/v1"
        request = api_request(url, "/chat/completions", {"model": "m"}, api_key="sk-test-trio-2")
        async with H11Transport(timeouts=Timeouts(read=0.3)) as transport:
            with anyio.fail_after(5), pytest.raises(errors.ReadTimeout):
                await transport(request)
            assert transport.open_connections == 0
    finally:
        server.close()


async def test_timed_out_and_cancelled_reads_leave_no_descriptor_open() -> None:
    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(200)  # never accepts, never answers: no descriptor on the server's side
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        request = api_request(url, "/chat/completions", {"model": "m"}, api_key="sk-test-trio-3")
        before = descriptors()
        async with H11Transport(timeouts=Timeouts(read=0.05), max_connections=20) as transport:

            async def timed_out() -> None:
                with pytest.raises(errors.ReadTimeout):
                    await transport(request)

            async def cancelled() -> None:
                with trio.move_on_after(0.05) as scope:
                    await transport(request)
                assert scope.cancelled_caught

            with anyio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for i in range(100):
                        nursery.start_soon(timed_out if i % 2 else cancelled)
            assert transport.open_connections == 0
        assert descriptors() == before


def _readable(stream: TrioStream) -> bool:
    """Bytes wait in the socket (a peek that takes none)."""
    try:
        return bool(stream._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def test_a_stream_kept_past_its_trio_run_is_timed_in_the_next(
    peer: tuple[int, list[socket.socket]],
) -> None:
    """A pooled connection may outlive one ``trio.run``: the next run's watchdog times it."""
    port, _ = peer
    kept: list[TrioStream] = []

    async def first() -> None:
        kept.append(await open_trio_stream("127.0.0.1", port))
        with pytest.raises(ReadTimedOut):  # starts this run's watchdog
            await (await open_trio_stream("127.0.0.1", port)).receive_until(1, 0.0)

    async def second() -> None:
        with trio.fail_after(5), pytest.raises(ReadTimedOut):
            await kept[0].receive_until(1024, trio.current_time() + 0.1)
        await kept[0].aclose()

    trio.run(first)
    trio.run(second)
