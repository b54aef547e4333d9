"""Opt-in memoization of API calls. This is not HTTP caching: POSTs are cached by their body.

Policy (pure): ``CacheRules`` turns a request into a key, a hash of the method, the full URL and
the body as canonical JSON (sorted keys; integers of any size kept exact, so bodies share a key
only when their values are equal), inside a namespace that is an HMAC of the credential, so two
API keys never share entries unless ``shared_namespace`` is set. The key itself is never
stored anywhere. ``CacheRules.read`` decides ``Lookup(key)``, ``Refresh(key)`` (store only) or
``Bypass``; ``CacheRules.store`` decides ``Write(value)`` or ``Skip``: only complete successes
are stored (status 200 with valid JSON, or a stream that reached ``[DONE]`` with every event a
JSON object).

Shell: ``Cache`` reads the store, makes concurrent identical calls share one upstream call
(single-flight; if it fails every waiter gets the error and nothing is stored), and stores
what the rules allow, reporting ``CacheHit``/``CacheMiss``/``CacheStored``. A cached stream
replays as a stream; a stream's completeness comes from the call's one parse of it
(``call.stream``). A store that fails (Redis down or frozen past its timeout, disk full) is
logged and treated as a miss: the cache never fails a call. After a failure the store is left
alone for ``recheck`` seconds (then one call probes it), so a dead Redis costs one timeout, not
one per call. When a call reaches the cache with a deadline, store calls end at it (a miss).
Hits give the event loop a turn every few calls (``Pacer``), so a loop of hits still honours
cancellation.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
import attrs

from corral._clock import current_time
from corral._pacing import Pacer
from corral.core import _jsonlib as jsonlib
from corral.core._call import Call
from corral.core._compose import Handler
from corral.core._errors import InvalidInput
from corral.core._events import CacheHit, CacheMiss, CacheStored
from corral.core._headers import Headers
from corral.core._models import ByteStream, CacheMode, Request, Response
from corral.core._wire import StreamParse, shared_parse
from corral.middleware._checks import finite, never, optional
from corral.stores import Store

__all__ = ["Bypass", "Cache", "CacheRules", "Lookup", "Refresh", "Skip", "Write"]

log = logging.getLogger("corral.cache")
_NAMESPACE_LABEL = b"corral-cache-namespace-v1"
_REPLAY_CHUNK = 4096
_STREAM_HEADERS = Headers({"content-type": "text/event-stream"})
T = TypeVar("T")


@attrs.frozen
class Lookup:
    """Read the entry under ``key``; on a miss, store the new success there."""

    key: str


@attrs.frozen
class Refresh:
    """Skip the read (``CacheMode.REFRESH``); store the new success under ``key``."""

    key: str


@attrs.frozen
class Bypass:
    """Neither read nor write: ``bypass`` (the call said so) or ``uncacheable`` (no key)."""

    reason: str


@attrs.frozen
class Write:
    """Store ``value`` (the encoded entry) for ``ttl`` seconds (None: until evicted)."""

    value: bytes
    ttl: float | None


@attrs.frozen
class Skip:
    """Not storable: ``status`` (not a 200), ``not_json`` or ``incomplete`` (a stream)."""

    reason: str


@attrs.frozen
class CacheRules:
    """What is cached under which key, and for how long. Frozen; the ``Cache``'s ``.config``."""

    #: Seconds an entry lives (None: until the store evicts it).
    ttl: float | None = attrs.field(default=24 * 3600.0, validator=optional(finite()))
    #: Let every credential read every entry (only for a cache you alone use).
    shared_namespace: bool = False
    #: Seconds a failed store is left alone before one call probes it again.
    recheck: float = attrs.field(default=5.0, validator=finite())

    def namespace(self, request: Request) -> str:
        """The key prefix of this caller: a keyed hash of its credential, so callers with
        different keys never read each other's entries (``shared_namespace`` joins them)."""
        if self.shared_namespace:
            return "shared"
        auth = request.headers.get("authorization") or request.headers.get("api-key") or ""
        return hmac.new(auth.encode(), _NAMESPACE_LABEL, hashlib.sha256).hexdigest()[:32]

    def key(self, request: Request) -> str | None:
        """The entry's key, or None when the body is not JSON (such a call is not cached)."""
        body = _canonical(request)
        if body is None:
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

    def read(self, request: Request) -> Lookup | Refresh | Bypass:
        """What to do before the call: look up the entry, refresh it, or bypass the cache (the
        call's ``CacheMode``, or a body that is not JSON)."""
        mode = request.options.cache
        if mode is CacheMode.BYPASS:
            return Bypass("bypass")
        key = self.key(request)
        if key is None:
            return Bypass("uncacheable")
        return Lookup(key) if mode is CacheMode.USE else Refresh(key)

    def store(self, response: Response) -> Write | Skip:
        """A buffered answer: stored when it is a 200 whose body is JSON."""
        if response.status != 200 or response.stream is not None:
            return Skip("status")
        try:
            response.json()
        except jsonlib.JSONDecodeError:
            return Skip("not_json")
        return Write(_encode(response.status, response.headers, response.body, False), self.ttl)

    def store_stream(self, data: bytes, parse: StreamParse) -> Write | Skip:
        """A streamed answer (all of its bytes): stored when its parse found it complete."""
        if not parse.complete:
            return Skip("incomplete")
        return Write(_encode(200, _STREAM_HEADERS, data, True), self.ttl)


def _canonical(request: Request) -> bytes | None:
    """The body as canonical JSON, from the call's parsed body; None when it is not JSON."""
    raw = request.body
    if not raw:
        return b""
    parsed = request.options.call.json(raw)
    if parsed is None and raw.strip() != b"null":
        return None
    try:
        out = jsonlib.dumps_canonical(parsed)
        if b"e+" in out:  # perhaps an integer orjson read as a float: read the text exactly
            out = jsonlib.canonical(raw)
    except jsonlib.JSONDecodeError:
        return None
    except InvalidInput:  # read by the stdlib alone (a lone surrogate): not worth a key
        return None
    return out


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


class _Failed:
    """The store did not answer (failed, froze past the deadline, or is being left alone)."""


_FAILED = _Failed()


class Cache:
    """Middleware: serve repeated calls from ``store``; see the module docstring.

    Args:
        store: where entries live (``MemoryStore``, ``SQLiteStore``, ``RedisStore``); closed by
            ``aclose``.
        ttl, shared_namespace, recheck: the ``CacheRules`` fields (``.config``).
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl: float | None = 24 * 3600.0,
        shared_namespace: bool = False,
        recheck: float = 5.0,
    ) -> None:
        self.store = store
        self.config = CacheRules(ttl, shared_namespace, recheck)
        self._down = False
        self._probe_at = 0.0
        self._pace = Pacer()
        self._flights: dict[str, _Flight] = {}
        self.hits = self.misses = self.coalesced = 0

    async def aclose(self) -> None:
        """Close the store."""
        await self.store.aclose()

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Answer from the store when it holds a fresh entry; otherwise call on and store a
        complete success. A failing store is skipped, never the call's failure."""
        call = request.options.call
        decision = self.config.read(request)
        match decision:
            case Lookup(key=key):
                cached = await self._read(key, request.options.stream, request.options.deadline)
                if isinstance(cached, Response):
                    await self._pace()
                    self.hits += 1
                    if call.sink is not None:  # the hot path: no clock read unless heard
                        call.emit(CacheHit, current_time())
                    return cached
                reason = "store_error" if cached is _FAILED else "absent"
            case Refresh(key=key):
                reason = "refresh"
            case Bypass(reason=reason):
                if call.sink is not None:
                    call.emit(CacheMiss, current_time(), reason=reason)
                return await call_next(request)
            case _:
                never(decision)
        self.misses += 1
        if call.sink is not None:
            call.emit(CacheMiss, current_time(), reason=reason)
        if not request.options.stream:
            return await self._single_flight(key, request, call_next)
        mark = call.stream
        response = await call_next(request)
        if response.status != 200 or response.stream is None:
            return response
        stream, parse = shared_parse(call, response.stream, mark)
        parse.check_events()
        tee = _Tee(stream, parse, self, key, call, request.options.deadline)
        return attrs.evolve(response, stream=tee)

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
            decision = self.config.store(response)
            await self._keep(decision, key, request.options.call, request.options.deadline)
            return response
        finally:
            del self._flights[key]
            flight.done.set()

    async def _keep(
        self, decision: Write | Skip, key: str, call: Call, deadline: float | None
    ) -> None:
        match decision:
            case Write(value=value, ttl=ttl):
                written = await self._guarded(
                    "write", lambda: self.store.set(key, value, ttl), deadline
                )
                if written is not _FAILED and call.sink is not None:
                    call.emit(CacheStored, current_time())
            case Skip():
                pass
            case _:
                never(decision)

    async def _read(
        self, key: str, stream: bool, deadline: float | None
    ) -> Response | _Failed | None:
        raw = await self._guarded("read", lambda: self.store.get(key), deadline)
        if raw is None or isinstance(raw, _Failed):
            return raw
        return _decode(raw, stream)

    async def _guarded(
        self, what: str, call: Callable[[], Awaitable[T]], deadline: float | None
    ) -> T | _Failed:
        """``call()`` ended at ``deadline``; ``_FAILED`` when it failed, timed out or was
        skipped (the store failed lately)."""
        if self._down:
            now = current_time()
            if now < self._probe_at:
                return _FAILED  # the store failed lately: leave it alone for now
            self._probe_at = now + self.config.recheck  # this call probes; the others skip
        try:
            if deadline is None:
                result = await call()
            else:
                with anyio.move_on_after(deadline - current_time()) as scope:
                    result = await call()
                if scope.cancelled_caught:
                    return _FAILED  # the call's deadline passed: no sign of a broken store
        except Exception as exc:  # a broken store is a miss, never a failed call
            if not self._down:
                log.warning(
                    "cache %s failed (%s); leaving the store alone for %gs",
                    what,
                    type(exc).__name__,
                    self.config.recheck,
                )
            self._down, self._probe_at = True, current_time() + self.config.recheck
            return _FAILED
        if self._down:
            log.warning("cache store answers again")
            self._down = False
        return result


class _Tee:
    """Passes a stream through and stores it once it has completed cleanly."""

    def __init__(
        self,
        inner: ByteStream,
        parse: StreamParse,
        cache: Cache,
        key: str,
        call: Call,
        deadline: float | None,
    ) -> None:
        self._inner, self._parse, self._cache = inner, parse, cache
        self._key, self._call, self._deadline = key, call, deadline

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        parts: list[bytes] = []
        async for chunk in self._inner:
            parts.append(chunk)
            yield chunk
        decision = self._cache.config.store_stream(b"".join(parts), self._parse)
        await self._cache._keep(decision, self._key, self._call, self._deadline)

    async def aclose(self) -> None:
        await self._inner.aclose()
