"""``Client``: the friendly front of a corral stack, and ``SyncClient`` for scripts.

Default stack, outermost first (docs/stack.md says what each order means)::

    Metrics -> [Cache] -> [Truncate] -> Deadline -> Retry -> CircuitBreaker -> [RateLimit]
            -> ConcurrencyLimit -> transport

A cache hit costs no quota; each retry pays the rate limit again and holds a concurrency slot
only while it is on the wire; metrics see the whole call including waits.
"""

from __future__ import annotations

import math
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any

import anyio

from corral._clock import current_time
from corral._streams import bound_waits
from corral.core import _errors as errors
from corral.core import _wire as wire
from corral.core._classify import classify, scrub
from corral.core._compose import Handler, Middleware, build_stack
from corral.core._events import EventSink
from corral.core._headers import SENSITIVE_HEADERS
from corral.core._models import ByteStream, Request, RequestOptions, Response, Timeouts
from corral.core._wire import (
    ChatCompletion,
    Embeddings,
    api_request,
    decode_chat,
    decode_embeddings,
    decode_models,
    raise_for_status,
)
from corral.middleware._breaker import CircuitBreaker
from corral.middleware._concurrency import ConcurrencyLimit
from corral.middleware._deadline import Deadline
from corral.middleware._metrics import Aggregator, Metrics
from corral.middleware._retry import Retry

if TYPE_CHECKING:  # the paths needing these import them when taken (issue 15: import time)
    from corral._mapping import MapResult, MapRun
    from corral.core._streaming import ChatChunk, StreamParse
    from corral.middleware._router import Deployment, Router
    from corral.transports._base import Transport

__all__ = [
    "Client",
    "SyncClient",
    "default_middleware",
    "resolve_api_key",
    "routed_middleware",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_PLACEHOLDERS = {"your-api-key", "your_api_key", "changeme", "none", "null", "undefined"}


def _placeholder(key: str) -> bool:
    """Keys copied from docs (``sk-...``, ``sk-xxxxxxxx``, ``<your key>``), not real ones."""
    lowered = key.lower()
    filler = lowered.removeprefix("sk-").removeprefix("proj-")
    return (
        lowered in _PLACEHOLDERS
        or set(filler) <= set("x.*-_")
        or (key.startswith("<") and key.endswith(">"))
        or key.startswith("$")
        or ("your" in lowered and "key" in lowered)
    )


def resolve_api_key(
    api_key: str | None, api_key_env: str | None = None, *, hint: str | None = None
) -> str:
    """The key to use, or ``InvalidInput`` saying exactly how to provide one.

    ``api_key_env`` names the one variable to read; without it CORRAL_API_KEY, then
    OPENAI_API_KEY. ``hint`` replaces the how-to (the CLI names its flag there).
    """
    if api_key is not None:
        key: str | None = api_key
    elif api_key_env is not None:
        key = os.environ.get(api_key_env)
    else:
        key = os.environ.get("CORRAL_API_KEY") or os.environ.get("OPENAI_API_KEY")
    env = api_key_env or "OPENAI_API_KEY"
    how = hint or (
        f"pass api_key=... or set {env}"
        + ("" if api_key_env else " (or CORRAL_API_KEY)")
        + f", e.g. `export {env}=sk-your-real-key`"
    )
    if key is None or not key.strip():
        raise errors.InvalidInput(f"no API key: {how}")
    stripped = key.strip()
    if _placeholder(stripped):
        raise errors.InvalidInput(f"the API key is a placeholder, not a real key: {how}")
    return stripped


def default_middleware(
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    concurrency: int = 64,
    max_attempts: int = 5,
    timeout: float | None = 600.0,
    retry_budget: float = 0.2,
    cache: Middleware | None = None,
    truncate: Middleware | None = None,
    metrics: Metrics | None = None,
    seed: int | None = None,
    max_pause: float = 60.0,
) -> list[Middleware]:
    """The documented default stack; every policy is a keyword away.

    ``max_pause`` caps how long a 429's ``Retry-After`` may pause the rate limit (seconds).
    """
    layers: list[Middleware] = [metrics or Metrics()]
    if cache is not None:
        layers.append(cache)
    if truncate is not None:
        layers.append(truncate)
    layers.append(Deadline(timeout))
    layers.append(Retry(max_attempts=max_attempts, budget_ratio=retry_budget, seed=seed))
    layers.append(CircuitBreaker())
    if rpm is not None or tpm is not None:
        from corral.middleware._ratelimit import RateLimit

        layers.append(RateLimit(rpm=rpm, tpm=tpm, max_pause=max_pause))
    layers.append(ConcurrencyLimit(concurrency))
    return layers


def routed_middleware(
    router: Router,
    *,
    timeout: float | None = 600.0,
    cache: Middleware | None = None,
    truncate: Middleware | None = None,
    metrics: Metrics | None = None,
) -> list[Middleware]:
    """The default stack over several deployments: ``Metrics -> [Cache] -> [Truncate] ->
    Deadline -> Router``. The router retries across deployments, and each deployment has its
    own breaker, quota and slots (and the budget, if the router has one)."""
    layers: list[Middleware] = [metrics or Metrics()]
    layers += [layer for layer in (cache, truncate) if layer is not None]
    return [*layers, Deadline(timeout), router]


def as_router(deployments: Router | str | os.PathLike[str] | Sequence[Deployment]) -> Router:
    """A router from what ``Client(deployments=...)`` accepts: a router, a TOML file, or
    ``Deployment`` values."""
    from corral.middleware._router import Router

    if isinstance(deployments, Router):
        return deployments
    if isinstance(deployments, str | os.PathLike):
        from corral._deployments import load_router

        return load_router(deployments)
    return Router(list(deployments))


class Client:
    """Call an OpenAI-compatible API through a corral stack.

    ``middleware=None`` uses ``default_middleware()``; pass a list (outermost first) to compose
    your own, or ``[]`` for a bare transport.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api_key_env: str | None = None,
        transport: Transport | None = None,
        middleware: Sequence[Middleware] | None = None,
        timeouts: Timeouts | None = None,
        model: str | None = None,
        headers: Mapping[str, str] | None = None,
        events: EventSink | None = None,
        deployments: Router | str | os.PathLike[str] | Sequence[Deployment] | None = None,
    ) -> None:
        """``events``: one sink for every decision the stack makes on this client's calls
        (``corral.observe`` has logging and trace-file sinks).

        ``deployments``: send every call over several deployments (a ``Router``, a TOML
        deployments file, or ``Deployment`` values), which bring their own URLs and keys. The
        router is the innermost layer; ``middleware`` lists the layers above it (default
        ``routed_middleware``: Metrics and a Deadline).
        """
        self.router = None if deployments is None else as_router(deployments)
        if self.router is not None:
            if base_url is not None or api_key is not None or api_key_env is not None:
                raise errors.InvalidInput(
                    "Client(deployments=...) takes URLs and keys from its deployments; "
                    "pass no base_url, api_key or api_key_env"
                )
            self.base_url, self._api_key = self.router.base_url, ""
        else:
            self.base_url = (
                base_url
                or os.environ.get("CORRAL_BASE_URL")
                or os.environ.get("OPENAI_BASE_URL")
                or DEFAULT_BASE_URL
            )
            self._api_key = resolve_api_key(api_key, api_key_env)
        if transport is None:
            from corral.transports._http11 import H11Transport

            transport = H11Transport(timeouts=timeouts)
        self.transport = transport
        if self.router is None:
            self.middleware = list(default_middleware() if middleware is None else middleware)
        elif middleware is None:
            self.middleware = routed_middleware(self.router)
        else:
            self.middleware = [*(m for m in middleware if m is not self.router), self.router]
        self.handler: Handler = build_stack(self.middleware, transport, events=events)
        self.model = model or os.environ.get("CORRAL_MODEL")
        self._headers = dict(headers or {})
        self._secrets = _credentials(self._api_key, self._headers)
        if self.router is not None:
            self._secrets = tuple(sorted({*self._secrets, *self.router.secrets}))

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r}, api_key=[redacted])"

    @property
    def metrics(self) -> Aggregator | None:
        """The aggregator of the first ``Metrics`` layer, if the stack has one."""
        for layer in self.middleware:
            if isinstance(layer, Metrics):
                return layer.aggregator
        return None

    def build_request(self, path: str, body: Mapping[str, Any] | None, **options: Any) -> Request:
        """Build (not send) the ``Request`` for ``path``, relative to ``base_url``, with this
        client's key; ``send`` sends it."""
        if body is not None:  # the options the body implies, so they are built once
            model = body.get("model")
            model = model if isinstance(model, str) else None
            stream = bool(body.get("stream"))
            if options:
                options.setdefault("model", model)
                options.setdefault("stream", stream)
                built = RequestOptions(**options)
            else:  # the usual call: positional, no keyword dict to unpack
                built = RequestOptions(model, stream)
        else:
            built = RequestOptions(**options)
        return api_request(
            self.base_url,
            path,
            body,
            api_key=self._api_key,
            extra_headers=self._headers,
            options=built,
        )

    async def send(self, request: Request) -> Response:
        """Send through the stack; returns the raw ``Response`` (error statuses included)."""
        return await self.handler(request)

    def error_for(self, request: Request, response: Response) -> errors.APIError | None:
        """The typed error a buffered ``response`` to ``request`` stands for, None for a success.

        ``classify`` with this client's credentials scrubbed from the provider's text (a relay
        may echo ``Authorization``) and the request's URL named in a not-found error.
        """
        return classify(
            response.status,
            response.headers,
            response.body,
            secrets=self._secrets,
            url=request.url,
        )

    def scrub(self, text: str) -> str:
        """``text`` with no piece of this client's credentials: for records built from what a
        provider sent (a response body written to a file, say)."""
        return scrub(text, self._secrets)

    async def _checked(self, request: Request) -> Response:
        response = await self.send(request)
        error = self.error_for(request, response)
        if error is not None:
            raise error
        return response

    def _chat_body(
        self, messages: Any, model: str | None, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        body = dict(params)
        if messages is not None:
            body["messages"] = messages
        chosen = model or body.get("model") or self.model
        if not chosen:
            raise errors.InvalidInput("no model: pass model=... or set CORRAL_MODEL")
        body["model"] = chosen
        return body

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        model: str | None = None,
        **params: Any,
    ) -> ChatCompletion:
        """One chat completion. Extra keyword arguments go into the request body as they are."""
        body = self._chat_body(messages, model, params)
        body.pop("stream", None)
        request = self.build_request("/chat/completions", body)
        response = await self.send(request)  # ``_checked`` in line: one coroutine less per call
        if response.status >= 400:
            error = self.error_for(request, response)
            if error is not None:
                raise error
        return decode_chat(response, secrets=self._secrets)

    async def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        model: str | None = None,
        idle_timeout: float | None = 60.0,
        **params: Any,
    ) -> AsyncIterator[ChatChunk]:
        """Chunks as they arrive; raises ``ReadTimeout`` if none comes for ``idle_timeout``."""
        body = self._chat_body(messages, model, params)
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
        request = self.build_request("/chat/completions", body)
        call = request.options.call
        mark = call.stream  # a layer that watches the stream installs the call's one parse
        response = await self.send(request)
        if response.stream is None:
            raise_for_status(response, secrets=self._secrets, url=request.url)
            source: ByteStream = _once(response.body)
        else:
            if response.status >= 400:
                raise_for_status(await response.aread(), secrets=self._secrets, url=request.url)
            source = response.stream
        stream, parse = wire.shared_parse(call, source, mark)  # the first stream loads it
        parse.keep_chunks()
        stream_bytes = aiter(stream)
        idle = math.inf if idle_timeout is None else idle_timeout

        def idle_error() -> errors.ReadTimeout:
            return errors.ReadTimeout(f"no stream data for {idle_timeout}s", request_sent=True)

        # The layer that waits for the bytes times the idle limit in its own read if it can
        # (corral._streams): no scope here, per chunk or per read.
        taken = idle_timeout is None or bound_waits(stream, idle=idle, error=idle_error)
        try:
            while True:
                if taken:
                    try:
                        await anext(stream_bytes)
                    except StopAsyncIteration:
                        break
                else:
                    with anyio.CancelScope(deadline=current_time() + idle) as scope:
                        try:
                            await anext(stream_bytes)
                        except StopAsyncIteration:
                            break
                    if scope.cancelled_caught:
                        raise idle_error()
                for chunk in self._parsed_chunks(parse):
                    yield chunk
            parse.close()
            for chunk in self._parsed_chunks(parse):
                yield chunk
        finally:
            await stream.aclose()

    def _parsed_chunks(self, parse: StreamParse) -> list[ChatChunk]:
        """The chunks the stream's parse decoded since last asked; its error once it has one."""
        chunks = parse.take()
        error = parse.error(self._secrets)
        if error is not None:
            raise error
        return chunks

    async def embed(self, input: str | Sequence[str], *, model: str, **params: Any) -> Embeddings:
        """Embeddings of ``input`` (one string or several) with ``model``, through the stack."""
        body = {"model": model, "input": input, **params}
        response = await self._checked(self.build_request("/embeddings", body))
        return decode_embeddings(response, secrets=self._secrets)

    async def models(self) -> list[str]:
        """The model ids the endpoint serves (``GET /models``), e.g. to check a name before a
        run."""
        response = await self._checked(self.build_request("/models", None))
        return decode_models(response, secrets=self._secrets)

    def map(
        self,
        bodies: Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 64,
        ordered: bool = False,
    ) -> MapRun:
        """Run many chat bodies with at most ``concurrency`` in flight; errors come back as values.

        Use it as ``async with client.map(bodies) as results: async for r in results: ...``;
        leaving the block early (``break``, an exception, a cancellation) cancels the calls
        still running. ``bodies`` is consumed lazily, so a generator of a million items uses
        memory for ``concurrency`` of them. With ``ordered=True`` results come in input order,
        and at most ``concurrency`` items run ahead of the oldest unfinished one.
        """

        async def call(body: Mapping[str, Any]) -> ChatCompletion:
            return await self.chat(**self._chat_body(None, None, body))

        from corral._mapping import MapRun

        return MapRun(call, bodies, concurrency, ordered)

    async def aclose(self) -> None:
        """Close the transport and every layer that holds resources (a cache's store, a
        shared limiter's Redis client)."""
        try:
            for layer in self.middleware:
                close = getattr(layer, "aclose", None)
                if close is not None:
                    await close()
        finally:
            await self.transport.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def _once(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


def _credentials(api_key: str, headers: Mapping[str, str]) -> tuple[str, ...]:
    """Every credential this client sends: the key, and any credential header's value (whole
    and without its scheme), so ``scrub`` can keep all of them out of errors."""
    found = {api_key}
    for name, value in headers.items():
        if name.lower() in SENSITIVE_HEADERS:
            found |= {value, value.partition(" ")[2]}
    return tuple(sorted(v for v in found if v.strip()))


class SyncClient:
    """A blocking facade over ``Client`` for scripts and notebooks (its loop runs in a thread)."""

    def __init__(self, *args: Any, backend: str = "asyncio", **kwargs: Any) -> None:
        import anyio.from_thread

        self._portal_cm = anyio.from_thread.start_blocking_portal(backend)
        self._portal = self._portal_cm.__enter__()
        try:
            self._client: Client = self._portal.call(_make_client, args, kwargs)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise

    def chat(
        self, messages: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any
    ) -> ChatCompletion:
        """``Client.chat``, blocking: the completion, or the typed error it raised."""
        return self._portal.call(lambda: self._client.chat(messages, **kwargs))

    def embed(self, input: str | Sequence[str], **kwargs: Any) -> Embeddings:
        """``Client.embed``, blocking."""
        return self._portal.call(lambda: self._client.embed(input, **kwargs))

    def stream_chat(
        self, messages: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any
    ) -> Generator[ChatChunk, None, None]:
        """Chunks as they arrive. One task on the client's loop reads the stream and hands
        chunks over a small buffer; ``close()`` before the end cancels it."""
        send, receive = anyio.create_memory_object_stream[wire.ChatChunk](16)

        async def pump() -> None:
            async with send:
                async for chunk in self._client.stream_chat(messages, **kwargs):
                    await send.send(chunk)

        future = self._portal.start_task_soon(pump)
        try:
            while True:
                try:
                    yield self._portal.call(receive.receive)
                except anyio.EndOfStream:
                    break
            future.result()  # the stream's error, if it ended with one
        finally:
            if not future.done():
                future.cancel()
            self._portal.call(receive.aclose)

    def map(self, bodies: Iterable[Mapping[str, Any]], **kwargs: Any) -> list[MapResult]:
        """``Client.map``, blocking: every result, in completion order unless ``ordered=True``."""

        async def collect() -> list[MapResult]:
            collected: list[MapResult] = []
            async with self._client.map(bodies, **kwargs) as results:
                collected = [r async for r in results]
            return collected

        return self._portal.call(collect)

    @property
    def metrics(self) -> Aggregator | None:
        """The numbers of the stack's ``Metrics`` layer, if it has one."""
        return self._client.metrics

    def close(self) -> None:
        """Close the client (transport and layers) and stop the thread running its loop."""
        try:
            self._portal.call(self._client.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _make_client(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Client:
    return Client(*args, **kwargs)
