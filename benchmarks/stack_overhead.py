"""What each layer of the default stack adds to a call, and the whole stack (issue 15).

    python benchmarks/stack_overhead.py                     # asyncio, 15 rounds of 5,000 calls
    python benchmarks/stack_overhead.py --backend trio --rounds 9 --calls 3000

Every row is ``Client.chat`` on ``MemoryTransport`` (the same canned answer), with a different
``middleware`` list: none (the bare transport), each default layer alone, the default stack
(``Metrics -> Deadline -> Retry -> CircuitBreaker -> ConcurrencyLimit``), and the default stack
with an event sink. Rounds are interleaved (each round runs every row in turn), and a row's
overhead is the median over rounds of its µs/call minus the bare row's in the same round, so a
burst of load from the other engineers on the 2 cores shifts both alike; the last column is the
best round of the row minus the best of the bare transport (the machine at its quietest).

For a figure the load does not blur, ``--instructions`` counts instructions per call instead:
``stack_instructions.py`` under ``valgrind --tool=callgrind`` with N and with 0 calls, for the
default stack and the bare transport.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import anyio

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, machine, pin_to

from corral import (
    CircuitBreaker,
    Client,
    ConcurrencyLimit,
    Deadline,
    Metrics,
    Retry,
    default_middleware,
)
from corral.core import Middleware, Request, Response
from corral.transports import MemoryTransport

BODY = (
    b'{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}'
)
MESSAGES = [{"role": "user", "content": "Say hi"}]

ROWS: dict[str, Callable[[], list[Middleware]]] = {
    "bare transport": list,
    "Metrics": lambda: [Metrics()],
    "Deadline(600)": lambda: [Deadline(600.0)],
    "Retry": lambda: [Retry()],
    "CircuitBreaker": lambda: [CircuitBreaker()],
    "ConcurrencyLimit(64)": lambda: [ConcurrencyLimit(64)],
    "default stack": default_middleware,
    "default stack + event sink": default_middleware,
}


def answer(_: Request) -> Response:
    return Response(200, [("content-type", "application/json")], BODY)


def _sink(_: object) -> None:
    pass


async def per_call(row: str, calls: int) -> float:
    """µs per ``Client.chat`` through ``row``'s layers."""
    async with Client(
        "http://emulated/v1",
        "sk-bench-0123456789",
        transport=MemoryTransport(answer),
        middleware=ROWS[row](),
        model="gpt-4o-mini",
        events=_sink if row.endswith("sink") else None,
    ) as client:
        for _ in range(200):
            await client.chat(MESSAGES)
        start = time.perf_counter()
        for _ in range(calls):
            await client.chat(MESSAGES)
        return (time.perf_counter() - start) / calls * 1e6


async def main(backend: str, rounds: int, calls: int) -> None:
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    for _ in range(rounds):
        for row in ROWS:
            times[row].append(await per_call(row, calls))
    bare = times["bare transport"]
    print(f"{machine()}, {backend}, {rounds} interleaved rounds of {calls:,} calls\n")
    print(
        "| layers | µs/call, median (min-max) | overhead over bare, µs, median (min-max) "
        "| overhead, best of rounds |"
    )
    print("|---|---:|---:|---:|")
    for row, values in times.items():
        extra = [v - b for v, b in zip(values, bare, strict=True)]
        over = "-" if row == "bare transport" else _spread(extra)
        best = "-" if row == "bare transport" else f"{min(values) - min(bare):.2f}"
        print(f"| {row} | {_spread(values)} | {over} | {best} |")


def instructions(calls: int) -> None:
    """Instructions per ``Client.chat`` (callgrind), default stack and bare transport."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stack_instructions.py")

    def total(n: int, stack: str) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "cg.out")
            subprocess.run(
                [
                    *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
                    *(sys.executable, script, str(n), stack),
                ],
                check=True,
                capture_output=True,
            )
            with open(out) as f:
                found = re.search(r"^summary: (\d+)", f.read(), re.MULTILINE)
        assert found is not None, "no summary line in the callgrind output"
        return int(found.group(1))

    per_call = {s: (total(calls, s) - total(0, s)) / calls for s in ("default", "bare")}
    print(f"{machine()}, callgrind, {calls:,} calls minus 0 calls\n")
    print("| stack | instructions per Client.chat |\n|---|---:|")
    for stack, count in per_call.items():
        print(f"| {stack} | {count:,.0f} |")
    print(f"| default stack over bare | {per_call['default'] - per_call['bare']:,.0f} |")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--instructions", action="store_true", help="callgrind counts instead")
    args = parser.parse_args()
    if args.instructions:
        instructions(args.calls)
        sys.exit()
    pin_to(CLIENT_CPU)
    anyio.run(main, args.backend, args.rounds, args.calls, backend=args.backend)
