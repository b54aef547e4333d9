"""Counting tokens before a call: the protocol, and a fast estimator that errs high.

The estimator needs no vocabulary, so it works everywhere; an exact BPE counter can be plugged
in through ``TokenCounter``. The rate limiter and truncation both take their numbers from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["EstimatingCounter", "TokenCounter", "estimate_request_tokens"]

#: Tokens a chat message costs beyond its text (role markers), as OpenAI documents.
MESSAGE_OVERHEAD = 4
REPLY_PRIMER = 3
#: Output tokens charged when a request sets no max_tokens (what providers reserve by default).
DEFAULT_MAX_OUTPUT = 1024


class TokenCounter(Protocol):
    def count(self, text: str) -> int: ...


class EstimatingCounter:
    """An upper-leaning estimate: about 3 characters per token for ASCII, 1 per char otherwise.

    English BPE averages ~4 chars/token; using 3 over-reserves rate-limit quota a little, which
    the limiter refunds when the real ``usage`` arrives. Non-ASCII text (Thai, CJK) often costs
    a token or more per character, so it is counted one per character.
    """

    def count(self, text: str) -> int:
        if text.isascii():
            return (len(text) + 2) // 3
        ascii_chars = sum(1 for c in text if c < "\x80")
        return (ascii_chars + 2) // 3 + (len(text) - ascii_chars)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def count_messages(messages: Any, counter: TokenCounter) -> int:
    """Prompt tokens for a list of chat messages."""
    if not isinstance(messages, list):
        return 0
    total = REPLY_PRIMER
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        total += MESSAGE_OVERHEAD + counter.count(_content_text(message.get("content")))
        name = message.get("name")
        if isinstance(name, str):
            total += counter.count(name)
    return total


def max_output_tokens(body: Mapping[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return DEFAULT_MAX_OUTPUT


def estimate_request_tokens(body: Mapping[str, Any], counter: TokenCounter) -> int:
    """Tokens a provider charges against TPM up front: prompt + max output, times ``n``."""
    if "messages" in body:
        prompt = count_messages(body["messages"], counter)
        n = body.get("n", 1)
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        return prompt + max_output_tokens(body) * choices
    raw = body.get("input")
    inputs = raw if isinstance(raw, list) else [raw]
    return sum(counter.count(x) for x in inputs if isinstance(x, str))
