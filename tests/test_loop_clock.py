"""No clock parameters (issue 13 item 4): Metrics, Deadline, Cache, Retry, Truncate, the semantic
cache and MemoryStore read the event loop's clock, so trio's MockClock drives them exactly; their
configurations are frozen and validated; the semantic cache reports its decisions."""

from __future__ import annotations

import inspect
import json

import anyio
import pytest
import trio.testing

from corral.core import Headers, Request, Response, api_request, build_stack, errors
from corral.core._events import Event, SemanticCacheHit, SemanticCacheMiss
from corral.core._models import RequestOptions
from corral.middleware._cache import Cache
from corral.middleware._deadline import Deadline
from corral.middleware._metrics import Metrics, Price
from corral.middleware._retry import Retry
from corral.middleware._semantic_cache import SemanticCache
from corral.middleware._truncate import Truncate
from corral.stores import MemoryStore
from corral.transports import MemoryTransport

pytestmark = pytest.mark.anyio


def chat(content: str = "hi", labels: dict[str, str] | None = None) -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": content}]},
        api_key="sk-test",
        options=RequestOptions(labels=labels or {}),
    )


@pytest.mark.parametrize(
    "factory", [Metrics, Deadline, Cache, Retry, Truncate, SemanticCache, MemoryStore]
)
def test_nothing_takes_a_clock(factory: type) -> None:
    assert "clock" not in inspect.signature(factory).parameters


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Deadline(0), "timeout"),
        (lambda: Deadline(float("inf")), "timeout"),
        (lambda: SemanticCache(threshold=1.5), "threshold"),
        (lambda: SemanticCache(max_scopes=0), "max_scopes"),
    ],
)
def test_bad_configuration_is_refused_naming_the_field(build: object, field: str) -> None:
    with pytest.raises(errors.InvalidInput, match=field):
        build()  # type: ignore[operator]


def test_configurations_are_frozen() -> None:
    import attrs

    metrics = Metrics(prices={"m": Price(1.0, 2.0)})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        metrics.config.prices = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        metrics.config.prices["m"] = Price(0, 0)  # type: ignore[index]
    assert Deadline(3).config.timeout == 3 and Retry(seed=1).config.max_attempts == 5


async def test_semantic_decisions_reach_the_sink_with_labels() -> None:
    def handler(request: Request) -> Response:
        if request.url.endswith("/embeddings"):
            body = {"data": [{"embedding": [1.0, 0.0]}], "model": "e"}
        else:
            body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}}]}
        return Response(
            200, Headers({"content-type": "application/json"}), json.dumps(body).encode()
        )

    events: list[Event] = []
    stack = build_stack([SemanticCache()], MemoryTransport(handler), events=events.append)
    labels = {"custom_id": "s1"}
    await stack(chat(labels=labels))
    assert (await stack(chat(labels=labels))).from_cache
    assert [type(e) for e in events] == [SemanticCacheMiss, SemanticCacheHit]
    assert all(e.labels == labels for e in events)
    hit = events[1]
    assert isinstance(hit, SemanticCacheHit) and hit.score == pytest.approx(1.0)


class TestVirtualTime:
    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, object]]:
        return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}

    async def test_metrics_times_calls_on_the_loop_s_clock(self) -> None:
        async def slow(_: Request) -> Response:
            await anyio.sleep(2.5)
            return Response(200, Headers(), b'{"usage": {"prompt_tokens": 1}}')

        metrics = Metrics()
        await build_stack([metrics], MemoryTransport(slow))(chat())
        assert metrics.aggregator.latency.max == pytest.approx(2.5)
        assert metrics.aggregator.latency.total == pytest.approx(2.5)

    async def test_deadline_is_on_the_loop_s_clock(self) -> None:
        seen: list[float | None] = []

        async def slow(request: Request) -> Response:
            seen.append(request.options.deadline)
            await anyio.sleep(60)
            return Response(200, Headers(), b"{}")

        t0 = anyio.current_time()
        with pytest.raises(errors.DeadlineExceeded):
            await build_stack([Deadline(7.0)], MemoryTransport(slow))(chat())
        assert seen == [t0 + 7.0] and anyio.current_time() == pytest.approx(t0 + 7.0)
