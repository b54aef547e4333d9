"""Long-running checks (issue 7), run by hand.

python benchmarks/soak.py load     # 60 s at the emulator's capacity: RSS flat? fds returned?
python benchmarks/soak.py faults   # 50k calls, 10% mixed faults, through the batch runner
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, emulator_counts, emulator_process, machine, pin_to
from batch import write_input

from corral._client import Client, default_middleware
from corral.batch._runner import BatchOptions, BatchRunner
from corral.core._models import Timeouts
from corral.transports import H11Transport

KEY = "sk-bench-0123456789"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def load(url: str, seconds: float) -> None:
    transport = H11Transport(max_connections=128)
    client = Client(
        url,
        KEY,
        model="gpt-4o-mini",
        transport=transport,
        middleware=default_middleware(concurrency=128),
    )
    fds_before = fds()
    samples: list[tuple[float, float, int, int]] = []
    done = 0
    start = time.monotonic()
    stop_at = start + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await client.chat([{"role": "user", "content": f"load {done}"}], max_tokens=8)
            done += 1

    async def sample() -> None:
        while time.monotonic() < stop_at:
            samples.append((time.monotonic() - start, rss_mb(), fds(), transport.open_connections))
            await anyio.sleep(5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        for _ in range(128):
            tg.start_soon(worker)
    await client.aclose()
    print(f"### {seconds:.0f} s of load at capacity (concurrency 128, zero latency)\n")
    print(f"{done:,} calls, {done / seconds:,.0f} req/s\n")
    print("| t (s) | RSS MB | open fds | pooled connections |\n|---:|---:|---:|---:|")
    for t, rss, fd, conns in samples:
        print(f"| {t:.0f} | {rss:.1f} | {fd} | {conns} |")
    print(
        f"\nAfter close: fds {fds()} (before the run: {fds_before}), pooled connections "
        f"{transport.open_connections}.\n"
    )


async def faults(url: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        write_input(source, n)
        transport = H11Transport(
            timeouts=Timeouts(connect=2, read=1.0, write=2, pool=30), max_connections=128
        )
        client = Client(
            url,
            KEY,
            transport=transport,
            middleware=default_middleware(concurrency=128, max_attempts=4),
        )
        t0 = time.monotonic()
        runner = BatchRunner(client, BatchOptions(source, out, concurrency=128))
        report = await runner.run()
        wall = time.monotonic() - t0
        await client.aclose()
        records = [json.loads(line) for line in out.open()]
    ids = Counter(r["custom_id"] for r in records)
    kinds = Counter(r["error"]["code"] for r in records if r["error"])
    print(f"### {n:,} calls through the batch runner, 10% mixed faults\n")
    once = len(ids) == n and set(ids.values()) == {1}
    print(f"- wall {wall:.1f} s; every custom_id exactly once: {once}")
    print(f"- succeeded {report.succeeded:,}; failed (typed) {dict(kinds)}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["load", "faults"])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("-n", type=int, default=50_000)
    args = parser.parse_args()
    pin_to(CLIENT_CPU)
    print(f"Machine: {machine()}\n")
    if args.which == "load":
        with emulator_process() as url:
            anyio.run(load, url, args.seconds)
    else:
        faults_args = []
        for kind in (
            "429",
            "500",
            "503",
            "reset",
            "reset_after_first_byte",
            "hang",
            "truncate",
            "malformed",
        ):
            faults_args += ["--fault", f"{kind}=0.0125"]
        with emulator_process(*faults_args) as url:
            anyio.run(faults, url, args.n)
            seen = emulator_counts(url)
        print(
            f"- the emulator received {seen['received']:,} requests for {args.n:,} calls "
            f"({seen['received'] / args.n - 1:.1%} extra); outcomes {seen}"
        )


if __name__ == "__main__":
    main()
