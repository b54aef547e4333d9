"""Fit a chat request into the model's context window, minus the output it reserves.

Policy (pure): ``fit_messages`` keeps every system/developer message and the last user turn,
drops the oldest other turns first (an assistant tool call goes together with its tool
results), then trims inside the longest remaining message. When even that cannot fit it
raises ``ContextLengthExceeded`` with the numbers.

Shell: ``Truncate`` rewrites the body when the request is too long for the model's window
(from an overridable table). If the server still answers 400 context_length_exceeded, the
request is fitted once more to the server's own numbers and resent, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from corral.core import jsonlib
from corral.core.classify import classify
from corral.core.compose import Handler
from corral.core.errors import ContextLengthExceeded
from corral.core.models import Request, Response
from corral.core.tokens import (
    CONTEXT_WINDOWS,
    TokenCounter,
    count_messages,
    counter_for_model,
    max_output_tokens,
    message_tokens,
)

__all__ = ["Fit", "Truncate", "fit_messages"]

_PROTECTED_ROLES = ("system", "developer")


@attrs.frozen
class Fit:
    messages: list[dict[str, Any]]
    tokens: int
    dropped: int = 0
    trimmed: bool = False


def _text_of(message: Mapping[str, Any]) -> str | None:
    content = message.get("content")
    return content if isinstance(content, str) else None


def fit_messages(messages: Sequence[Mapping[str, Any]], budget: int, counter: TokenCounter) -> Fit:
    """The messages, shortened as little as possible to count at most ``budget`` tokens."""
    msgs = [dict(m) for m in messages]
    total = count_messages(msgs, counter)
    if total <= budget:
        return Fit(msgs, total)
    last_user = max(
        (i for i, m in enumerate(msgs) if m.get("role") == "user"), default=len(msgs) - 1
    )
    protected = {
        i for i, m in enumerate(msgs) if m.get("role") in _PROTECTED_ROLES or i >= last_user
    }
    gone: set[int] = set()
    i = 0
    while total > budget and i < len(msgs):
        if i in protected:
            i += 1
            continue
        group = [i]  # an assistant tool call leaves together with the tool results answering it
        if msgs[i].get("tool_calls"):
            while group[-1] + 1 < len(msgs) and msgs[group[-1] + 1].get("role") == "tool":
                if group[-1] + 1 in protected:
                    break
                group.append(group[-1] + 1)
        for k in group:
            gone.add(k)
            total -= message_tokens(msgs[k], counter)
        i = group[-1] + 1
    remaining = [m for k, m in enumerate(msgs) if k not in gone]
    dropped = len(gone)
    if total <= budget:
        return Fit(remaining, total, dropped)
    texts = [
        (counter.count(t), n) for n, m in enumerate(remaining) if (t := _text_of(m)) is not None
    ]
    if not texts:
        raise ContextLengthExceeded(
            f"messages need {total} tokens but only {budget} fit, and none can be trimmed",
            max_context=budget,
            requested=total,
        )
    longest_tokens, index = max(texts)
    excess = total - budget
    if excess >= longest_tokens:
        raise ContextLengthExceeded(
            f"messages need {total} tokens but only {budget} fit, even after dropping "
            f"{dropped} old turn(s) and emptying the longest message",
            max_context=budget,
            requested=total,
        )
    text = _text_of(remaining[index]) or ""
    remaining[index] = {
        **remaining[index],
        "content": counter.truncate(text, longest_tokens - excess),
    }
    total = count_messages(remaining, counter)
    return Fit(remaining, total, dropped, trimmed=True)


class Truncate:
    """Middleware: make chat requests fit their model's context window."""

    def __init__(
        self,
        windows: Mapping[str, int] | None = None,
        *,
        default_window: int | None = None,
        counter_for: Callable[[str | None], TokenCounter] = counter_for_model,
        margin: int = 16,
    ) -> None:
        self.windows = dict(CONTEXT_WINDOWS if windows is None else windows)
        self.default_window = default_window
        self._counter_for = counter_for
        self.margin = margin
        self.truncated = 0

    def _fit(
        self, request: Request, body: dict[str, Any], window: int, scale: float = 1.0
    ) -> Request | None:
        counter = self._counter_for(body.get("model"))
        budget = int((window - max_output_tokens(body) - self.margin) * scale)
        fit = fit_messages(body["messages"], budget, counter)
        if not fit.dropped and not fit.trimmed:
            return None
        self.truncated += 1
        return request.evolve(body=jsonlib.dumps({**body, "messages": fit.messages}))

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        body = self._body(request)
        if body is None:
            return await call_next(request)
        window = self.windows.get(str(body.get("model")), self.default_window)
        if window is not None:
            request = self._fit(request, body, window) or request
        response = await call_next(request)
        if response.status != 400:
            return response
        if response.stream is not None:
            response = await response.aread()
        error = classify(response.status, response.headers, response.body)
        if not isinstance(error, ContextLengthExceeded) or error.max_context is None:
            return response
        body = self._body(request) or body
        counter = self._counter_for(body.get("model"))
        ours = count_messages(body["messages"], counter) + max_output_tokens(body)
        # The server counts differently from us: shrink our budget by its ratio to ours.
        scale = min(1.0, ours / error.requested) if error.requested else 1.0
        smaller = self._fit(request, body, error.max_context, scale * 0.98)
        return response if smaller is None else await call_next(smaller)

    @staticmethod
    def _body(request: Request) -> dict[str, Any] | None:
        if not request.body or not request.url.endswith("/chat/completions"):
            return None
        try:
            body = jsonlib.loads(request.body)
        except jsonlib.JSONDecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return None
        return body
