"""``corral demo``: 2000 product reviews through a rate-limited, faulty emulated provider.

The reviews are generated from a fixed seed (so every run is the same batch), written as a
Batch API JSONL file, and run through the same code path as ``corral run``. The emulator plays
a sentiment model: it answers positive/negative/neutral from the words of the review.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from corral.batch._job import BatchJob, run_job
from corral.testing.emulator import EmulatorConfig, Fault, Latency
from corral.testing.server import serve_in_thread

__all__ = ["DEMO_EMULATOR", "DEMO_LIMITS", "run_demo", "sentiment_reply", "write_reviews"]

_PRODUCTS = [
    "wireless earbuds",
    "coffee grinder",
    "standing desk",
    "rice cooker",
    "trail shoes",
    "phone case",
    "air purifier",
    "mechanical keyboard",
    "yoga mat",
    "desk lamp",
]
_GOOD = ["love", "great", "excellent", "perfect", "sturdy", "fast", "comfortable", "quiet"]
_BAD = ["broke", "terrible", "slow", "noisy", "flimsy", "refund", "disappointed", "leaks"]
_OPENERS = [
    "Bought this {p} last month.",
    "My second {p} from this brand.",
    "Got the {p} as a gift.",
    "Used the {p} daily for two weeks.",
]
_POSITIVE = [
    "Honestly I {g} it, {g2} build and {g3} delivery.",
    "It is {g} and {g2}; would buy again.",
]
_NEGATIVE = ["It {b} after a week, {b2} and {b3}.", "Feels {b}, arrived {b2}; asked for a {b3}."]
_NEUTRAL = ["It does the job, nothing special.", "Average {p}, about what I expected."]

SYSTEM = (
    "Classify the sentiment of the product review. Answer with one word: "
    "positive, negative or neutral."
)

#: The limits the emulator enforces and corral is told about (the user's provider quota).
DEMO_LIMITS = {"rpm": 9_000, "tpm": 600_000}


def _review(rng: random.Random) -> str:
    product = rng.choice(_PRODUCTS)
    text = rng.choice(_OPENERS).format(p=product) + " "
    kind = rng.random()
    if kind < 0.45:
        g, g2, g3 = rng.sample(_GOOD, 3)
        text += rng.choice(_POSITIVE).format(g=g, g2=g2, g3=g3)
    elif kind < 0.85:
        b, b2, b3 = rng.sample(_BAD, 3)
        text += rng.choice(_NEGATIVE).format(b=b, b2=b2, b3=b3)
    else:
        text += rng.choice(_NEUTRAL).format(p=product)
    return text


def write_reviews(
    path: Path, count: int = 2000, *, seed: int = 2026, model: str = "gpt-4o-mini"
) -> None:
    """A Batch API input file of ``count`` sentiment requests."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            line = {
                "custom_id": f"review-{i:05d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": _review(rng)},
                    ],
                    "max_tokens": 3,
                    "temperature": 0,
                },
            }
            f.write(json.dumps(line) + "\n")


def sentiment_reply(body: Mapping[str, Any]) -> str:
    """The emulated model's answer: count positive and negative words in the last message."""
    messages = body.get("messages") or [{}]
    text = str(messages[-1].get("content", "")).lower()
    score = sum(w in text for w in _GOOD) - sum(w in text for w in _BAD)
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


DEMO_EMULATOR = EmulatorConfig(
    latency=Latency.lognormal(0.08, 0.5),
    faults={
        Fault.SERVER_ERROR: 0.02,
        Fault.UNAVAILABLE: 0.01,
        Fault.RATE_LIMIT: 0.01,
        Fault.RESET: 0.01,
        Fault.MALFORMED: 0.005,
        Fault.TRUNCATE: 0.005,
    },
    fault_retry_after=0.1,
    seed=7,
    reply=sentiment_reply,
    **DEMO_LIMITS,  # type: ignore[arg-type]
)


def run_demo(
    requests: int, directory: Path, *, backend: str = "asyncio", json_summary: bool = False
) -> int:
    """Write the reviews, start the emulator in a thread, run the batch, tell what happened."""
    directory.mkdir(parents=True, exist_ok=True)
    source, output = directory / "reviews.jsonl", directory / "results.jsonl"
    write_reviews(source, requests)
    output.unlink(missing_ok=True)
    print(
        f"corral demo: {requests} reviews -> {source}\n"
        f"  emulator: {DEMO_LIMITS['rpm']} RPM, {DEMO_LIMITS['tpm']} TPM, ~80 ms latency, "
        "6% injected faults (500, 503, 429, resets, malformed and truncated bodies)\n"
        "  corral:   the same RPM/TPM, retries with backoff, concurrency 128",
        file=sys.stderr,
    )
    with serve_in_thread(DEMO_EMULATOR, any_model=False) as emu:
        job = BatchJob(
            source,
            output,
            base_url=emu.base_url,
            api_key="sk-corral-demo-key",
            concurrency=128,
            retries=6,
            timeout=30.0,
            json_summary=json_summary,
            resume_command=f"corral demo --dir {directory}",
            rpm=DEMO_LIMITS["rpm"],
            tpm=DEMO_LIMITS["tpm"],
        )
        result = anyio.run(run_job, job, backend=backend)
        counts = emu.counts
    tally: dict[str, int] = {}
    with output.open("rb") as f:
        for raw in f:
            record = json.loads(raw)
            if record["error"] is None:
                answer = record["response"]["body"]["choices"][0]["message"]["content"]
                tally[answer] = tally.get(answer, 0) + 1
    injected = {
        k: v
        for k, v in counts.items()
        if k not in ("ok", "received", "connections", "rate_limited")
    }
    print(
        f"\n  emulator saw {counts.get('received', 0)} requests for {requests} reviews: "
        f"{counts.get('ok', 0)} ok\n"
        f"  429s from its RPM/TPM limiter: {counts.get('rate_limited', 0)} "
        f"(corral kept under the quota)\n"
        f"  injected faults (each retried by corral): {injected}\n"
        f"  sentiment: {tally}\n  results: {output}",
        file=sys.stderr,
    )
    return int(result.exit_code)
