"""The router (issue 16 items 1, 2, 6): its pure choice and failover rules, its cooldowns, and
the shell routing real requests (URL, key and model rewritten below the cache), failing over,
pooling keys and pricing a budget by deployment, with every decision as an event."""

from __future__ import annotations

import json
import math
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core import build_stack
from corral.core._errors import (
    AuthenticationError,
    BadRequestError,
    CircuitOpen,
    ConnectError,
    ContextLengthExceeded,
    CorralError,
    RateLimitError,
    ReadTimeout,
    ServerError,
    WrongScheme,
)
from corral.core._events import (
    CooledDown,
    Event,
    FailedOver,
    GaveUp,
    RetryScheduled,
    RouteChosen,
)
from corral.core._models import Request, Response
from corral.core._wire import api_request
from corral.middleware._budget import Budget
from corral.middleware._cache import Cache
from corral.middleware._deadline import Deadline
from corral.middleware._metrics import Price
from corral.middleware._prices import PriceTable
from corral.middleware._retry import RetryBudget
from corral.middleware._router import (
    ROUTER_BASE_URL,
    CoolDown,
    CooldownPolicy,
    Deployment,
    FailOver,
    GiveUp,
    Health,
    LaneView,
    NoDeployment,
    NoLane,
    RetryLater,
    RoutePolicy,
    Router,
    RouterConfig,
    Send,
    Unchanged,
    WaitUntil,
)
from corral.stores.memory import MemoryStore
from corral.transports import MemoryTransport

# -- choosing ------------------------------------------------------------------------------------


def policy(strategy: str = "priority", **kwargs: Any) -> RoutePolicy:
    return RoutePolicy(RouterConfig(strategy=strategy, **kwargs))  # type: ignore[arg-type]


def test_priority_takes_the_first_ready_lane() -> None:
    lanes = [LaneView(priority=1), LaneView(priority=0, ready_at=5.0), LaneView(priority=2)]
    assert policy().choose(1.0, lanes, 0.0, 0) == Send(0)
    assert policy().choose(5.0, lanes, 0.0, 0) == Send(1)


def test_priority_passes_over_a_lane_whose_quota_would_hold_the_call_too_long() -> None:
    lanes = [LaneView(priority=0, quota_wait=3.0), LaneView(priority=1, quota_wait=0.0)]
    assert policy(max_wait=1.0).choose(0.0, lanes, 0.0, 0) == Send(1)
    assert policy(max_wait=5.0).choose(0.0, lanes, 0.0, 0) == Send(0)
    slow = [LaneView(priority=0, quota_wait=3.0), LaneView(priority=1, quota_wait=4.0)]
    assert policy(max_wait=1.0).choose(0.0, slow, 0.0, 0) == Send(0)  # none is quick


def test_equal_lanes_take_turns() -> None:
    lanes = [LaneView(), LaneView(), LaneView()]
    assert [policy().choose(0.0, lanes, 0.0, turn) for turn in range(3)] == [
        Send(0),
        Send(1),
        Send(2),
    ]


def test_nothing_ready_waits_for_the_first_back_and_nothing_open_is_no_lane() -> None:
    lanes = [LaneView(ready_at=9.0), LaneView(ready_at=4.0), LaneView(ready_at=1.0, excluded=True)]
    assert policy().choose(0.0, lanes, 0.0, 0) == WaitUntil(4.0)
    assert policy().choose(0.0, [LaneView(excluded=True)], 0.0, 0) == NoLane()


@given(roll=st.floats(0, 1, exclude_max=True))
def test_weighted_draws_in_proportion_to_weight(roll: float) -> None:
    lanes = [LaneView(weight=1.0), LaneView(weight=3.0)]
    expected = Send(0) if roll < 0.25 else Send(1)
    assert policy("weighted").choose(0.0, lanes, roll, 0) == expected


def test_least_loaded_prefers_free_quota_then_low_latency() -> None:
    lanes = [
        LaneView(free=0.3, latency=0.01),
        LaneView(free=0.9, latency=0.5),
        LaneView(free=0.92, latency=0.2),
    ]
    assert policy("least_loaded").choose(0.0, lanes, 0.0, 0) == Send(2)


# -- after a failure -----------------------------------------------------------------------------


def decide(
    error: CorralError,
    *,
    others: bool = True,
    attempt: int = 1,
    budget: RetryBudget | None = None,
    window: int | None = 8_000,
    larger: bool = False,
) -> Any:
    return policy().after_failure(attempt, error, 0.0, None, 0.5, budget, others, window, larger)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectError("refused"), FailOver("unavailable", True)),
        (ReadTimeout("slow", request_sent=True), FailOver("unavailable", True)),
        (ServerError("boom", status=503), FailOver("unavailable", True)),
        (CircuitOpen("open", retry_at=3.0), FailOver("unavailable", True)),
        (RateLimitError("slow down", retry_after=30.0), FailOver("rate_limited", False)),
        (RateLimitError("slow down", retry_after=0.5), RetryLater(0.5)),
        (BadRequestError("bad", status=400), GiveUp("not_retryable")),
        (AuthenticationError("key", status=401), GiveUp("not_retryable")),
    ],
)
def test_what_fails_over_and_what_does_not(error: CorralError, expected: Any) -> None:
    assert decide(error) == expected


def test_a_context_length_error_moves_only_to_a_larger_window() -> None:
    error = ContextLengthExceeded("too long")
    assert decide(error, larger=True) == FailOver("context_window", False, 8_001)
    assert decide(error, larger=False) == GiveUp("no_larger_window")


def test_with_no_lane_left_a_failure_waits_a_backoff_or_gives_up() -> None:
    assert decide(ServerError("boom", status=500), others=False) == RetryLater(0.25)
    assert decide(WrongScheme("https to http"), others=False) == GiveUp("not_retryable")
    assert decide(CircuitOpen("open", retry_at=1.0), others=False) == RetryLater(0.0)


def test_failovers_count_attempts_and_backoffs_spend_the_shared_retry_budget() -> None:
    assert decide(ConnectError("x"), attempt=5) == GiveUp("attempts")
    empty = RetryBudget(ratio=0.0, reserve=0.0, cap=0.0)
    # A failover adds no load to the failing deployment: an empty budget does not stop it...
    assert decide(ConnectError("x"), budget=empty) == FailOver("unavailable", True)
    # ...but a backoff retry (nowhere else to go) spends from it.
    assert decide(ServerError("boom", status=500), others=False, budget=empty) == GiveUp("budget")
    one = RetryBudget(ratio=0.0, reserve=1.0, cap=1.0)
    assert decide(ServerError("boom", status=500), others=False, budget=one) == RetryLater(0.25)
    assert one.balance == 0.0


# -- cooldown ------------------------------------------------------------------------------------


def test_cooldown_after_allowed_fails_then_one_probe() -> None:
    cooling = CooldownPolicy(cooldown=5.0, allowed_fails=1)
    health = Health()
    assert cooling.failed(health, 0.0, None) == Unchanged()
    assert cooling.ready_at(health, 0.0) == -math.inf
    assert cooling.failed(health, 1.0, None) == CoolDown(6.0, 2)
    assert cooling.ready_at(health, 2.0) == 6.0
    cooling.sent(health, 6.0)  # the probe
    assert cooling.ready_at(health, 6.5) == 11.5  # the others wait for its answer
    assert cooling.failed(health, 7.0, None) == CoolDown(12.0, 3)  # a failed probe cools again
    cooling.sent(health, 12.0)
    cooling.succeeded(health)
    assert cooling.ready_at(health, 12.1) == -math.inf and health.failures == 0


def test_a_429_cools_its_lane_at_once_for_as_long_as_it_asked() -> None:
    cooling = CooldownPolicy(cooldown=5.0, allowed_fails=3)
    assert cooling.failed(Health(), 10.0, 30.0) == CoolDown(40.0, 1)


def test_an_abandoned_probe_lets_another_go() -> None:
    cooling = CooldownPolicy(cooldown=5.0, allowed_fails=0)
    health = Health()
    cooling.failed(health, 0.0, None)
    cooling.sent(health, 5.0)
    cooling.abandoned(health)
    assert cooling.ready_at(health, 5.1) == -math.inf


# -- the shell -----------------------------------------------------------------------------------

pytestmark = pytest.mark.anyio


def answer(request: Request, model: str | None = None) -> Response:
    body = json.loads(request.body) if request.body else {}
    data = {
        "id": "c",
        "model": model or body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": request.url}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    return Response(200, {"content-type": "application/json"}, json.dumps(data).encode())


class Provider:
    """Answers by host: ``down`` hosts refuse connections, ``status`` hosts answer that."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.status: dict[str, tuple[int, dict[str, str], dict[str, Any]]] = {}
        self.seen: list[tuple[str, str | None, str]] = []

    def __call__(self, request: Request) -> Response:
        host = request.url.split("/")[2]
        body = json.loads(request.body) if request.body else {}
        self.seen.append((host, request.headers.get("authorization"), str(body.get("model"))))
        if host in self.down:
            raise ConnectError(f"connection refused by {host}")
        if host in self.status:
            status, headers, error = self.status[host]
            headers = {"content-type": "application/json", **headers}
            return Response(status, headers, json.dumps({"error": error}).encode())
        return answer(request)

    def hosts(self) -> list[str]:
        return [host for host, _, _ in self.seen]


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEY_A", "KEY_B", "KEY_B2", "KEY_C"):
        monkeypatch.setenv(name, f"sk-{name.lower()}-secret")


def deployments(**overrides: Any) -> list[Deployment]:
    a = Deployment(name="a", base_url="http://a/v1", api_key_env="KEY_A", priority=0)
    b = Deployment(
        name="b",
        base_url="http://b/v1",
        api_key_env="KEY_B",
        priority=1,
        models={"small": "b-small"},
    )
    return [a, b]


def chat(model: str = "small", **body: Any) -> Request:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    return api_request(ROUTER_BASE_URL, "/chat/completions", payload, api_key=None)


async def test_calls_go_to_the_preferred_deployment_with_its_url_key_and_model(keys: None) -> None:
    a = Deployment(
        name="a",
        base_url="http://a/v1",
        api_key_env="KEY_A",
        models={"small": "a-small-2026"},
    )
    provider = Provider()
    handler = build_stack([Router([a, *deployments()[1:]])], MemoryTransport(provider))
    response = await handler(chat())
    assert response.status == 200
    assert provider.seen == [("a", "Bearer sk-key_a-secret", "a-small-2026")]
    assert response.json()["choices"][0]["message"]["content"] == "http://a/v1/chat/completions"


async def test_a_refused_connection_fails_over_at_once_and_says_so(keys: None) -> None:
    provider = Provider()
    provider.down.add("a")
    events: list[Event] = []
    router = Router(deployments(), allowed_fails=0, cooldown=60.0)
    handler = build_stack([router], MemoryTransport(provider), events=events.append)
    with anyio.fail_after(5):
        response = await handler(chat())
    assert response.status == 200
    assert provider.seen == [
        ("a", "Bearer sk-key_a-secret", "small"),
        ("b", "Bearer sk-key_b-secret", "b-small"),
    ]
    kinds = [(type(e).__name__, getattr(e, "deployment", None)) for e in events]
    assert kinds == [
        ("RouteChosen", "a"),
        ("CooledDown", "a"),
        ("FailedOver", "a"),
        ("RouteChosen", "b"),
    ]
    assert events[-1].attempt == 2 and getattr(events[-1], "reason", None) == "failover"
    # Cooling down: the next call goes straight to b.
    await handler(chat())
    assert provider.hosts()[-1] == "b" and provider.hosts().count("a") == 1


async def test_a_cooled_deployment_gets_one_probe_and_comes_back(keys: None) -> None:
    provider = Provider()
    provider.down.add("a")
    router = Router(deployments(), allowed_fails=0, cooldown=0.05)
    handler = build_stack([router], MemoryTransport(provider))
    await handler(chat())
    provider.down.clear()
    with anyio.fail_after(5):
        while provider.hosts()[-1] != "a":
            await anyio.sleep(0.02)
            await handler(chat())
    await handler(chat())
    assert provider.hosts()[-2:] == ["a", "a"]


async def test_a_400_never_fails_over(keys: None) -> None:
    provider = Provider()
    provider.status["a"] = (400, {}, {"message": "bad field", "type": "invalid_request_error"})
    events: list[Event] = []
    handler = build_stack([Router(deployments())], MemoryTransport(provider), events=events.append)
    response = await handler(chat())
    assert response.status == 400
    assert provider.hosts() == ["a"]
    assert [type(e) for e in events] == [RouteChosen, GaveUp]


async def test_a_context_length_error_goes_to_a_larger_window(keys: None) -> None:
    small = Deployment(name="a", base_url="http://a/v1", api_key_env="KEY_A", context_window=4096)
    mid = Deployment(
        name="b", base_url="http://b/v1", api_key_env="KEY_B", context_window=2048, priority=1
    )
    large = Deployment(
        name="c", base_url="http://c/v1", api_key_env="KEY_C", context_window=128_000, priority=2
    )
    provider = Provider()
    error = {"message": "maximum context length is 4096", "code": "context_length_exceeded"}
    provider.status["a"] = (400, {}, error)
    events: list[Event] = []
    handler = build_stack(
        [Router([small, mid, large])], MemoryTransport(provider), events=events.append
    )
    response = await handler(chat())
    assert response.status == 200
    assert provider.hosts() == ["a", "c"]  # b's window is smaller than a's
    failover = next(e for e in events if isinstance(e, FailedOver))
    assert (failover.kind, failover.reason) == ("context_length_exceeded", "context_window")


async def test_a_long_429_fails_over_and_cools_the_deployment_for_its_pause(keys: None) -> None:
    provider = Provider()
    provider.status["a"] = (429, {"retry-after": "30"}, {"message": "slow down"})
    events: list[Event] = []
    handler = build_stack([Router(deployments())], MemoryTransport(provider), events=events.append)
    for _ in range(3):
        assert (await handler(chat())).status == 200
    assert provider.hosts() == ["a", "b", "b", "b"]
    cooled = next(e for e in events if isinstance(e, CooledDown))
    assert cooled.until - cooled.time == pytest.approx(30.0)


async def test_a_short_429_waits_and_retries_instead(keys: None) -> None:
    provider = Provider()
    provider.status["a"] = (429, {"retry-after": "0.01"}, {"message": "slow down"})
    events: list[Event] = []
    handler = build_stack(
        [Router(deployments(), max_attempts=2)], MemoryTransport(provider), events=events.append
    )
    response = await handler(chat())
    assert response.status == 429  # both attempts at a, none moved
    assert provider.hosts() == ["a", "a"]
    assert any(isinstance(e, RetryScheduled) for e in events)


async def test_no_deployment_for_a_model_is_a_typed_error(keys: None) -> None:
    only_b = deployments()[1]
    handler = build_stack([Router([only_b])], MemoryTransport(Provider()))
    with pytest.raises(NoDeployment, match="no deployment serves model 'large'"):
        await handler(chat("large"))


async def test_every_deployment_down_ends_within_the_attempts(keys: None) -> None:
    provider = Provider()
    provider.down |= {"a", "b"}
    router = Router(deployments(), max_attempts=3, backoff_base=0.01)
    handler = build_stack([router], MemoryTransport(provider))
    with anyio.fail_after(5), pytest.raises(ConnectError):
        await handler(chat())
    assert len(provider.seen) == 3


async def test_a_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEY_A", raising=False)
    with pytest.raises(CorralError, match="KEY_A holding its key is not set"):
        Router(deployments())


async def test_the_cache_above_keys_by_what_was_asked_not_who_answered(keys: None) -> None:
    provider = Provider()
    provider.down.add("a")
    router = Router(deployments(), allowed_fails=0, cooldown=0.0)
    handler = build_stack([Cache(MemoryStore()), router], MemoryTransport(provider))
    first = await handler(chat())
    provider.down.clear()
    second = await handler(chat())
    assert second.from_cache and second.body == first.body
    assert provider.hosts() == ["a", "b"]


async def test_a_key_pool_spreads_calls_and_each_key_has_its_own_quota(keys: None) -> None:
    pool = Deployment(
        name="p", base_url="http://p/v1", api_key_env=["KEY_A", "KEY_B", "KEY_C"], rpm=60
    )
    provider = Provider()
    events: list[Event] = []
    router = Router([pool])
    handler = build_stack([router], MemoryTransport(provider), events=events.append)
    for _ in range(6):
        await handler(chat())
    used = [auth or "" for _, auth, _ in provider.seen]
    assert sorted(set(used)) == [
        "Bearer sk-key_a-secret",
        "Bearer sk-key_b-secret",
        "Bearer sk-key_c-secret",
    ]
    assert {e.lane for e in events if isinstance(e, RouteChosen)} == {
        "p#0",
        "p#1",
        "p#2",
    }
    limiters = {id(lane.ratelimit) for lane in router.lanes_for("small")}
    assert len(limiters) == 3
    shared = Router(
        [
            Deployment(
                name="s",
                base_url="http://s/v1",
                api_key_env=["KEY_A", "KEY_B"],
                rpm=60,
                shared_quota=True,
            )
        ]
    )
    assert len({id(lane.ratelimit) for lane in shared.lanes_for("small")}) == 1


async def test_a_429_on_one_key_of_a_pool_moves_to_another_key(keys: None) -> None:
    pool = Deployment(name="p", base_url="http://p/v1", api_key_env=["KEY_A", "KEY_B"])
    seen: list[str | None] = []

    def provider(request: Request) -> Response:
        auth = request.headers.get("authorization")
        seen.append(auth)
        if auth == "Bearer sk-key_a-secret":
            body = json.dumps({"error": {"message": "per-key limit"}}).encode()
            return Response(429, {"retry-after": "20"}, body)
        return answer(request)

    handler = build_stack([Router([pool])], MemoryTransport(provider))
    for _ in range(3):
        assert (await handler(chat())).status == 200
    # Key a is tried once (the keys take turns), then cools for its 20 s; b takes the rest.
    assert seen.count("Bearer sk-key_a-secret") == 1
    assert seen.count("Bearer sk-key_b-secret") == 3


async def test_the_budget_prices_each_attempt_at_its_deployments_prices(keys: None) -> None:
    cheap = PriceTable(None, default=Price(1.0, 1.0))
    dear = PriceTable(None, default=Price(10.0, 10.0))
    a = Deployment(name="a", base_url="http://a/v1", api_key_env="KEY_A", prices=cheap)
    b = Deployment(name="b", base_url="http://b/v1", api_key_env="KEY_B", prices=dear, priority=1)
    provider = Provider()
    budget = Budget(1.0)
    handler = build_stack([Router([a, b], budget=budget)], MemoryTransport(provider))
    await handler(chat())
    at_a = budget.last.spent
    assert at_a == round(15 * 1.0 * 1000)  # 15 tokens at $1/M, in nano-dollars
    provider.down.add("a")
    await handler(chat())
    assert budget.last.spent - at_a == round(15 * 10.0 * 1000)
    assert budget.last.reserved == 0


async def test_the_deadline_spans_deployments_no_wait_past_it(keys: None) -> None:
    """Every deployment cooling down for a minute: a call with a half-second deadline gives
    up at once instead of waiting for one to come back."""
    provider = Provider()
    provider.down |= {"a", "b"}
    router = Router(deployments(), allowed_fails=0, cooldown=60.0, max_attempts=2)
    handler = build_stack([router], MemoryTransport(provider))
    with pytest.raises(ConnectError):
        await handler(chat())  # a fails over to b; both now cool down
    seen = len(provider.seen)
    with anyio.fail_after(5):
        with pytest.raises(NoDeployment, match="before its deadline"):
            await build_stack([Deadline(0.5), router], MemoryTransport(provider))(chat())
    assert len(provider.seen) == seen
