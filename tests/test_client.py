"""The Client against the live emulator, on asyncio and trio."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from corral._client import Client, SyncClient, default_middleware, resolve_api_key
from corral.core import _errors as errors
from corral.testing.emulator import EmulatorConfig, Fault, Latency
from corral.testing.server import RunningEmulator, serve_in_thread
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio
MESSAGES = [{"role": "user", "content": "Is this good?"}]


@pytest.mark.parametrize("bad", ["", "   ", "sk-...", "<your key>", "YOUR_API_KEY"])
def test_missing_or_placeholder_keys_fail_with_instructions(bad: str) -> None:
    with pytest.raises(errors.InvalidInput, match="OPENAI_API_KEY"):
        resolve_api_key(bad)


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", CANARY_KEY)
    assert resolve_api_key(None) == CANARY_KEY
    monkeypatch.setenv("CORRAL_API_KEY", "sk-other-real-key")
    assert resolve_api_key(None) == "sk-other-real-key"


async def test_chat_stream_embed_models(emulator: RunningEmulator) -> None:
    async with Client(emulator.base_url, CANARY_KEY, model="gpt-4o-mini") as client:
        assert CANARY_KEY not in repr(client)
        result = await client.chat(MESSAGES, temperature=0)
        assert result.text.startswith("Emulated answer")
        chunks = [c async for c in client.stream_chat(MESSAGES)]
        assert "".join(c.text for c in chunks) == result.text
        assert chunks[-1].usage is not None
        emb = await client.embed(["a b", "c"], model="text-embedding-3-small")
        assert len(emb.vectors) == 2
        assert "gpt-4o-mini" in await client.models()
        metrics = client.metrics
        assert metrics is not None and metrics.count == 4


async def test_typed_errors_reach_the_caller(emulator: RunningEmulator) -> None:
    async with Client(emulator.base_url, CANARY_KEY) as client:
        with pytest.raises(errors.ContextLengthExceeded):
            await client.chat(
                [{"role": "user", "content": "x " * 10_000}], model="small-model", max_tokens=10
            )
        with pytest.raises(errors.InvalidInput, match="model"):
            await client.chat(MESSAGES)


async def test_stream_idle_timeout() -> None:
    with serve_in_thread(EmulatorConfig(tokens_per_second=1)) as emu:
        async with Client(emu.base_url, CANARY_KEY, model="m") as client:
            with pytest.raises(errors.ReadTimeout, match="no stream data"):
                async for _ in client.stream_chat(MESSAGES, idle_timeout=0.2):
                    pass


@pytest.mark.parametrize("ordered", [False, True])
async def test_map_returns_every_item_once_with_errors_as_values(ordered: bool) -> None:
    config = EmulatorConfig(faults={Fault.SERVER_ERROR: 0.3}, seed=3)
    with serve_in_thread(config) as emu:
        stack = default_middleware(max_attempts=1)  # no retries: some 500s surface as values
        async with Client(emu.base_url, CANARY_KEY, middleware=stack) as client:
            bodies = (
                {"model": "m", "messages": [{"role": "user", "content": str(i)}]} for i in range(60)
            )
            async with client.map(bodies, concurrency=8, ordered=ordered) as run:
                results = [r async for r in run]
    assert sorted(r.index for r in results) == list(range(60))
    if ordered:
        assert [r.index for r in results] == list(range(60))
    failed = [r for r in results if r.error is not None]
    assert failed and all(isinstance(r.error, errors.ServerError) for r in failed)
    assert all(r.result is not None for r in results if r.error is None)


async def test_default_stack_absorbs_faults() -> None:
    config = EmulatorConfig(
        faults={
            Fault.SERVER_ERROR: 0.04,
            Fault.RESET: 0.02,
            Fault.MALFORMED: 0.02,
            Fault.RATE_LIMIT: 0.02,
        },
        fault_retry_after=0.05,
        seed=1,
    )
    with serve_in_thread(config) as emu:
        async with Client(emu.base_url, CANARY_KEY, model="m") as client:
            bodies = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(100)]
            async with client.map(bodies, concurrency=16) as run:
                results = [r async for r in run]
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    assert emu.counts["received"] > 100  # the faults happened and were retried


def test_sync_client(emulator: RunningEmulator) -> None:
    with SyncClient(emulator.base_url, CANARY_KEY, model="m") as client:
        assert client.chat(MESSAGES).text
        chunks = client.stream_chat(MESSAGES)
        assert not isinstance(chunks, list)  # an iterator: chunks as they arrive
        assert "".join(c.text for c in chunks) == client.chat(MESSAGES).text
        early = client.stream_chat(MESSAGES)
        assert next(early).text is not None
        early.close()  # stopping early cancels the stream; the client stays usable
        assert len(client.map([{"messages": MESSAGES}] * 5)) == 5


def test_sync_stream_errors_reach_the_caller() -> None:
    base = "http://127.0.0.1:9/v1"
    with (
        SyncClient(base, CANARY_KEY, model="m", middleware=[]) as client,
        pytest.raises(errors.ConnectError),
    ):
        list(client.stream_chat(MESSAGES))


async def test_cancellation_propagates(emulator: RunningEmulator) -> None:
    async with Client(emulator.base_url, CANARY_KEY, model="m") as client:
        with anyio.move_on_after(0):
            await client.chat(MESSAGES)
        assert (await client.chat(MESSAGES)).text


def many(n: int = 10_000) -> Iterator[dict[str, object]]:
    return ({"model": "m", "messages": [{"role": "user", "content": str(i)}]} for i in range(n))


async def test_map_break_cancels_the_rest(emulator: RunningEmulator) -> None:
    async with Client(emulator.base_url, CANARY_KEY) as client:
        async with client.map(many(), concurrency=8) as results:
            async for _ in results:
                break
        assert (await client.chat(MESSAGES, model="m")).text  # the client still works
    assert emulator.counts["received"] < 100


async def test_map_exception_in_the_body_propagates_as_itself(emulator: RunningEmulator) -> None:
    async with Client(emulator.base_url, CANARY_KEY) as client:
        with pytest.raises(LookupError, match="stop here"):
            async with client.map(many(), concurrency=8) as results:
                async for _ in results:
                    raise LookupError("stop here")
        assert (await client.chat(MESSAGES, model="m")).text
    assert emulator.counts["received"] < 100


async def test_map_caller_cancelled_cancels_the_calls() -> None:
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(0.2))) as emu:
        async with Client(emu.base_url, CANARY_KEY) as client:
            seen = []
            with anyio.move_on_after(0.5) as scope:
                async with client.map(many(), concurrency=8) as results:
                    async for result in results:
                        seen.append(result)
            assert scope.cancelled_caught
            assert all(r.error is None for r in seen)
            assert (await client.chat(MESSAGES, model="m")).text
    assert emu.counts["received"] < 100


async def test_map_without_async_with_is_refused_before_any_call(
    emulator: RunningEmulator,
) -> None:
    async with Client(emulator.base_url, CANARY_KEY) as client:
        with pytest.raises(errors.InvalidInput, match=r"async with client\.map"):
            async for _ in client.map(many()):
                break
    assert emulator.counts.get("received", 0) == 0
