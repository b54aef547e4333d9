"""The official openai SDK (and plain httpx) running through a corral stack."""

from __future__ import annotations

import threading

import anyio
import httpx
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from corral._client import default_middleware
from corral.core import Handler, build_stack
from corral.core._models import Timeouts
from corral.integrations.httpx_adapter import (
    corral_async_transport,
    corral_sync_transport,
    request_timeouts,
)
from corral.testing.emulator import EmulatorConfig, Fault
from corral.testing.server import RunningEmulator, serve_in_thread
from corral.transports import H11Transport
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello sdk"}]


def stack(max_attempts: int = 8) -> tuple[Handler, H11Transport]:
    transport = H11Transport()
    # A generous retry budget: this storm fails 40% of calls, far beyond the default 20%.
    layers = default_middleware(max_attempts=max_attempts, retry_budget=1.0)
    return build_stack(layers, transport), transport


async def test_sdk_429_storm_is_absorbed_by_corral_not_the_sdk() -> None:
    config = EmulatorConfig(
        faults={Fault.RATE_LIMIT: 0.3, Fault.SERVER_ERROR: 0.1}, fault_retry_after=0.02, seed=11
    )
    with serve_in_thread(config) as emu:
        handler, transport = stack()
        http = httpx2.AsyncClient(transport=corral_async_transport(handler, owned=transport))
        client = openai.AsyncOpenAI(
            base_url=emu.base_url, api_key=CANARY_KEY, max_retries=0, http_client=http
        )
        texts: list[str] = []

        async def one(i: int) -> None:
            result = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
            )
            texts.append(result.choices[0].message.content or "")

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
        await client.close()
    assert len(texts) == 30 and all(texts)
    assert emu.counts["429"] > 0  # the storm happened; corral retried, the SDK never saw it


async def test_sdk_streaming_through_corral(emulator: RunningEmulator) -> None:
    handler, transport = stack()
    http = httpx2.AsyncClient(transport=corral_async_transport(handler, owned=transport))
    client = openai.AsyncOpenAI(
        base_url=emulator.base_url, api_key=CANARY_KEY, max_retries=0, http_client=http
    )
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    plain = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await client.close()
    assert text == plain.choices[0].message.content


def test_sync_sdk_through_corral(emulator: RunningEmulator) -> None:
    handler, transport = stack()
    http = httpx2.Client(transport=corral_sync_transport(handler, owned=transport))
    client = openai.OpenAI(
        base_url=emulator.base_url, api_key=CANARY_KEY, max_retries=0, http_client=http
    )
    result = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    chunks = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    client.close()
    assert result.choices[0].message.content == text


async def test_plain_httpx_through_corral(emulator: RunningEmulator) -> None:
    handler, transport = stack()
    async with httpx.AsyncClient(
        transport=corral_async_transport(handler, package="httpx", owned=transport)
    ) as http:
        reply = await http.post(
            emulator.base_url + "/chat/completions",
            json={"model": "m", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {CANARY_KEY}"},
        )
    assert reply.status_code == 200 and reply.json()["usage"]["total_tokens"] > 0


async def test_wire_errors_become_the_packages_own() -> None:
    handler, transport = stack(max_attempts=1)
    http = httpx2.AsyncClient(transport=corral_async_transport(handler, owned=transport))
    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1:9/v1", api_key=CANARY_KEY, max_retries=0, http_client=http
    )
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=MESSAGES)
    await client.close()


HANGING = EmulatorConfig(faults={Fault.HANG: 1.0}, hang_seconds=120)


async def test_sdk_timeout_bounds_each_attempt_async() -> None:
    """AsyncOpenAI(timeout=1) against a server that never answers: APITimeoutError after about
    1 s per attempt, not the transport's own 600 s read timeout."""
    with serve_in_thread(HANGING) as emu:
        handler, transport = stack(max_attempts=2)
        http = httpx2.AsyncClient(transport=corral_async_transport(handler, owned=transport))
        client = openai.AsyncOpenAI(
            base_url=emu.base_url, api_key=CANARY_KEY, max_retries=0, timeout=1, http_client=http
        )
        with anyio.fail_after(15), pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        await client.close()
    assert emu.counts["received"] == 2  # corral's Retry repeated the timed-out attempt once


def test_sdk_timeout_bounds_each_attempt_sync() -> None:
    with serve_in_thread(HANGING) as emu:
        handler, transport = stack(max_attempts=1)
        http = httpx2.Client(transport=corral_sync_transport(handler, owned=transport))
        client = openai.OpenAI(
            base_url=emu.base_url, api_key=CANARY_KEY, max_retries=0, http_client=http
        )
        raised: list[BaseException] = []

        def call() -> None:
            try:
                client.with_options(timeout=1).chat.completions.create(model="m", messages=MESSAGES)
            except BaseException as exc:
                raised.append(exc)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(15)  # bounded: the old adapter waited out the 600 s read timeout
        assert not worker.is_alive()
        client.close()
    assert len(raised) == 1 and isinstance(raised[0], openai.APITimeoutError)


def test_the_timeout_extension_becomes_the_requests_timeouts() -> None:
    request = httpx2.Request("POST", "http://x/v1", json={"model": "m"})
    request.extensions["timeout"] = {"connect": 1.0, "read": 2.0, "write": None, "pool": 4.0}
    assert request_timeouts(request) == Timeouts(connect=1.0, read=2.0, write=None, pool=4.0)
    assert request_timeouts(httpx2.Request("GET", "http://x/")) is None
