"""What the limiting layers cost per call (issue 13: typed decisions must not slow them).

python benchmarks/limits.py            # µs/call of RateLimit, ConcurrencyLimit, CircuitBreaker
python benchmarks/limits.py -n 50000   # fewer calls

Each layer alone on a MemoryTransport, sequential calls, best of five runs, with and without an
event sink (a sink that drops every event: what building the events costs).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import anyio

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, pin_to

from corral.core import Headers, Request, Response, api_request, build_stack
from corral.middleware import CircuitBreaker, ConcurrencyLimit, RateLimit
from corral.transports import MemoryTransport

BODY = (
    b'{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"positive"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":20,"completion_tokens":1,"total_tokens":21}}'
)


def answer(_: Request) -> Response:
    return Response(200, Headers({"content-type": "application/json"}), BODY)


def request() -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        api_key="sk-bench-0123456789",
    )


async def per_call(stack: Any, n: int) -> float:
    """µs per call; a fresh request each time, as every call has its own context."""
    requests = [request() for _ in range(n)]
    for r in requests[:200]:
        await stack(r)
    t0 = time.perf_counter()
    for r in requests:
        await stack(r)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=100_000)
    args = parser.parse_args()
    pin_to(CLIENT_CPU)
    layers: dict[str, Any] = {
        "bare": lambda: [],
        "RateLimit(rpm, tpm)": lambda: [RateLimit(rpm=10**9, tpm=10**12)],
        "ConcurrencyLimit(64)": lambda: [ConcurrencyLimit(64)],
        "CircuitBreaker()": lambda: [CircuitBreaker()],
        "all three": lambda: [
            CircuitBreaker(),
            RateLimit(rpm=10**9, tpm=10**12),
            ConcurrencyLimit(64),
        ],
    }
    print(f"### Limiting layers, {args.n:,} sequential calls on MemoryTransport (µs/call)\n")
    print("| layers | no sink | sink |\n|---|---:|---:|")
    for name, make in layers.items():
        row = []
        for sink in (None, lambda _: None):
            kwargs = {} if sink is None else {"events": sink}
            best = min(
                anyio.run(per_call, build_stack(make(), MemoryTransport(answer), **kwargs), args.n)
                for _ in range(5)
            )
            row.append(f"{best:.2f}")
        print(f"| {name} | {' | '.join(row)} |")


if __name__ == "__main__":
    main()
