"""Metrics: what each call cost in time, tokens and money, aggregated without holding secrets.

Policy: ``Histogram`` (log-spaced buckets, ~2% relative error, fixed memory) and ``Aggregator``
(counts by outcome, latency and time-to-first-byte histograms, tokens, cost from a price table).
Shell: ``Metrics`` times each call through the rest of the stack and feeds the aggregator; a
stream's tokens are added when the call's one parse of it (``call.stream``) finds its usage.

Only model names, status codes and error kinds are recorded: never headers, bodies or keys.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping
from math import log as _log
from types import MappingProxyType
from typing import Any

import attrs

from corral._clock import current_time
from corral.core import _wire as wire
from corral.core._compose import Handler
from corral.core._errors import CorralError
from corral.core._models import Request, Response
from corral.core._wire import Usage, response_usage

__all__ = ["DEFAULT_PRICES", "Aggregator", "Histogram", "Metrics", "MetricsConfig", "Price"]


@attrs.frozen
class Price:
    """US dollars per million tokens.

    ``cached_input`` prices the prompt tokens the provider served from its prompt cache and
    ``reasoning`` the hidden reasoning tokens (both counted in the usage's totals too); None
    prices them as ``input`` and ``output``, which never under-counts.
    """

    input: float
    output: float
    cached_input: float | None = None
    reasoning: float | None = None

    def usd(self, usage: Usage) -> float:
        """What ``usage`` costs at these prices."""
        if not usage.cached_tokens and not usage.reasoning_tokens:  # most calls: two rates
            return (usage.prompt_tokens * self.input + usage.completion_tokens * self.output) / 1e6
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        reasoning_rate = self.output if self.reasoning is None else self.reasoning
        return (
            (usage.prompt_tokens - cached) * self.input
            + cached * cached_rate
            + (usage.completion_tokens - reasoning) * self.output
            + reasoning * reasoning_rate
        ) / 1e6


#: List prices as of 2026-11-01 (USD per 1M tokens); pass your own table to override.
DEFAULT_PRICES: Mapping[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
}


class Histogram:
    """Log-bucketed histogram of positive values: bucket i covers [min*g^i, min*g^(i+1))."""

    __slots__ = (
        "_growth",
        "_log_g",
        "_log_min",
        "_min",
        "_per_log",
        "count",
        "counts",
        "max",
        "total",
    )

    def __init__(self, minimum: float = 1e-5, growth: float = 1.04) -> None:
        self._min, self._log_g = minimum, math.log(growth)
        self._log_min, self._per_log = math.log(minimum), 1 / self._log_g
        self._growth = growth
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, value: float) -> None:
        index = 0 if value <= self._min else int((_log(value) - self._log_min) * self._per_log) + 1
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket holding the q-quantile (0 when empty)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(self.max, self._min * self._growth**index)
        return self.max


@attrs.define(eq=False)
class Aggregator:
    """Running totals of the calls a ``Metrics`` layer saw: outcomes, latency histograms, tokens
    and cost (``snapshot`` reads them). Mutable, so equal only to itself."""

    prices: Mapping[str, Price] = DEFAULT_PRICES
    started: float | None = None
    last: float = 0.0
    outcomes: Counter[str] = attrs.field(factory=Counter)
    latency: Histogram = attrs.field(factory=Histogram)
    first_byte: Histogram = attrs.field(factory=Histogram)
    #: The answering attempt's time on the wire (no quota waits, backoff or earlier attempts).
    service: Histogram = attrs.field(factory=Histogram)
    #: The rest of each call: waits for quota and slots, backoff, earlier attempts.
    waits: Histogram = attrs.field(factory=Histogram)
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    cache_hits: int = 0

    def record(
        self,
        start: float,
        end: float,
        outcome: str,
        model: str | None,
        first_byte: float | None = None,
        usage: Usage | None = None,
        from_cache: bool = False,
        on_wire: float | None = None,
    ) -> None:
        """One finished call. Positional, plain branches: this runs on every call."""
        if self.started is None or start < self.started:
            self.started = start
        if end > self.last:
            self.last = end
        outcomes = self.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self.latency.add(end - start)
        if on_wire is not None and start <= on_wire <= end:  # a cached copy's timing is old
            self.service.add(end - on_wire)
            self.waits.add(on_wire - start)
        if first_byte is not None:
            self.first_byte.add(first_byte - start)
        if from_cache:
            self.cache_hits += 1
        elif usage is not None:
            self.add_usage(model, usage)

    def add_usage(self, model: str | None, usage: Usage) -> None:
        """Tokens and cost of a call (a stream reports them after its call was recorded)."""
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        self.tokens_in += prompt
        self.tokens_out += completion
        price = self.prices.get(model or "")
        if price is not None:
            self.cost += price.usd(usage)

    @property
    def count(self) -> int:
        """Calls recorded, whatever their outcome."""
        return sum(self.outcomes.values())

    def snapshot(self) -> dict[str, Any]:
        """The numbers as a plain dict (counts, error rate, latency quantiles, tokens, cost),
        ready for JSON or a summary."""
        count = self.count
        elapsed = (self.last - self.started) if self.started is not None else 0.0
        errors = {k: v for k, v in self.outcomes.items() if k != "ok"}
        return {
            "count": count,
            "ok": self.outcomes.get("ok", 0),
            "errors": errors,
            "error_rate": (sum(errors.values()) / count) if count else 0.0,
            "requests_per_second": count / elapsed if elapsed > 0 else 0.0,
            "latency_s": {
                "p50": self.latency.quantile(0.5),
                "p90": self.latency.quantile(0.9),
                "p95": self.latency.quantile(0.95),
                "p99": self.latency.quantile(0.99),
                "max": self.latency.max,
                "mean": self.latency.total / self.latency.count if self.latency.count else 0.0,
            },
            "service_latency_s": _quantiles(self.service),
            "wait_per_call_s": _quantiles(self.waits),
            "time_to_first_byte_s": {
                "p50": self.first_byte.quantile(0.5),
                "p99": self.first_byte.quantile(0.99),
            },
            "tokens": {"input": self.tokens_in, "output": self.tokens_out},
            "cost_usd": round(self.cost, 6),
            "cache_hit_rate": self.cache_hits / count if count else 0.0,
        }

    def prometheus(self, prefix: str = "corral") -> str:
        """The snapshot in Prometheus text exposition format."""
        lines = [f"# TYPE {prefix}_requests_total counter"]
        for outcome, n in sorted(self.outcomes.items()):
            lines.append(f'{prefix}_requests_total{{outcome="{outcome}"}} {n}')
        lines.append(f"# TYPE {prefix}_latency_seconds summary")
        for q in (0.5, 0.9, 0.99):
            lines.append(
                f'{prefix}_latency_seconds{{quantile="{q}"}} {self.latency.quantile(q):.6f}'
            )
        lines.append(f"{prefix}_latency_seconds_sum {self.latency.total:.6f}")
        lines.append(f"{prefix}_latency_seconds_count {self.latency.count}")
        lines.append(f"# TYPE {prefix}_tokens_total counter")
        lines.append(f'{prefix}_tokens_total{{direction="input"}} {self.tokens_in}')
        lines.append(f'{prefix}_tokens_total{{direction="output"}} {self.tokens_out}')
        lines.append(f"# TYPE {prefix}_cost_usd_total counter")
        lines.append(f"{prefix}_cost_usd_total {self.cost:.6f}")
        lines.append(f"# TYPE {prefix}_cache_hits_total counter")
        lines.append(f"{prefix}_cache_hits_total {self.cache_hits}")
        return "\n".join(lines) + "\n"


def _quantiles(h: Histogram) -> dict[str, float]:
    mean = h.total / h.count if h.count else 0.0
    return {"p50": h.quantile(0.5), "p95": h.quantile(0.95), "max": h.max, "mean": mean}


def _frozen_prices(prices: Mapping[str, Price]) -> Mapping[str, Price]:
    return MappingProxyType(dict(prices))


@attrs.frozen
class MetricsConfig:
    """What ``Metrics`` prices calls with."""

    #: USD per million tokens by model name; a model not named costs nothing.
    prices: Mapping[str, Price] = attrs.field(default=DEFAULT_PRICES, converter=_frozen_prices)


class Metrics:
    """Middleware: time every call through the layers inside it and aggregate the outcome.

    ``prices``: the ``MetricsConfig`` (``.config``); the numbers are in ``.aggregator``. A
    stream's usage comes from the call's one parse of it (``call.stream``), when it arrives.
    """

    def __init__(self, *, prices: Mapping[str, Price] = DEFAULT_PRICES) -> None:
        self.config = MetricsConfig(prices)
        self.aggregator = Aggregator(self.config.prices)

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Time the call through the layers inside and record its outcome (a typed error's
        kind too), tokens and cost; a stream's usage is added when its last event arrives."""
        start = current_time()
        options = request.options
        model = options.model
        call = options.call
        mark = call.stream
        try:
            response = await call_next(request)
        except CorralError as exc:
            self.aggregator.record(start, current_time(), exc.kind, model)
            raise
        timing = response.timing
        status = response.status
        usage = None
        if response.stream is None:
            usage = response_usage(response)
            if usage is not None:
                call.usage = usage
        elif status == 200 and not response.from_cache:
            stream, parse = wire.shared_parse(call, response.stream, mark)  # loads on 1st stream
            parse.on_usage(functools.partial(self.aggregator.add_usage, model))
            if stream is not response.stream:
                response = attrs.evolve(response, stream=stream)
        self.aggregator.record(
            start,
            current_time(),
            "ok" if status < 400 else f"http_{status}",
            model,
            None if timing is None else timing.first_byte,
            usage,
            response.from_cache,
            None if timing is None else timing.started,
        )
        return response
