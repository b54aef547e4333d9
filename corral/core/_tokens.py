"""Counting tokens before a call: the protocol, and a fast estimator that errs high.

The estimator needs no vocabulary, so it works everywhere; an exact BPE counter can be plugged
in through ``TokenCounter``. The rate limiter and truncation both take their numbers from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = [
    "CONTEXT_WINDOWS",
    "BPECounter",
    "EstimatingCounter",
    "TokenCounter",
    "count_messages",
    "counter_for_model",
    "encoding_for_model",
    "estimate_request_tokens",
    "max_output_tokens",
    "message_tokens",
]

#: Tokens a chat message costs beyond its text (role markers), as OpenAI documents.
MESSAGE_OVERHEAD = 4
REPLY_PRIMER = 3
#: Output tokens charged when a request sets no max_tokens (what providers reserve by default).
DEFAULT_MAX_OUTPUT = 1024


class TokenCounter(Protocol):
    def count(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` that counts at most ``max_tokens``."""
        ...


#: Context windows (tokens) of common models; pass your own table to ``Truncate`` to override.
CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
    "gpt-4-turbo": 128_000,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385,
    "o1": 200_000,
    "o3": 200_000,
    "o3-mini": 200_000,
    "o4-mini": 200_000,
}

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")


def encoding_for_model(model: str | None) -> str:
    """The BPE a model uses: o200k_base for the GPT-4o generation on, cl100k_base before."""
    return "o200k_base" if model and model.startswith(_O200K_PREFIXES) else "cl100k_base"


class BPECounter:
    """Exact OpenAI token counts from toktok-rs (the ``tokenizer`` extra).

    toktok compiles the o200k_base and cl100k_base vocabularies into its extension, so it works
    offline; tiktoken downloads its files on first use and fails without internet.
    """

    def __init__(self, encoding: str = "o200k_base") -> None:
        import toktok

        self._toktok = toktok
        self.encoding = encoding
        toktok.batch_count([""], encoding)  # load the vocabulary now, not on a hot path

    def count(self, text: str) -> int:
        return int(self._toktok.batch_count([text], self.encoding, threads=1)[0])

    def truncate(self, text: str, max_tokens: int) -> str:
        cut, _ = self._toktok.truncate(text, max(0, max_tokens), self.encoding)
        return str(cut)


_COUNTERS: dict[str, TokenCounter] = {}


def counter_for_model(model: str | None) -> TokenCounter:
    """An exact counter for the model's encoding if toktok is installed, else the estimator."""
    encoding = encoding_for_model(model)
    counter = _COUNTERS.get(encoding)
    if counter is None:
        try:
            counter = BPECounter(encoding)
        except ImportError:
            counter = EstimatingCounter()
        _COUNTERS[encoding] = counter
    return counter


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

    def truncate(self, text: str, max_tokens: int) -> str:
        if self.count(text) <= max_tokens:
            return text
        low, high = 0, len(text)  # the longest prefix whose estimate fits: binary search
        while low < high:
            mid = (low + high + 1) // 2
            if self.count(text[:mid]) <= max_tokens:
                low = mid
            else:
                high = mid - 1
        return text[:low]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def message_tokens(message: Any, counter: TokenCounter) -> int:
    """Tokens one chat message adds to a prompt."""
    if not isinstance(message, Mapping):
        return 0
    total = MESSAGE_OVERHEAD + counter.count(_content_text(message.get("content")))
    name = message.get("name")
    return total + counter.count(name) if isinstance(name, str) else total


def count_messages(messages: Any, counter: TokenCounter) -> int:
    """Prompt tokens for a list of chat messages."""
    if not isinstance(messages, list):
        return 0
    return REPLY_PRIMER + sum(message_tokens(m, counter) for m in messages)


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
