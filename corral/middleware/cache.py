"""Opt-in memoization of API calls. This is not HTTP caching: POSTs are cached by their body.

Policy (pure): ``CacheRules`` turns a request into a key, a hash of the method, the full URL and
the body as canonical JSON (sorted keys; integers of any size kept exact, so bodies share a key
only when their values are equal), inside a namespace that is an HMAC of the credential, so two
API keys never share entries unless ``shared_namespace`` is set. The key itself is never
stored anywhere. It also says what may be stored: only complete successes (status 200, valid
JSON, or a stream that reached ``[DONE]``).

Shell: ``Cache`` reads the store, makes concurrent identical calls share one upstream call
(single-flight; if it fails every waiter gets the error and nothing is stored), and stores
what the rules allow. A cached stream replays as a stream. A store that fails (Redis down or
frozen past its timeout, disk full) is logged and treated as a miss: the cache never fails a
call. After a failure the store is left alone for ``recheck`` seconds (then one call probes it),
so a dead Redis costs one timeout, not one per call. When a call reaches the cache with a
deadline, store calls end at it (a miss). Hits give the event loop a turn every few calls
(``Pacer``), so a loop of hits still honours cancellation.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
import attrs

from corral.clock import current_time
from corral.core import jsonlib
from corral.core.compose import Clock, Handler
from corral.core.errors import CorralError, InvalidInput
from corral.core.headers import Headers
from corral.core.models import ByteStream, CachePolicy, Request, Response
from corral.core.wire import ChatStreamDecoder
from corral.pacing import Pacer
from corral.stores import Store

__all__ = ["Cache", "CacheRules"]

log = logging.getLogger("corral.cache")
_NAMESPACE_LABEL = b"corral-cache-namespace-v1"
_REPLAY_CHUNK = 4096
T = TypeVar("T")


@attrs.frozen
class CacheRules:
    ttl: float | None = 24 * 3600.0
    #: Let every credential read every entry (only for a cache you alone use).
    shared_namespace: bool = False

    def namespace(self, request: Request) -> str:
        if self.shared_namespace:
            return "shared"
        auth = request.headers.get("authorization") or request.headers.get("api-key") or ""
        return hmac.new(auth.encode(), _NAMESPACE_LABEL, hashlib.sha256).hexdigest()[:32]

    def key(self, request: Request) -> str | None:
        """The entry's key, or None when the body is not JSON (such a call is not cached)."""
        try:
            body = jsonlib.canonical(request.body) if request.body else b""
        except jsonlib.JSONDecodeError:
            return None
        except InvalidInput:  # read by the stdlib alone (a lone surrogate): not worth a key
            return None
        digest = hashlib.sha256()
        for part in (
            self.namespace(request).encode(),
            request.method.encode(),
            request.url.encode(),
            body,
        ):
            digest.update(part)
            digest.update(b"\0")
        return digest.hexdigest()

    @staticmethod
    def storable(response: Response) -> bool:
        if response.status != 200 or response.stream is not None:
            return False
        try:
            response.json()
        except jsonlib.JSONDecodeError:
            return False
        return True

    @staticmethod
    def complete_stream(data: bytes) -> bool:
        decoder = ChatStreamDecoder()
        try:
            decoder.feed(data)
            decoder.close()
        except CorralError:
            return False
        return True


def _encode(status: int, headers: Headers, body: bytes, stream: bool) -> bytes:
    content_type = headers.get("content-type") or "application/json"
    return jsonlib.dumps(
        {
            "v": 1,
            "status": status,
            "content_type": content_type,
            "stream": stream,
            "body": body.decode("utf-8", "replace"),
        }
    )


def _decode(raw: bytes, want_stream: bool) -> Response | None:
    try:
        entry = jsonlib.loads(raw)
    except jsonlib.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or entry.get("v") != 1 or entry.get("stream") != want_stream:
        return None
    body = str(entry.get("body", "")).encode()
    headers = Headers({"content-type": str(entry.get("content_type")), "x-corral-cache": "hit"})
    if want_stream:
        return Response(int(entry["status"]), headers, stream=_Replay(body), from_cache=True)
    return Response(int(entry["status"]), headers, body, from_cache=True)


class _Replay:
    """A stored SSE body played back as a stream."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self._data), _REPLAY_CHUNK):
            yield self._data[i : i + _REPLAY_CHUNK]

    async def aclose(self) -> None:
        return None


@attrs.define(eq=False)
class _Flight:
    done: anyio.Event = attrs.field(factory=anyio.Event)
    response: Response | None = None
    error: BaseException | None = None
    abandoned: bool = False


class Cache:
    """Middleware: serve repeated calls from ``store``; see the module docstring."""

    def __init__(
        self,
        store: Store,
        rules: CacheRules | None = None,
        *,
        recheck: float = 5.0,
        clock: Clock = current_time,
    ) -> None:
        self.store = store
        self.rules = rules or CacheRules()
        self._recheck = recheck
        self._clock = clock
        self._down = False
        self._probe_at = 0.0
        self._pace = Pacer()
        self._flights: dict[str, _Flight] = {}
        self.hits = self.misses = self.coalesced = 0

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        policy = request.options.cache
        key = None if policy is CachePolicy.BYPASS else self.rules.key(request)
        if key is None:
            return await call_next(request)
        stream = request.options.stream
        deadline = request.options.deadline
        if policy is CachePolicy.USE:
            cached = await self._read(key, stream, deadline)
            if cached is not None:
                await self._pace()
                self.hits += 1
                return cached
        self.misses += 1
        if stream:
            response = await call_next(request)
            if response.status == 200 and response.stream is not None:
                tee = _Tee(response.stream, self, key, deadline)
                return attrs.evolve(response, stream=tee)
            return response
        return await self._single_flight(key, request, call_next)

    async def _single_flight(self, key: str, request: Request, call_next: Handler) -> Response:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.abandoned:
                continue  # the leader was cancelled: try again, perhaps as the new leader
            self.coalesced += 1
            if flight.error is not None:
                raise flight.error
            assert flight.response is not None
            return attrs.evolve(flight.response, from_cache=flight.response.status == 200)
        flight = self._flights[key] = _Flight()
        try:
            response = await call_next(request)
        except anyio.get_cancelled_exc_class():
            flight.abandoned = True
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.response = response
            if self.rules.storable(response):
                value = _encode(response.status, response.headers, response.body, False)
                await self._write(key, value, request.options.deadline)
            return response
        finally:
            del self._flights[key]
            flight.done.set()

    async def _read(self, key: str, stream: bool, deadline: float | None) -> Response | None:
        raw = await self._guarded("read", lambda: self.store.get(key), deadline)
        return None if raw is None else _decode(raw, stream)

    async def _write(self, key: str, value: bytes, deadline: float | None) -> None:
        ttl = self.rules.ttl
        await self._guarded("write", lambda: self.store.set(key, value, ttl), deadline)

    async def _guarded(
        self, what: str, call: Callable[[], Awaitable[T]], deadline: float | None
    ) -> T | None:
        """``call()`` ended at ``deadline``; None when it failed, timed out or was skipped."""
        if self._down:
            now = self._clock()
            if now < self._probe_at:
                return None  # the store failed lately: leave it alone for now
            self._probe_at = now + self._recheck  # this call probes; the others keep skipping
        try:
            if deadline is None:
                result = await call()
            else:
                with anyio.move_on_after(deadline - self._clock()) as scope:
                    result = await call()
                if scope.cancelled_caught:
                    return None  # the call's deadline passed: no sign of a broken store
        except Exception as exc:  # a broken store is a miss, never a failed call
            if not self._down:
                log.warning(
                    "cache %s failed (%s); leaving the store alone for %gs",
                    what,
                    type(exc).__name__,
                    self._recheck,
                )
            self._down, self._probe_at = True, self._clock() + self._recheck
            return None
        if self._down:
            log.warning("cache store answers again")
            self._down = False
        return result


class _Tee:
    """Passes a stream through and stores it once it has completed cleanly."""

    def __init__(self, inner: ByteStream, cache: Cache, key: str, deadline: float | None) -> None:
        self._inner, self._cache, self._key, self._deadline = inner, cache, key, deadline

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        parts: list[bytes] = []
        async for chunk in self._inner:
            parts.append(chunk)
            yield chunk
        data = b"".join(parts)
        if self._cache.rules.complete_stream(data):
            value = _encode(200, Headers({"content-type": "text/event-stream"}), data, True)
            await self._cache._write(self._key, value, self._deadline)

    async def aclose(self) -> None:
        await self._inner.aclose()
