"""The provider's Batch API from Python: ``BatchAPI`` (files and batches), and ``submit``,
``poll`` and ``collect`` for scripts.

The Batch API runs a file of requests within 24 hours at half the price of live calls. The
official SDK offers create/retrieve/list/cancel; this adds what a script needs around them:
splitting a file within the provider's limits, uploads streamed from disk, polling with
backoff, and results read line by line as they download::

    async with BatchAPI() as api:
        batches = await submit(api, Path("requests.jsonl"), Path("parts/"))
        async for batches in poll(api, [b.id for b in batches]):
            print([(b.status, b.counts.completed) for b in batches])
        for batch in batches:
            async for record in collect(api, batch):
                ...

``corral run --via batch-api`` (``_batch_run.py``) adds the run manifest, exactly-once merging
into the output and resubmission on top of the same calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from corral._client import Client, resolve_api_key
from corral.batch._batch_plan import PartLimits, PartWriter, PollSchedule, request_line
from corral.batch._batch_state import PartRecord
from corral.batch._batch_wire import MultipartFile, RemoteBatch, RemoteFile
from corral.batch._items import BadLine, read_items
from corral.core import _jsonlib as jsonlib
from corral.core._compose import build_stack
from corral.core._errors import InvalidInput, MalformedResponse, TransportError
from corral.core._events import EventSink
from corral.core._models import Request, Response, Timeouts
from corral.middleware._retry import Retry
from corral.transports._http11 import H11Transport

__all__ = ["BatchAPI", "collect", "poll", "submit"]

#: Metadata key naming a batch's part, so a create whose answer was lost is found by listing.
TOKEN_KEY = "corral_part"
_TIMEOUTS = Timeouts(connect=10, read=120, write=60, pool=60)


class BatchAPI:
    """The Files and Batches endpoints of an OpenAI-compatible API, through a corral stack
    that retries what may pass (429, 5xx, connection faults) with backoff.

    Uploads stream the file from disk (``H11Transport.send_streaming``), downloads are read
    line by line: neither holds a whole file. A batch create is never retried once sent (a
    duplicate batch would be paid twice); ``create`` with a ``token`` finds a batch whose
    answer was lost by listing instead.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api_key_env: str | None = None,
        transport: H11Transport | None = None,
        max_attempts: int = 5,
        events: EventSink | None = None,
    ) -> None:
        key = resolve_api_key(api_key, api_key_env)
        #: What no record or error may show: the key (``settle`` scrubs results with it).
        self.secrets: tuple[str, ...] = (key,)
        self.transport = transport or H11Transport(timeouts=_TIMEOUTS)
        retry = Retry(max_attempts=max_attempts, budget_ratio=1.0)
        self._retry = retry
        self._create_once = build_stack(
            [Retry(max_attempts=max_attempts, budget_ratio=1.0, retry_sent=False)],
            self.transport,
            events=events,
        )
        self.client = Client(
            base_url,
            key,
            transport=self.transport,
            middleware=[retry],
            events=events,
        )
        self._events = events

    @property
    def base_url(self) -> str:
        """The API's base URL (the argument, else ``$OPENAI_BASE_URL``, else OpenAI's)."""
        return self.client.base_url

    def __repr__(self) -> str:
        return f"BatchAPI(base_url={self.base_url!r}, api_key=[redacted])"

    # -- files ------------------------------------------------------------------------------

    async def upload(self, path: Path, *, purpose: str = "batch") -> RemoteFile:
        """Upload the file at ``path`` (multipart, read from disk as it is sent)."""
        body = MultipartFile(path, purpose=purpose)
        base = self.client.build_request("/files", None)
        request = base.evolve(
            method="POST", headers=base.headers.with_("content-type", body.content_type)
        )
        transport = self.transport

        async def send(r: Request) -> Response:
            return await transport.send_streaming(r, body)

        handler = build_stack([self._retry], send, events=self._events)
        return RemoteFile.from_json(self._decoded(request, await handler(request)))

    async def file(self, file_id: str) -> RemoteFile:
        """The stored file ``file_id`` as the provider describes it."""
        return RemoteFile.from_json(await self._get(f"/files/{file_id}"))

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """The lines of a stored file (an output or error file) as they download."""
        request = self.client.build_request(f"/files/{file_id}/content", None, stream=True)
        response = await self.client.send(request)
        if response.stream is None or response.status >= 400:
            self._decoded(request, await response.aread())
            raise MalformedResponse(f"file {file_id}: no content")  # a 2xx without a stream
        tail = b""
        try:
            async for piece in response.stream:
                *whole, tail = (tail + piece).split(b"\n")
                for line in whole:
                    if line.strip():
                        yield line
        finally:
            await response.aclose()
        if tail.strip():
            yield tail

    # -- batches ----------------------------------------------------------------------------

    async def create(
        self,
        input_file_id: str,
        endpoint: str,
        *,
        metadata: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> RemoteBatch:
        """Create a batch of ``input_file_id`` for ``endpoint`` (completion window 24h).

        ``token`` (kept in the batch's metadata) makes the create safe to repeat: if the
        answer is lost after the request went out, the batch is looked up by its token and
        created again only if the provider has none.
        """
        meta = dict(metadata or {})
        if token is not None:
            meta[TOKEN_KEY] = token
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
        }
        if meta:
            body["metadata"] = meta
        request = self.client.build_request("/batches", body)
        try:
            response = await self._create_once(request)
        except TransportError as exc:
            if token is None or not exc.request_sent:
                raise
            found = await self.find(token)
            if found is not None:
                return found
            response = await self._create_once(self.client.build_request("/batches", body))
        return RemoteBatch.from_json(self._decoded(request, response))

    async def find(self, token: str, *, pages: int = 3) -> RemoteBatch | None:
        """The newest batch carrying ``token`` in its metadata, among the latest ``pages``."""
        after: str | None = None
        for _ in range(pages):
            batches, more = await self.list(limit=100, after=after)
            for batch in batches:
                if batch.metadata.get(TOKEN_KEY) == token:
                    return batch
            if not more or not batches:
                return None
            after = batches[-1].id
        return None

    async def retrieve(self, batch_id: str) -> RemoteBatch:
        """The batch ``batch_id`` as the provider describes it now."""
        return RemoteBatch.from_json(await self._get(f"/batches/{batch_id}"))

    async def list(
        self, *, limit: int = 20, after: str | None = None
    ) -> tuple[list[RemoteBatch], bool]:
        """One page of batches, newest first, and whether more follow."""
        query = f"?limit={limit}" + (f"&after={after}" if after else "")
        data = await self._get("/batches" + query)
        page = data.get("data")
        if not isinstance(page, list):
            raise MalformedResponse("the provider's batch list has no data")
        return [RemoteBatch.from_json(b) for b in page], bool(data.get("has_more"))

    async def cancel(self, batch_id: str) -> RemoteBatch:
        """Ask the provider to cancel ``batch_id`` (it ends ``cancelled``; what it finished
        stays in its output file)."""
        request = self.client.build_request(f"/batches/{batch_id}/cancel", {})
        return RemoteBatch.from_json(self._decoded(request, await self.client.send(request)))

    # -- plumbing ---------------------------------------------------------------------------

    async def _get(self, path: str) -> Mapping[str, Any]:
        request = self.client.build_request(path, None)
        return self._decoded(request, await self.client.send(request))

    def _decoded(self, request: Request, response: Response) -> Mapping[str, Any]:
        error = self.client.error_for(request, response)
        if error is not None:
            raise error
        try:
            data = response.json()
        except jsonlib.JSONDecodeError:
            raise MalformedResponse(
                f"HTTP {response.status} body is not JSON", status=response.status
            ) from None
        if not isinstance(data, Mapping):
            raise MalformedResponse(
                f"HTTP {response.status} body is not a JSON object", status=response.status
            )
        return data

    async def aclose(self) -> None:
        """Close the connections."""
        await self.client.aclose()

    async def __aenter__(self) -> BatchAPI:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def submit(
    api: BatchAPI,
    input: Path,
    workdir: Path,
    *,
    limits: PartLimits | None = None,
    model: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[RemoteBatch]:
    """Split ``input`` into part files in ``workdir`` within ``limits``, upload each, create
    its batch; the batches in part order. A bad line is refused before anything is sent."""
    parts = await anyio.to_thread.run_sync(_split, input, workdir, limits or PartLimits(), model)
    batches = []
    for part in parts:
        uploaded = await api.upload(workdir / part.name)
        batches.append(await api.create(uploaded.id, part.endpoint, metadata=metadata))
    return batches


def _split(input: Path, workdir: Path, limits: PartLimits, model: str | None) -> list[PartRecord]:
    workdir.mkdir(parents=True, exist_ok=True)
    writer = PartWriter(workdir, "part", limits)
    for item in read_items(input):
        if isinstance(item, BadLine):
            writer.close()
            raise InvalidInput(f"{item.where(input)}: {item.reason}; nothing was sent")
        line = request_line(item, model)
        if not writer.fits(line):
            writer.close()
            raise InvalidInput(f"{input}:{item.line}: the line is over the file size limit")
        writer.add(item.url, line)
    return writer.close()


async def poll(
    api: BatchAPI, batch_ids: Sequence[str], *, schedule: PollSchedule | None = None
) -> AsyncIterator[list[RemoteBatch]]:
    """Every batch as the provider now describes it, once per poll, until all are done (the
    last list yielded is all done). Waits ``schedule`` between polls."""
    schedule = schedule or PollSchedule()
    delay: float | None = None
    seen: dict[str, str] = {}
    while True:
        batches = [await api.retrieve(batch_id) for batch_id in batch_ids]
        yield batches
        if all(b.done for b in batches):
            return
        changed = any(seen.get(b.id) != b.status for b in batches)
        seen = {b.id: b.status for b in batches}
        delay = schedule.after(delay, changed=changed)
        await anyio.sleep(delay)


async def collect(api: BatchAPI, batch: RemoteBatch) -> AsyncIterator[dict[str, Any]]:
    """The records of a finished batch: its output file's, then its error file's."""
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is None:
            continue
        async for raw in api.lines(file_id):
            try:
                record = jsonlib.loads(raw)
            except jsonlib.JSONDecodeError:
                raise MalformedResponse(f"file {file_id}: a line is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
                raise MalformedResponse(f"file {file_id}: a line is not a result record")
            yield record
