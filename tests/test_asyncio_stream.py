"""The asyncio stream under H11Transport: back-pressure both ways, closes, on asyncio and uvloop."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from corral.transports import _asyncio_stream as asyncio_stream
from corral.transports._asyncio_stream import AsyncioStream, open_asyncio_stream
from tests.support import until

pytestmark = pytest.mark.anyio

BIG = bytes(range(256)) * (16 * 1024)  # 4 MiB, four times the read high-water mark


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture
async def connected(
    peer: tuple[int, list[socket.socket]],
) -> AsyncIterator[tuple[AsyncioStream, socket.socket]]:
    """Our stream and the peer's end of the same connection."""
    port, accepted = peer
    stream = await open_asyncio_stream("127.0.0.1", port, None)
    await until(lambda: bool(accepted))
    yield stream, accepted[0]
    await stream.aclose()


async def test_reading_pauses_while_unread_data_piles_up(
    connected: tuple[AsyncioStream, socket.socket],
) -> None:
    stream, conn = connected
    sender = threading.Thread(target=conn.sendall, args=(BIG,), daemon=True)
    sender.start()
    protocol = stream._protocol
    await until(lambda: protocol.reading_paused)
    assert protocol.buffered <= asyncio_stream._HIGH_WATER + 65536 * 4
    got = bytearray()
    with anyio.fail_after(10):
        while len(got) < len(BIG):
            got += await stream.receive()
    assert bytes(got) == BIG and not protocol.reading_paused
    sender.join(timeout=5)


async def test_send_waits_for_a_peer_that_does_not_read(
    connected: tuple[AsyncioStream, socket.socket],
) -> None:
    stream, conn = connected
    payload = BIG * 8  # 32 MiB: more than the kernel buffers hold
    assert stream.write(payload) is True  # the transport's buffer is over its high-water mark
    with anyio.move_on_after(0.3) as waited:
        await stream.drain()
    assert waited.cancelled_caught  # nobody reads: drain keeps waiting, and can be cancelled

    def read_all() -> int:
        total = 0
        while total < len(payload):
            total += len(conn.recv(1 << 20))
        return total

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    with anyio.fail_after(10):
        await stream.drain()
    reader.join(timeout=10)


async def test_peer_close_is_seen_when_idle_and_ends_the_stream(
    connected: tuple[AsyncioStream, socket.socket],
) -> None:
    stream, conn = connected
    assert not stream.looks_closed()
    conn.sendall(b"tail")
    conn.close()
    await until(stream.looks_closed)
    assert await stream.receive() == b"tail"  # data before the close is still delivered
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(b"x")


async def test_connections_share_one_read_buffer_and_each_keeps_its_own_bytes() -> None:
    """asyncio's plain protocols get a fresh 256 KiB bytes per read (an mmap, a mremap and a
    munmap each); a buffered protocol reads into one buffer per thread and copies out what came."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)
    patterns = [bytes([n]) * 300_000 for n in (1, 2)]

    def serve() -> None:
        conns = [server.accept()[0] for _ in patterns]
        for offset in range(0, 300_000, 50_000):  # interleaved, so reads of both alternate
            for conn, pattern in zip(conns, patterns, strict=True):
                conn.sendall(pattern[offset : offset + 50_000])
        for conn in conns:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    streams = [await open_asyncio_stream("127.0.0.1", port, None) for _ in patterns]
    try:
        first, second = (s._protocol for s in streams)
        assert first.get_buffer(-1) is second.get_buffer(-1)
        got = [bytearray(), bytearray()]

        async def drain(i: int) -> None:
            with pytest.raises(anyio.EndOfStream):
                while True:
                    got[i] += await streams[i].receive()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(2):
                    tg.start_soon(drain, i)
        assert [bytes(g) for g in got] == patterns
    finally:
        for stream in streams:
            await stream.aclose()
        thread.join(timeout=5)
        server.close()
