"""Route each call to one of several deployments; fail over, cool down, retry across them.

Theory of operation. A deployment is one OpenAI-compatible endpoint: a base URL, one or more
keys (named by environment variable), a model mapping (the name callers use -> the name the
deployment knows), its own ``CircuitBreaker``, ``ConcurrencyLimit`` and ``RateLimit``, and its
prices. Each key of a deployment is a *lane*; a pool of keys has one quota per key, or one for
the whole account (``shared_quota``). The router is the retry loop of a routed call: it
replaces ``Retry`` (the deadline and one shared ``RetryBudget`` span every deployment), and
each attempt may go to another lane.

Choosing (``RoutePolicy.choose``, pure): the lanes that serve the model and are not ruled out
for this call; of those, the ready ones (not cooling down, circuit not open); of those, the
ones whose quota would let the call go within ``max_wait`` seconds (all of them if none).
Then by strategy: ``priority`` (lowest ``priority`` first; the one with the most free quota
among equals, keys in turn), ``weighted`` (at random, in proportion to ``weight``), or
``least_loaded`` (most free quota and concurrency in tenths, then the lowest recent latency).
When no lane is ready the call waits for the first to come back, never past its deadline.

After a failed attempt (``RoutePolicy.after_failure``): connect errors, timeouts, 5xx, an
open circuit and 429s asking for more than ``max_wait`` seconds fail over at once to another
lane (the failed one is ruled out for this call; for a 429 only its lane, else its whole
deployment). A context-length error fails over only to a deployment with a larger window for
the model. Anything else that would fail anywhere (400, 401, 404...) is final. The other
retryable failures (a short 429, 408, 409, a malformed body), and failovers once every lane
was tried, wait a backoff (``RetryPolicy``) and start over. Every attempt counts against
``max_attempts``; every backoff spends from the one retry budget all deployments share. A
failover does not: it moves a call off a failing deployment instead of adding load to it, so
a deployment dying under many calls in flight sends all of them elsewhere at once.

Cooldown (``CooldownPolicy``, pure): a deployment failing over ``allowed_fails + 1`` times in a
row (a lane, for 429s: at once, for as long as the 429 asked) takes no calls for ``cooldown``
seconds; then one probe call goes, whose success ends the cooldown and whose failure starts
another.

Below the cache: the router rewrites the URL, the key and the model of the request it is
given, so a cache above it keys entries by what the caller asked, not by who answered.
Events: ``RouteChosen``, ``FailedOver``, ``CooledDown``, ``RouteWaited``, ``RetryScheduled``,
``GaveUp``.
"""

from __future__ import annotations

import enum
import functools
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import anyio
import attrs

from corral._clock import current_time
from corral.core import _jsonlib as jsonlib
from corral.core._call import Call
from corral.core._compose import Handler
from corral.core._errors import (
    APIError,
    CircuitOpen,
    ContextLengthExceeded,
    CorralError,
    InvalidInput,
    MalformedResponse,
    RateLimitError,
    ServerError,
    TransportError,
)
from corral.core._events import (
    CooledDown,
    FailedOver,
    GaveUp,
    RetryScheduled,
    RouteChosen,
    RouteWaited,
)
from corral.core._models import Request, Response
from corral.core._tokens import CONTEXT_WINDOWS, EstimatingCounter
from corral.middleware._breaker import BreakerConfig, CircuitBreaker, State
from corral.middleware._budget import Budget
from corral.middleware._checks import at_least, finite, never, optional
from corral.middleware._concurrency import ConcurrencyLimit
from corral.middleware._metrics import Price
from corral.middleware._prices import DEFAULT_PRICE_TABLE, PriceTable
from corral.middleware._ratelimit import RateLimit, RateLimitPolicy, call_tokens
from corral.middleware._retry import GiveUp as RetryGiveUp
from corral.middleware._retry import RetryAfter, RetryBudget, RetryPolicy, _malformed

__all__ = [
    "ROUTER_BASE_URL",
    "STRATEGIES",
    "CoolDown",
    "CooldownPolicy",
    "Deployment",
    "FailOver",
    "GiveUp",
    "Health",
    "LaneView",
    "NoDeployment",
    "NoLane",
    "RetryLater",
    "RoutePolicy",
    "Router",
    "RouterConfig",
    "Send",
    "Unchanged",
    "WaitUntil",
]

#: The base URL a routed client builds its requests on; the router swaps it for a
#: deployment's. ``.invalid`` (RFC 2606) never resolves, so a request that misses the router
#: fails at once instead of reaching some host.
ROUTER_BASE_URL = "http://router.corral.invalid/v1"

STRATEGIES = ("priority", "weighted", "least_loaded")
Strategy = Literal["priority", "weighted", "least_loaded"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class NoDeployment(CorralError):
    """No deployment serves the call's model, or none could take it before its deadline."""

    kind = "no_deployment"


# -- configuration ------------------------------------------------------------------------------


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _env_names(instance: Deployment, attribute: Any, value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(v, str) and _ENV_NAME.match(v) for v in value):
        raise InvalidInput(
            f"Deployment {instance.name!r}: api_key_env must name one or more environment "
            f"variables (letters, digits, _), got {value!r}"
        )


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class Deployment:
    """One OpenAI-compatible endpoint the router may send calls to.

    Keys are named by environment variable only (``api_key_env``: one name, or several for a
    key pool); they are read when the ``Router`` is built and never kept in this value.
    """

    name: str
    base_url: str
    api_key_env: tuple[str, ...] = attrs.field(converter=_names, validator=_env_names)
    #: The model names callers use -> the names this deployment knows. Empty: it serves any
    #: model under the name the caller gave.
    models: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    rpm: int | None = attrs.field(default=None, validator=optional(at_least(1)))
    tpm: int | None = attrs.field(default=None, validator=optional(at_least(1)))
    concurrency: int = attrs.field(default=64, validator=at_least(1))
    #: Lower goes first (strategy ``priority``).
    priority: int = attrs.field(default=0, validator=at_least(-(2**31)))
    #: Share of calls (strategy ``weighted``).
    weight: float = attrs.field(default=1.0, validator=finite(open_below=True))
    #: One quota for all the keys of the pool (the provider limits the account, not the key).
    shared_quota: bool = False
    #: Tokens the deployment's models accept (default: known windows by model name).
    context_window: int | None = attrs.field(default=None, validator=optional(at_least(1)))
    #: This deployment's prices (default: OpenAI's list, by the deployment's model name).
    prices: PriceTable = DEFAULT_PRICE_TABLE
    breaker: BreakerConfig = attrs.field(factory=BreakerConfig)
    #: Where it was configured (``file:line``), for messages.
    where: str | None = None

    def serves(self, model: str | None) -> bool:
        """Does it take calls for ``model`` (its mapping names it, or it has none)?"""
        return not self.models or model in self.models

    def model_for(self, model: str | None) -> str | None:
        """The name this deployment knows the caller's ``model`` by."""
        return self.models.get(model, model) if model is not None else None

    def price_for(self, model: str | None) -> Price | None:
        """Its price for the caller's ``model`` (by its own name for it first), or None."""
        return self.prices.get(self.model_for(model)) or self.prices.get(model)

    def window_for(self, model: str | None) -> int | None:
        """The context window it gives ``model`` (configured, else known by name), or None."""
        if self.context_window is not None:
            return self.context_window
        return CONTEXT_WINDOWS.get(self.model_for(model) or "")


def _strategy(instance: Any, attribute: Any, value: object) -> None:
    if value not in STRATEGIES:
        raise InvalidInput(
            f"RouterConfig.strategy must be one of {', '.join(STRATEGIES)}, got {value!r}"
        )


@attrs.frozen(kw_only=True)
class RouterConfig:
    """How the router chooses and when it moves on; validated when built."""

    strategy: Strategy = attrs.field(default="priority", validator=_strategy)
    #: Seconds a failing deployment (or a 429'd lane, at least) takes no calls.
    cooldown: float = attrs.field(default=5.0, validator=finite())
    #: Failovers in a row a deployment may cause before it cools down.
    allowed_fails: int = attrs.field(default=2, validator=at_least(0))
    #: A 429 asking for longer than this fails over; a lane whose quota would make the call
    #: wait longer is passed over for one that can send sooner.
    max_wait: float = attrs.field(default=1.0, validator=finite())
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)


# -- choosing (pure) ----------------------------------------------------------------------------


@attrs.frozen
class LaneView:
    """What the choice needs to know of one lane, read at ``now``."""

    priority: int = 0
    weight: float = 1.0
    #: When it can take a call (cooldown end, circuit probe); -inf: now.
    ready_at: float = -math.inf
    #: Seconds its rate limit would make this call wait.
    quota_wait: float = 0.0
    #: Share (0-1) of its quota and concurrency free now.
    free: float = 1.0
    #: Recent latency of its successful attempts (seconds; 0 unknown).
    latency: float = 0.0
    #: Ruled out for this call (failed it, or its window is too small).
    excluded: bool = False


@attrs.frozen
class Send:
    """Send the attempt through lane ``index``."""

    index: int


@attrs.frozen
class WaitUntil:
    """No lane is ready; the first comes back at ``until``."""

    until: float


@attrs.frozen
class NoLane:
    """Every lane is ruled out for this call."""


@attrs.frozen
class FailOver:
    """Move to another lane at once; ``reason``: unavailable, rate_limited, context_window."""

    reason: str
    #: Rule out the failed lane's whole deployment (an endpoint fault), or only the lane.
    whole_deployment: bool
    #: Only deployments with a larger window may take it (context length), else 0.
    min_window: int = 0


@attrs.frozen
class RetryLater:
    """Wait ``delay`` seconds, then choose again among every lane."""

    delay: float


@attrs.frozen
class GiveUp:
    """No more attempts: ``reason`` as ``RetryPolicy``'s, or ``no_larger_window``."""

    reason: str


@attrs.frozen
class CoolDown:
    """The lane (``whole_deployment``: every lane of it) cools down until ``until``."""

    until: float
    failures: int


@attrs.frozen
class Unchanged:
    """Its health stays."""


_UNCHANGED = Unchanged()
FailureDecision = FailOver | RetryLater | GiveUp


@attrs.frozen
class RoutePolicy:
    """Which lane takes an attempt, and what a failure leads to. Pure."""

    config: RouterConfig = attrs.field(factory=RouterConfig)

    def choose(
        self, now: float, lanes: Sequence[LaneView], roll: float, turn: int
    ) -> Send | WaitUntil | NoLane:
        """``roll`` in [0, 1) draws a weighted choice; ``turn`` rotates ties among equals."""
        open_ = [i for i, lane in enumerate(lanes) if not lane.excluded]
        if not open_:
            return NoLane()
        ready = [i for i in open_ if lanes[i].ready_at <= now]
        if not ready:
            return WaitUntil(min(lanes[i].ready_at for i in open_))
        quick = [i for i in ready if lanes[i].quota_wait <= self.config.max_wait] or ready
        n = len(lanes)
        strategy = self.config.strategy
        if strategy == "weighted":
            total = sum(lanes[i].weight for i in quick)
            point = roll * total
            for i in quick:
                point -= lanes[i].weight
                if point < 0:
                    return Send(i)
            return Send(quick[-1])
        if strategy == "priority":
            return Send(
                min(
                    quick,
                    key=lambda i: (
                        lanes[i].priority,
                        lanes[i].quota_wait,
                        -round(lanes[i].free, 1),
                        (i - turn) % n,
                    ),
                )
            )
        return Send(
            min(
                quick,
                key=lambda i: (
                    lanes[i].quota_wait,
                    -round(lanes[i].free, 1),
                    lanes[i].latency,
                    (i - turn) % n,
                ),
            )
        )

    def failover_reason(self, error: CorralError) -> str | None:
        """Why ``error`` moves the call to another lane at once, or None when it does not."""
        if isinstance(error, TransportError | ServerError | CircuitOpen):
            return "unavailable"
        if isinstance(error, RateLimitError):
            wait = error.retry_after
            return "rate_limited" if wait is not None and wait > self.config.max_wait else None
        return None

    def after_failure(
        self,
        attempt: int,
        error: CorralError,
        now: float,
        deadline: float | None,
        jitter: float,
        budget: RetryBudget | None,
        others: bool,
        window: int | None,
        larger_window: bool,
    ) -> FailureDecision:
        """What follows failed attempt ``attempt`` (1 first) at ``now``.

        ``others``: another lane not yet ruled out serves the call; ``window``: the failed
        lane's context window; ``larger_window``: some lane has a larger one.
        """
        retry = self.config.retry
        if isinstance(error, ContextLengthExceeded):
            if not larger_window:
                return GiveUp("no_larger_window")
            return self._attempts_left(attempt) or FailOver(
                "context_window", False, (window or 0) + 1
            )
        reason = self.failover_reason(error)
        if reason is not None and others:
            return self._attempts_left(attempt) or FailOver(reason, reason != "rate_limited")
        if isinstance(error, CircuitOpen):
            # Every lane is out: choose again, which waits for the first circuit to probe.
            if budget is not None and not budget.withdraw():
                return GiveUp("budget")
            return self._attempts_left(attempt) or RetryLater(0.0)
        if reason is not None and not retry.retryable(error):
            # Fails over (a wrong scheme at one endpoint), but is not worth waiting for.
            return GiveUp("not_retryable")
        match retry.decide(attempt, error, now, deadline, jitter, budget):
            case RetryAfter(delay=delay):
                return RetryLater(delay)
            case RetryGiveUp(reason=why):
                return GiveUp(why)
            case other:
                never(other)

    def _attempts_left(self, attempt: int) -> GiveUp | None:
        if attempt >= self.config.retry.max_attempts:
            return GiveUp("attempts")
        return None


class Phase(enum.Enum):
    OK = "ok"
    COOLING = "cooling"
    PROBING = "probing"


@attrs.define
class Health:
    """A deployment's (or a lane's) failover record: mutable, changed by ``CooldownPolicy``."""

    phase: Phase = Phase.OK
    failures: int = 0
    until: float = -math.inf


@attrs.frozen
class CooldownPolicy:
    """When a deployment or lane stops taking calls, and how it comes back. Pure."""

    cooldown: float = 5.0
    allowed_fails: int = 2

    def ready_at(self, health: Health, now: float) -> float:
        """When it may take a call: -inf now, the cooldown's end, or a while after a probe."""
        if health.phase is Phase.OK:
            return -math.inf
        if health.phase is Phase.COOLING:
            return health.until if now < health.until else -math.inf
        return now + self.cooldown  # a probe is out: the others wait for its answer

    def sent(self, health: Health, now: float) -> None:
        """A call went to it: after a cooldown, that call is the one probe."""
        if health.phase is Phase.COOLING and now >= health.until:
            health.phase = Phase.PROBING

    def succeeded(self, health: Health) -> None:
        """It answered: any cooldown is over and the count of failures starts again."""
        health.phase, health.failures, health.until = Phase.OK, 0, -math.inf

    def abandoned(self, health: Health) -> None:
        """A call to it ended with no answer (cancelled): a probe may go again."""
        if health.phase is Phase.PROBING:
            health.phase = Phase.COOLING

    def failed(self, health: Health, now: float, pause: float | None) -> CoolDown | Unchanged:
        """A call to it failed over; ``pause``: the seconds a 429 asked for (cools at once)."""
        health.failures += 1
        probing = health.phase is Phase.PROBING
        if pause is None and not probing and health.failures <= self.allowed_fails:
            return _UNCHANGED
        if health.phase is Phase.COOLING and now < health.until and pause is None:
            return _UNCHANGED  # already cooling (calls sent before it started)
        until = now + max(self.cooldown if pause is None else 0.0, pause or 0.0)
        health.phase, health.until = Phase.COOLING, max(health.until, until)
        return CoolDown(health.until, health.failures)


# -- shell --------------------------------------------------------------------------------------


def _read_key(deployment: Deployment, env: str) -> str:
    key = (os.environ.get(env) or "").strip()
    if not key:
        where = f" ({deployment.where})" if deployment.where else ""
        raise InvalidInput(
            f"deployment {deployment.name!r}{where}: the environment variable {env} holding its "
            f"key is not set; e.g. `export {env}=sk-...`"
        )
    return key


@attrs.define(eq=False, repr=False)
class _Lane:
    """One key of one deployment, with the layers it shares with its deployment."""

    deployment: Deployment
    name: str
    key: str
    ratelimit: RateLimit | None
    #: The rate limit's key for this lane (the deployment's name when the quota is shared).
    quota_key: str
    breaker: CircuitBreaker
    concurrency: ConcurrencyLimit
    endpoint: Health
    health: Health = attrs.field(factory=Health)
    latency: float = 0.0

    def __repr__(self) -> str:
        return f"_Lane({self.name})"


def _lanes(deployment: Deployment, max_pause: float) -> list[_Lane]:
    d = deployment
    breaker = CircuitBreaker(
        window=d.breaker.window,
        min_calls=d.breaker.min_calls,
        threshold=d.breaker.threshold,
        cooldown=d.breaker.cooldown,
        probes=d.breaker.probes,
        key=lambda request: d.name,
    )
    concurrency = ConcurrencyLimit(d.concurrency)
    endpoint = Health()

    def limiter(name: str) -> RateLimit | None:
        if d.rpm is None and d.tpm is None:
            return None
        return RateLimit(rpm=d.rpm, tpm=d.tpm, max_pause=max_pause, key=lambda request: name)

    shared = limiter(d.name) if d.shared_quota else None
    lanes = []
    for i, env in enumerate(d.api_key_env):
        name = d.name if len(d.api_key_env) == 1 else f"{d.name}#{i}"
        quota = shared if d.shared_quota else limiter(name)
        quota_key = d.name if d.shared_quota else name
        key = _read_key(d, env)
        lanes.append(_Lane(d, name, key, quota, quota_key, breaker, concurrency, endpoint))
    return lanes


def _quota(policy: RateLimitPolicy, now: float, tokens: int) -> tuple[float, float]:
    """(seconds this call would wait, share left) of one key's buckets, taking nothing."""
    until, free = policy.paused_until, 1.0
    for buckets, amount in ((policy.requests, 1), (policy.tokens, tokens)):
        for bucket in buckets:
            bucket.refill(now)
            until = max(until, now + bucket.wait(amount))
            free = min(free, max(0.0, bucket.level) / bucket.capacity)
    return max(0.0, until - now), free


@attrs.define
class _Attempts:
    """One call's progress through the lanes."""

    excluded: set[int] = attrs.field(factory=set)
    min_window: int = 0
    attempt: int = 0
    reason: str | None = None
    response: Response | None = None
    error: CorralError | None = None
    #: The call's body was rewritten for a deployment (its model name).
    rewrote: bool = False


class Router:
    """Middleware: send each call to one of several deployments, failing over between them.

    Put it innermost (it ends in the transport): it replaces ``Retry``, ``CircuitBreaker``,
    ``RateLimit`` and ``ConcurrencyLimit``, which each deployment has of its own. Calls must
    be built on ``base_url`` (``Client(deployments=...)`` does that); the router swaps it,
    the key and the model name for the chosen deployment's.

    Args:
        deployments: where calls may go (``corral.load_router`` reads them from a TOML file).
        strategy: ``"priority"``, ``"weighted"`` or ``"least_loaded"``.
        cooldown, allowed_fails, max_wait: see ``RouterConfig``.
        max_attempts, backoff_base, backoff_cap, max_retry_after, budget_ratio,
            budget_reserve, budget_cap: the retry policy (``RetryPolicy``), across deployments.
        budget: a spend cap, held in every deployment's stack at that deployment's prices.
        max_pause: the longest a 429 may pause a deployment's quota.
        seed: seeds the jitter and the weighted draw.

    Raises ``InvalidInput`` for a bad value or a key variable that is not set.
    """

    def __init__(
        self,
        deployments: Sequence[Deployment],
        *,
        strategy: Strategy = "priority",
        cooldown: float = 5.0,
        allowed_fails: int = 2,
        max_wait: float = 1.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_retry_after: float = 120.0,
        budget_ratio: float = 0.2,
        budget_reserve: float = 10.0,
        budget_cap: float = 100.0,
        budget: Budget | None = None,
        max_pause: float = 60.0,
        base_url: str = ROUTER_BASE_URL,
        seed: int | None = None,
    ) -> None:
        if not deployments:
            raise InvalidInput("Router needs at least one deployment")
        names = [d.name for d in deployments]
        if len(set(names)) != len(names):
            raise InvalidInput(f"Router: deployment names must differ, got {names}")
        retry = RetryPolicy(
            max_attempts=max_attempts,
            base=backoff_base,
            cap=backoff_cap,
            max_retry_after=max_retry_after,
            budget_ratio=budget_ratio,
            budget_reserve=budget_reserve,
            budget_cap=budget_cap,
        )
        self.config = RouterConfig(
            strategy=strategy,
            cooldown=cooldown,
            allowed_fails=allowed_fails,
            max_wait=max_wait,
            retry=retry,
        )
        self.policy = RoutePolicy(self.config)
        self.cooling = CooldownPolicy(cooldown, allowed_fails)
        self.deployments = tuple(deployments)
        self.budget = budget
        self.retry_budget = RetryBudget(budget_ratio, budget_reserve, budget_cap)
        self.base_url = base_url.rstrip("/")
        self._lanes = [lane for d in deployments for lane in _lanes(d, max_pause)]
        self._by_model: dict[str | None, list[_Lane]] = {}
        self._random = random.Random(seed)
        self._turn = 0
        self._counter = EstimatingCounter()
        #: Attempts per deployment name, and failovers (for summaries and tests).
        self.sent: dict[str, int] = {d.name: 0 for d in deployments}
        self.failovers = 0

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every key the router sends, for scrubbing provider text."""
        return tuple(sorted({lane.key for lane in self._lanes}))

    @property
    def waited(self) -> float:
        """Seconds calls spent waiting for the deployments' quotas."""
        limits = {id(ln.ratelimit): ln.ratelimit for ln in self._lanes if ln.ratelimit}
        return sum(limit.waited for limit in limits.values())

    async def aclose(self) -> None:
        """Close the budget's Redis client, if it made one."""
        if self.budget is not None:
            await self.budget.aclose()

    def lanes_for(self, model: str | None) -> list[_Lane]:
        """The lanes (a deployment's keys) that serve ``model``, in configuration order."""
        lanes = self._by_model.get(model)
        if lanes is None:
            lanes = self._by_model[model] = [
                ln for ln in self._lanes if ln.deployment.serves(model)
            ]
        return lanes

    def _view(
        self, lane: _Lane, now: float, tokens: int, state: _Attempts, index: int, model: str | None
    ) -> LaneView:
        d = lane.deployment
        ready = max(
            self.cooling.ready_at(lane.endpoint, now), self.cooling.ready_at(lane.health, now)
        )
        breaker = lane.breaker.policies.get(d.name)
        if breaker is not None and breaker.state is State.OPEN:
            ready = max(ready, breaker.opened_at + breaker.config.cooldown)
        wait, free = 0.0, 1.0
        if lane.ratelimit is not None:
            wait, free = _quota(lane.ratelimit.policy(lane.quota_key), now, tokens)
        slots = lane.concurrency
        free = min(free, max(0.0, 1.0 - slots.in_flight / slots.limit))
        window = d.window_for(model)
        excluded = index in state.excluded or (
            state.min_window > 0 and (window is None or window < state.min_window)
        )
        return LaneView(d.priority, d.weight, ready, wait, free, lane.latency, excluded)

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Send the call through the chosen deployment's stack; fail over, wait, retry."""
        options = request.options
        call = options.call
        model = options.model
        lanes = self.lanes_for(model)
        if not lanes:
            served = sorted({m for d in self.deployments for m in d.models})
            raise NoDeployment(f"no deployment serves model {model!r} (they serve {served})")
        if not request.url.startswith(self.base_url):
            raise InvalidInput(f"Router: {request.url} is not under its base URL {self.base_url}")
        tokens = call_tokens(request, self._counter)
        body, parsed = request.body, call.json(request.body)
        self.retry_budget.deposit()
        state = _Attempts()
        try:
            while True:
                lane_index = await self._choose(call, lanes, tokens, state, model, options.deadline)
                if lane_index is None:
                    return self._give_up(state)
                lane = lanes[lane_index]
                outcome = await self._attempt(
                    request, parsed, lane, state, model, tokens, call_next
                )
                if outcome is not None:
                    return outcome
                if not await self._next_step(
                    call, lanes, lane, lane_index, state, model, options.deadline
                ):
                    return self._give_up(state)
        finally:
            if state.rewrote:
                call.replace_json(parsed, body)
                call.tokens = tokens

    async def _choose(
        self,
        call: Call,
        lanes: list[_Lane],
        tokens: int,
        state: _Attempts,
        model: str | None,
        deadline: float | None,
    ) -> int | None:
        waited_since: float | None = None
        while True:
            now = current_time()
            views = [self._view(ln, now, tokens, state, i, model) for i, ln in enumerate(lanes)]
            self._turn += 1
            match self.policy.choose(now, views, self._random.random(), self._turn):
                case Send(index=index):
                    if waited_since is not None:
                        call.emit(RouteWaited, now, waited=now - waited_since)
                    return index
                case WaitUntil(until=until):
                    if deadline is not None and until >= deadline:
                        return None
                    waited_since = now if waited_since is None else waited_since
                    await anyio.sleep_until(until)
                case NoLane():
                    return None
                case other:
                    never(other)

    async def _attempt(
        self,
        request: Request,
        parsed: Any,
        lane: _Lane,
        state: _Attempts,
        model: str | None,
        tokens: int,
        call_next: Handler,
    ) -> Response | None:
        """One attempt through ``lane``: its response on success, None after a failure."""
        d = lane.deployment
        call = request.options.call
        state.attempt += 1
        call.attempt = state.attempt
        now = current_time()
        call.emit(
            RouteChosen,
            now,
            deployment=d.name,
            lane=lane.name,
            reason=state.reason or self.config.strategy,
        )
        self.sent[d.name] += 1
        self.cooling.sent(lane.endpoint, now)
        self.cooling.sent(lane.health, now)
        routed = self._rewrite(request, parsed, lane, model, tokens, state)
        handler = self._stack(lane, model, call_next)
        state.response = None
        try:
            response = await handler(routed)
        except (TransportError, MalformedResponse, CircuitOpen) as exc:
            state.error = exc
            return None
        except BaseException:
            self.cooling.abandoned(lane.endpoint)
            self.cooling.abandoned(lane.health)
            raise
        if response.status >= 400 and response.stream is not None:
            response = await response.aread()
        error = response.error() or _malformed(response)
        if error is None:
            self.cooling.succeeded(lane.endpoint)
            self.cooling.succeeded(lane.health)
            sample = current_time() - now
            lane.latency = sample if lane.latency == 0 else 0.8 * lane.latency + 0.2 * sample
            return response
        state.response, state.error = response, error
        return None

    def _stack(self, lane: _Lane, model: str | None, call_next: Handler) -> Handler:
        """The lane's own layers around ``call_next``: breaker, quota, slots, budget."""
        handler = call_next
        if self.budget is not None:
            price = lane.deployment.price_for(model)
            if price is None:
                raise InvalidInput(
                    f"deployment {lane.deployment.name!r} has no price for model {model!r}: add "
                    "[deployment.prices] so the budget can hold its cost"
                )
            handler = functools.partial(self.budget.guard, call_next=handler, price=price)
        handler = functools.partial(lane.concurrency, call_next=handler)
        if lane.ratelimit is not None:
            handler = functools.partial(lane.ratelimit, call_next=handler)
        return functools.partial(lane.breaker, call_next=handler)

    def _rewrite(
        self,
        request: Request,
        parsed: Any,
        lane: _Lane,
        model: str | None,
        tokens: int,
        state: _Attempts,
    ) -> Request:
        """The request as ``lane`` takes it: its URL, its key, its name for the model."""
        d = lane.deployment
        url = d.base_url.rstrip("/") + request.url[len(self.base_url) :]
        headers = request.headers.with_("authorization", f"Bearer {lane.key}")
        body = request.body
        target = d.model_for(model)
        call = request.options.call
        if target != model and isinstance(parsed, dict):
            renamed = {**parsed, "model": target}
            body = jsonlib.dumps(renamed)
            call.replace_json(renamed, body)
            call.tokens = tokens
            state.rewrote = True
        elif state.rewrote:
            call.replace_json(parsed, body)
            call.tokens = tokens
            state.rewrote = False
        return Request(request.method, url, headers, body, request.options)

    async def _next_step(
        self,
        call: Call,
        lanes: list[_Lane],
        lane: _Lane,
        index: int,
        state: _Attempts,
        model: str | None,
        deadline: float | None,
    ) -> bool:
        """After a failed attempt: fail over, wait and start over, or give up (False)."""
        error = state.error
        assert error is not None
        now = current_time()
        reason = self.policy.failover_reason(error)
        if reason is None:
            self.cooling.succeeded(lane.endpoint)  # it answered: no endpoint trouble
        else:
            self._cool(call, lane, error, reason, now)
        whole = reason == "unavailable"
        ruled_out = {
            i
            for i, other in enumerate(lanes)
            if i == index or (whole and other.deployment is lane.deployment)
        } | state.excluded
        window = lane.deployment.window_for(model)
        larger = any(
            (w := other.deployment.window_for(model)) is not None and w > (window or 0)
            for other in lanes
        )
        others = any(i not in ruled_out for i in range(len(lanes)))
        decision = self.policy.after_failure(
            state.attempt,
            error,
            now,
            deadline,
            self._random.random(),
            self.retry_budget,
            others,
            window,
            larger,
        )
        match decision:
            case FailOver(reason=why, whole_deployment=whole_deployment, min_window=min_window):
                self.failovers += 1
                call.emit(
                    FailedOver, now, deployment=lane.deployment.name, kind=error.kind, reason=why
                )
                state.excluded |= ruled_out if whole_deployment else {index}
                state.min_window = max(state.min_window, min_window)
                state.reason = "failover"
                return True
            case RetryLater(delay=delay):
                hint = error.retry_after if isinstance(error, APIError) else None
                call.emit(RetryScheduled, now, kind=error.kind, delay=delay, retry_after=hint)
                await anyio.sleep(delay)
                state.excluded.clear()
                state.reason = None
                return True
            case GiveUp(reason=why):
                call.emit(GaveUp, now, kind=error.kind, reason=why)
                return False
            case other:
                never(other)

    def _cool(self, call: Call, lane: _Lane, error: CorralError, reason: str, now: float) -> None:
        pause = error.retry_after if isinstance(error, RateLimitError) else None
        shared = lane.deployment.shared_quota or len(lane.deployment.api_key_env) == 1
        health = lane.health if reason == "rate_limited" and not shared else lane.endpoint
        match self.cooling.failed(health, now, pause):
            case CoolDown(until=until, failures=failures):
                call.emit(
                    CooledDown,
                    now,
                    deployment=lane.deployment.name,
                    lane=lane.name if health is lane.health else lane.deployment.name,
                    kind=error.kind,
                    failures=failures,
                    until=until,
                )
            case Unchanged():
                pass
            case other:
                never(other)

    @staticmethod
    def _give_up(state: _Attempts) -> Response:
        if state.response is not None:
            return state.response
        if state.error is not None:
            raise state.error
        raise NoDeployment("no deployment could take the call before its deadline")
