"""Limits as providers count them (issue 14): settle modes, the enforcement window and bursts,
no credit during a pause, cold start and what headers and a previous run teach, the output
reservation of bodies without max_tokens, and the window property in virtual time."""

from __future__ import annotations

import heapq
import json
import math
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import cli
from corral.batch._job import _limiter
from corral.batch._manifest import Manifest, RecentSends, read_recent, record_manifest
from corral.core import Headers, Request, Response, api_request, build_stack
from corral.core._classify import RateLimitHeaders
from corral.core._events import Event, RateLimitColdStart, RateLimitLearned
from corral.core._models import RequestOptions
from corral.core._tokens import DEFAULT_MAX_OUTPUT
from corral.middleware import RateLimit
from corral.middleware._outputs import OutputEstimate
from corral.middleware._ratelimit import (
    Cost,
    Delay,
    Learned,
    Proceed,
    RateLimitConfig,
    RateLimitPolicy,
    Reject,
    reservation,
    settle_delta,
)
from corral.middleware._sendlog import SendLog, room
from corral.testing.quota import SlidingWindowQuota
from corral.transports import MemoryTransport
from tests.support import most_in_a_window

LABELS = {"custom_id": "row-7"}


def chat(content: str = "hi", **body: object) -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": content}], **body},
        api_key="sk-test",
        options=RequestOptions(labels=LABELS),
    )


def answer(completion: int, prompt: int = 5, **headers: str) -> Response:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    return Response(200, Headers(headers), json.dumps({"usage": usage}).encode())


# -- item 1: settlement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reserved", "total", "completion", "guess", "delta"),
    [
        ("reserved", 100, 40, 5, None, 0),  # max_tokens unused: the provider keeps it
        ("reserved", 100, 130, 95, None, 30),  # more than reserved: charged
        ("usage", 100, 40, 5, None, -60),  # refunded to the usage
        ("usage", 100, 130, 95, None, 30),
        ("reserved", 60, 30, 10, 40, -30),  # estimated output: set to the real one
        ("reserved", 60, 95, 75, 40, 35),
    ],
)
def test_settle_modes(
    mode: str, reserved: int, total: int, completion: int, guess: int | None, delta: int
) -> None:
    assert settle_delta(mode, reserved, total, completion, guess) == delta  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "refunded"), [("reserved", False), ("usage", True)])
async def test_the_default_keeps_the_reservation_usage_refunds_it(
    mode: str, refunded: bool
) -> None:
    limiter = RateLimit(tpm=60_000, burst_tokens=1_000, cold_start=1.0, settle=mode)  # type: ignore[arg-type]
    assert RateLimit(tpm=1).config.settle == "reserved"
    stack = build_stack([limiter], MemoryTransport(lambda _: answer(5)))
    request = chat(max_tokens=200)
    await stack(request)
    bucket = limiter.policy("m").tokens[0]
    bucket.refill(bucket.updated)
    reserved = request.options.call.tokens
    assert reserved is not None and reserved > 200
    expected = 1_000 - (10 if refunded else reserved)
    assert bucket.level == pytest.approx(expected, abs=1.0)


# -- item 2: the enforcement window, bursts, no credit while paused -----------------------------


def test_per_minute_limits_over_a_shorter_window() -> None:
    policy = RateLimitPolicy(RateLimitConfig(rpm=600, tpm=60_000, window=10), 0.0)
    requests, tokens = policy.requests[0], policy.tokens[0]
    assert (requests.allowance, tokens.allowance) == (100, 10_000)  # limit x 10 / 60
    assert (requests.capacity, tokens.capacity) == (2, 200)  # default burst: 2%
    assert tokens.capacity + tokens.rate * 10 == pytest.approx(10_000)
    quota = SlidingWindowQuota(600, 60_000, window=10)
    assert (quota.max_requests, quota.max_tokens) == (100, 10_000)


def test_no_credit_builds_up_while_paused() -> None:
    config = RateLimitConfig(tpm=60_000, burst_tokens=3_000, cold_start=1.0)
    policy = RateLimitPolicy(config, 0.0)
    bucket = policy.tokens[0]
    policy.pause(0.0, 20.0)
    decision = policy.admit(19.0, Cost(1, 1))
    assert isinstance(decision, Delay) and decision.until == pytest.approx(20.0 + 1 / bucket.rate)
    # At the end of the pause the bucket is empty: the steady rate, not a 3000-token burst.
    taken, now = 0, 20.0
    while now < 25.0:
        match policy.admit(now, Cost(1, 100)):
            case Proceed():
                taken += 100
            case Delay(until=until):
                now = until
            case other:
                raise AssertionError(other)
    assert taken <= bucket.rate * 5 + 100


def test_cli_flags_reach_the_limiter(tmp_path: Path) -> None:
    argv = [
        "run",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--tpm",
        "60000",
        "--window",
        "10",
        "--settle",
        "usage",
        "--burst-requests",
        "3",
        "--burst-tokens",
        "500",
        "--no-calibrate",
    ]
    job = cli._job(cli._parser().parse_args(argv), argv)
    limiter = _limiter(job)
    assert isinstance(limiter, RateLimit)
    config = limiter.config
    assert (
        config.window,
        config.settle,
        config.burst_requests,
        config.burst_tokens,
        config.calibrate,
    ) == (10.0, "usage", 3.0, 500.0, False)
    defaults = cli._job(cli._parser().parse_args(argv[:6]), argv[:6])
    assert (defaults.window, defaults.settle, defaults.burst_tokens) == (60.0, "reserved", None)
    assert defaults.calibrate


def test_serve_window_flag_reaches_the_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(
        "corral.testing.server.serve_forever", lambda config, *a, **k: seen.append(config)
    )
    flags = ["serve", "--tpm", "600", "--window", "10", "--count", "reserved"]
    assert cli.main(flags) == 0
    assert (seen[0].window, seen[0].count) == (10.0, "reserved")


# -- item 3: cold start, headers, a previous run --------------------------------------------------


def test_a_key_starts_from_a_share_of_its_burst() -> None:
    policy = RateLimitPolicy(RateLimitConfig(tpm=60_000, burst_tokens=1_000), 0.0)
    assert policy.tokens[0].level == pytest.approx(100)  # cold_start 0.1
    full = RateLimitPolicy(RateLimitConfig(tpm=60_000, burst_tokens=1_000, cold_start=1.0), 0.0)
    assert full.tokens[0].level == 1_000


def test_the_first_headers_say_how_full_the_window_is() -> None:
    config = RateLimitConfig(tpm=60_000, burst_tokens=1_000, cold_start=1.0)
    policy = RateLimitPolicy(config, 0.0)
    bucket = policy.tokens[0]
    # Another process left 59,500 tokens that stay 59 s: room for 500, less our refill meanwhile.
    learned = policy.learn(0.0, RateLimitHeaders(remaining_tokens=500, reset_tokens=59.0))
    expected = 60_000 - bucket.rate * 59.0
    assert len(learned) == 1 and learned[0].level == pytest.approx(min(500, expected))
    assert learned[0] == Learned("tokens", None, learned[0].level)
    assert bucket.level == pytest.approx(min(500, expected))
    # Later headers only cap the level at what remains, never raise it.
    bucket.level, bucket.updated = 800.0, 1.0
    assert policy.learn(1.0, RateLimitHeaders(remaining_tokens=5_000, reset_tokens=59.0)) == []
    assert bucket.level == 800.0


def test_a_lower_stated_limit_is_learnt() -> None:
    policy = RateLimitPolicy(RateLimitConfig(rpm=600, window=10), 0.0)
    learned = policy.learn(0.0, RateLimitHeaders(limit_requests=300, remaining_requests=50))
    assert learned[0] == Learned("requests", 300.0, policy.requests[0].level)
    assert policy.requests[0].allowance == 50  # 300 x 10 / 60
    assert policy.learn(1.0, RateLimitHeaders(limit_requests=900)) == []  # never raised


def test_room_left_by_what_a_previous_run_sent() -> None:
    # 900 of a 1000 allowance sent 2 s ago in a 10 s window: they stay 8 s more.
    assert room(1_000, 50.0, 10.0, [(2.0, 900.0)]) == pytest.approx(1_000 - 900 - 50.0 * 8)
    assert room(1_000, 50.0, 10.0, [(10.0, 900.0)]) == 1_000  # already out of the window
    log = SendLog(10.0)
    log.add(0.0, 1, 300)
    log.add(9.5, 1, 200)
    assert [r for _, r, _ in log.recent(12.0)] == [1]  # the first slice left the window
    policy = RateLimitPolicy(RateLimitConfig(tpm=6_000), 0.0, sent=((0.5, 3, 950),))
    assert policy.tokens[0].level < 0  # a full window: the key starts in debt, it waits
    assert policy.sent_before


def test_the_manifest_keeps_recent_sends_for_a_resume(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    base = Manifest("d", 1, False, None, "http://h/v1", None)
    recent = RecentSends(1_000.0, {"m": ((0.5, 3, 120),)})
    record_manifest(output, attrs_evolve(base, recent))
    found = read_recent(output)
    assert found == recent
    assert found is not None and found.aged(1_002.0) == {"m": ((2.5, 3, 120),)}
    assert base.changes(attrs_evolve(base, recent)) == []  # not a setting: resume unchanged
    record_manifest(output, base)
    assert read_recent(output) is None
    assert RecentSends.from_json({"at": "x", "keys": {}}) is None


def attrs_evolve(manifest: Manifest, recent: RecentSends) -> Manifest:
    import attrs

    return attrs.evolve(manifest, recent=recent)


@pytest.mark.anyio
async def test_cold_start_and_learning_are_reported() -> None:
    events: list[Event] = []
    limiter = RateLimit(tpm=60_000, burst_tokens=1_000)
    limiter.resume({"m": ((1.0, 2, 50),)})
    headers = {"x-ratelimit-remaining-tokens": "20", "x-ratelimit-limit-tokens": "30000"}
    stack = build_stack(
        [limiter], MemoryTransport(lambda _: answer(5, 5, **headers)), events=events.append
    )
    with anyio.fail_after(30):
        await stack(chat(max_tokens=5))
        await stack(chat(max_tokens=5))
    [cold] = [e for e in events if isinstance(e, RateLimitColdStart)]
    assert isinstance(cold, RateLimitColdStart) and dict(cold.labels) == LABELS
    assert cold.key == "m" and cold.requests is None and cold.resumed
    assert cold.tokens == pytest.approx(100.0)
    learned = [e for e in events if isinstance(e, RateLimitLearned)]
    assert [(e.dimension, e.limit) for e in learned] == [("tokens", 30_000.0), ("tokens", None)]
    assert isinstance(learned[-1], RateLimitLearned) and learned[-1].level <= 20


# -- item 4: no max_tokens ------------------------------------------------------------------------


def test_output_estimate_starts_conservative_and_follows_answers() -> None:
    outputs = OutputEstimate()
    assert outputs.reserve("m") == DEFAULT_MAX_OUTPUT
    outputs.observe("m", 10)
    assert outputs.reserve("m") == 30  # one sample: padded threefold
    for _ in range(200):
        outputs.observe("m", 10)
    assert 10 <= outputs.reserve("m") <= 11
    outputs.observe("m", 400)  # a long answer is looked at at once; one in 200 is past p99
    assert outputs.reserve("m") <= 11
    for _ in range(10):
        outputs.observe("m", 400)
    assert outputs.reserve("m") >= 400
    assert outputs.reserve("other") == DEFAULT_MAX_OUTPUT


def test_a_body_without_max_tokens_reserves_the_estimate() -> None:
    outputs = OutputEstimate()
    for _ in range(50):
        outputs.observe("m", 10)
    counter = RateLimit()._counter
    bare, capped = chat(), chat(max_tokens=16)
    free = reservation(bare, counter, outputs)
    fixed = reservation(capped, counter, outputs)
    assert free.guess == outputs.reserve("m") and fixed.guess is None
    assert free.tokens == fixed.tokens - 16 + free.guess
    assert bare.options.call.tokens == free.tokens - free.guess + DEFAULT_MAX_OUTPUT


@pytest.mark.anyio
async def test_calls_without_max_tokens_reach_the_limit_in_seconds() -> None:
    """A conservative first reservation, then the model's real answers: the bucket does not
    pay 1024 tokens per call for long."""
    limiter = RateLimit(tpm=60_000, window=10)
    stack = build_stack([limiter], MemoryTransport(lambda _: answer(10)))
    with anyio.fail_after(60):
        for _ in range(5):
            await stack(chat())
    held = [reservation(chat(), limiter._counter, limiter._outputs).tokens for _ in range(2)]
    assert held[0] < 50  # prompt + ~10 tokens, not + 1024


def test_a_grown_bucket_pays_when_it_shrinks_back() -> None:
    """The default burst grew to 300 for one call and its level refilled to 300; that level
    spent just before the bucket shrinks back must not be followed by the faster refill for
    free (a window would hold 1,264 of 1,000)."""
    policy = RateLimitPolicy(RateLimitConfig(tpm=6_000, window=10, cold_start=1.0), 0.0)
    counted: list[tuple[float, int, int]] = []
    now = 0.0
    for at, tokens in [(0.0, 300), (13.9, 150), (13.95, 150), (14.1, 20)] + [
        (14.1 + i * 0.05, 5) for i in range(1, 400)
    ]:
        now = max(now, at)
        while not isinstance(decision := policy.admit(now, Cost(1, tokens)), Proceed):
            assert isinstance(decision, Delay)
            now = decision.until
        counted.append((now, 1, tokens))
    assert most_in_a_window(counted, 10.0, 2) <= 1_000 + 1e-6


# -- item 6: the window property, in virtual time --------------------------------------------


@st.composite
def runs(draw: st.DrawFn) -> dict[str, object]:
    window = draw(st.sampled_from([1.0, 10.0, 60.0]))
    explicit = draw(st.booleans())
    return {
        "window": window,
        "rpm": draw(st.integers(6, 600)),
        "tpm": draw(st.integers(600, 60_000)),
        "settle": draw(st.sampled_from(["reserved", "usage"])),
        "cold_start": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "burst_tokens": draw(st.integers(50, 5_000)) if explicit else None,
        "calls": draw(
            st.lists(
                st.tuples(
                    st.floats(0, 3),  # gap before the call arrives
                    # reserved tokens, as a share of what a window admits: small and large
                    st.one_of(st.floats(0.0001, 0.03), st.floats(0.03, 0.6)),
                    st.floats(0, 1.5),  # usage as a share of the reservation
                    st.floats(0, 2),  # latency
                    st.integers(0, 12),  # 0: a 429 (pause), else an answer
                ),
                min_size=1,
                max_size=60,
            )
        ),
    }


def simulate(
    run: dict[str, object],
) -> tuple[RateLimitPolicy, list[tuple[float, int, int]], list[float]]:
    """Arrivals queued FIFO at one key, admitted by the policy at the earliest moment it
    allows (a completion may let the head go earlier), settled when they complete. Returns
    the policy, what the provider counted per admission (time, requests, tokens: the
    reservation, or in usage mode the usage, never above it since max_tokens caps it) and
    the pauses' ends."""
    calls = run["calls"]
    assert isinstance(calls, list)
    keys = ("window", "rpm", "tpm", "settle", "cold_start", "burst_tokens")
    config = RateLimitConfig(**{k: run[k] for k in keys})  # type: ignore[arg-type]
    usage_mode = config.settle == "usage"
    policy = RateLimitPolicy(config, 0.0)
    arrivals, t = [], 0.0
    allowance = policy.tokens[0].allowance
    for gap, size, share, latency, outcome in calls:
        t += gap
        tokens = max(1, int(size * allowance))
        used = int(tokens * min(share, 1.0)) if usage_mode else int(tokens * share)
        arrivals.append((t, tokens, used, latency, outcome))
    done: list[tuple[float, int, int, int]] = []  # (when, index, reserved, used; -1: a 429)
    counted: list[tuple[float, int, int]] = []
    pauses: list[float] = []
    now, head = 0.0, 0
    for _ in range(100_000):
        if head == len(arrivals) and not done:
            break
        wake = arrivals[head][0] if head < len(arrivals) else math.inf
        if head < len(arrivals) and now >= wake:
            _, tokens, used, latency, outcome = arrivals[head]
            match policy.admit(now, Cost(1, tokens)):
                case Proceed():
                    counted.append((now, 1, used if usage_mode else tokens))
                    heapq.heappush(done, (now + latency, head, tokens, used if outcome else -1))
                    head += 1
                    continue
                case Reject():
                    head += 1
                    continue
                case Delay(until=until):
                    wake = until
        if done and done[0][0] <= wake:
            at, _, reserved, used = heapq.heappop(done)
            now = max(now, at)
            if used < 0:
                policy.pause(now, now + 1.0)
                pauses.append(now + 1.0)
            else:
                policy.settle(now, settle_delta(config.settle, reserved, used, 0, None))
        else:
            assert math.isfinite(wake)
            now = max(now, wake)
    return policy, counted, pauses


@settings(max_examples=150, deadline=None)
@given(run=runs())
def test_no_window_admits_more_than_the_limit(run: dict[str, object]) -> None:
    """For any arrivals, usage outcomes and 429 pauses, under both settle modes: what the
    provider counts in any window of the configured length stays within limit x w / 60 (plus
    the burst when a burst of the whole allowance was asked for)."""
    policy, counted, _ = simulate(run)
    for column, bucket in ((1, policy.requests[0]), (2, policy.tokens[0])):
        bound = bucket.allowance
        if bucket.burst is not None and bucket.capacity >= bucket.allowance:
            bound += bucket.capacity
        assert most_in_a_window(counted, bucket.window, column) <= bound + 1e-6


@settings(max_examples=100, deadline=None)
@given(run=runs())
def test_after_a_pause_the_steady_rate_not_a_burst(run: dict[str, object]) -> None:
    """From the end of a pause, at most the refill since then is admitted: no credit from the
    paused time (reserved mode, an explicit burst: nothing else adds to the level)."""
    run = {**run, "burst_tokens": run["burst_tokens"] or 1_000, "settle": "reserved"}
    policy, counted, pauses = simulate(run)
    bucket = policy.tokens[0]
    for end in pauses:
        after = [c for c in counted if c[0] >= end]
        for until, *_ in after:
            taken = sum(c[2] for c in after if c[0] <= until)
            assert taken <= bucket.rate * (until - end) + 1e-6


# -- the shared limiter: the same settle modes, window and pause, in Redis -----------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "refunded"), [("reserved", False), ("usage", True)])
async def test_the_shared_limiter_settles_as_told(
    redis_url: str, mode: str, refunded: bool
) -> None:
    import uuid

    import redis

    from corral.middleware._shared_ratelimit import SharedRateLimit

    name = uuid.uuid4().hex
    limiter = SharedRateLimit(redis_url, name=name, tpm=60_000, window=10, settle=mode)  # type: ignore[arg-type]
    assert limiter.config.gcra().tokens.interval == pytest.approx(1 / ((10_000 - 4_096) / 10))
    stack = build_stack([limiter], MemoryTransport(lambda _: answer(5)))
    client = redis.Redis.from_url(redis_url)
    request = chat(max_tokens=2_000)
    try:
        seconds, micros = client.time()
        await stack(request)
        tat = float(client.get(f"corral:rl:{name}:tokens") or 0) - (seconds + micros / 1e6)
    finally:
        await limiter.aclose()
        client.close()
    held, step = request.options.call.tokens, limiter.config.gcra().tokens.interval
    assert held is not None and held > 2_000
    # The token cell's arrival time is ahead by the reservation (3.4 s of refill), or by the
    # 10 tokens used (17 ms) plus the call's own time.
    if refunded:
        assert tat < 1.0
    else:
        assert tat >= held * step * 0.999


def test_the_shared_cells_restart_empty_after_a_pause() -> None:
    from corral.middleware._gcra import Cell, GcraPolicy, GcraState

    policy = GcraPolicy(Cell(0.1, 5.0), Cell(0.001, 1_000.0), max_pause=60.0)
    state = policy.pause(GcraState(), 100.0, 10.0)  # credit for a full burst before the pause
    _, first = policy.reserve(state, 110.0, 50)
    # one request's interval after the pause's end
    assert isinstance(first, Delay) and first.until == pytest.approx(110.1)
