"""Hostile servers against the whole client: deadlines over bodies, typed errors in ``map``, the
trio idle check past descriptor 1024, and TLS spoken to a plain-HTTP server."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import anyio
import pytest

from corral._client import Client
from corral.core import _errors as errors
from corral.middleware._deadline import Deadline
from corral.testing.server import serve_in_thread
from corral.transports._http11 import H11Transport
from tests import hostile
from tests.support import CANARY_KEY, TransportFactory

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello"}]


def _client(base_url: str, transport: object, timeout: float = 5.0) -> Client:
    return Client(
        base_url,
        CANARY_KEY,
        transport=transport,  # type: ignore[arg-type]
        middleware=[Deadline(timeout)],
        model="gpt-4o-mini",
    )


async def test_deadline_bounds_a_trickled_stream_chat(
    transport_factory: TransportFactory,
) -> None:
    """Item 3: 1 byte per 20 ms keeps every read timer alive; Deadline(0.5) still ends it."""
    with hostile.serving(hostile.BY_NAME["trickled_sse_body"]) as (base_url, _):
        client = _client(base_url, transport_factory(), timeout=0.5)
        with anyio.fail_after(10), pytest.raises(errors.DeadlineExceeded):
            async for _ in client.stream_chat(MESSAGES, idle_timeout=5):
                pass


async def test_stream_keeps_its_idle_timeout_under_a_long_deadline(
    transport_factory: TransportFactory,
) -> None:
    with hostile.serving(hostile.BY_NAME["stalled_stream"]) as (base_url, _):
        client = _client(base_url, transport_factory(), timeout=30)
        with anyio.fail_after(10), pytest.raises(errors.ReadTimeout):
            async for _ in client.stream_chat(MESSAGES, idle_timeout=0.3):
                pass


async def test_map_over_bad_gzip_bodies_returns_every_result_typed(
    transport_factory: TransportFactory,
) -> None:
    """Item 7: a bad gzip body is a typed error per item, never an escaping exception."""
    with hostile.serving(hostile.BY_NAME["bad_gzip"]) as (base_url, _):
        client = _client(base_url, transport_factory())
        bodies = [{"messages": MESSAGES} for _ in range(20)]
        with anyio.fail_after(20):
            async with client.map(bodies, concurrency=4) as run:
                results = [r async for r in run]
    assert len(results) == 20
    assert all(isinstance(r.error, errors.MalformedResponse) for r in results)


async def test_https_to_the_plain_http_emulator_suggests_the_scheme(
    transport_factory: TransportFactory,
) -> None:
    """Issue 11 item 18, client half: a clear ConnectError at once, not a connect timeout."""
    with serve_in_thread() as emu:
        url = emu.base_url.replace("http://", "https://")
        client = _client(url, transport_factory())
        with anyio.fail_after(5), pytest.raises(errors.ConnectError, match="http:// vs https://"):
            await client.chat(MESSAGES)


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Push the next sockets past descriptor 1024, where ``select.select`` stops working."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    null = os.open(os.devnull, os.O_RDONLY)
    held = [os.dup(null) for _ in range(1030)]
    try:
        yield
    finally:
        for fd in [*held, null]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_keep_alive_works_past_descriptor_1024(many_descriptors: None) -> None:
    """Item 10: the idle check (trio: a peek, not select) still sees a live pooled socket."""
    with serve_in_thread() as emu:
        async with H11Transport() as t:
            client = _client(emu.base_url, t)
            for _ in range(3):
                assert (await client.chat(MESSAGES)).text
        assert emu.counts["connections"] == 1
