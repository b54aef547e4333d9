"""Policy benchmarks (issue 3).

python benchmarks/policies.py limits     # (a) live emulator, RPM+TPM: corral vs aiolimiter
python benchmarks/policies.py virtual    # (b) 1,000,000 calls in virtual time (trio MockClock)
python benchmarks/policies.py overhead   # (c) CPU µs/call of the policy stack on MemoryTransport
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import anyio

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, cpu_seconds, emulator_counts, emulator_process, machine, pin_to

from corral._client import Client, default_middleware
from corral.core import Headers, Request, Response, api_request, build_stack
from corral.core._tokens import EstimatingCounter, estimate_request_tokens
from corral.testing.emulator import EmulatorConfig, Latency
from corral.testing.simulator import SimulatedProvider
from corral.transports import H11Transport, MemoryTransport

KEY = "sk-bench-0123456789"


def body(i: int) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": f"request number {i} " + "word " * (i % 40)}],
    }


# -- (a) live limits ---------------------------------------------------------------------------


async def corral_run(url: str, n: int, rpm: int, tpm: int) -> None:
    stack = default_middleware(rpm=rpm, tpm=tpm, concurrency=256)
    transport = H11Transport(max_connections=256)
    async with (
        Client(url, KEY, middleware=stack, transport=transport) as c,
        c.map((body(i) for i in range(n)), concurrency=256) as results,
    ):
        async for _ in results:
            pass


async def peer_run(url: str, n: int, rpm: int, tpm: int) -> None:
    """The usual hand-wiring: aiolimiter for RPM and TPM, tenacity retries, a semaphore, aiohttp."""
    import aiohttp
    import tenacity
    from aiolimiter import AsyncLimiter

    requests_limiter, tokens_limiter = AsyncLimiter(rpm, 60), AsyncLimiter(tpm, 60)
    semaphore = anyio.Semaphore(256)
    counter = EstimatingCounter()

    class Retryable(Exception):
        pass

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:

        @tenacity.retry(
            stop=tenacity.stop_after_attempt(6),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
            retry=tenacity.retry_if_exception_type(Retryable),
        )
        async def one(b: dict[str, Any]) -> None:
            async with semaphore:
                await requests_limiter.acquire()
                await tokens_limiter.acquire(estimate_request_tokens(b, counter))
                async with session.post(url + "/chat/completions", json=b) as r:
                    if r.status == 429 or r.status >= 500:
                        raise Retryable(r.status)
                    await r.read()

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, body(i))


def limits(n: int, rpm: int, tpm: int) -> None:
    pin_to(CLIENT_CPU)
    counter = EstimatingCounter()
    charged = sum(estimate_request_tokens(body(i), counter) for i in range(n))
    print(
        f"### (a) Live emulator enforcing {rpm} RPM and {tpm} TPM (60 s sliding window), "
        f"N={n}, 50 ms latency\n"
    )
    print("| client | wall s | 429s received | requests/min | % of RPM | tokens/min | % of TPM |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, fn in (("corral", corral_run), ("aiolimiter+tenacity+semaphore", peer_run)):
        with emulator_process("--rpm", str(rpm), "--tpm", str(tpm), "--latency", "0.05") as url:
            t0 = time.perf_counter()
            anyio.run(fn, url, n, rpm, tpm)
            wall = time.perf_counter() - t0
            seen = emulator_counts(url)
        per_min = n / wall * 60
        tok_min = charged / wall * 60
        print(
            f"| {name} | {wall:.1f} | {seen.get('rate_limited', 0)} | {per_min:.0f} | "
            f"{per_min / rpm:.1%} | {tok_min:.0f} | {tok_min / tpm:.1%} |"
        )


# -- (b) virtual time ---------------------------------------------------------------------------


async def virtual_run(
    n: int, rpm: int, tpm: int, latency: float, concurrency: int
) -> dict[str, float]:
    provider = SimulatedProvider(EmulatorConfig(rpm=rpm, tpm=tpm, latency=Latency.fixed(latency)))
    stack = build_stack(
        default_middleware(rpm=rpm, tpm=tpm, concurrency=concurrency, timeout=None), provider
    )
    tokens = 0
    counter = EstimatingCounter()
    requests = []
    for i in range(200):  # a cycle of 200 distinct bodies, prebuilt
        b = body(i)
        requests.append(api_request("http://sim/v1", "/chat/completions", b, api_key=KEY))
    per_cycle = [estimate_request_tokens(body(i), counter) for i in range(200)]
    start = anyio.current_time()
    slots = anyio.Semaphore(concurrency * 2)

    async def one(r: Request) -> None:
        try:
            await stack(r)
        finally:
            slots.release()

    async with anyio.create_task_group() as tg:
        for i in range(n):
            await slots.acquire()
            tokens += per_cycle[i % 200]
            tg.start_soon(one, requests[i % 200])
    makespan = anyio.current_time() - start
    return {"makespan": makespan, "tokens": tokens, **provider.counts}


def virtual(n: int) -> None:
    import trio.testing

    rpm, tpm, latency, concurrency = 60_000, 6_000_000, 0.5, 512
    t0 = time.perf_counter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    result = anyio.run(
        virtual_run,
        n,
        rpm,
        tpm,
        latency,
        concurrency,
        backend="trio",
        backend_options={"clock": clock},
    )
    real = time.perf_counter() - t0
    ideal = max(n / (rpm / 60), result["tokens"] / (tpm / 60), n * latency / concurrency)
    print(
        f"### (b) {n:,} calls in virtual time: {rpm} RPM, {tpm} TPM, "
        f"{latency}s latency, C={concurrency}\n"
    )
    print("| makespan (virtual s) | ideal | ratio | 429s | ok | real s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {result['makespan']:.1f} | {ideal:.1f} | {result['makespan'] / ideal:.4f} | "
        f"{result.get('rate_limited', 0)} | {result.get('ok', 0)} | {real:.0f} |"
    )


# -- (c) overhead -------------------------------------------------------------------------------


def _ok(_: Request) -> Response:
    return Response(
        200,
        Headers({"content-type": "application/json"}),
        b'{"choices": [], "usage": '
        b'{"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}',
    )


async def corral_overhead(n: int) -> None:
    stack = build_stack(
        default_middleware(rpm=10**9, tpm=10**12, concurrency=64), MemoryTransport(_ok)
    )
    request = api_request("http://mem/v1", "/chat/completions", body(1), api_key=KEY)

    async def worker(k: int) -> None:
        for _ in range(k):
            await stack(request)

    async with anyio.create_task_group() as tg:
        for _ in range(64):
            tg.start_soon(worker, n // 64)


async def peer_overhead(n: int) -> None:
    import tenacity
    from aiolimiter import AsyncLimiter

    rl, tl = AsyncLimiter(10**9, 60), AsyncLimiter(10**12, 60)
    sem = anyio.Semaphore(64)
    transport = MemoryTransport(_ok)
    request = api_request("http://mem/v1", "/chat/completions", body(1), api_key=KEY)
    counter = EstimatingCounter()
    b = body(1)

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(5), wait=tenacity.wait_random_exponential(0.5, 30)
    )
    async def one() -> None:
        async with sem:
            await rl.acquire()
            await tl.acquire(estimate_request_tokens(b, counter))
            response = await transport(request)
            if response.status >= 500:
                raise RuntimeError(response.status)

    async def worker(k: int) -> None:
        for _ in range(k):
            await one()

    async with anyio.create_task_group() as tg:
        for _ in range(64):
            tg.start_soon(worker, n // 64)


def overhead(n: int) -> None:
    pin_to(CLIENT_CPU)
    print(f"### (c) CPU per call of the policy stack on MemoryTransport, N={n}, 64 workers\n")
    print("| stack | CPU µs/call | ratio to peer |")
    print("|---|---:|---:|")
    results = {}
    for name, fn in (
        (
            "corral default stack (Metrics, Deadline, Retry, CircuitBreaker, RateLimit, "
            "ConcurrencyLimit)",
            corral_overhead,
        ),
        ("aiolimiter (RPM+TPM) + tenacity + semaphore", peer_overhead),
    ):
        anyio.run(fn, 2_000)
        c0 = cpu_seconds()
        anyio.run(fn, n)
        results[name] = (cpu_seconds() - c0) / n * 1e6
    peer = list(results.values())[1]
    for name, us in results.items():
        print(f"| {name} | {us:.1f} | {us / peer:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["limits", "virtual", "overhead"])
    parser.add_argument("-n", type=int)
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    if args.which == "limits":
        limits(args.n or 3_600, 1_200, 100_000)
    elif args.which == "virtual":
        virtual(args.n or 1_000_000)
    else:
        overhead(args.n or 50_000)


if __name__ == "__main__":
    main()
