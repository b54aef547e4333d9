"""The emulated provider: what it answers to each request, decided without I/O.

``Emulator.handle`` reads a parsed HTTP request and returns a ``Plan``: the bytes to write, how
long to wait first, whether to stream, and which fault (if any) to act out. The asyncio server in
``server.py`` carries the plan out. Faults are drawn from a seeded RNG, so a run is repeatable.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from corral.core import _jsonlib as jsonlib
from corral.core._tokens import (
    CONTEXT_WINDOWS,
    EstimatingCounter,
    count_messages,
    max_output_tokens,
)
from corral.testing.batches import BatchConfig, BatchService, LineAnswer
from corral.testing.quota import Admission, SlidingWindowQuota

__all__ = [
    "DEFAULT_CONTEXT_WINDOWS",
    "DEFAULT_MODELS",
    "ROUTES",
    "Emulator",
    "EmulatorConfig",
    "Fault",
    "Latency",
    "Plan",
    "format_duration",
]

#: The real table plus a deliberately small model for context-length tests.
DEFAULT_CONTEXT_WINDOWS: Mapping[str, int] = {**CONTEXT_WINDOWS, "small-model": 4_096}

#: Models the emulator serves unless told otherwise: OpenAI's current chat and embedding models
#: (the demo's ``gpt-4o-mini`` among them), so a misspelt model fails as it would in production.
DEFAULT_MODELS: frozenset[str] = frozenset(CONTEXT_WINDOWS) | {
    "gpt-4o-2024-08-06",
    "gpt-4o-mini-2024-07-18",
    "chatgpt-4o-latest",
    "gpt-4.5-preview",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "o1-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
}

#: The routes the emulator answers (method, path); anything else is a 404 that lists them.
ROUTES = (("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("GET", "/v1/models"))


class Fault(enum.Enum):
    """A failure the emulator injects at random (``EmulatorConfig.faults``), one per kind a real
    provider or network shows."""

    RATE_LIMIT = "429"
    SERVER_ERROR = "500"
    UNAVAILABLE = "503"
    RESET = "reset"  #: close the socket (RST) without answering
    RESET_AFTER_FIRST_BYTE = "reset_after_first_byte"
    HANG = "hang"  #: say nothing until the client gives up
    TRUNCATE = "truncate"  #: body (or SSE stream) cut short
    MALFORMED = "malformed"  #: 200 with a body that is not the promised JSON


@attrs.frozen
class Latency:
    """Time to first byte: fixed, uniform(low, high) or lognormal with a given median."""

    kind: str = "fixed"
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def fixed(cls, seconds: float) -> Latency:
        """Every request waits ``seconds`` before its first byte."""
        return cls("fixed", seconds)

    @classmethod
    def uniform(cls, low: float, high: float) -> Latency:
        """Waits drawn uniformly between ``low`` and ``high`` seconds."""
        return cls("uniform", low, high)

    @classmethod
    def lognormal(cls, median: float, sigma: float) -> Latency:
        """Waits with median ``median`` seconds and a long tail (``sigma``), as real providers
        show."""
        return cls("lognormal", median, sigma)

    @classmethod
    def parse(cls, text: str) -> Latency:
        """``"0.05"``, ``"uniform:0.01,0.1"`` or ``"lognormal:0.2,0.5"`` (for the CLI)."""
        kind, _, args = text.partition(":")
        if not args:
            return cls.fixed(float(kind))
        a, _, b = args.partition(",")
        return cls(kind, float(a), float(b or 0))

    def sample(self, rng: random.Random) -> float:
        """One wait, drawn from ``rng`` so a seeded emulator repeats itself."""
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "lognormal":
            return self.a * math.exp(rng.gauss(0.0, self.b))
        return self.a


def format_duration(seconds: float) -> str:
    """OpenAI's reset style: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.3g}s"


def default_reply(body: Mapping[str, Any]) -> str:
    """A deterministic answer that depends on the prompt, so tests can tell them apart."""
    messages = body.get("messages")
    last = ""
    if isinstance(messages, list) and messages and isinstance(messages[-1], Mapping):
        content = messages[-1].get("content")
        last = content if isinstance(content, str) else json.dumps(content)
    digest = hashlib.blake2b(last.encode(), digest_size=4).hexdigest()
    return f"Emulated answer {digest} to a prompt of {len(last.split())} words."


@attrs.frozen
class EmulatorConfig:
    #: Accepted keys; None accepts any non-empty Bearer key.
    """How the emulated provider behaves: keys it accepts, latency, RPM/TPM limits, injected
    faults, models and their context windows. Frozen; ``seed`` makes runs repeatable."""

    api_keys: frozenset[str] | None = None
    latency: Latency = Latency()
    #: Streaming pace; None sends every chunk at once.
    tokens_per_second: float | None = None
    rpm: int | None = None
    tpm: int | None = None
    #: The window the per-minute limits are enforced over, in seconds: any ``window`` admits
    #: at most ``rpm * window / 60`` calls and ``tpm * window / 60`` tokens (OpenAI documents
    #: that per-minute limits may be enforced over shorter periods).
    window: float = 60.0
    #: How TPM is charged at admission: ``"reserved"`` counts the prompt as the provider
    #: estimates it (characters / 4) plus ``max_tokens`` (OpenAI's rate-limit guide), and
    #: does not give back what the answer did not use; ``"usage"`` counts the real usage.
    count: str = "usage"
    #: Do injected faults (500, 503, 429, resets...) count against the limits?
    faults_use_quota: bool = False
    #: Fault kind -> probability per admitted request.
    faults: Mapping[Fault, float] = attrs.field(factory=dict)
    seed: int = 0
    fault_retry_after: float = 1.0
    hang_seconds: float = 30.0
    context_windows: Mapping[str, int] = DEFAULT_CONTEXT_WINDOWS
    #: Served models; any other gets OpenAI's 404 ``model_not_found``.
    models: frozenset[str] = DEFAULT_MODELS
    #: Accept every model name (tests that name models freely, e.g. "m").
    any_model: bool = False
    default_context_window: int = 128_000
    embedding_dimensions: int = 64
    reply: Callable[[Mapping[str, Any]], str] = default_reply
    #: The Batch API (/v1/files, /v1/batches): timeline, expiry, line faults, queue limit.
    batches: BatchConfig = attrs.field(factory=BatchConfig)


@attrs.frozen
class Plan:
    """What the server does for one request."""

    status: int
    headers: tuple[tuple[str, str], ...]
    #: The JSON body, or the SSE events when ``events`` is set.
    body: bytes = b""
    events: tuple[bytes, ...] | None = None
    delay: float = 0.0
    #: Seconds between stream events.
    pace: float = 0.0
    fault: Fault | None = None


_KEY_IN_AUTH = re.compile(r"^Bearer\s+(\S+)$", re.IGNORECASE)


def _error(status: int, message: str, code: str | None, kind: str) -> bytes:
    return jsonlib.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def estimate_prompt(messages: list[Any]) -> int:
    """The provider's own prompt estimate for rate limits: characters / 4, rounded up (not
    corral's estimator, so the two can disagree as a real provider and corral do)."""
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(
                len(str(part.get("text", ""))) for part in content if isinstance(part, dict)
            )
    return -(-chars // 4) + 3 * len(messages)


class Emulator:
    """The provider's logic. Not thread-safe: one server loop owns it."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.quota = SlidingWindowQuota(self.config.rpm, self.config.tpm, self.config.window)
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(self.config.seed)
        self._counter = EstimatingCounter()
        self._ids = 0
        if self.config.count not in ("reserved", "usage"):
            raise ValueError(f"count must be 'reserved' or 'usage', got {self.config.count!r}")
        fault_total = sum(self.config.faults.values())
        if fault_total > 1:
            raise ValueError(f"fault rates add up to {fault_total} > 1")
        self.batches = BatchService(self.config.batches, self._answer_line)

    # -- entry point ------------------------------------------------------------------------

    def handle(
        self, now: float, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Plan:
        """The provider's answer to one request at ``now``: a ``Plan`` (status, headers, body or
        events, delay, fault) that a server or the simulator carries out."""
        if path == "/_corral/counts":  # the emulator's own counters, for tests and benchmarks
            counts = {**self.counts, **self.quota.stats()}
            return Plan(200, (("content-type", "application/json"),), jsonlib.dumps(counts))
        self.counts["received"] += 1
        self._ids += 1
        rid = (("x-request-id", f"req_{self._ids:08d}"),)
        if not self._authorized(headers.get("authorization", "")):
            return self._fail(
                401, "Incorrect API key provided.", "invalid_api_key", "invalid_request_error", rid
            )
        if path.startswith(("/v1/files", "/v1/batches")):
            status, kind, reply = self.batches.handle(now, method, path, headers, body)
            return Plan(status, (*rid, ("content-type", kind)), reply)
        path = path.split("?", 1)[0]
        if (method, path) not in ROUTES:
            served = ", ".join(f"{m} {p}" for m, p in ROUTES)
            return self._fail(
                404,
                f"Invalid URL ({method} {path}). This server serves {served}.",
                None,
                "invalid_request_error",
                rid,
            )
        if path == "/v1/models":
            data = [
                {"id": m, "object": "model", "owned_by": "corral-emulator"}
                for m in sorted(self.config.models)
            ]
            return self._ok(rid, {"object": "list", "data": data})
        try:
            request = jsonlib.loads(body)
        except jsonlib.JSONDecodeError:
            return self._fail(
                400,
                "We could not parse the JSON body of your request.",
                None,
                "invalid_request_error",
                rid,
            )
        if not isinstance(request, dict) or not isinstance(request.get("model"), str):
            return self._fail(
                400, "you must provide a model parameter", None, "invalid_request_error", rid
            )
        if not self.config.any_model and request["model"] not in self.config.models:
            return self._fail(
                404,
                f"The model `{request['model']}` does not exist or you do not have access to it.",
                "model_not_found",
                "invalid_request_error",
                rid,
            )
        if path.endswith("/embeddings"):
            return self._embeddings(now, request, rid)
        return self._chat(now, request, rid)

    # -- routes -----------------------------------------------------------------------------

    def _chat(self, now: float, request: dict[str, Any], rid: tuple[tuple[str, str], ...]) -> Plan:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._fail(
                400, "'messages' must be a non-empty array", None, "invalid_request_error", rid
            )
        model = request["model"]
        prompt = count_messages(messages, self._counter)
        max_out = (
            max_output_tokens(request)
            if ("max_tokens" in request or "max_completion_tokens" in request)
            else 0
        )
        window = self.config.context_windows.get(model, self.config.default_context_window)
        if prompt + max_out > window:
            self.counts["context_length_exceeded"] += 1
            return self._fail(
                400,
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt + max_out} tokens ({prompt} in the messages, {max_out} in the "
                "completion). Please reduce the length of the messages or completion.",
                "context_length_exceeded",
                "invalid_request_error",
                rid,
                count=False,
            )
        words = self.config.reply(request).split(" ")
        limit = max_output_tokens(request)
        finish = "stop"
        if len(words) > limit:
            words, finish = words[:limit], "length"
        text = " ".join(words)
        completion = len(words)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        charged = prompt + completion
        if self.config.count == "reserved":
            charged = estimate_prompt(messages) + (max_out if max_out else completion)
        fault = self._draw_fault()
        admission = self.quota.try_admit(
            now, charged, charge=fault is None or self.config.faults_use_quota
        )
        limit_headers = self._limit_headers(admission)
        if not admission.admitted:
            return self._rate_limited(admission, rid + limit_headers)
        headers = rid + limit_headers
        if fault is Fault.RATE_LIMIT:
            return self._fail(
                429,
                "Rate limit reached (injected).",
                "rate_limit_exceeded",
                "requests",
                (*headers, ("retry-after", f"{self.config.fault_retry_after:g}")),
                fault=fault,
            )
        if fault in (Fault.SERVER_ERROR, Fault.UNAVAILABLE):
            status = 500 if fault is Fault.SERVER_ERROR else 503
            return self._fail(
                status,
                "The server had an error processing your request.",
                None,
                "server_error",
                headers,
                fault=fault,
            )
        cid = f"chatcmpl-{self._ids}"
        delay = self.config.latency.sample(self._rng)
        if fault is Fault.HANG:
            delay = self.config.hang_seconds
        self.counts[fault.value if fault else "ok"] += 1
        if request.get("stream"):
            include_usage = isinstance(request.get("stream_options"), dict) and bool(
                request["stream_options"].get("include_usage")
            )
            events = self._stream_events(
                cid, model, words, finish, usage if include_usage else None
            )
            if fault is Fault.TRUNCATE:
                events = events[: max(1, len(events) // 2)]
            elif fault is Fault.MALFORMED:
                events = (events[0], b"data: {not json\n\n")
            pace = 1.0 / self.config.tokens_per_second if self.config.tokens_per_second else 0.0
            return Plan(
                200,
                (*headers, ("content-type", "text/event-stream")),
                events=events,
                delay=delay,
                pace=pace,
                fault=fault,
            )
        body = jsonlib.dumps(
            {
                "id": cid,
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        )
        if fault is Fault.MALFORMED:
            body = body[: len(body) // 2]  # a valid HTTP message whose JSON is cut
        return Plan(
            200, (*headers, ("content-type", "application/json")), body, delay=delay, fault=fault
        )

    def _embeddings(
        self, now: float, request: dict[str, Any], rid: tuple[tuple[str, str], ...]
    ) -> Plan:
        raw = request.get("input")
        inputs: list[str] = [
            x for x in (raw if isinstance(raw, list) else [raw]) if isinstance(x, str)
        ]
        if not inputs or (isinstance(raw, list) and len(inputs) != len(raw)):
            return self._fail(
                400,
                "'input' must be a string or an array of strings",
                None,
                "invalid_request_error",
                rid,
            )
        tokens = sum(self._counter.count(x) for x in inputs)
        admission = self.quota.try_admit(now, tokens)
        headers = rid + self._limit_headers(admission)
        if not admission.admitted:
            return self._rate_limited(admission, headers)
        dims = request.get("dimensions")
        dims = (
            dims if isinstance(dims, int) and 0 < dims <= 4096 else self.config.embedding_dimensions
        )
        self.counts["ok"] += 1
        data = [
            {"object": "embedding", "index": i, "embedding": embed_text(x, dims)}
            for i, x in enumerate(inputs)
        ]
        return self._ok(
            headers,
            {
                "object": "list",
                "data": data,
                "model": request["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            delay=self.config.latency.sample(self._rng),
        )

    def _answer_line(
        self, now: float, url: str, headers: Mapping[str, str], body: bytes
    ) -> LineAnswer:
        """One line of a batch, answered as the live route answers it; a fault that would
        break the connection (reset, hang, a cut body) is a 500 record."""
        plan = self.handle(now, "POST", url, headers, body)
        request_id = dict(plan.headers).get("x-request-id", "")
        if plan.fault is not None or plan.events is not None:
            return 500, _error(500, "The server had an error.", None, "server_error"), request_id
        return plan.status, plan.body, request_id

    # -- helpers ----------------------------------------------------------------------------

    def _authorized(self, auth: str) -> bool:
        match = _KEY_IN_AUTH.match(auth.strip())
        if match is None:
            return False
        keys = self.config.api_keys
        return keys is None or match.group(1) in keys

    def _draw_fault(self) -> Fault | None:
        if not self.config.faults:
            return None
        roll = self._rng.random()
        for fault, rate in self.config.faults.items():
            if roll < rate:
                return fault
            roll -= rate
        return None

    def _limit_headers(self, a: Admission) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        if self.config.rpm is not None:
            out += [
                ("x-ratelimit-limit-requests", str(self.config.rpm)),
                ("x-ratelimit-remaining-requests", str(a.remaining_requests)),
                ("x-ratelimit-reset-requests", format_duration(a.reset_requests)),
            ]
        if self.config.tpm is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(self.config.tpm)),
                ("x-ratelimit-remaining-tokens", str(a.remaining_tokens)),
                ("x-ratelimit-reset-tokens", format_duration(a.reset_tokens)),
            ]
        return tuple(out)

    def _rate_limited(self, a: Admission, headers: tuple[tuple[str, str], ...]) -> Plan:
        self.counts["rate_limited"] += 1
        wait = a.retry_after if math.isfinite(a.retry_after) else 60.0
        return self._fail(
            429,
            f"Rate limit reached. Please try again in {format_duration(wait)}.",
            "rate_limit_exceeded",
            "requests",
            (
                *headers,
                ("retry-after", f"{math.ceil(wait * 1000) / 1000:g}"),
                ("retry-after-ms", str(math.ceil(wait * 1000))),
            ),
            count=False,
        )

    def _fail(
        self,
        status: int,
        message: str,
        code: str | None,
        kind: str,
        headers: tuple[tuple[str, str], ...],
        *,
        fault: Fault | None = None,
        count: bool = True,
    ) -> Plan:
        if count:
            self.counts[fault.value if fault else str(status)] += 1
        return Plan(
            status,
            (*headers, ("content-type", "application/json")),
            _error(status, message, code, kind),
            fault=None,
        )

    def _ok(
        self, headers: tuple[tuple[str, str], ...], data: Mapping[str, Any], delay: float = 0.0
    ) -> Plan:
        return Plan(
            200, (*headers, ("content-type", "application/json")), jsonlib.dumps(data), delay=delay
        )

    @staticmethod
    def _stream_events(
        cid: str, model: str, words: list[str], finish: str, usage: Mapping[str, int] | None
    ) -> tuple[bytes, ...]:
        def event(choices: list[Any], extra: Mapping[str, Any] | None = None) -> bytes:
            payload = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": choices,
                **(extra or {}),
            }
            return b"data: " + jsonlib.dumps(payload) + b"\n\n"

        events = [
            event(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
        ]
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            events.append(event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        events.append(event([{"index": 0, "delta": {}, "finish_reason": finish}]))
        if usage is not None:
            events.append(event([], {"usage": dict(usage)}))
        events.append(b"data: [DONE]\n\n")
        return tuple(events)


def embed_text(text: str, dims: int) -> list[float]:
    """A bag-of-words hashing embedding: similar texts get similar (high-cosine) vectors."""
    vec = [0.0] * dims
    for word in text.lower().split():
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vec[h % dims] += 1.0 if (h >> 32) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]
