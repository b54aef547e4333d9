"""Instructions per ``Client.chat`` on MemoryTransport, with no middleware (what the client
itself costs: building the request, classifying and decoding the answer), the default stack, or
one of its layers alone; a figure a busy machine does not blur. Run under callgrind and divide by
the calls:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \\
        python benchmarks/client_instructions.py bare 2000    # or default, metrics, deadline,
                                                               # retry, breaker, concurrency
    callgrind_annotate /tmp/cg.out | grep TOTALS    # subtract a run with 0 calls

Works on any corral that exports ``Client`` and ``MemoryTransport`` (two trees, call for call).
"""

from __future__ import annotations

import json
import sys

import anyio

from corral import CircuitBreaker, Client, ConcurrencyLimit, Deadline, Metrics, Retry
from corral.core import Response
from corral.transports import MemoryTransport

BODY = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
).encode()


STACKS = {
    "bare": list,
    "default": lambda: None,
    "metrics": lambda: [Metrics()],
    "deadline": lambda: [Deadline(600)],
    "retry": lambda: [Retry()],
    "breaker": lambda: [CircuitBreaker()],
    "concurrency": lambda: [ConcurrencyLimit(64)],
}


def answer(request: object) -> Response:
    return Response(200, [("content-type", "application/json")], BODY)


async def main(stack: str, calls: int) -> None:
    async with Client(
        "http://emulated/v1",
        "sk-bench-key-1234567",
        transport=MemoryTransport(answer),
        middleware=STACKS[stack](),
        model="gpt-4o-mini",
    ) as client:
        for _ in range(calls):
            await client.chat([{"role": "user", "content": "Say hi"}], max_tokens=8)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]))
