"""One conformance suite, every transport, real local servers, asyncio and trio."""

from __future__ import annotations

import socket
import ssl
import threading
import tracemalloc
from collections.abc import Iterator

import anyio
import pytest
import trustme

from corral.core import Request, api_request, decode_chat, decode_models
from corral.core import _errors as errors
from corral.core._compose import build_stack
from corral.core._models import Timeouts
from corral.core._wire import ChatStreamDecoder
from corral.middleware._deadline import Deadline
from corral.testing.emulator import EmulatorConfig, Fault, Latency
from corral.testing.server import RunningEmulator, ServerLimits, serve_in_thread
from tests import hostile
from tests.support import CANARY_KEY, TransportFactory, until

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Transports also run on uvloop, whose transports differ from asyncio's in small ways."""
    return request.param


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


def chat(base_url: str, **body: object) -> Request:
    return api_request(base_url, "/chat/completions", {**CHAT, **body}, api_key=CANARY_KEY)


async def test_status_headers_and_json(
    emulator: RunningEmulator, transport_factory: TransportFactory
) -> None:
    t = transport_factory()
    reply = await t(api_request(emulator.base_url, "/models", None, api_key=CANARY_KEY))
    assert reply.status == 200
    assert reply.headers.get("Content-Type") == "application/json"
    assert reply.request_id is not None and reply.request_id.startswith("req_")
    assert "gpt-4o-mini" in decode_models(reply)
    result = decode_chat(await t(chat(emulator.base_url)))
    assert result.text.startswith("Emulated answer")
    assert result.usage is not None and result.usage.total_tokens > 0


async def test_error_statuses_are_returned_not_raised(
    emulator: RunningEmulator, transport_factory: TransportFactory
) -> None:
    t = transport_factory()
    no_key = api_request(emulator.base_url, "/chat/completions", CHAT, api_key=None)
    assert (await t(no_key)).status == 401
    missing = api_request(emulator.base_url, "/nowhere", CHAT, api_key=CANARY_KEY)
    assert (await t(missing)).status == 404
    with pytest.raises(errors.AuthenticationError):
        decode_chat(await t(no_key))


async def test_streamed_body(
    emulator: RunningEmulator, transport_factory: TransportFactory
) -> None:
    t = transport_factory()
    reply = await t(chat(emulator.base_url, stream=True, stream_options={"include_usage": True}))
    assert reply.status == 200 and reply.stream is not None
    decoder = ChatStreamDecoder()
    chunks = []
    async for data in reply.stream:
        chunks += decoder.feed(data)
    chunks += decoder.close()
    assert "".join(c.text for c in chunks).startswith("Emulated answer")
    assert chunks[-1].usage is not None


async def test_keep_alive_reuses_one_connection(
    emulator: RunningEmulator, transport_factory: TransportFactory
) -> None:
    t = transport_factory()
    for _ in range(10):
        assert (await t(chat(emulator.base_url))).status == 200
    assert emulator.counts["connections"] == 1


async def test_server_closing_idle_connections_is_absorbed(
    transport_factory: TransportFactory,
) -> None:
    with serve_in_thread(limits=ServerLimits(keepalive_timeout=0.1)) as emu:
        t = transport_factory()
        for _ in range(3):
            assert (await t(chat(emu.base_url))).status == 200
            await until(lambda: emu.open_connections == 0)  # the server closed the idle one
            # One turn of the client's loop to read that close: aiohttp (which never resends a
            # POST) would otherwise write on the closed socket when a loaded machine delays it.
            # A close that races the next request is H11's stale-connection resend (tested there).
            await anyio.sleep(0.05)
        assert emu.counts["connections"] == 3
        assert emu.counts["received"] == 3


async def test_read_timeout(transport_factory: TransportFactory) -> None:
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(3.0))) as emu:
        t = transport_factory(timeouts=Timeouts(connect=2, read=0.2, write=2, pool=2))
        with anyio.fail_after(2), pytest.raises(errors.ReadTimeout):
            await t(chat(emu.base_url))


async def test_connect_error(transport_factory: TransportFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        t = transport_factory()
        with pytest.raises(errors.ConnectError):
            await t(chat(f"http://127.0.0.1:{port}/v1"))


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never reads or answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


async def test_write_timeout(silent_server: int, transport_factory: TransportFactory) -> None:
    t = transport_factory(timeouts=Timeouts(connect=2, read=2, write=0.3, pool=2))
    big = api_request(
        f"http://127.0.0.1:{silent_server}/v1",
        "/chat/completions",
        {**CHAT, "pad": "x" * 32_000_000},
        api_key=CANARY_KEY,
    )
    with anyio.fail_after(5), pytest.raises(errors.WriteTimeout):
        await t(big)


async def test_pool_timeout(transport_name: str, transport_factory: TransportFactory) -> None:
    with serve_in_thread(EmulatorConfig(tokens_per_second=2)) as emu:
        t = transport_factory(
            max_connections=1, timeouts=Timeouts(connect=2, read=2, write=2, pool=0.2)
        )
        held = await t(chat(emu.base_url, stream=True))  # a slow stream holds the one slot
        expected = errors.APITimeoutError if transport_name == "aiohttp" else errors.PoolTimeout
        with anyio.fail_after(3), pytest.raises(expected):
            await t(chat(emu.base_url))
        await held.aclose()
        assert (await t(chat(emu.base_url, max_tokens=1))).status == 200


@pytest.mark.parametrize("fault", [Fault.RESET, Fault.RESET_AFTER_FIRST_BYTE, Fault.TRUNCATE])
async def test_broken_connections_raise_transport_errors(
    fault: Fault, transport_factory: TransportFactory
) -> None:
    with serve_in_thread(EmulatorConfig(faults={fault: 1.0})) as emu:
        t = transport_factory()
        with anyio.fail_after(3), pytest.raises(errors.TransportError):
            reply = await t(chat(emu.base_url))
            decode_chat(reply)


async def test_truncated_stream_is_detected(transport_factory: TransportFactory) -> None:
    with serve_in_thread(EmulatorConfig(faults={Fault.TRUNCATE: 1.0})) as emu:
        t = transport_factory()
        reply = await t(chat(emu.base_url, stream=True))
        assert reply.stream is not None
        decoder = ChatStreamDecoder()
        with pytest.raises(errors.RemoteProtocolError, match="truncated"):
            async for data in reply.stream:
                decoder.feed(data)
            decoder.close()


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def test_https_with_a_test_certificate(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], transport_factory: TransportFactory
) -> None:
    server_ctx, client_ctx = tls
    with serve_in_thread(ssl_context=server_ctx) as emu:
        assert emu.base_url.startswith("https://")
        t = transport_factory(ssl_context=client_ctx)
        for _ in range(3):
            assert decode_chat(await t(chat(emu.base_url))).text
        assert emu.counts["connections"] == 1
        untrusting = transport_factory()
        with pytest.raises(errors.ConnectError):
            await untrusting(chat(emu.base_url))


async def test_aiohttp_refuses_trio_clearly(
    anyio_backend: object, emulator: RunningEmulator
) -> None:
    if anyio_backend != "trio":
        pytest.skip("trio only")
    from corral.transports._aiohttp_transport import AiohttpTransport

    with pytest.raises(errors.InvalidInput, match="only under asyncio"):
        await AiohttpTransport()(chat(emulator.base_url))


@pytest.fixture
def redirecting_servers() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A server answering 307 to another host (another port), which records what it receives."""
    import http.server

    seen: list[dict[str, str]] = []

    class Target(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(dict(self.headers.items()))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)
    other = f"http://localhost:{target.server_address[1]}/v1/chat/completions"

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(307)
            self.send_header("location", other)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    source = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (target, source)]
    for t in threads:
        t.start()
    yield f"http://127.0.0.1:{source.server_address[1]}/v1", seen
    for s in (target, source):
        s.shutdown()
        s.server_close()


async def test_redirects_are_not_followed_so_the_key_stays_home(
    redirecting_servers: tuple[str, list[dict[str, str]]], transport_factory: TransportFactory
) -> None:
    base_url, seen_elsewhere = redirecting_servers
    reply = await transport_factory()(chat(base_url))
    assert reply.status == 307 and reply.headers.get("location")
    assert seen_elsewhere == []  # nothing, let alone the Authorization header, went elsewhere


async def test_h11_resends_once_on_a_pooled_connection_found_dead(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: object
) -> None:
    from corral.transports import _http11 as http11

    # Skip the idle check, so the pooled socket the server has closed is really used.
    monkeypatch.setattr(http11._Connection, "looks_closed", lambda self: False)
    with serve_in_thread(limits=ServerLimits(keepalive_timeout=0.1)) as emu:
        async with http11.H11Transport() as t:
            assert (await t(chat(emu.base_url))).status == 200
            await until(lambda: emu.open_connections == 0)  # the server closed the idle one
            assert (await t(chat(emu.base_url))).status == 200
        assert emu.counts["received"] == 2 and emu.counts["connections"] == 2


@pytest.fixture
def big_body_server() -> Iterator[tuple[str, bytes]]:
    """Answers every request with an 8 MB body sent as fast as the socket takes it."""
    body = bytes(range(256)) * (8 * 4096)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, rest = request.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
                conn.sendall(body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1", body
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_large_body_arrives_intact(
    big_body_server: tuple[str, bytes], transport_factory: TransportFactory, stream: bool
) -> None:
    """8 MB, read whole or slowly in pieces (the transport must hold back, not drop, data)."""
    base_url, expected = big_body_server
    reply = await transport_factory()(chat(base_url, stream=stream))
    if not stream:
        assert reply.body == expected
        return
    assert reply.stream is not None
    got = bytearray()
    async for piece in reply.stream:
        got += piece
        if len(got) < 2_000_000:
            await anyio.sleep(0.001)  # a slow reader: the socket fills and reading pauses
    assert bytes(got) == expected


async def test_header_injection_is_refused(
    emulator: RunningEmulator, transport_name: str, transport_factory: TransportFactory
) -> None:
    request = chat(emulator.base_url)
    evil = request.evolve(headers=request.headers.with_("x-note", "a\r\nx-injected: 1"))
    with pytest.raises(errors.InvalidInput, match="x-note"):
        await transport_factory()(evil)
    assert emulator.counts.get("received", 0) == 0


# -- hostile servers (tests/hostile.py): one table, every transport ------------------------
# request_sent per phase: connect_refused (connect, False), never_reads_the_request (write,
# False), never_answers, endless_100_continue, closes_without_answer (read, True).


@pytest.mark.parametrize("row", hostile.ROWS, ids=lambda row: row.name)
async def test_hostile_server_gets_a_typed_bounded_scrubbed_error(
    row: hostile.Row, transport_factory: TransportFactory
) -> None:
    with hostile.serving(row) as (base_url, server):
        t = transport_factory(
            timeouts=Timeouts(connect=2, read=0.3, write=0.3, pool=2),
            max_response_bytes=1 << 20,
        )
        handler = t if row.deadline is None else build_stack([Deadline(row.deadline)], t)
        body = {**CHAT, "stream": row.stream}
        if row.big_request:
            body["pad"] = "x" * 32_000_000
        request = api_request(base_url, "/chat/completions", body, api_key=CANARY_KEY)
        if row.memory:
            tracemalloc.start()
        try:
            with anyio.fail_after(10), pytest.raises(errors.CorralError) as caught:
                reply = await handler(request)
                await reply.aread()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    error = caught.value
    assert isinstance(error, row.expect), repr(error)
    if row.sent is not None:
        assert isinstance(error, errors.TransportError) and error.request_sent is row.sent
    if row.memory:
        assert peak < 16 << 20, f"{peak} bytes allocated for a 1 MiB cap (the server sends 32)"
    if row.says is not None:
        assert row.says in str(error)
    text = f"{error!s} {error!r} {error.args!r}"
    pieces = {CANARY_KEY[i : i + 8] for i in range(len(CANARY_KEY) - 7)}
    assert not [p for p in pieces if p in text], text
    if server is not None and server.heads and server.heads[0]:
        assert hostile.header(server.heads[0], b"accept-encoding") == b"identity"


@pytest.fixture
def poisoning_server() -> Iterator[str]:
    """Answers each connection's first request, plus a forged second answer in the same send."""

    def behaviour(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        first = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        forged = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"
        conn.sendall(first + forged)
        while hostile.read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond")

    server = hostile.HostileServer(behaviour)
    yield f"http://127.0.0.1:{server.port}/v1"
    server.close()


async def test_bytes_after_a_response_never_answer_the_next_request(
    poisoning_server: str, transport_factory: TransportFactory
) -> None:
    base_url = poisoning_server
    t = transport_factory()
    for _ in range(3):
        # "forged" would be the leftover bytes, "second" a reused connection's real answer
        assert (await t(chat(base_url))).body == b"ok"
