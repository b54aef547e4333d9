"""The batch runner at the wire's speed (issue 15), every peer in the same run.

    python benchmarks/batch_speed.py live        # corral run vs bare H11Transport vs cookbook
    python benchmarks/batch_speed.py memory      # corral run's path on MemoryTransport: lines/s
    python benchmarks/batch_speed.py rss         # peak RSS on MemoryTransport, 1M and 10M lines
    python benchmarks/batch_speed.py latency     # 50 ms latency, C=256: wall / ideal, asyncio+trio

``live`` interleaves rounds (bare H11Transport, corral run, two openai-cookbook peers) against
one emulator (zero latency, pinned to core 1; every client pinned to core 0) and prints each
round and the median ratio. The peers: benchmarks/batch.py's condensed cookbook (a semaphore
and a locked token bucket over ``asyncio.gather``, aiohttp) every round, and
benchmarks/limits_fidelity.py's faithful ``api_request_parallel_processor.py`` (its dispatch
loop sleeps 1 ms between requests) in the first round only (about 100 s for 100k lines).
``memory`` and ``rss`` run ``run_job`` (what ``corral run`` calls) with the transport swapped
for a MemoryTransport answering at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, emulator_process, machine
from batch import COOKBOOK, KEY, corral_run, write_input
from limits_fidelity import COOKBOOK as API_REQUEST_PARALLEL_PROCESSOR

HERE = Path(__file__).resolve().parent


def child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS MB, stdout) of one child pinned to the client core."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["taskset", "-c", str(CLIENT_CPU), *cmd],
            cwd=tempfile.gettempdir(),  # not this checkout: ``-m corral`` would import it first
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "OPENAI_API_KEY": KEY, **(env or {})},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stdout.seek(0)
        stderr.seek(0)
        if os.waitstatus_to_exitcode(status) not in (0, 1):
            raise RuntimeError(stderr.read()[-3000:])
        cpu = usage.ru_utime + usage.ru_stime
        return wall, cpu, usage.ru_maxrss / 1024, stdout.read()


def bare_h11(url: str, n: int, concurrency: int, backend: str) -> tuple[float, float]:
    """(req/s, CPU us/req) of the bare H11Transport (benchmarks/transports.py's worker loop,
    warmed up) on ``backend`` (asyncio, uvloop or trio)."""
    cmd = [sys.executable, str(HERE / "transports.py"), "--child", f"corral-h11-{backend}"]
    cmd += ["--url", url, "-n", str(n), "-c", str(concurrency)]
    _, _, _, out = child(cmd)
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["req_per_s"]), float(result["cpu_us_per_req"])


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_live(n: int, rounds: int, concurrency: int, before: str | None, backend: str) -> None:
    print(f"### `corral run --backend {backend}`, {n:,} lines, zero latency, C={concurrency}")
    print(f"(the bare H11Transport on {backend} too; the cookbooks on asyncio; {load()})\n")
    print(
        "| round | bare H11 req/s (CPU us/req) | corral run lines/s (CPU us/line) | ratio |", end=""
    )
    print(" gather+semaphore lines/s |\n|---:|---:|---:|---:|---:|")
    h11s, runs, books, faithful, cpus = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, emulator_process() as url:
        source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        write_input(source, n)
        for r in range(rounds):
            h11, h11_cpu = bare_h11(url, n, concurrency, backend)
            out.unlink(missing_ok=True)
            flags = ("--concurrency", str(concurrency), "--backend", backend)
            wall, cpu, _, _ = child(corral_run(source, out, url, *flags))
            assert sum(1 for _ in out.open()) == n
            out.unlink()
            if before is not None:  # the same command on an older checkout, for before/after
                was, _, _, _ = child(
                    corral_run(source, out, url, *flags), env={"PYTHONPATH": before}
                )
                out.unlink()
                print(f"|   | (before: {n / was:,.0f} lines/s, {n / was / h11:.2f}x) | | | |")
            big = str(10**9)
            book, _, _, _ = child(
                [sys.executable, "-c", COOKBOOK, str(source), str(out), url, big, big]
            )
            out.unlink()
            if r == 0:
                peer = [str(source), str(out), url, "0", str(10**12)]
                slow, _, _, _ = child([sys.executable, "-c", API_REQUEST_PARALLEL_PROCESSOR, *peer])
                out.unlink()
                faithful.append(n / slow)
            h11s.append(h11)
            runs.append(n / wall)
            books.append(n / book)
            cpus.append(h11_cpu / (cpu / n * 1e6))
            row = f"| {r + 1} | {h11:,.0f} ({h11_cpu:.0f}) | {n / wall:,.0f} ({cpu / n * 1e6:.0f})"
            print(f"{row} | {n / wall / h11:.2f}x | {n / book:,.0f} |")
    ratio = statistics.median(a / b for a, b in zip(runs, h11s, strict=True))
    book_ratio = statistics.median(a / b for a, b in zip(runs, books, strict=True))
    print(f"\ncorral run / bare H11: {ratio:.2f}x (median of rounds); by CPU per request ")
    print(f"(bare H11 CPU / corral run CPU, whole process): {statistics.median(cpus):.2f}x; ")
    print(f"corral run / gather+semaphore cookbook: {book_ratio:.2f}x")
    print(f"api_request_parallel_processor (round 1): {faithful[0]:,.0f} lines/s, corral run ")
    print(f"{runs[0] / faithful[0]:.2f}x of it ({load()})\n")


MEMORY_DRIVER = """
import sys, time, anyio
from pathlib import Path
from corral.batch import _job
from corral.core import Headers, Response
from corral.transports import MemoryTransport

BODY = (b'{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"positive"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":20,"completion_tokens":1,"total_tokens":21}}')
HEADERS = Headers({"content-type": "application/json"})

def answer(request):
    return Response(200, HEADERS, BODY)

_job._transport = lambda name, timeout: MemoryTransport(answer)
job = _job.BatchJob(Path(sys.argv[1]), Path(sys.argv[2]), base_url="http://mem/v1",
                    api_key="sk-bench-0123456789", concurrency=int(sys.argv[3]), progress=False,
                    handle_signals=False, json_summary=False)
t0 = time.perf_counter()
result = anyio.run(_job.run_job, job, backend=sys.argv[4])
print(result.report.succeeded, time.perf_counter() - t0)
"""


def memory_run(
    n: int, source: Path, out: Path, concurrency: int, backend: str
) -> tuple[float, float]:
    """(lines/s inside run_job, peak RSS MB) of one run on MemoryTransport."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", MEMORY_DRIVER, str(source), str(out), str(concurrency), backend]
    _, _, rss, stdout = child(cmd)
    done, elapsed = stdout.split()
    assert int(done) == n, stdout
    out.unlink()
    return n / float(elapsed), rss


def bench_memory(n: int, rounds: int, concurrency: int) -> None:
    print(f"### `corral run`'s path (run_job) on MemoryTransport, {n:,} lines, C={concurrency}")
    print(f"({load()})\n\n| round | asyncio lines/s | trio lines/s |\n|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        write_input(source, n)
        rates: list[float] = []
        for r in range(rounds):
            a, _ = memory_run(n, source, out, concurrency, "asyncio")
            t, _ = memory_run(n, source, out, concurrency, "trio")
            rates.append(a)
            print(f"| {r + 1} | {a:,.0f} | {t:,.0f} |")
    print(f"\nmedian asyncio {statistics.median(rates):,.0f} lines/s ({load()})\n")


def bench_rss(sizes: list[int], concurrency: int) -> None:
    print(f"### Peak RSS through run_job on MemoryTransport, C={concurrency} ({load()})\n")
    print("| lines | lines/s | peak RSS MB |\n|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
            write_input(source, n)
            rate, rss = memory_run(n, source, out, concurrency, "asyncio")
            source.unlink()
            print(f"| {n:,} | {rate:,.0f} | {rss:.0f} |")
    print()


def bench_latency(n: int, concurrency: int, latency: float) -> None:
    ideal = n * latency / concurrency
    print(f"### {latency * 1000:.0f} ms latency, C={concurrency}, {n:,} lines: wall / ideal")
    print(f"(ideal {ideal:.2f} s; {load()})\n")
    print("| client | run s | wall / ideal | CPU us/line |\n|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        write_input(source, n)
        with emulator_process("--latency", str(latency)) as url:
            for backend in ("asyncio", "uvloop", "trio"):
                out.unlink(missing_ok=True)
                cmd = corral_run(source, out, url, "--concurrency", str(concurrency))
                _, cpu, _, stdout = child([*cmd, "--backend", backend])
                elapsed = json.loads(stdout)["elapsed_s"]
                row = f"| corral run, {backend} | {elapsed:.2f} | {elapsed / ideal:.3f}"
                print(f"{row} | {cpu / n * 1e6:.0f} |")
                # The bare transport on the same emulator, for the floor this machine allows.
                cmd = [sys.executable, str(HERE / "transports.py"), "--child"]
                cmd += [f"corral-h11-{backend}", "--url", url, "-n", str(n), "-c", str(concurrency)]
                result = json.loads(child(cmd)[3].strip().splitlines()[-1])
                bare = n / result["req_per_s"]
                row = f"| bare H11Transport, {backend} | {bare:.2f} | {bare / ideal:.3f}"
                print(f"{row} | {result['cpu_us_per_req']:.0f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["live", "memory", "rss", "latency"])
    parser.add_argument("-n", type=int)
    parser.add_argument("-c", "--concurrency", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="live: also run corral run from this source tree")
    parser.add_argument(
        "--backend", default="asyncio", choices=["asyncio", "uvloop", "trio"], help="live: loop"
    )
    args = parser.parse_args()
    print(f"Machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    if args.which == "live":
        bench_live(args.n or 100_000, args.rounds, args.concurrency, args.before, args.backend)
    elif args.which == "memory":
        bench_memory(args.n or 100_000, args.rounds, args.concurrency)
    elif args.which == "rss":
        bench_rss([args.n] if args.n else [1_000_000, 10_000_000], args.concurrency)
    else:
        bench_latency(args.n or 51_200, args.concurrency, 0.05)


if __name__ == "__main__":
    main()
