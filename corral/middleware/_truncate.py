"""Fit a chat request into the model's context window, minus the output it reserves.

Policy (pure): ``fit_messages`` keeps every system/developer message and the last user turn,
drops the oldest other turns first (an assistant tool call goes together with its tool
results), then trims inside the longest remaining message. It decides ``Fits`` (nothing to do),
``Fitted`` (the shorter messages) or ``TooLong`` (even that cannot fit: the shell raises
``ContextLengthExceeded`` with the numbers).

Shell: ``Truncate`` rewrites the body when the request is too long for the model's window
(from an overridable table), in the call's parsed body too (``call.replace_json``), and reports
it (``Truncated``). If the server still answers 400 context_length_exceeded, the request is
fitted once more to the server's own numbers and resent, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from corral._clock import current_time
from corral.core import _jsonlib as jsonlib
from corral.core._call import Call
from corral.core._compose import Handler
from corral.core._errors import ContextLengthExceeded
from corral.core._events import Truncated
from corral.core._models import Request, Response
from corral.core._tokens import (
    CONTEXT_WINDOWS,
    TokenCounter,
    count_messages,
    counter_for_model,
    max_output_tokens,
    message_tokens,
)
from corral.middleware._checks import at_least, never, optional

__all__ = ["Fit", "Fits", "Fitted", "TooLong", "Truncate", "TruncateConfig", "fit_messages"]

_PROTECTED_ROLES = ("system", "developer")


@attrs.frozen
class Fits:
    """The messages already fit: ``tokens`` of them, nothing to change."""

    tokens: int


@attrs.frozen
class Fitted:
    """The messages, shortened from ``tokens_before`` to ``tokens`` by dropping ``dropped`` old
    turns and, if ``trimmed``, cutting the longest message."""

    messages: list[dict[str, Any]]
    tokens_before: int
    tokens: int
    dropped: int
    trimmed: bool


@attrs.frozen
class TooLong:
    """Even dropping every turn that may go and emptying the longest message leaves ``needed``
    tokens where ``budget`` fit: the call cannot be sent as it is."""

    needed: int
    budget: int
    reason: str


Fit = Fits | Fitted | TooLong


def _text_of(message: Mapping[str, Any]) -> str | None:
    content = message.get("content")
    return content if isinstance(content, str) else None


def fit_messages(messages: Sequence[Mapping[str, Any]], budget: int, counter: TokenCounter) -> Fit:
    """The messages, shortened as little as possible to count at most ``budget`` tokens."""
    msgs = [dict(m) for m in messages]
    total = before = count_messages(msgs, counter)
    if total <= budget:
        return Fits(total)
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
        return Fitted(remaining, before, total, dropped, trimmed=False)
    texts = [
        (counter.count(t), n) for n, m in enumerate(remaining) if (t := _text_of(m)) is not None
    ]
    if not texts:
        return TooLong(total, budget, "none can be trimmed")
    longest_tokens, index = max(texts)
    excess = total - budget
    if excess >= longest_tokens:
        return TooLong(
            total,
            budget,
            f"even after dropping {dropped} old turn(s) and emptying the longest message",
        )
    text = _text_of(remaining[index]) or ""
    remaining[index] = {
        **remaining[index],
        "content": counter.truncate(text, longest_tokens - excess),
    }
    total = count_messages(remaining, counter)
    return Fitted(remaining, before, total, dropped, trimmed=True)


def _windows(value: Mapping[str, int] | None) -> Mapping[str, int]:
    return MappingProxyType(dict(CONTEXT_WINDOWS if value is None else value))


def _window_sizes(instance: TruncateConfig, attribute: Any, value: Mapping[str, int]) -> None:
    check = at_least(1)
    for size in value.values():
        check(instance, attribute, size)


@attrs.frozen
class TruncateConfig:
    """Which windows to fit into; validated when built (``InvalidInput`` names the field)."""

    #: Context window (tokens) by model name; None: corral's table (``CONTEXT_WINDOWS``).
    windows: Mapping[str, int] = attrs.field(
        default=None, converter=_windows, validator=_window_sizes
    )
    #: The window of a model the table does not name (None: such calls pass untouched).
    default_window: int | None = attrs.field(default=None, validator=optional(at_least(1)))
    #: Tokens kept free besides the reserved output, for the counters' disagreement.
    margin: int = attrs.field(default=16, validator=at_least(0))
    #: The token counter for a model name.
    counter_for: Callable[[str | None], TokenCounter] = counter_for_model

    def window(self, model: object) -> int | None:
        return self.windows.get(str(model), self.default_window)


class Truncate:
    """Middleware: make chat requests fit their model's context window.

    Args:
        windows, default_window, margin, counter_for: the ``TruncateConfig`` fields
            (``.config``).
    """

    def __init__(
        self,
        *,
        windows: Mapping[str, int] | None = None,
        default_window: int | None = None,
        margin: int = 16,
        counter_for: Callable[[str | None], TokenCounter] = counter_for_model,
    ) -> None:
        self.config = TruncateConfig(windows, default_window, margin, counter_for)
        #: Requests rewritten (for metrics).
        self.truncated = 0

    def _fit(
        self, request: Request, body: dict[str, Any], window: int, scale: float = 1.0
    ) -> Request:
        """``request`` fitted into ``window`` (itself when it fits); ``ContextLengthExceeded``
        when it cannot be."""
        counter = self.config.counter_for(body.get("model"))
        budget = int((window - max_output_tokens(body) - self.config.margin) * scale)
        fit = fit_messages(body["messages"], budget, counter)
        match fit:
            case Fits():
                return request
            case Fitted(messages=messages):
                call = request.options.call
                self.truncated += 1
                fitted = {**body, "messages": messages}
                encoded = jsonlib.dumps(fitted)
                call.replace_json(fitted, encoded)
                call.emit(
                    Truncated,
                    current_time(),
                    tokens_before=fit.tokens_before,
                    tokens_after=fit.tokens,
                    dropped_messages=fit.dropped,
                )
                return request.evolve(body=encoded)
            case TooLong(needed=needed, budget=budget, reason=reason):
                raise ContextLengthExceeded(
                    f"messages need {needed} tokens but only {budget} fit, {reason}",
                    max_context=budget,
                    requested=needed,
                )
            case _:
                never(fit)

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        """Shorten a chat body that would not fit its model's window (as little as possible,
        ``fit_messages``) before calling on; ``ContextLengthExceeded`` when it cannot fit."""
        call = request.options.call
        body = _chat_body(request, call)
        if body is None:
            return await call_next(request)
        window = self.config.window(body.get("model"))
        if window is not None:
            request = self._fit(request, body, window)
        response = await call_next(request)
        if response.status != 400:
            return response
        if response.stream is not None:
            response = await response.aread()
        error = response.error()
        if not isinstance(error, ContextLengthExceeded) or error.max_context is None:
            return response
        body = _chat_body(request, call) or body
        counter = self.config.counter_for(body.get("model"))
        ours = count_messages(body["messages"], counter) + max_output_tokens(body)
        # The server counts differently from us: shrink our budget by its ratio to ours.
        scale = min(1.0, ours / error.requested) if error.requested else 1.0
        smaller = self._fit(request, body, error.max_context, scale * 0.98)
        return response if smaller is request else await call_next(smaller)


def _chat_body(request: Request, call: Call) -> dict[str, Any] | None:
    """The call's parsed chat body (``call.json``), or None when this is not a chat call."""
    if not request.body or not request.url.endswith("/chat/completions"):
        return None
    body = call.json(request.body)
    if type(body) is not dict or not isinstance(body.get("messages"), list):
        return None
    return body
