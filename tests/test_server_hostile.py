"""``corral serve`` facing bad clients (issue 12, item 18), over raw sockets on 127.0.0.1.

Every wait is bounded (socket timeouts, bounded loops); a test that would hang on a server
without the bound fails with a timeout instead.
"""

from __future__ import annotations

import json
import resource
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from corral.testing.emulator import EmulatorConfig, Latency
from corral.testing.server import RunningEmulator, ServerLimits, serve_in_thread
from tests.support import wait_until

AUTH = "Authorization: Bearer sk-test\r\n"
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def request(body: str = CHAT, *, path: str = "/v1/chat/completions", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: application/json\r\n"
        f"Content-Length: {len(body.encode())}\r\n{extra}\r\n{body}"
    ).encode()


def connect(emu: RunningEmulator, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((emu.host, emu.port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Exactly one Content-Length response (pipelined ones stay unread); timeouts bound it."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        data = sock.recv(1)
        assert data, f"closed before a response: {head!r}"
        head += data
    lines = head.decode("latin-1").strip().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    body = b""
    while len(body) < int(headers["content-length"]):
        data = sock.recv(int(headers["content-length"]) - len(body))
        assert data, "closed mid-body"
        body += data
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, within: float = 10.0) -> bool:
    """True once the server has closed (EOF or reset) within ``within`` s; False if still open."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def served(emu: RunningEmulator) -> int:
    """A well-behaved client's request on a new connection: its status."""
    with connect(emu) as sock:
        sock.sendall(request())
        return read_response(sock)[0]


@pytest.fixture
def quick() -> Iterator[RunningEmulator]:
    limits = ServerLimits(request_timeout=0.5, keepalive_timeout=0.5, linger=0.5)
    with serve_in_thread(limits=limits) as emu:
        yield emu


@pytest.mark.parametrize("value", ["-100000", "-1", "+5", "1_0", "5, 5", "abc", "\u0663"])
def test_invalid_content_length_gets_400_and_a_close(value: str) -> None:
    with serve_in_thread() as emu, connect(emu) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\n{AUTH}Content-Length: {value}\r\n\r\n".encode()
            + CHAT.encode()
        )
        status, headers, body = read_response(sock)
        assert status == 400 and headers["connection"] == "close"
        assert "Content-Length" in json.loads(body)["error"]["message"]
        assert closed_by_server(sock)
        assert served(emu) == 200
        assert (
            emu.counts.get("received") == 1
        )  # only the good client's request reached the emulator


def test_conflicting_content_lengths_get_400() -> None:
    with serve_in_thread() as emu, connect(emu) as sock:
        sock.sendall(request(extra="Content-Length: 3\r\n"))
        assert read_response(sock)[0] == 400
        assert closed_by_server(sock)


def test_a_gigabyte_body_gets_413_before_it_is_sent() -> None:
    with serve_in_thread() as emu, connect(emu) as sock:
        head = f"POST /v1/chat/completions HTTP/1.1\r\n{AUTH}Content-Length: {1 << 30}\r\n\r\n"
        sock.sendall(head.encode())
        sock.sendall(b"x" * (1 << 20))  # 1 MiB of the promised 1 GiB, then the answer is there
        status, headers, body = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        message = json.loads(body)["error"]["message"]
        assert str(1 << 30) in message and str(32 * 1024 * 1024) in message
        assert closed_by_server(sock)
        assert emu.counts.get("received") is None


def test_the_body_cap_is_configurable() -> None:
    with serve_in_thread(limits=ServerLimits(max_body=len(CHAT) + 10)) as emu:
        assert served(emu) == 200
        with connect(emu) as sock:
            sock.sendall(request(CHAT + " " * 11))
            assert read_response(sock)[0] == 413


def test_slow_headers_get_408_and_a_close(quick: RunningEmulator) -> None:
    with connect(quick) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        status = None
        for _ in range(100):  # one header byte every 50 ms: at most 5 s
            try:
                sock.sendall(b"X")
            except OSError:
                break
            sock.settimeout(0.05)
            try:
                status = read_response(sock)[0]
                break
            except TimeoutError:
                continue
        assert status == 408
        assert closed_by_server(sock)


def test_slow_body_gets_408(quick: RunningEmulator) -> None:
    with connect(quick) as sock:
        sock.sendall(request()[:-5])  # the head and all but 5 bytes of the body
        assert read_response(sock)[0] == 408


def test_a_connection_that_sends_nothing_is_closed(quick: RunningEmulator) -> None:
    with connect(quick) as sock:
        assert closed_by_server(sock)


def test_idle_keep_alive_connection_is_closed(quick: RunningEmulator) -> None:
    with connect(quick) as sock:
        for _ in range(2):
            sock.sendall(request())
            assert read_response(sock)[0] == 200
        assert closed_by_server(sock)


def test_a_slow_answer_is_not_a_slow_client() -> None:
    limits = ServerLimits(request_timeout=0.2, keepalive_timeout=0.2)
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(1.0)), limits=limits) as emu:
        assert served(emu) == 200


def test_a_head_sent_byte_by_byte_in_time_is_served() -> None:
    with serve_in_thread() as emu, connect(emu) as sock:
        for byte in request():
            sock.send(bytes([byte]))
        assert read_response(sock)[0] == 200


def test_pipelined_requests_are_all_answered() -> None:
    with serve_in_thread() as emu, connect(emu) as sock:
        sock.sendall(request() * 3)
        assert [read_response(sock)[0] for _ in range(3)] == [200] * 3


def test_an_oversized_head_gets_431() -> None:
    with serve_in_thread() as emu, connect(emu) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024))
        assert read_response(sock)[0] == 431
        assert closed_by_server(sock)


def test_1100_idle_connections_do_not_lock_out_a_client() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2600:  # both ends of every connection live in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    idle: list[socket.socket] = []
    try:
        with serve_in_thread() as emu:
            for _ in range(1100):
                idle.append(connect(emu))
            assert served(emu) == 200
            assert closed_by_server(idle[0])  # the longest-idle ones made room
            assert not closed_by_server(idle[-1], within=0.2)
            assert emu.open_connections <= ServerLimits().max_connections
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_at_the_cap_with_every_connection_busy_a_newcomer_gets_503() -> None:
    config = EmulatorConfig(latency=Latency.fixed(1.0))
    with serve_in_thread(config, limits=ServerLimits(max_connections=2)) as emu:
        busy = [connect(emu), connect(emu)]
        for sock in busy:
            sock.sendall(request())
        # Both requests are being answered (latency 1 s): the connections are busy.
        assert wait_until(lambda: emu.counts.get("received", 0) == 2, timeout=10)
        with connect(emu) as newcomer:
            status, headers, _ = read_response(newcomer)
            assert status == 503 and headers["connection"] == "close"
        assert [read_response(sock)[0] for sock in busy] == [200, 200]
        for sock in busy:
            sock.close()


def test_tls_to_the_plain_server_fails_at_once() -> None:
    with serve_in_thread() as emu, connect(emu, timeout=10.0) as sock:
        context = ssl.create_default_context()
        with pytest.raises(ssl.SSLError) as info:  # not a 10 s timeout
            context.wrap_socket(sock, server_hostname="localhost")
        assert not isinstance(info.value, TimeoutError)
    with serve_in_thread() as emu, connect(emu) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
        status, headers, body = read_response(sock)
        assert status == 400 and headers["connection"] == "close"
        assert "use an http:// URL" in json.loads(body)["error"]["message"]
        assert closed_by_server(sock)


def test_unknown_routes_and_models_over_the_wire() -> None:
    with serve_in_thread(any_model=False) as emu, connect(emu) as sock:
        sock.sendall(request(path="/v1/chat/completion"))
        status, _, body = read_response(sock)
        assert status == 404 and "POST /v1/chat/completions" in body.decode()
        sock.sendall(request(CHAT.replace("gpt-4o-mini", "gpt-4o-mnii")))
        status, _, body = read_response(sock)
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    with serve_in_thread() as emu, connect(emu) as sock:  # tests name models freely
        sock.sendall(request(CHAT.replace("gpt-4o-mini", "m")))
        assert read_response(sock)[0] == 200


def test_pipelined_bytes_behind_a_slow_answer_are_not_buffered_without_bound() -> None:
    config = EmulatorConfig(latency=Latency.fixed(2.0))
    limits = ServerLimits(max_head=1024, max_body=1024)
    with serve_in_thread(config, limits=limits) as emu, connect(emu) as sock:
        sock.sendall(request())  # answered after 2 s; meanwhile the client keeps sending
        sock.setblocking(False)
        sent, chunk = 0, b"x" * 65536
        for _ in range(2048):  # up to 128 MiB
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                break
        assert sent < 48 << 20, "the server kept reading while it was answering"
        sock.settimeout(5.0)
        assert read_response(sock)[0] == 200
