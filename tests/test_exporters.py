"""Metrics exporters: the aggregator's figures, Prometheus, OpenTelemetry spans; no secrets."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from corral._client import Client, default_middleware
from corral.core import _errors as errors
from corral.integrations.otel import Tracing
from corral.integrations.prometheus import register
from corral.middleware._metrics import Histogram, Metrics, Price
from corral.testing.server import RunningEmulator
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio
MESSAGES = [{"role": "user", "content": "hi"}]


def test_histogram_quantiles_are_within_bucket_error() -> None:
    h = Histogram()
    values = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1 s
    for v in values:
        h.add(v)
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1]
        assert exact <= h.quantile(q) <= exact * 1.05
    assert h.quantile(1.0) == h.max == 1.0


async def test_aggregator_snapshot_prometheus_and_spans(emulator: RunningEmulator) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = Metrics(prices={"gpt-4o-mini": Price(1.0, 2.0)})
    aggregator = metrics.aggregator
    stack = [
        Tracing(provider.get_tracer("test")),
        *default_middleware(metrics=metrics, max_attempts=1),
    ]
    async with Client(emulator.base_url, CANARY_KEY, middleware=stack, model="gpt-4o-mini") as c:
        for _ in range(3):
            await c.chat(MESSAGES)
        with pytest.raises(errors.ContextLengthExceeded):
            await c.chat(
                [{"role": "user", "content": "x " * 10_000}], model="small-model", max_tokens=10
            )
    snap = aggregator.snapshot()
    assert snap["count"] == 4 and snap["ok"] == 3 and snap["errors"] == {"http_400": 1}
    assert snap["tokens"]["input"] > 0 and snap["cost_usd"] > 0
    assert 0 < snap["latency_s"]["p50"] <= snap["latency_s"]["max"]
    text = aggregator.prometheus()
    assert 'corral_requests_total{outcome="ok"} 3' in text
    registry = CollectorRegistry()
    register(aggregator, registry)
    scraped = generate_latest(registry).decode()
    assert 'corral_requests_total{outcome="ok"} 3.0' in scraped
    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    assert spans[0].attributes is not None
    assert spans[0].attributes["gen_ai.request.model"] == "gpt-4o-mini"
    input_tokens = spans[0].attributes["gen_ai.usage.input_tokens"]
    assert isinstance(input_tokens, int) and input_tokens > 0
    everything = text + scraped + str(snap) + "".join(str(s.attributes) for s in spans)
    assert CANARY_KEY[:8] not in everything and CANARY_KEY[-8:] not in everything
