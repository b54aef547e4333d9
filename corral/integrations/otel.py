"""OpenTelemetry spans for corral calls (the ``otel`` extra).

``Tracing`` opens one client span per call around the layers inside it. Attributes follow the
OpenTelemetry HTTP and GenAI conventions and hold no secret: method, host, model, status,
tokens, whether the cache answered, and the error kind. Headers and bodies are never recorded.
``span_events`` is an event sink (``Client(events=span_events)``) that adds each decision of
the stack (retry scheduled, rate-limit wait, breaker opened...) to the current span.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from corral.core._compose import Handler
from corral.core._errors import CorralError
from corral.core._events import Event, event_fields
from corral.core._models import Request, Response
from corral.core._wire import response_usage

__all__ = ["Tracing", "span_events"]


def span_events(event: Event) -> None:
    """An event sink: each decision becomes an event on the current span (``Tracing``'s span
    when it is outermost), so a trace shows why a call waited, retried or hit the cache."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes: dict[str, str | int | float | bool] = {}
    for key, value in event_fields(event).items():
        if key == "labels":
            attributes.update({f"corral.label.{k}": v for k, v in value.items()})
        elif isinstance(value, str | int | float | bool) and key != "event":
            attributes[f"corral.{key}"] = value
    span.add_event(event.name, attributes)


class Tracing:
    """Middleware: a span per call. Put it outermost to time the whole call, waits included."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.get_tracer("corral")

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        parts = urlsplit(request.url)
        attributes: dict[str, str | int | bool] = {
            "http.request.method": request.method,
            "server.address": parts.hostname or "",
            "url.path": parts.path,
        }
        if request.options.model:
            attributes["gen_ai.request.model"] = request.options.model
        with self._tracer.start_as_current_span(
            "corral.request", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            try:
                response = await call_next(request)
            except CorralError as exc:
                span.set_attribute("error.type", exc.kind)
                span.set_status(Status(StatusCode.ERROR, exc.kind))
                raise
            span.set_attribute("http.response.status_code", response.status)
            span.set_attribute("corral.from_cache", response.from_cache)
            usage = response_usage(response)
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if response.status >= 400:
                span.set_attribute("error.type", str(response.status))
                span.set_status(Status(StatusCode.ERROR, f"HTTP {response.status}"))
            return response
