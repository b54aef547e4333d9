"""A semantic cache (off by default): answer a chat call from a *similar* earlier one.

Policy: a ``SemanticIndex`` per scope (model + system prompt) holds the embeddings of earlier
last-user-turns and finds the nearest by cosine similarity; a hit needs ``threshold`` (0.95 by
default) or more. Scoping means a different model or instructions never share answers.

Shell: ``SemanticCache`` embeds the last user message with the provider's ``/v1/embeddings``
(through the rest of the stack, so it is rate-limited and retried like any call), looks it
up (reading the call's parsed body, ``call.json``), and on a miss sends the call and remembers a
successful answer, reporting ``SemanticCacheHit``/``SemanticCacheMiss`` with the best score.
Streams, calls with tools, and non-chat calls pass through untouched. Use it where a
near-duplicate question may get the same answer (FAQ bots); never where the exact wording
matters.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from corral._clock import current_time
from corral.core import _jsonlib as jsonlib
from corral.core._compose import Handler
from corral.core._errors import CorralError
from corral.core._events import SemanticCacheHit, SemanticCacheMiss
from corral.core._models import Request, Response
from corral.core._wire import decode_embeddings
from corral.middleware._checks import at_least, between

__all__ = ["SemanticCache", "SemanticCacheConfig", "SemanticIndex", "cosine"]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


@attrs.define
class SemanticIndex:
    """Embeddings and answers of one scope, oldest evicted first beyond ``max_entries``."""

    max_entries: int = 1000
    entries: deque[tuple[tuple[float, ...], Response]] = attrs.field(factory=deque)

    def nearest(self, vector: Sequence[float]) -> tuple[float, Response | None]:
        best, answer = -1.0, None
        for stored, response in self.entries:
            score = cosine(vector, stored)
            if score > best:
                best, answer = score, response
        return best, answer

    def add(self, vector: Sequence[float], response: Response) -> None:
        self.entries.append((tuple(vector), response))
        while len(self.entries) > self.max_entries:
            self.entries.popleft()


def _scope_and_question(body: Mapping[str, Any]) -> tuple[str, str] | None:
    messages = body.get("messages")
    if body.get("stream") or body.get("tools") or not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, Mapping) or last.get("role") != "user":
        return None
    question = last.get("content")
    if not isinstance(question, str):
        return None
    system = [
        m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "system"
    ]
    scope = hashlib.sha256(jsonlib.dumps_canonical([body.get("model"), system])).hexdigest()
    return scope, question


@attrs.frozen
class SemanticCacheConfig:
    """How near is near enough, and how much is remembered."""

    #: The model that embeds each question (through the rest of the stack).
    embedding_model: str = "text-embedding-3-small"
    #: The cosine similarity a hit needs, in (0, 1].
    threshold: float = attrs.field(
        default=0.95, validator=between(0.0, 1.0, open_low=True, open_high=False)
    )
    #: Answers kept per scope (model + system prompt), oldest evicted first.
    max_entries: int = attrs.field(default=1000, validator=at_least(1))
    #: Scopes kept, least recently used evicted first.
    max_scopes: int = attrs.field(default=100, validator=at_least(1))


class SemanticCache:
    """Middleware: serve near-duplicate chat questions from earlier answers.

    Args:
        embedding_model, threshold, max_entries, max_scopes: the ``SemanticCacheConfig``
            fields (``.config``).
    """

    def __init__(
        self,
        *,
        embedding_model: str = "text-embedding-3-small",
        threshold: float = 0.95,
        max_entries: int = 1000,
        max_scopes: int = 100,
    ) -> None:
        self.config = SemanticCacheConfig(embedding_model, threshold, max_entries, max_scopes)
        self._indexes: OrderedDict[str, SemanticIndex] = OrderedDict()
        self.hits = self.misses = 0

    def _index(self, scope: str) -> SemanticIndex:
        index = self._indexes.get(scope)
        if index is None:
            index = self._indexes[scope] = SemanticIndex(self.config.max_entries)
            while len(self._indexes) > self.config.max_scopes:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(scope)
        return index

    async def _embed(
        self, request: Request, text: str, call_next: Handler
    ) -> tuple[float, ...] | None:
        url = request.url.rsplit("/chat/completions", 1)[0] + "/embeddings"
        embed_request = Request(
            "POST",
            url,
            request.headers,
            jsonlib.dumps({"model": self.config.embedding_model, "input": text}),
        ).with_options(model=self.config.embedding_model)
        try:
            return decode_embeddings(await call_next(embed_request)).vectors[0]
        except (CorralError, IndexError):
            return None  # no embedding, no semantic lookup: the call goes through as usual

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Answer a chat call from an earlier answer to a question close enough to it; otherwise
        call on and remember the answer."""
        if not request.url.endswith("/chat/completions") or not request.body:
            return await call_next(request)
        call = request.options.call
        body = call.json(request.body)
        found = _scope_and_question(body) if type(body) is dict else None
        if found is None:
            return await call_next(request)
        scope, question = found
        vector = await self._embed(request, question, call_next)
        if vector is None:
            return await call_next(request)
        index = self._index(scope)
        score, answer = index.nearest(vector)
        if answer is not None and score >= self.config.threshold:
            self.hits += 1
            call.emit(SemanticCacheHit, current_time(), score=score)
            return attrs.evolve(answer, from_cache=True)
        self.misses += 1
        call.emit(SemanticCacheMiss, current_time(), score=max(score, 0.0))
        response = await call_next(request)
        if response.status == 200 and response.stream is None:
            index.add(vector, response)
        return response
