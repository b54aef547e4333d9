"""Instructions per call through the default stack, on MemoryTransport: a figure that a busy
machine does not blur (run under ``valgrind --tool=callgrind``; divide by the calls).

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
        python benchmarks/stack_instructions.py 2000 [STACK]
    callgrind_annotate /tmp/cg.out | grep TOTALS    # subtract a run with 0 calls

Every run makes ``WARM_UP`` calls first (the N=0 run too), so one-time costs cancel.

STACK: ``ratelimit`` (the default stack with ``rpm``/``tpm``, the default here), ``default``
(``default_middleware()``: no rate limit) or ``bare`` (no middleware: the transport alone).

Works on any corral that exports ``Client``, ``default_middleware`` and ``MemoryTransport``, so
two trees can be compared call for call.
"""

from __future__ import annotations

import json
import sys

import anyio

from corral import Client, default_middleware
from corral.core import Response
from corral.transports import MemoryTransport

BODY = json.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
).encode()


def answer(request: object) -> Response:
    return Response(200, [("content-type", "application/json")], BODY)


#: Calls every run makes first, N=0 included: what the first call loads (orjson, urllib.parse)
#: and builds (caches) cancels out of the difference.
WARM_UP = 50

STACKS = {
    "ratelimit": lambda: default_middleware(rpm=10**9, tpm=10**12, concurrency=64),
    "default": default_middleware,
    "bare": list,
}


async def main(calls: int, stack_name: str) -> None:
    stack = STACKS[stack_name]()
    async with Client(
        "http://emulated/v1",
        "sk-bench-key-1234567",
        transport=MemoryTransport(answer),
        middleware=stack,
        model="gpt-4o-mini",
    ) as client:
        for _ in range(WARM_UP + calls):
            await client.chat([{"role": "user", "content": "Say hi"}])


if __name__ == "__main__":
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    anyio.run(main, calls, sys.argv[2] if len(sys.argv) > 2 else "ratelimit")
