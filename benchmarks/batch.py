"""Batch benchmarks (issue 5).

    python benchmarks/batch.py run         # 100k requests through `corral run` vs the emulator
    python benchmarks/batch.py memory      # peak RSS on MemoryTransport, 100k and 1M lines
    python benchmarks/batch.py peers       # corral vs the cookbook script vs openai SDK + gather

Every client runs in its own process (pinned to core 0; the emulator to core 1) and its peak
RSS is that process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, emulator_counts, emulator_process, machine

KEY = "sk-bench-0123456789"


def corral_run(source: Path, out: Path, url: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "corral.cli",
        "run",
        str(source),
        "-o",
        str(out),
        "--base-url",
        url,
        "--no-progress",
        "--json",
        *flags,
    ]


def write_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": "gpt-4o-mini",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"Review {i}: works well, arrived late."}],
            }
            f.write(
                json.dumps(
                    {
                        "custom_id": f"r{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                )
                + "\n"
            )


def timed_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one child pinned to the client core."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["taskset", "-c", str(CLIENT_CPU), *cmd],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not a running max
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode not in (0, 1):
            raise RuntimeError(stderr.read()[-2000:])
        return wall, usage.ru_maxrss / 1024, stdout.read()


MEMORY_DRIVER = """
import sys, anyio
from pathlib import Path
from corral.batch._runner import BatchOptions, BatchRunner
from corral._client import Client, default_middleware
from corral.core import Headers, Response
from corral.transports import MemoryTransport

BODY = (b'{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"positive"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":20,"completion_tokens":1,"total_tokens":21}}')

def answer(request):
    return Response(200, Headers({"content-type": "application/json"}), BODY)

async def main():
    client = Client("http://mem/v1", "sk-bench-0123456789", transport=MemoryTransport(answer),
                    middleware=default_middleware(concurrency=256))
    options = BatchOptions(Path(sys.argv[1]), Path(sys.argv[2]), concurrency=256)
    runner = BatchRunner(client, options)
    report = await runner.run()
    print(report.succeeded)

anyio.run(main)
"""


def bench_run(n: int) -> None:
    print(
        f"### `corral run`, {n:,} requests against the emulator (zero latency), concurrency 256\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        write_input(source, n)
        with emulator_process() as url:
            wall, rss, _ = timed_child(
                corral_run(source, out, url, "--concurrency", "256"), env={"OPENAI_API_KEY": KEY}
            )
    print("| requests | wall s | req/s | peak RSS MB |\n|---:|---:|---:|---:|")
    print(f"| {n:,} | {wall:.1f} | {n / wall:.0f} | {rss:.0f} |\n")


def bench_memory(sizes: list[int]) -> None:
    print("### Peak RSS of the batch runner on MemoryTransport (concurrency 256)\n")
    print("| lines | wall s | lines/s | peak RSS MB |\n|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            source, out = Path(tmp) / f"in{n}.jsonl", Path(tmp) / f"out{n}.jsonl"
            write_input(source, n)
            wall, rss, stdout = timed_child(
                [sys.executable, "-c", MEMORY_DRIVER, str(source), str(out)]
            )
            assert int(stdout.strip()) == n, stdout
            print(f"| {n:,} | {wall:.1f} | {n / wall:.0f} | {rss:.0f} |")
            source.unlink()
            out.unlink()
    print()


COOKBOOK = """
# The openai-cookbook pattern (api_request_parallel_processor.py), condensed: a semaphore for
# concurrency, hand-made request and token buckets, a retry queue, aiohttp.
import asyncio, json, sys, time
import aiohttp

async def main(path, out, url, rpm, tpm):
    lines = [json.loads(l) for l in open(path)]          # the cookbook reads the whole file
    sem = asyncio.Semaphore(256)
    req_cap, tok_cap = rpm / 60, tpm / 60
    state = {"req": req_cap, "tok": tok_cap, "t": time.monotonic(), "429": 0}
    lock = asyncio.Lock()
    async def take(tokens):
        while True:
            async with lock:
                now = time.monotonic(); dt = now - state["t"]; state["t"] = now
                state["req"] = min(req_cap, state["req"] + dt * rpm / 60)
                state["tok"] = min(tok_cap, state["tok"] + dt * tpm / 60)
                if state["req"] >= 1 and state["tok"] >= tokens:
                    state["req"] -= 1; state["tok"] -= tokens; return
            await asyncio.sleep(0.001)
    results = []
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-bench-0123456789"},
                                     connector=aiohttp.TCPConnector(limit=256)) as s:
        async def one(item):
            body = item["body"]
            tokens = len(json.dumps(body["messages"])) // 4 + body.get("max_tokens", 16)
            for attempt in range(5):
                async with sem:
                    await take(tokens)
                    async with s.post(url + "/chat/completions", json=body) as r:
                        data = await r.json()
                        if r.status == 429:
                            state["429"] += 1
                            await asyncio.sleep(15 if attempt else 1)  # the cookbook pauses 15 s
                            continue
                        results.append({"custom_id": item["custom_id"], "response": data})
                        return
        await asyncio.gather(*(one(i) for i in lines))
    with open(out, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\\n")
    print(state["429"])

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
"""

SDK_GATHER = """
import asyncio, json, sys, openai

async def main(path, out, url):
    client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench-0123456789")  # default retries
    items = [json.loads(l) for l in open(path)]
    async def one(item):
        try:
            r = await client.chat.completions.create(**item["body"])
            return {"custom_id": item["custom_id"], "content": r.choices[0].message.content}
        except openai.APIError as e:
            return {"custom_id": item["custom_id"], "error": str(e)}
    results = await asyncio.gather(*(one(i) for i in items))
    with open(out, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\\n")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


def bench_peers(n: int, rpm: int, tpm: int) -> None:
    print(f"### Same file, same emulator ({rpm} RPM, {tpm} TPM, 20 ms latency), N={n:,}\n")
    print("| client | wall s | 429s received | failed | peak RSS MB |\n|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.jsonl"
        write_input(source, n)
        runs = {
            "corral run": lambda url, out: corral_run(
                source, out, url, "--rpm", str(rpm), "--tpm", str(tpm), "--concurrency", "256"
            ),
            "cookbook (semaphore + token bucket, aiohttp)": lambda url, out: [
                sys.executable,
                "-c",
                COOKBOOK,
                str(source),
                str(out),
                url,
                str(rpm),
                str(tpm),
            ],
            "openai SDK + asyncio.gather": lambda url, out: [
                sys.executable,
                "-c",
                SDK_GATHER,
                str(source),
                str(out),
                url,
            ],
        }
        for name, make in runs.items():
            out = Path(tmp) / "out.jsonl"
            with emulator_process("--rpm", str(rpm), "--tpm", str(tpm), "--latency", "0.02") as url:
                wall, rss, _ = timed_child(make(url, out), env={"OPENAI_API_KEY": KEY})
                seen = emulator_counts(url)
            done = sum(1 for line in out.open() if json.loads(line).get("error") is None)
            print(
                f"| {name} | {wall:.1f} | {seen.get('rate_limited', 0)} | {n - done} | {rss:.0f} |"
            )
            out.unlink()
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["run", "memory", "peers"])
    parser.add_argument("-n", type=int)
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    if args.which == "run":
        bench_run(args.n or 100_000)
    elif args.which == "memory":
        bench_memory([100_000, 1_000_000] if args.n is None else [args.n])
    else:
        bench_peers(args.n or 20_000, 12_000, 1_200_000)


if __name__ == "__main__":
    main()
