"""Provider text in errors, through a real local server: non-JSON bodies classified by status
with their first characters, and a server that echoes Authorization never gets the key into an
error (message, str, repr, args), a log line or a record built with ``Client.scrub``."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from corral._client import Client, default_middleware
from corral.core import _errors as errors
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio
MESSAGES = [{"role": "user", "content": "hi"}]
NGINX_404 = b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"


class Echo(BaseHTTPRequestHandler):
    """Answers by the first path segment; the ``echo`` modes repeat the Authorization header."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.answer()

    def answer(self) -> None:
        auth = self.headers.get("authorization") or ""
        mode = self.path.split("/")[1]
        headers = {"x-request-id": f"req {auth}"}
        if mode == "echo-json":
            status, kind = 401, "application/json"
            error = {"message": f"Invalid header: {auth}", "code": auth, "type": auth}
            body = json.dumps({"error": error}).encode()
        elif mode == "echo-text":
            status, kind, body = 401, "text/plain", f"Authorization: {auth}\r\n".encode()
        elif mode == "echo-200":
            status, kind, body = 200, "text/plain", f"you sent {auth}".encode()
        elif mode == "echo-stream":
            status, kind = 200, "text/event-stream"
            body = b"data: " + json.dumps({"error": {"message": f"bad {auth}"}}).encode() + b"\n\n"
        elif mode == "html404":
            status, kind, body = 404, "text/html", NGINX_404
        else:
            status, kind, body = 500, "text/plain", b"Internal Server Error"
        self.send_response(status)
        for name, value in {**headers, "content-type": kind}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def pieces(text: str) -> list[str]:
    return [
        CANARY_KEY[i : i + 8] for i in range(len(CANARY_KEY) - 7) if CANARY_KEY[i : i + 8] in text
    ]


def client(base: str) -> Client:
    return Client(
        base + "/v1", CANARY_KEY, model="m", middleware=default_middleware(max_attempts=1)
    )


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("echo-json", errors.AuthenticationError),
        ("echo-text", errors.AuthenticationError),
        ("echo-200", errors.MalformedResponse),
    ],
)
async def test_an_echoed_key_never_reaches_an_error_or_a_log(
    server: str, mode: str, kind: type[errors.CorralError], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with client(f"{server}/{mode}") as c:
        with pytest.raises(kind) as caught:
            await c.chat(MESSAGES)
    exc = caught.value
    for text in (str(exc), repr(exc), repr(exc.args), exc.message, vars(exc).__repr__()):
        assert pieces(text) == [], text
    assert "[redacted]" in str(exc)
    assert pieces(caplog.text) == []


async def test_an_echoed_key_never_reaches_a_stream_error(server: str) -> None:
    async with client(f"{server}/echo-stream") as c:
        with pytest.raises(errors.MalformedResponse) as caught:
            async for _ in c.stream_chat(MESSAGES):
                pass
    assert pieces(str(caught.value)) == [] and "bad Bearer [redacted]" in str(caught.value)


async def test_error_for_and_scrub_serve_records_built_from_provider_text(server: str) -> None:
    async with client(f"{server}/echo-json") as c:
        request = c.build_request("/chat/completions", {"model": "m", "messages": MESSAGES})
        response = await c.send(request)
        error = c.error_for(request, response)
        assert isinstance(error, errors.AuthenticationError) and pieces(str(error)) == []
        assert pieces(c.scrub(response.body.decode())) == []
        assert json.loads(c.scrub(response.body.decode()))["error"]["code"] == "Bearer [redacted]"


async def test_non_json_error_pages_are_typed_by_status_with_their_text(server: str) -> None:
    async with client(f"{server}/html404") as c:
        with pytest.raises(errors.NotFoundError) as not_found:
            await c.chat(MESSAGES)
    assert "404 Not Found" in str(not_found.value) and "<" not in str(not_found.value)
    assert f"{server}/html404/v1/chat/completions" in str(not_found.value)
    async with client(f"{server}/plain500") as c:
        with pytest.raises(errors.ServerError, match="text/plain body: Internal Server Error"):
            await c.chat(MESSAGES)
