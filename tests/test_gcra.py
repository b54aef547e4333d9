"""The shared limiter's Lua scripts on a real Redis agree with their Python model (GcraPolicy).

Every script takes the time as an argument here, so each example is exact and repeatable; the
keys' real-time TTLs (a minute, a second at least for a pause) outlive an example.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.middleware._gcra import (
    PAUSE,
    RESERVE,
    SETTLE,
    Cell,
    GcraPolicy,
    GcraState,
    decode,
)
from corral.middleware._ratelimit import Delay, Proceed

MARGIN_MS = 60_000

cells = st.builds(
    Cell,
    interval=st.one_of(st.just(0.0), st.floats(1e-4, 10.0)),
    burst=st.floats(1.0, 50.0),
)
token_cells = st.builds(
    Cell,
    interval=st.one_of(st.just(0.0), st.floats(1e-5, 0.05)),
    burst=st.floats(100.0, 10_000.0),
)
policies = st.builds(GcraPolicy, cells, token_cells, st.floats(1.0, 600.0))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.floats(0, 30), st.floats(0, 1)),
        st.tuples(st.just("settle"), st.floats(0, 30), st.integers(-5_000, 5_000)),
        st.tuples(st.just("pause"), st.floats(0, 30), st.floats(0, 3)),
    ),
    min_size=1,
    max_size=25,
)


class Scripts:
    """The three scripts on one quota name, each given the time explicitly."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.client = client
        self.keys = [f"corral:rl:{name}:{k}" for k in ("requests", "tokens", "pause")]
        self.reserve_script = client.register_script(RESERVE)
        self.settle_script = client.register_script(SETTLE)
        self.pause_script = client.register_script(PAUSE)

    def state(self) -> GcraState:
        values = [self.client.get(k) for k in self.keys]
        return GcraState(*(float(v) if v is not None else 0.0 for v in values))


@pytest.fixture(scope="module")
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies,
    start=st.one_of(st.floats(0, 1e4), st.floats(1.6e9, 1.9e9)),  # Redis TIME is ~1.7e9
    ops=operations,
)
def test_the_lua_scripts_agree_with_the_model(
    client: redis.Redis, policy: GcraPolicy, start: float, ops: list[tuple[str, float, Any]]
) -> None:
    scripts = Scripts(client, uuid.uuid4().hex)
    model = GcraState()
    now = start
    for kind, dt, amount in ops:
        now += dt
        if kind == "reserve":
            tokens = int(amount * policy.tokens.burst)  # within the burst, as the shell sends
            args = policy.reserve_args(tokens, MARGIN_MS, now)
            reply = scripts.reserve_script(keys=scripts.keys, args=args)
            model, expected = policy.reserve(model, now, tokens)
            assert decode(reply, now) == expected, (kind, now, tokens)
        elif kind == "settle":
            args = policy.settle_args(amount, MARGIN_MS, now)
            scripts.settle_script(keys=[scripts.keys[1]], args=args)
            model = policy.settle(model, now, amount)
        else:
            # Up to 3x max_pause, so a pause stored longer than the cap is met when read; at
            # least a second, so its real-time TTL outlives the example.
            seconds = max(1.0, amount * policy.max_pause)
            keys = [scripts.keys[2], scripts.keys[0], scripts.keys[1]]
            scripts.pause_script(keys=keys, args=policy.pause_args(seconds, MARGIN_MS, now))
            model = policy.pause(model, now, seconds)
        assert scripts.state() == model, (kind, now)


def test_the_model_pauses_reserves_and_refunds() -> None:
    """The model on its own: a burst, then the wait, a refund, and a capped pause."""
    policy = GcraPolicy(Cell(1.0, 2.0), Cell(0.01, 100.0), max_pause=5.0)
    state = GcraState()
    state, first = policy.reserve(state, 10.0, 100)
    assert first == Proceed()
    state, second = policy.reserve(state, 10.0, 50)
    assert second == Delay(10.5)  # the token cell is empty for 50 tokens * 0.01 s
    state = policy.settle(state, 10.0, -60)  # the first call used 40 of its 100
    state, third = policy.reserve(state, 10.0, 50)
    assert third == Proceed()
    state = policy.pause(state, 10.0, 1e6)
    _, paused = policy.reserve(state, 10.0, 1)
    assert paused == Delay(15.0)  # a stored pause longer than max_pause is cut when read


def test_without_a_time_the_scripts_read_the_redis_clock(client: redis.Redis) -> None:
    """The shell sends no time: every process is judged by Redis's clock, whatever its own."""
    scripts = Scripts(client, uuid.uuid4().hex)
    seconds, micros = client.time()
    redis_now = seconds + micros / 1e6
    client.set(scripts.keys[0], str(redis_now + 100.0), px=10_000)
    policy = GcraPolicy(Cell(1.0, 1.0), Cell(), max_pause=60.0)
    reply = scripts.reserve_script(keys=scripts.keys, args=policy.reserve_args(0, MARGIN_MS))
    decision = decode(reply, 0.0)
    assert isinstance(decision, Delay) and 99.0 < decision.until <= 100.0


def test_a_key_lives_as_long_as_its_debt(client: redis.Redis) -> None:
    """A cell whose arrival time is far ahead (a large burst, a charge) must not expire early:
    an expired key reads as "no debt" and would hand out a second burst."""
    scripts = Scripts(client, uuid.uuid4().hex)
    now = float(client.time()[0])  # whole seconds: 14 significant digits keep it exact
    policy = GcraPolicy(Cell(10.0, 50.0), Cell(), max_pause=60.0)
    for _ in range(50):
        reply = scripts.reserve_script(keys=scripts.keys, args=policy.reserve_args(0, 1_000, now))
        assert decode(reply, now) == Proceed()
    assert client.pttl(scripts.keys[0]) >= 500_000  # 50 calls x 10 s of debt, not 1 s
