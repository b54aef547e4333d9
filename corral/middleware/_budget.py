"""A hard spend cap: hold each attempt's most before it is sent, settle with what it cost.

Theory of operation. A ledger holds integers in nano-dollars (1e-9 USD, so sums are exact):
``spent`` (settled costs), ``reserved`` (holds of attempts on their way) and the ``cap``. Just
before an attempt goes on the wire it asks for a hold of its worst case: the prompt estimate
(plus ``margin``) at the input price and its maximum output (``max_tokens`` times ``n``) at the
output price (each at the dearer of the plain and the cached or reasoning rate). The hold is
granted only when ``spent + reserved + hold <= cap``. When the attempt ends its hold becomes its
real cost, from the usage the provider reported (cached prompt tokens and reasoning tokens at
their own rates): ``reserved -= hold; spent += cost``. An error status costs nothing (providers
do not bill them); an attempt whose fate is unknown (the connection died after the request was
sent, a cancellation, a 200 without usage) is charged its whole hold.

Invariant: ``spent + reserved <= cap`` at every moment, however many calls and processes run at
once, as long as no cost exceeds its hold. A cost can exceed it only when the prompt estimate
was low (a tokenizer the estimator does not know, or no ``max_tokens``, whose default of 1024
is a guess): it is charged in full all the same and counted as ``overrun``.

A hold that does not fit while other holds are out waits for them to settle (they usually free
most of what they hold); when nothing else is held and it still does not fit, the cap is
reached: the call fails with ``BudgetExceeded`` and is not sent.

Policy: ``BudgetPolicy`` (pure, integers in and out). Ledgers: in-process, or one Redis hash
for many processes, changed only by the Lua scripts ``RESERVE`` and ``SETTLE``, which run the
same algorithm atomically (tests/test_budget.py holds them to agree with the policy). A Redis
that does not answer fails the call closed (``BudgetUnavailable``): a cap that cannot be
checked is not a cap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, cast

import anyio
import attrs

from corral._clock import current_time
from corral.core._call import Call
from corral.core._compose import Handler
from corral.core._errors import CorralError, InvalidInput, MalformedResponse, TransportError
from corral.core._events import BudgetRefused, BudgetReserved, BudgetSettled
from corral.core._models import ByteStream, Request, Response
from corral.core._tokens import (
    EstimatingCounter,
    TokenCounter,
    count_messages,
    estimate_request_tokens,
    max_output_tokens,
)
from corral.core._wire import StreamParse, Usage, response_usage, shared_parse
from corral.middleware._checks import at_least, finite, never
from corral.middleware._metrics import Price
from corral.middleware._prices import (
    DEFAULT_PRICE_TABLE,
    NANO,
    PriceTable,
    usage_nano,
    worst_case_nano,
)

__all__ = [
    "RESERVE",
    "SETTLE",
    "Budget",
    "BudgetConfig",
    "BudgetError",
    "BudgetExceeded",
    "BudgetPolicy",
    "BudgetUnavailable",
    "Held",
    "Ledger",
    "Short",
    "call_worst_case",
]

log = logging.getLogger("corral.budget")


class BudgetError(CorralError):
    """The spend cap stopped the call before it was sent."""

    kind = "budget_error"


class BudgetExceeded(BudgetError):
    """The call's worst case does not fit under the cap, and no hold is out that could free
    room: the cap is reached. Amounts in USD."""

    kind = "budget_exceeded"

    def __init__(self, message: str, *, needed: float, free: float, cap: float) -> None:
        super().__init__(message)
        self.needed, self.free, self.cap = needed, free, cap


class BudgetUnavailable(BudgetError):
    """The shared budget's Redis did not answer: the call is not sent (fail closed)."""

    kind = "budget_unavailable"


# -- policy -------------------------------------------------------------------------------------


@attrs.frozen
class Ledger:
    """A budget's state, in nano-dollars."""

    spent: int = 0
    reserved: int = 0
    #: Costs beyond their holds (a low prompt estimate), already counted in ``spent``.
    overrun: int = 0


@attrs.frozen
class Held:
    """The hold of ``amount`` is granted: send the call."""

    amount: int


@attrs.frozen
class Short:
    """Does not fit: ``free`` is left; ``others``: holds are out that may free more."""

    free: int
    others: bool


@attrs.frozen
class BudgetPolicy:
    """The ledger's algorithm: pure, integers (nano-dollars) in and out."""

    cap: int = attrs.field(validator=at_least(0))

    def reserve(self, state: Ledger, amount: int) -> tuple[Ledger, Held | Short]:
        """Hold ``amount`` if it fits under the cap with everything spent and held."""
        used = state.spent + state.reserved
        if used + amount > self.cap:
            return state, Short(max(0, self.cap - used), state.reserved > 0)
        return attrs.evolve(state, reserved=state.reserved + amount), Held(amount)

    def settle(self, state: Ledger, held: int, actual: int) -> Ledger:
        """A hold of ``held`` ends: ``actual`` is what the call cost."""
        return Ledger(
            state.spent + actual, state.reserved - held, state.overrun + max(0, actual - held)
        )


# KEYS: the budget's hash.  ARGV: cap, amount.  Answers {1, spent, reserved} (held),
# {0, spent, reserved} (short) or {-1, the cap stored, 0} (another process set another cap).
RESERVE = """
local cap = redis.call('HGET', KEYS[1], 'cap')
if not cap then
  redis.call('HSET', KEYS[1], 'cap', ARGV[1])
  cap = ARGV[1]
end
if cap ~= ARGV[1] then return {-1, tonumber(cap), 0} end
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
if spent + reserved + tonumber(ARGV[2]) > tonumber(cap) then return {0, spent, reserved} end
reserved = redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[2])
return {1, spent, reserved}
"""

# KEYS: the budget's hash.  ARGV: -held, actual, overrun (actual - held, or 0).
# Answers {spent, reserved}.  HINCRBY keeps every sum an exact 64-bit integer.
SETTLE = """
local reserved = redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[1])
local spent = redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[1], 'overrun', ARGV[3]) end
return {spent, reserved}
"""


def call_worst_case(request: Request, price: Price, counter: TokenCounter, margin: float) -> int:
    """The most this call can cost at ``price``, in nano-dollars, from its parsed body."""
    body = request.options.call.json(request.body)
    if not isinstance(body, dict):
        return 0  # no body (a GET): nothing is billed
    if "messages" in body:
        n = body.get("n", 1)
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        prompt = count_messages(body["messages"], counter)
        output = max_output_tokens(body) * choices
    else:
        prompt, output = estimate_request_tokens(body, counter), 0
    return worst_case_nano(price, math.ceil(prompt * (1 + margin)), output)


# -- ledgers ------------------------------------------------------------------------------------


class _Ledger(Protocol):
    async def reserve(self, amount: int) -> tuple[Held | Short, Ledger, int]: ...

    async def changed(self, version: int) -> None: ...

    async def settle(self, held: int, actual: int) -> Ledger: ...

    async def read(self) -> Ledger: ...

    async def aclose(self) -> None: ...


class _LocalLedger:
    """One process's ledger; a waiter wakes on the next settlement."""

    def __init__(self, policy: BudgetPolicy) -> None:
        self._policy, self.state = policy, Ledger()
        self._version = 0
        self._settled: anyio.Event | None = None

    async def reserve(self, amount: int) -> tuple[Held | Short, Ledger, int]:
        self.state, decision = self._policy.reserve(self.state, amount)
        return decision, self.state, self._version

    async def changed(self, version: int) -> None:
        if version == self._version:
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()

    async def settle(self, held: int, actual: int) -> Ledger:
        self.state = self._policy.settle(self.state, held, actual)
        self._version += 1
        if self._settled is not None:
            self._settled.set()
            self._settled = None
        return self.state

    async def read(self) -> Ledger:
        return self.state

    async def aclose(self) -> None:
        pass


class _RedisLedger:
    """Many processes' ledger: one Redis hash, changed only by ``RESERVE`` and ``SETTLE``."""

    def __init__(
        self, url: str, name: str, policy: BudgetPolicy, timeout: float, client: Any
    ) -> None:
        import redis

        from corral.stores.redis import redis_client

        self._errors = redis.RedisError
        self._owns_client = client is None
        self._client = client or redis_client(url, timeout)
        self._name, self._cap = name, policy.cap
        self._key = f"corral:budget:{name}"
        self._reserve = self._client.register_script(RESERVE)
        self._settle = self._client.register_script(SETTLE)
        self._settled: anyio.Event | None = None

    async def _run(self, command: Callable[[], object]) -> list[int]:
        from corral.stores.redis import run_blocking

        try:
            reply = await run_blocking(command)
        except self._errors as exc:
            raise BudgetUnavailable(
                f"the shared budget {self._name!r} cannot be checked: Redis did not answer "
                f"({type(exc).__name__}); nothing was sent"
            ) from None
        return [int(x) for x in cast(list[Any], reply)]

    async def reserve(self, amount: int) -> tuple[Held | Short, Ledger, int]:
        key, args = [self._key], [self._cap, amount]
        code, spent, reserved = await self._run(lambda: self._reserve(keys=key, args=args))
        if code == -1:
            raise InvalidInput(
                f"the shared budget {self._name!r} has a cap of ${spent / NANO:g} in Redis, not "
                f"${self._cap / NANO:g}: give this cap another budget name, or delete the key "
                f"{self._key} to start it again"
            )
        state = Ledger(spent, reserved)
        if code == 1:
            return Held(amount), state, 0
        return Short(max(0, self._cap - spent - reserved), reserved > 0), state, 0

    async def changed(self, version: int) -> None:
        """A settlement in this process, or a moment for another process's."""
        if self._settled is None:
            self._settled = anyio.Event()
        with anyio.move_on_after(0.02):
            await self._settled.wait()

    def _wake(self) -> None:
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    async def settle(self, held: int, actual: int) -> Ledger:
        args = [-held, actual, max(0, actual - held)]
        spent, reserved = await self._run(lambda: self._settle(keys=[self._key], args=args))
        self._wake()
        return Ledger(spent, reserved)

    async def read(self) -> Ledger:
        fields = await self._run(
            lambda: [
                int(v or 0) for v in self._client.hmget(self._key, ["spent", "reserved", "overrun"])
            ]
        )
        return Ledger(*fields)

    async def aclose(self) -> None:
        if self._owns_client:
            from corral.stores.redis import run_blocking

            await run_blocking(self._client.close)


# -- shell --------------------------------------------------------------------------------------


def _price_table(prices: Mapping[str, Price] | PriceTable | None) -> PriceTable:
    if prices is None:
        return DEFAULT_PRICE_TABLE
    if isinstance(prices, PriceTable):
        return prices
    return PriceTable(DEFAULT_PRICE_TABLE.as_of, prices)


@attrs.frozen
class BudgetConfig:
    """What ``Budget`` enforces; validated when built (``InvalidInput`` names the field)."""

    #: The cap, in US dollars.
    usd: float = attrs.field(validator=finite())
    #: Prices by model (the deployment's own, when a ``Router`` asks).
    prices: PriceTable = attrs.field(default=DEFAULT_PRICE_TABLE, converter=_price_table)
    #: Extra share of the prompt estimate held, for a tokenizer that counts more.
    margin: float = attrs.field(default=0.1, validator=finite())
    #: Wait for other holds to settle when a call does not fit yet (else fail at once).
    wait: bool = True
    #: Processes using the same Redis and ``name`` share one budget.
    name: str = "default"

    @property
    def cap(self) -> int:
        """The cap in nano-dollars."""
        return round(self.usd * NANO)


class Budget:
    """Middleware: a hard cap on what calls cost, in US dollars, held before each attempt.

    Put it innermost (right before the transport; a ``Router`` puts it in every deployment's
    stack, priced at that deployment's prices), so a hold is out only while its attempt is on
    the wire.

    Args:
        usd: the cap, in US dollars.
        prices: USD per million tokens by model (a ``PriceTable`` or a mapping); a model it
            does not price is refused (``InvalidInput``), never counted as free.
        margin: extra share of the prompt estimate held (0.1: 10%).
        wait: a call that does not fit waits while other holds are out (they may free room);
            with False it fails at once.
        redis: share one budget among processes through this Redis (the ``redis`` extra).
        name: which shared budget (processes with the same Redis and name share it).
        timeout: seconds a Redis command may take before the budget counts as unavailable.
        client: a ``redis.Redis`` to use as it is (not closed by ``aclose``).
        counter: counts prompt tokens for the estimate.

    Raises ``BudgetExceeded`` when the cap is reached (the call is not sent) and
    ``BudgetUnavailable`` when the shared ledger cannot be read.
    """

    def __init__(
        self,
        usd: float,
        *,
        prices: Mapping[str, Price] | PriceTable | None = None,
        margin: float = 0.1,
        wait: bool = True,
        redis: str | None = None,
        name: str = "default",
        timeout: float = 0.5,
        client: Any = None,
        counter: TokenCounter | None = None,
    ) -> None:
        self.config = BudgetConfig(usd=usd, prices=prices, margin=margin, wait=wait, name=name)
        self.policy = BudgetPolicy(self.config.cap)
        self._ledger: _Ledger = (
            _LocalLedger(self.policy)
            if redis is None and client is None
            else _RedisLedger(redis or "", name, self.policy, timeout, client)
        )
        self._counter = counter or EstimatingCounter()
        #: The ledger as this process last saw it (spent and held across every process).
        self.last = Ledger()
        #: Set once a call was refused because the cap was reached.
        self.exhausted = False
        self._queue: anyio.Lock | None = None

    @property
    def cap_usd(self) -> float:
        """The cap in US dollars (as the ledger holds it: whole nano-dollars)."""
        return self.config.cap / NANO

    async def status(self) -> Ledger:
        """The ledger now (read from Redis for a shared budget)."""
        self.last = await self._ledger.read()
        return self.last

    async def aclose(self) -> None:
        """Close the Redis client this budget made (not one it was given)."""
        await self._ledger.aclose()

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Hold the call's worst case at its model's price, send it, settle with its usage."""
        model = request.options.model
        price = self.config.prices.get(model)
        if price is None:
            raise InvalidInput(
                f"Budget: no price for model {model!r} (prices as of "
                f"{self.config.prices.as_of}); add it to prices=... so the cap can hold"
            )
        return await self.guard(request, call_next, price)

    async def guard(self, request: Request, call_next: Handler, price: Price) -> Response:
        """Like calling the budget, at ``price`` (a router passes its deployment's)."""
        call = request.options.call
        amount = call_worst_case(request, price, self._counter, self.config.margin)
        await self._reserve(call, amount)
        mark = call.stream
        try:
            response = await call_next(request)
        except TransportError as exc:
            await self._settle(call, amount, amount if exc.request_sent else 0)
            raise
        except MalformedResponse:
            await self._settle(call, amount, amount)  # it answered: perhaps billed
            raise
        except CorralError:
            await self._settle(call, amount, 0)  # refused before the wire (a breaker, quota)
            raise
        except BaseException:
            await self._settle(call, amount, amount)  # cancelled: it may have been billed
            raise
        if response.status >= 400:
            await self._settle(call, amount, 0)
            return response
        if response.stream is None:
            usage = response_usage(response)
            await self._settle(call, amount, amount if usage is None else usage_nano(price, usage))
            return response
        stream, parse = shared_parse(call, response.stream, mark)
        settle = _StreamSettlement(self, call, amount, price, parse)
        return attrs.evolve(response, stream=_SettlingStream(stream, settle))

    def _waits(self, decision: Held | Short) -> bool:
        return (
            isinstance(decision, Short)
            and decision.others
            and self.config.wait
            and not self.exhausted
        )

    async def _reserve(self, call: Call, amount: int) -> None:
        decision, state, version = await self._ledger.reserve(amount)
        if self._waits(decision):
            # One waiter at a time asks again (FIFO), after a settlement or a moment: many
            # calls waiting for room cost one question to the ledger, not one each.
            if self._queue is None:
                self._queue = anyio.Lock()
            async with self._queue:
                while True:
                    if not self.exhausted:  # else ask once more at once: the cap was reached
                        await self._ledger.changed(version)
                    decision, state, version = await self._ledger.reserve(amount)
                    if not self._waits(decision):
                        break
        self.last = state
        match decision:
            case Held():
                call.emit(
                    BudgetReserved,
                    current_time(),
                    usd=amount / NANO,
                    spent=state.spent / NANO,
                    reserved=state.reserved / NANO,
                    cap=self.cap_usd,
                )
            case Short(free=free):
                self.exhausted = True  # from now on a call that does not fit fails at once
                call.emit(
                    BudgetRefused,
                    current_time(),
                    usd=amount / NANO,
                    free=free / NANO,
                    cap=self.cap_usd,
                )
                raise BudgetExceeded(
                    f"the spend cap is reached: this call may cost up to ${amount / NANO:.6f}"
                    f" but ${free / NANO:.6f} of the ${self.cap_usd:g} cap is left "
                    f"(${state.spent / NANO:.6f} spent)",
                    needed=amount / NANO,
                    free=free / NANO,
                    cap=self.cap_usd,
                )
            case other:
                never(other)

    async def _settle(self, call: Call, held: int, actual: int) -> None:
        with anyio.CancelScope(shield=True):
            try:
                self.last = await self._ledger.settle(held, actual)
            except BudgetUnavailable:
                log.warning("budget: a settlement was lost; its hold stays counted as spent")
                return
        call.emit(BudgetSettled, current_time(), reserved=held / NANO, usd=actual / NANO)


@attrs.define
class _StreamSettlement:
    """Settles a streamed answer once: with its usage, or its whole hold without one."""

    budget: Budget
    call: Call
    held: int
    price: Price
    parse: StreamParse
    done: bool = False

    async def __call__(self) -> None:
        if not self.done:
            self.done = True
            usage: Usage | None = self.parse.usage
            actual = self.held if usage is None else usage_nano(self.price, usage)
            await self.budget._settle(self.call, self.held, actual)


class _SettlingStream:
    """Passes a streamed body through; settles the hold when it ends or is closed."""

    def __init__(self, inner: ByteStream, settle: Callable[[], Awaitable[None]]) -> None:
        self._inner, self._settle = inner, settle

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        finally:
            await self._settle()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._settle()
