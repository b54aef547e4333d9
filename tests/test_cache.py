"""The cache: one suite over every store, then the middleware's rules and single-flight."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import redis
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from corral._client import Client
from corral.core import Headers, Request, Response, api_request, build_stack, errors
from corral.core._events import CacheMiss, Event
from corral.core._models import CacheMode, RequestOptions
from corral.middleware._cache import Bypass, Cache, CacheRules, Lookup, Refresh, Skip, Write
from corral.middleware._metrics import Metrics
from corral.stores import MemoryStore, SQLiteStore, Store
from corral.stores.redis import RedisStore
from corral.testing.server import RunningEmulator
from corral.transports import MemoryTransport
from tests.support import CANARY_KEY, as_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "cache.db")
    else:
        url = request.getfixturevalue("redis_url")
        made = RedisStore(url, prefix=f"test:{tmp_path.name}:")
    yield made
    await made.aclose()


async def test_store_get_set_delete(store: Store) -> None:
    """Every store; expiry is tested per store, on the clock each one keeps."""
    assert await store.get("k") is None
    await store.set("k", b"v1", None)
    assert await store.get("k") == b"v1"
    await store.set("k", b"v2", 60)
    assert await store.get("k") == b"v2"
    await store.delete("k")
    assert await store.get("k") is None


async def test_sqlite_entries_expire_on_wall_time(tmp_path: Path) -> None:
    """SQLite expiry is wall time (every process sharing the file agrees); here a fake one."""
    now = [1_000.0]
    store = SQLiteStore(tmp_path / "c.db", clock=lambda: now[0])
    await store.set("short", b"x", 10.0)
    now[0] += 9.9
    assert await store.get("short") == b"x"
    now[0] += 0.2
    assert await store.get("short") is None
    await store.aclose()


async def test_redis_entries_expire_by_redis_s_own_ttl(redis_url: str, tmp_path: Path) -> None:
    """Redis expires keys on its own clock, which no test clock drives: a bounded poll."""
    store = RedisStore(redis_url, prefix=f"test:{tmp_path.name}:")
    await store.set("short", b"x", 0.05)
    await store.set("long", b"y", 60)
    with anyio.fail_after(10):
        for _ in range(1_000):
            if await store.get("short") is None:
                break
            await anyio.sleep(0.01)
    assert await store.get("short") is None and await store.get("long") == b"y"
    await store.aclose()


async def test_memory_store_lru_by_entries_and_bytes() -> None:
    store = MemoryStore(max_entries=3, max_bytes=10)
    for key in "abc":
        await store.set(key, b"12", None)
    await store.get("a")  # a is now most recent
    await store.set("d", b"12", None)
    assert await store.get("b") is None and await store.get("a") == b"12"
    await store.set("big", b"123456789", None)  # 9 bytes: evicts until <= 10
    assert store.size <= 10 and await store.get("big") == b"123456789"


def test_sqlite_file_is_private_and_shared_by_processes(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    SQLiteStore(path)
    assert path.stat().st_mode & 0o777 == 0o600
    script = (
        "import sys, anyio\n"
        "from corral.stores import SQLiteStore\n"
        "async def main():\n"
        "    s = SQLiteStore(sys.argv[1])\n"
        "    for i in range(200):\n"
        "        await s.set(f'{sys.argv[2]}-{i}', b'v' * 100, None)\n"
        "        assert await s.get(f'{sys.argv[2]}-{i}') == b'v' * 100\n"
        "anyio.run(main)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), f"p{n}"]) for n in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM corral_cache").fetchone()
    assert rows == (800,)


def ok_json(request: Request) -> Response:
    return Response(
        200,
        Headers({"content-type": "application/json"}),
        json.dumps({"echo": request.body.decode(), "usage": {"total_tokens": 1}}).encode(),
    )


def req(key: str = CANARY_KEY, content: str = "hi", **options: object) -> Request:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return api_request("http://h/v1", "/chat/completions", body, api_key=key).with_options(
        **options
    )


async def test_hit_miss_key_canonical_and_isolated_by_credential(store: Store) -> None:
    transport = MemoryTransport(ok_json)
    stack = build_stack([Cache(store)], transport)
    first = await stack(req())
    again = await stack(req())
    assert not first.from_cache and again.from_cache and again.body == first.body
    assert transport.calls == 1
    reordered = api_request(
        "http://h/v1",
        "/chat/completions",
        {"messages": [{"content": "hi", "role": "user"}], "model": "m"},
        api_key=CANARY_KEY,
    )
    assert (await stack(reordered)).from_cache  # same JSON, different key order
    assert not (await stack(req(key="sk-another-real-key-123"))).from_cache
    assert transport.calls == 2
    assert not (await stack(req(cache=CacheMode.BYPASS))).from_cache
    assert not (await stack(req(cache=CacheMode.REFRESH))).from_cache
    assert transport.calls == 4


async def test_errors_and_bad_bodies_are_never_stored() -> None:
    replies = iter(
        [
            Response(500, Headers(), b"{}"),
            Response(200, Headers(), b"{bad json"),
            Response(200, Headers(), b'{"ok": 1}'),
            Response(200, Headers(), b'{"ok": 2}'),
        ]
    )
    transport = MemoryTransport(lambda _: next(replies))
    stack = build_stack([Cache(MemoryStore())], transport)
    assert (await stack(req())).status == 500
    assert (await stack(req())).body == b"{bad json"
    assert (await stack(req())).body == b'{"ok": 1}'
    assert (await stack(req())).body == b'{"ok": 1}' and transport.calls == 3


async def test_single_flight_one_upstream_call_and_shared_failure() -> None:
    calls = 0
    answer = anyio.Event()

    async def slow(request: Request) -> Response:
        nonlocal calls
        calls += 1
        await answer.wait()
        if calls == 2:
            raise errors.ServerError("boom", status=500)
        return ok_json(request)

    cache = Cache(MemoryStore())
    stack = build_stack([cache], MemoryTransport(slow))
    results: list[Response] = []

    async def one() -> None:
        results.append(await stack(req(content="same")))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()  # all ten asked while the first was upstream
        answer.set()
    assert calls == 1 and len(results) == 10 and cache.coalesced == 9
    failures: list[BaseException] = []

    async def failing() -> None:
        try:
            await stack(req(content="other"))
        except errors.ServerError as exc:
            failures.append(exc)

    answer = anyio.Event()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(failing)
        await anyio.wait_all_tasks_blocked()
        answer.set()
    assert calls == 2 and len(failures) == 5
    assert await cache.store.get(cache.config.key(req(content="other")) or "") is None


async def test_cached_stream_replays_as_a_stream(emulator: RunningEmulator, tmp_path: Path) -> None:
    from corral._client import default_middleware

    store = SQLiteStore(tmp_path / "c.db")
    stack = default_middleware(cache=Cache(store))
    async with Client(emulator.base_url, CANARY_KEY, model="m", middleware=stack) as client:
        messages = [{"role": "user", "content": "stream me"}]
        first = "".join([c.text async for c in client.stream_chat(messages)])
        second = "".join([c.text async for c in client.stream_chat(messages)])
        plain = (await client.chat(messages)).text
        plain_again = (await client.chat(messages)).text
    assert first == second == plain == plain_again
    assert emulator.counts["received"] == 2  # one stream, one plain call
    metrics = next(m for m in stack if isinstance(m, Metrics)).aggregator
    assert metrics.cache_hits == 2


async def test_no_secret_reaches_any_store(tmp_path: Path, redis_url: str) -> None:
    sqlite_path = tmp_path / "c.db"
    stores: list[Store] = [SQLiteStore(sqlite_path), RedisStore(redis_url, prefix="secret-test:")]
    for store in stores:
        stack = build_stack([Cache(store)], MemoryTransport(ok_json))
        await stack(req())
        await store.aclose()
    raw = sqlite_path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("c.db-*"))
    client = redis.Redis.from_url(redis_url)
    for key in client.keys("secret-test:*"):
        raw += as_bytes(key) + as_bytes(client.get(key) or b"")
    assert raw  # something was stored
    for i in range(len(CANARY_KEY) - 7):
        assert CANARY_KEY[i : i + 8].encode() not in raw


async def test_a_broken_store_is_a_miss_not_a_failure() -> None:
    class Broken:
        async def get(self, key: str) -> bytes | None:
            raise ConnectionError("down")

        async def set(self, key: str, value: bytes, ttl: float | None) -> None:
            raise ConnectionError("down")

        async def delete(self, key: str) -> None: ...

        async def aclose(self) -> None: ...

    stack = build_stack([Cache(Broken())], MemoryTransport(ok_json))
    assert (await stack(req())).status == 200


def test_rules_key_ignores_nothing_that_matters() -> None:
    rules = CacheRules()
    assert rules.key(req(content="a")) != rules.key(req(content="b"))
    assert rules.key(req()) != CacheRules(shared_namespace=True).key(req())
    assert CANARY_KEY not in (rules.key(req()) or "")


async def test_sqlite_purges_expired_rows(tmp_path: Path) -> None:
    now = [1_000.0]
    store = SQLiteStore(tmp_path / "c.db", clock=lambda: now[0])
    await store.set("old", b"x", 0.01)
    await store.set("new", b"y", 60)
    now[0] += 0.05
    assert store.purge_expired() == 1
    assert await store.get("new") == b"y"
    await store.aclose()


async def test_a_loop_of_cache_hits_still_honours_cancellation() -> None:
    """Hits never wait on I/O, yet a 10 ms deadline stops a loop of 200k of them."""
    stack = build_stack([Cache(MemoryStore())], MemoryTransport(ok_json))
    await stack(req())
    done = 0
    with anyio.move_on_after(0.01):
        while done < 200_000:
            assert (await stack(req())).from_cache
            done += 1
    assert done < 200_000  # stopped by the deadline, not by the end of the loop
    done = 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        while done < 1_000:
            done += 1
            await stack(req())
    assert scope.cancelled_caught and done <= 16


async def test_a_loop_of_memory_store_reads_still_honours_cancellation() -> None:
    store = MemoryStore()
    await store.set("k", b"v", None)
    done = 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        while done < 1_000:
            done += 1
            assert await store.get("k") == b"v"
    assert scope.cancelled_caught and done <= 16


def seeded(seed: object) -> Request:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": seed}
    return api_request("http://h/v1", "/chat/completions", body, api_key=CANARY_KEY)


def test_keys_of_integers_beyond_64_bits_never_collide() -> None:
    rules = CacheRules()
    keys = {rules.key(seeded(n)) for n in (2**64, 2**64 + 1, -(2**63) - 1, -(2**63) - 2, 2**63)}
    assert None not in keys and len(keys) == 5
    assert rules.key(seeded(float(2**64))) not in keys


async def test_chat_with_a_huge_seed_is_sent_exactly_and_bad_values_are_invalid_input() -> None:
    sent: list[bytes] = []

    def answer(request: Request) -> Response:
        sent.append(request.body)
        return Response(
            200, Headers({"content-type": "application/json"}), json.dumps(CHAT).encode()
        )

    cache = Cache(MemoryStore())
    transport = MemoryTransport(answer)
    client = Client("http://h/v1", CANARY_KEY, model="m", transport=transport, middleware=[cache])
    messages = [{"role": "user", "content": "hi"}]
    await client.chat(messages, seed=2**64)
    await client.chat(messages, seed=2**64 + 1)
    assert [json.loads(body)["seed"] for body in sent] == [2**64, 2**64 + 1]
    assert cache.misses == 2
    with pytest.raises(errors.InvalidInput, match="JSON"):
        await client.chat(messages, seed=object())


CHAT = {
    "id": "c",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


@given(body=st.binary(max_size=64) | st.from_regex(rb'\A\{"n": -?[0-9]{15,25}, "s": ".{0,8}"\}\Z'))
def test_any_body_gets_a_key_or_none_never_an_exception(body: bytes) -> None:
    request = Request("POST", "http://h/v1/chat/completions", Headers(), body)
    key = CacheRules().key(request)
    assert key is None or len(key) == 64


def test_a_body_only_the_stdlib_reads_is_not_cached_rather_than_an_error() -> None:
    body = b'{"s": "\\ud800", "n": 12345678901234567890}'  # a lone surrogate
    assert CacheRules().key(Request("POST", "http://h/v1/x", Headers(), body)) is None


# -- issue 13: typed decisions, events, the loop's clock -----------------------------------------

LABELS = {"custom_id": "c1"}


def labelled(content: str = "hi", **options: object) -> Request:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return api_request(
        "http://h/v1",
        "/chat/completions",
        body,
        api_key=CANARY_KEY,
        options=RequestOptions(labels=LABELS, **options),  # type: ignore[arg-type]
    )


@given(
    body=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=4),
    mode=st.sampled_from(list(CacheMode)),
)
def test_read_decisions_follow_the_call_s_mode(body: dict[str, object], mode: CacheMode) -> None:
    request = api_request("http://h/v1", "/x", body, api_key="k").with_options(cache=mode)
    decision = CacheRules().read(request)
    key = CacheRules().key(api_request("http://h/v1", "/x", body, api_key="k"))
    assert (
        decision
        == {
            CacheMode.USE: Lookup(key or ""),
            CacheMode.REFRESH: Refresh(key or ""),
            CacheMode.BYPASS: Bypass("bypass"),
        }[mode]
    )
    not_json = Request("POST", "http://h/v1/x", Headers(), b"{nope")
    assert CacheRules().read(not_json) == Bypass("uncacheable")


@given(status=st.sampled_from([200, 201, 400, 429, 500]), body=st.sampled_from([b"{}", b"{no"]))
def test_store_decisions_keep_only_json_successes(status: int, body: bytes) -> None:
    decision = CacheRules(ttl=7.0).store(Response(status, Headers(), body))
    if status == 200 and body == b"{}":
        assert isinstance(decision, Write) and decision.ttl == 7.0
    else:
        assert decision == Skip("status" if status != 200 else "not_json")


@pytest.mark.parametrize(("field", "value"), [("ttl", -1.0), ("recheck", float("nan"))])
def test_bad_configuration_is_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(errors.InvalidInput, match=field):
        Cache(MemoryStore(), **{field: value})  # type: ignore[arg-type]
    assert Cache(MemoryStore(), ttl=None).config.ttl is None


async def test_every_decision_reaches_the_sink_with_the_call_s_labels() -> None:
    events: list[Event] = []
    stack = build_stack([Cache(MemoryStore())], MemoryTransport(ok_json), events=events.append)
    await stack(labelled())
    await stack(labelled())
    await stack(labelled(cache=CacheMode.BYPASS))
    await stack(labelled(cache=CacheMode.REFRESH))
    await stack(
        Request("POST", "http://h/v1/x", Headers(), b"{nope", RequestOptions(labels=LABELS))
    )
    assert [(e.name, getattr(e, "reason", None)) for e in events] == [
        ("cache.miss", "absent"),
        ("cache.stored", None),
        ("cache.hit", None),
        ("cache.miss", "bypass"),
        ("cache.miss", "refresh"),
        ("cache.stored", None),
        ("cache.miss", "uncacheable"),
    ]
    assert all(e.labels == LABELS for e in events)


async def test_aclose_closes_the_store() -> None:
    store = MemoryStore()
    await store.set("k", b"v", None)
    await Cache(store).aclose()
    assert len(store) == 0


class TestVirtualTime:
    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, object]]:
        return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}

    async def test_memory_store_entries_expire_on_the_loop_s_clock(self) -> None:
        store = MemoryStore()
        await store.set("k", b"v", 10.0)
        await anyio.sleep(9.9)
        assert await store.get("k") == b"v"
        await anyio.sleep(0.2)
        assert await store.get("k") is None

    async def test_a_failed_store_is_left_alone_for_recheck_seconds(self) -> None:
        reads: list[float] = []

        class Broken:
            async def get(self, key: str) -> bytes | None:
                reads.append(anyio.current_time())
                raise ConnectionError("down")

            async def set(self, key: str, value: bytes, ttl: float | None) -> None:
                raise ConnectionError("down")

            async def delete(self, key: str) -> None: ...

            async def aclose(self) -> None: ...

        events: list[Event] = []
        stack = build_stack(
            [Cache(Broken(), recheck=30.0)], MemoryTransport(ok_json), events=events.append
        )
        t0 = anyio.current_time()
        await stack(labelled())
        await anyio.sleep(29)
        await stack(labelled())  # still left alone: no read
        await anyio.sleep(2)
        await stack(labelled())  # probes once more
        assert reads == [t0, t0 + 31]
        misses = [e for e in events if isinstance(e, CacheMiss)]
        assert [e.reason for e in misses] == ["store_error"] * 3
