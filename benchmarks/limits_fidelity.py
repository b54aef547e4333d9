"""Limits fidelity (issue 14): `corral run` against a strict provider, beside two peers.

    python benchmarks/limits_fidelity.py                  # every scenario, 2000 lines each
    python benchmarks/limits_fidelity.py -s ten -n 500    # one scenario, fewer lines

The provider is `corral serve --count reserved`: a true sliding window over ``--window``
seconds that charges each call its prompt estimate (characters / 4) plus ``max_tokens`` at
admission and keeps it. Each client runs the same file against a fresh emulator: `corral run`,
aiolimiter + tenacity + a semaphore over the openai SDK, and the openai-cookbook approach
(api_request_parallel_processor.py, condensed but faithful: per-minute buckets starting full,
tiktoken-style counts with max_tokens 15 when absent, a 15 s pause after a 429, 5 attempts).
Reported per client: the 429s the provider's limits gave, the utilisation of the binding limit
(what the provider admitted between the first and the last admission, over what the limit
allows in that time), and whether every custom_id is in the output exactly once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import attrs

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, emulator_counts, emulator_process, machine

KEY = "sk-bench-0123456789"
LATENCY = "uniform:0.02,0.2"


@attrs.frozen
class Scenario:
    title: str
    window: float
    tpm: int
    rpm: int | None = None
    max_tokens: int | None = 32
    #: Kill the client once the provider has answered this share of the lines, then rerun it.
    kill_at: float | None = None
    #: Also run the file with this max_tokens and compare the rates (the no-max_tokens row).
    compare: int | None = None


SCENARIOS = {
    "sixty": Scenario("60 s window, TPM binds, max_tokens 32", 60, 72_000),
    "ten": Scenario("per-minute limits enforced over 10 s windows", 10, 180_000),
    "restart": Scenario("SIGKILL at 40% and restart, 10 s windows", 10, 120_000, kill_at=0.4),
    "nomax": Scenario(
        "bodies without max_tokens (rate vs max_tokens 16)",
        10,
        180_000,
        max_tokens=None,
        compare=16,
    ),
    "both": Scenario("RPM and TPM both bind, 10 s windows", 10, 87_000, rpm=3_000, max_tokens=16),
}

AIOLIMITER = """
# aiolimiter + tenacity + a semaphore over the openai SDK: what many scripts do.
import asyncio, json, sys
import openai, toktok
from aiolimiter import AsyncLimiter
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

async def main(path, out, url, rpm, tpm):
    client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench-0123456789", max_retries=0)
    requests = AsyncLimiter(rpm, 60) if rpm else None
    tokens = AsyncLimiter(tpm, 60)
    sem = asyncio.Semaphore(64)
    lines = [json.loads(l) for l in open(path)]
    f = open(out, "a")

    def cost(body):
        text = "".join(m["content"] for m in body["messages"])
        return toktok.batch_count([text], "cl100k_base")[0] + body.get("max_tokens", 0)

    @retry(retry=retry_if_exception_type(openai.RateLimitError),
           wait=wait_random_exponential(min=1, max=60), stop=stop_after_attempt(6))
    async def call(body):
        async with sem:
            if requests:
                await requests.acquire()
            await tokens.acquire(cost(body))
            return await client.chat.completions.create(**body)

    async def one(item):
        try:
            await call(item["body"])
            ok = True
        except Exception:
            ok = False
        f.write(json.dumps({"custom_id": item["custom_id"], "ok": ok}) + "\\n")
        f.flush()

    await asyncio.gather(*(one(item) for item in lines))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
"""

COOKBOOK = """
# openai-cookbook api_request_parallel_processor.py, condensed: per-minute capacity that starts
# full, tiktoken-style token counts (max_tokens 15 when absent), a 15 s pause for everyone
# after a 429, a retry queue with 5 attempts, each result appended to the output as it ends.
import asyncio, json, sys, time
import aiohttp, toktok

def num_tokens(body):
    n = 0
    for message in body["messages"]:
        n += 4
        for key, value in message.items():
            n += toktok.batch_count([value], "cl100k_base")[0]
            if key == "name":
                n -= 1
    n += 2
    return n + body.get("n", 1) * body.get("max_tokens", 15)

async def main(path, out, url, rpm, tpm):
    rpm = rpm or 10**9
    queue, retries = iter(open(path)), asyncio.Queue()
    req_cap, tok_cap, last = rpm, tpm, time.time()
    last_429, pending = 0.0, set()
    f = open(out, "a")
    headers = {"Authorization": "Bearer sk-bench-0123456789"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async def call(item, attempts):
            nonlocal last_429
            async with session.post(url + "/chat/completions", json=item["body"]) as r:
                data = await r.json()
            if "error" in data:
                if "Rate limit" in data["error"].get("message", ""):
                    last_429 = time.time()
                if attempts > 1:
                    retries.put_nowait((item, attempts - 1))
                    return
            f.write(json.dumps({"custom_id": item["custom_id"], "ok": "error" not in data}) + "\\n")
            f.flush()

        nxt, done_reading = None, False
        while True:
            if nxt is None:
                if not retries.empty():
                    nxt = retries.get_nowait()
                elif not done_reading:
                    try:
                        nxt = (json.loads(next(queue)), 5)
                    except StopIteration:
                        done_reading = True
            now = time.time()
            req_cap = min(req_cap + rpm * (now - last) / 60, rpm)
            tok_cap = min(tok_cap + tpm * (now - last) / 60, tpm)
            last = now
            if nxt is not None:
                cost = num_tokens(nxt[0]["body"])
                if req_cap >= 1 and tok_cap >= cost:
                    req_cap -= 1
                    tok_cap -= cost
                    task = asyncio.create_task(call(*nxt))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    nxt = None
            if done_reading and nxt is None and not pending and retries.empty():
                break
            await asyncio.sleep(0.001)
            since = time.time() - last_429
            if since < 15:
                await asyncio.sleep(15 - since)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
"""


CLIENTS = ("corral run", "aiolimiter + tenacity + semaphore", "openai-cookbook")


def write_input(path: Path, n: int, max_tokens: int | None) -> None:
    with path.open("w") as f:
        for i in range(n):
            body: dict[str, object] = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"Review {i}: works well, arrived late."}],
            }
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            f.write(json.dumps({"custom_id": f"r{i}", "body": body}) + "\n")


def commands(s: Scenario, source: Path, out: Path, url: str) -> dict[str, list[str]]:
    limits = ["--tpm", str(s.tpm), "--window", str(s.window)]
    if s.rpm:
        limits += ["--rpm", str(s.rpm)]
    corral = [sys.executable, "-m", "corral.cli", "run", str(source), "-o", str(out)]
    corral += ["--base-url", url, "--no-progress", "--json", *limits]
    peer = [str(source), str(out), url, str(s.rpm or 0), str(s.tpm)]
    peers = [[sys.executable, "-c", AIOLIMITER, *peer], [sys.executable, "-c", COOKBOOK, *peer]]
    return dict(zip(CLIENTS, [corral, *peers], strict=True))


def exactly_once(out: Path, n: int) -> tuple[bool, int, int]:
    """(every id once and succeeded, records, ids missing or failed)."""
    seen: Counter[str] = Counter()
    good: set[str] = set()
    for raw in out.read_text().splitlines():
        record = json.loads(raw)
        seen[record["custom_id"]] += 1
        if record.get("ok", record.get("error") is None):
            good.add(record["custom_id"])
    expected = {f"r{i}" for i in range(n)}
    return (
        set(seen) == expected and max(seen.values()) == 1 and good == expected,
        sum(seen.values()),
        len(expected - good),
    )


def run_client(s: Scenario, cmd: list[str], url: str, n: int) -> dict[str, float]:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    pinned = ["taskset", "-c", str(CLIENT_CPU), *cmd]
    started = time.perf_counter()
    if s.kill_at is not None:
        child = subprocess.Popen(
            pinned, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while emulator_counts(url).get("ok", 0) < s.kill_at * n and child.poll() is None:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    before = emulator_counts(url).get("rate_limited", 0)
    restarted = time.perf_counter()
    subprocess.run(
        pinned, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600
    )
    wall = time.perf_counter() - started
    counts = emulator_counts(url)
    span = counts["admitted_span_ms"] / 1000
    result = {
        "wall": wall,
        "429": counts.get("rate_limited", 0),
        "429_after_restart": counts.get("rate_limited", 0) - before,
        "restart_wall": time.perf_counter() - restarted,
        "tokens_util": counts["admitted_tokens"] / (s.tpm / 60 * span) if span else 0.0,
        "requests_util": counts["admitted_requests"] / (s.rpm / 60 * span)
        if s.rpm and span
        else 0.0,
        "lines_per_s": n / span if span else 0.0,
    }
    return result


def bench(name: str, s: Scenario, n: int) -> None:
    print(
        f"#### {s.title} (`{name}`): {n:,} lines, TPM {s.tpm:,}"
        + (f", RPM {s.rpm:,}" if s.rpm else "")
        + f", window {s.window:g} s\n"
    )
    head = "| client | 429s | 429s % | utilisation (binding) | exactly once | wall s |"
    if s.kill_at is not None:
        head += " 429s after restart |"
    if s.compare is not None:
        head += f" rate vs max_tokens {s.compare} |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        source, other = Path(tmp) / "in.jsonl", Path(tmp) / "in16.jsonl"
        write_input(source, n, s.max_tokens)
        if s.compare is not None:
            write_input(other, n, s.compare)
        serve = ["--tpm", str(s.tpm), "--window", str(s.window), "--count", "reserved"]
        serve += ["--latency", LATENCY] + (["--rpm", str(s.rpm)] if s.rpm else [])
        for client in CLIENTS:
            out = Path(tmp) / "out.jsonl"
            out.unlink(missing_ok=True)
            Path(str(out) + ".manifest.json").unlink(missing_ok=True)
            with emulator_process(*serve) as url:
                r = run_client(s, commands(s, source, out, url)[client], url, n)
            once, records, bad = exactly_once(out, n)
            util = max(r["tokens_util"], r["requests_util"])
            which = "RPM" if r["requests_util"] > r["tokens_util"] else "TPM"
            row = (
                f"| {client} | {r['429']} | {100 * r['429'] / n:.2f}% | {100 * util:.1f}% {which} "
                f"| {'yes' if once else f'no ({records} records, {bad} missing or failed)'} "
                f"| {r['wall']:.0f} |"
            )
            if s.kill_at is not None:
                row += f" {r['429_after_restart']} |"
            if s.compare is not None:
                out.unlink()
                with emulator_process(*serve) as url:
                    r16 = run_client(s, commands(s, other, out, url)[client], url, n)
                row += f" {r['lines_per_s'] / r16['lines_per_s']:.2f}x |"
            print(row, flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-s", "--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"Machine: {machine()}; {datetime.date.today()}; load average {load:.1f} at start\n")
    for name in args.scenario or list(SCENARIOS):
        bench(name, SCENARIOS[name], args.n)


if __name__ == "__main__":
    main()
