"""Hostile HTTP servers on raw sockets, one per misbehaviour, for the transport conformance suite.

Each ``Row`` is a server behaviour plus what every transport must do about it: raise one typed
corral error (never another exception), within a bounded time and memory, with no credential
in its message. ``request_sent`` is checked per phase (connect, write, read).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
from collections.abc import Callable, Iterator

import attrs

from corral.core import _errors as errors

#: What a connection handler gets: the socket, the request head it read (b"" if it read none),
#: and the event that says the test is over.
Behaviour = Callable[[socket.socket, bytes, threading.Event], None]

_CAP = 32 * 1024 * 1024  # the most any behaviour sends, so a transport without a cap stays sane
_ZEROS = bytes(65536)


def read_request(conn: socket.socket) -> bytes:
    """The request head (its body read and dropped); b"" if the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return b""
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        piece = conn.recv(65536)
        if not piece:
            break
        rest += piece
    return head


def header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


def _trickle_sse(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    while not stop.wait(0.02):
        conn.sendall(b"1\r\nx\r\n")  # one byte of an SSE line every 20 ms, forever


def _stall_stream(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n"
    )
    stop.wait(30)


def _endless_chunked(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (len(_ZEROS), _ZEROS)
    for _ in range(_CAP // len(_ZEROS)):
        if stop.is_set():
            return
        conn.sendall(chunk)


def _huge_length(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (1 << 30))
    for _ in range(_CAP // len(_ZEROS)):
        if stop.is_set():
            return
        conn.sendall(_ZEROS)


def _answer_each(response: bytes) -> Behaviour:
    """Send ``response`` to this request and to every later one on the connection."""

    def behaviour(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        while head and not stop.is_set():
            conn.sendall(response)
            head = read_request(conn)

    return behaviour


def _gzipped(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


_gzip_bomb = _answer_each(_gzipped(gzip.compress(bytes(_CAP), compresslevel=9)))  # ~32 KB
_bad_gzip = _answer_each(_gzipped(b"\x1f\x8b\x08\x00this is not a deflate stream at all"))


def _endless_continue(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    while not stop.wait(0.02):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")


def _silent(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    stop.wait(30)


def _close(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.close()


def _echo_key_in_status(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 2OO " + header(head, b"authorization") + b"\r\n\r\n")
    stop.wait(30)


def _plain_http(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.recv(65536)  # a TLS ClientHello: garbage to an HTTP server, which answers 400
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    conn.close()


@attrs.frozen
class Row:
    name: str
    behaviour: Behaviour | None  # None: nothing listens (connect refused)
    expect: type[errors.CorralError]
    #: ``request_sent`` the error must carry (None: not checked).
    sent: bool | None = None
    stream: bool = False
    #: Wrap the transport in ``Deadline(deadline)``.
    deadline: float | None = None
    read_request: bool = True
    #: Send a 32 MB body (to fill the socket buffers of a server that never reads).
    big_request: bool = False
    #: Check the peak of Python allocations during the call.
    memory: bool = False
    tls: bool = False
    #: A phrase the message must hold.
    says: str | None = None


ROWS = [
    Row("trickled_sse_body", _trickle_sse, errors.DeadlineExceeded, stream=True, deadline=0.5),
    Row("stalled_stream", _stall_stream, errors.ReadTimeout, sent=True, stream=True),
    Row("endless_chunked_body", _endless_chunked, errors.ResponseTooLarge, memory=True),
    Row(
        "endless_chunked_stream",
        _endless_chunked,
        errors.ResponseTooLarge,
        stream=True,
        memory=True,
    ),
    Row("one_gib_content_length", _huge_length, errors.ResponseTooLarge, memory=True),
    Row("gzip_bomb", _gzip_bomb, errors.MalformedResponse, memory=True, says="identity"),
    Row("bad_gzip", _bad_gzip, errors.MalformedResponse, says="identity"),
    Row("endless_100_continue", _endless_continue, errors.ReadTimeout, sent=True),
    Row("connect_refused", None, errors.ConnectError, sent=False),
    Row(
        "never_reads_the_request",
        _silent,
        errors.WriteTimeout,
        sent=False,
        read_request=False,
        big_request=True,
    ),
    Row("never_answers", _silent, errors.ReadTimeout, sent=True),
    Row("closes_without_answer", _close, errors.NetworkError, sent=True),
    Row("echoes_the_key_in_a_bad_status_line", _echo_key_in_status, errors.RemoteProtocolError),
    Row(
        "plain_http_server_for_https",
        _plain_http,
        errors.ConnectError,
        sent=False,
        read_request=False,
        tls=True,
        says="http:// vs https://",
    ),
    Row(
        "https_to_a_server_that_hangs_up",
        _close,
        errors.ConnectError,
        sent=False,
        read_request=False,
        tls=True,
        says="http:// vs https://",
    ),
]

BY_NAME = {row.name: row for row in ROWS}


class HostileServer:
    """A listening socket on 127.0.0.1; each connection runs ``behaviour`` in its own thread."""

    def __init__(self, behaviour: Behaviour, *, reads_request: bool = True) -> None:
        self.behaviour = behaviour
        self.reads_request = reads_request
        self.heads: list[bytes] = []
        self.connections = 0
        self.stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.settimeout(5)
            self._conns.append(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            head = read_request(conn) if self.reads_request else b""
            self.heads.append(head)
            self.behaviour(conn, head, self.stop)

    def close(self) -> None:
        self.stop.set()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._sock.close()


@contextlib.contextmanager
def serving(row: Row) -> Iterator[tuple[str, HostileServer | None]]:
    """The base URL of the row's server (a refusing port when it has no behaviour)."""
    scheme = "https" if row.tls else "http"
    if row.behaviour is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            yield f"{scheme}://127.0.0.1:{s.getsockname()[1]}/v1", None
        return
    server = HostileServer(row.behaviour, reads_request=row.read_request)
    try:
        yield f"{scheme}://127.0.0.1:{server.port}/v1", server
    finally:
        server.close()
