"""Expose a metrics ``Aggregator`` to Prometheus (the ``prometheus`` extra).

``register(aggregator)`` adds a collector to a prometheus_client registry (the default one
unless given), so an existing ``/metrics`` endpoint serves corral's figures; without
prometheus_client, ``Aggregator.prometheus()`` returns the same figures as exposition text.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from corral.middleware._metrics import Aggregator

__all__ = ["AggregatorCollector", "register"]


class AggregatorCollector(Collector):
    def __init__(self, aggregator: Aggregator, prefix: str = "corral") -> None:
        self._aggregator, self._prefix = aggregator, prefix

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | SummaryMetricFamily]:
        agg, p = self._aggregator, self._prefix
        requests = CounterMetricFamily(f"{p}_requests", "Calls by outcome", labels=["outcome"])
        for outcome, n in sorted(agg.outcomes.items()):
            requests.add_metric([outcome], n)
        yield requests
        latency = GaugeMetricFamily(
            f"{p}_latency_seconds", "Call latency quantiles", labels=["quantile"]
        )
        for q in (0.5, 0.9, 0.99):
            latency.add_metric([str(q)], agg.latency.quantile(q))
        yield latency
        tokens = CounterMetricFamily(f"{p}_tokens", "Tokens by direction", labels=["direction"])
        tokens.add_metric(["input"], agg.tokens_in)
        tokens.add_metric(["output"], agg.tokens_out)
        yield tokens
        yield CounterMetricFamily(f"{p}_cost_usd", "Estimated cost", value=agg.cost)
        yield CounterMetricFamily(
            f"{p}_cache_hits", "Calls answered by a cache", value=agg.cache_hits
        )


def register(
    aggregator: Aggregator, registry: CollectorRegistry = REGISTRY, prefix: str = "corral"
) -> AggregatorCollector:
    collector = AggregatorCollector(aggregator, prefix)
    registry.register(collector)
    return collector
