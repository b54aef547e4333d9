"""The emulator's Batch API under the official openai SDK, and streamed uploads on h11."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Iterator

import anyio
import openai
import pytest

from corral.core import _errors as errors
from corral.core._models import Request, Timeouts
from corral.testing.batches import BatchConfig
from corral.testing.emulator import EmulatorConfig
from corral.testing.server import RunningEmulator, ServerLimits, serve_in_thread
from corral.transports import H11Transport
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio


def lines(n: int, *, url: str = "/v1/chat/completions", tokens: int = 5) -> bytes:
    return "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": url,
                "body": {
                    "model": "gpt-4o-mini",
                    "max_tokens": tokens,
                    "messages": [{"role": "user", "content": f"item {i}"}],
                },
            }
        )
        + "\n"
        for i in range(n)
    ).encode()


@pytest.fixture
def batch_emulator(request: pytest.FixtureRequest) -> Iterator[RunningEmulator]:
    config = getattr(request, "param", BatchConfig(duration=0.2))
    with serve_in_thread(EmulatorConfig(batches=config)) as running:
        yield running


def sdk(emu: RunningEmulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=emu.base_url, api_key=CANARY_KEY, max_retries=0)


def wait_done(client: openai.OpenAI, batch_id: str) -> openai.types.Batch:
    for _ in range(200):  # bounded: 10 s at most
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} never finished")


def records(client: openai.OpenAI, file_id: str | None) -> list[dict[str, object]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).content.splitlines()]


@pytest.mark.parametrize(
    "batch_emulator", [BatchConfig(duration=0.2, line_faults={"r3": "500"})], indirect=True
)
def test_the_sdk_runs_a_batch_from_upload_to_results(batch_emulator: RunningEmulator) -> None:
    client = sdk(batch_emulator)
    uploaded = client.files.create(file=("in.jsonl", lines(10)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(lines(10))
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert client.files.content(uploaded.id).content == lines(10)
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "t1"},
    )
    assert batch.status == "validating" and batch.metadata == {"run": "t1"}
    seen: set[str] = {batch.status}
    for _ in range(200):
        now = client.batches.retrieve(batch.id)
        seen.add(now.status)
        if now.status == "completed":
            break
        time.sleep(0.01)
    assert {"validating", "in_progress", "completed"} <= seen
    assert now.request_counts is not None
    assert (now.request_counts.total, now.request_counts.completed) == (10, 9)
    assert now.request_counts.failed == 1
    ok = records(client, now.output_file_id)
    failed = records(client, now.error_file_id)
    assert sorted(str(r["custom_id"]) for r in ok) == sorted(f"r{i}" for i in range(10) if i != 3)
    assert [(r["custom_id"], r["response"]["status_code"]) for r in failed] == [("r3", 500)]  # type: ignore[index]
    body = ok[0]["response"]["body"]  # type: ignore[index]
    assert body["object"] == "chat.completion" and body["usage"]["total_tokens"] > 0
    listed = client.batches.list(limit=1)
    assert [b.id for b in listed.data] == [batch.id] and not listed.has_more


def test_list_pages_and_cancel(batch_emulator: RunningEmulator) -> None:
    client = sdk(batch_emulator)
    uploaded = client.files.create(file=("in.jsonl", lines(4)), purpose="batch")
    made = [
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # auto-paging
    cancelled = client.batches.cancel(made[0])
    assert cancelled.status in ("cancelling", "cancelled")
    done = wait_done(client, made[0])
    assert done.status == "cancelled"
    failed = records(client, done.error_file_id)
    assert failed and {r["error"]["code"] for r in failed} == {"batch_cancelled"}  # type: ignore[index]


@pytest.mark.parametrize(
    "batch_emulator", [BatchConfig(duration=10.0, expires_after=0.3)], indirect=True
)
def test_an_unfinished_batch_expires_with_its_rest_in_the_error_file(
    batch_emulator: RunningEmulator,
) -> None:
    client = sdk(batch_emulator)
    uploaded = client.files.create(file=("in.jsonl", lines(20)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_done(client, batch.id)
    assert done.status == "expired"
    expired = records(client, done.error_file_id)
    assert expired and all(r["error"]["code"] == "batch_expired" for r in expired)  # type: ignore[index]
    assert len(records(client, done.output_file_id)) + len(expired) == 20


@pytest.mark.parametrize(
    "batch_emulator", [BatchConfig(duration=5.0, enqueued_token_limit=150)], indirect=True
)
def test_the_queue_refuses_a_batch_over_the_enqueued_token_limit(
    batch_emulator: RunningEmulator,
) -> None:
    client = sdk(batch_emulator)
    small = client.files.create(file=("a.jsonl", lines(4, tokens=10)), purpose="batch")
    first = client.batches.create(
        input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    second = client.batches.create(
        input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert first.status == "validating"
    assert second.status == "failed" and second.errors and second.errors.data
    assert second.errors.data[0].code == "token_limit_exceeded"


def test_bad_requests_are_refused_by_name(batch_emulator: RunningEmulator) -> None:
    client = sdk(batch_emulator)
    with pytest.raises(openai.NotFoundError, match="file-nope"):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id="file-nope",
            endpoint="/v1/moderations",
            completion_window="24h",
        )
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")


class Pieces:
    """A body of ``total`` bytes sent in ``size`` pieces; ``claim`` is the length it states."""

    def __init__(self, total: int, size: int, claim: int | None = None) -> None:
        self.total, self.size = total, size
        self.length = total if claim is None else claim
        self.opened = 0

    def piece(self, i: int) -> bytes:
        return bytes([65 + (i % 26)]) * self.size

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        self.opened += 1
        sent = 0
        i = 0
        while sent < self.total:
            piece = self.piece(i)[: self.total - sent]
            sent += len(piece)
            i += 1
            yield piece


def multipart(source: Pieces) -> tuple[str, bytes, bytes]:
    head = (
        b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
    )
    return "multipart/form-data; boundary=B", head, b"\r\n--B--\r\n"


class Wrapped:
    """A multipart upload around ``Pieces``."""

    def __init__(self, inner: Pieces) -> None:
        self.inner = inner
        _, self.head, self.tail = multipart(inner)

    @property
    def length(self) -> int:
        return len(self.head) + self.inner.length + len(self.tail)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        yield self.head
        async for piece in self.inner.chunks():
            yield piece
        yield self.tail


async def test_h11_streams_a_body_in_pieces_and_it_arrives_whole() -> None:
    limits = ServerLimits(max_body=1024)  # uploads take max_upload, not max_body
    with serve_in_thread(limits=limits) as emu:
        source = Pieces(3 * 1024 * 1024 + 7, 65536)
        body = Wrapped(source)
        headers = {
            "authorization": f"Bearer {CANARY_KEY}",
            "content-type": "multipart/form-data; boundary=B",
        }
        async with H11Transport() as transport:
            upload = Request("POST", emu.base_url + "/files", headers)
            response = await transport.send_streaming(upload, body)
            assert response.status == 200, response.body
            stored = json.loads(response.body)
            assert stored["bytes"] == source.total
            got = await transport(
                Request("GET", emu.base_url + f"/files/{stored['id']}/content", headers)
            )
        expected = b"".join([piece async for piece in Pieces(source.total, 65536).chunks()])
        assert got.body == expected and source.opened == 1


@pytest.mark.parametrize(("total", "claim"), [(1000, 2000), (3000, 2000)])
async def test_h11_refuses_a_body_that_is_not_its_stated_length(total: int, claim: int) -> None:
    with serve_in_thread() as emu:
        body = Wrapped(Pieces(total, 400, claim=claim))
        headers = {"authorization": "Bearer k", "content-type": "multipart/form-data; boundary=B"}
        async with H11Transport() as transport:
            with anyio.fail_after(10), pytest.raises(errors.InvalidInput, match="stated"):
                await transport.send_streaming(
                    Request("POST", emu.base_url + "/files", headers), body
                )
            assert transport.open_connections == 0  # the broken exchange is not pooled
            ok = await transport(Request("GET", emu.base_url + "/models", headers))
            assert ok.status == 200


class Stalled:
    """A body whose second piece never comes (a file on a hung network mount, say)."""

    length = 10

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        yield b"01234"
        await anyio.sleep_forever()
        yield b"56789"


async def test_h11_times_a_stalled_body_source_by_the_write_timeout() -> None:
    with serve_in_thread() as emu:
        headers = {"authorization": "Bearer k", "content-type": "application/octet-stream"}
        async with H11Transport(timeouts=Timeouts(connect=5, read=5, write=0.3, pool=5)) as t:
            with anyio.fail_after(5), pytest.raises(errors.WriteTimeout):
                await t.send_streaming(Request("POST", emu.base_url + "/files", headers), Stalled())
