"""`corral run --via batch-api` against the emulator's Batch API (issue 18).

    python benchmarks/batch_api.py rss --lines 100000 200000 1000000
    python benchmarks/batch_api.py peers --lines 200000

``rss``: each size through ``corral run --via batch-api`` (50,000 requests per file, the
provider's limit), its peak RSS (the child's ru_maxrss), wall time, files and batches.
``peers``: the same file through the official openai SDK as its docs show it (files.create,
batches.create, batches.retrieve in a loop, files.content read whole), for the ratio.

The emulator runs in its own process (pinned to core 1; clients to core 0), keeping every file
on disk; batches take 2 s plus 20 us per request and are polled every 0.5 s.
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
from _common import CLIENT_CPU, SERVER_CPU, free_port, machine

KEY = "sk-bench-0123456789"

EMULATOR = """
import sys
from corral.testing.batches import BatchConfig
from corral.testing.emulator import EmulatorConfig
from corral.testing.server import serve_forever
config = EmulatorConfig(any_model=True, batches=BatchConfig(duration=2.0, per_request=2e-5))
serve_forever(config, "127.0.0.1", int(sys.argv[1]))
"""

SDK_PEER = """
import json, sys, time
from pathlib import Path
import openai
source, out, url = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
client = openai.OpenAI(base_url=url, api_key="sk-bench-0123456789")
parts, lines = [], source.read_text().splitlines(keepends=True)
for start in range(0, len(lines), 50_000):
    part = out.with_name(f"sdk-part-{start}.jsonl")
    part.write_text("".join(lines[start:start + 50_000]))
    parts.append(part)
del lines
batches = []
for part in parts:
    uploaded = client.files.create(file=part.open("rb"), purpose="batch")
    batches.append(client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"))
done = {}
while len(done) < len(batches):
    for b in batches:
        if b.id not in done:
            now = client.batches.retrieve(b.id)
            if now.status in ("completed", "failed", "expired", "cancelled"):
                done[b.id] = now
    time.sleep(0.5)
with out.open("w") as f:
    for b in done.values():
        text = client.files.content(b.output_file_id).text
        for line in text.splitlines():
            record = json.loads(line)
            f.write(json.dumps(record) + "\\n")
"""


def write_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": "gpt-4o-mini",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"Review {i}: works well, arrived late."}],
            }
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if (os.cpu_count() or 1) > cpu else cmd


def measured(cmd: list[str]) -> tuple[int, float, float]:
    """Run ``cmd``; (exit status, wall seconds, peak RSS MB of that process)."""
    started = time.monotonic()
    proc = subprocess.Popen(pinned(CLIENT_CPU, cmd), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - started, usage.ru_maxrss / 1024


class Emulator:
    def __enter__(self) -> str:
        port = free_port()
        cmd = pinned(SERVER_CPU, [sys.executable, "-c", EMULATOR, str(port)])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "corral emulator listening on ..."
        return f"http://127.0.0.1:{port}/v1"

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def corral(source: Path, out: Path, url: str) -> list[str]:
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
        "--via",
        "batch-api",
        "--batch-poll",
        "0.5",
        "--no-progress",
        "--json",
    ]


def check(out: Path, n: int) -> int:
    ids = set()
    with out.open("rb") as f:
        for raw in f:
            ids.add(json.loads(raw)["custom_id"])
    assert len(ids) == n, (len(ids), n)
    return len(ids)


def rss(sizes: list[int]) -> None:
    print(f"machine: {machine()}")
    print("| lines | batch files | wall s | peak RSS MB |")
    print("|---:|---:|---:|---:|")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp, Emulator() as url:
            source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
            write_input(source, n)
            code, wall, peak = measured(corral(source, out, url))
            assert code == 0, code
            check(out, n)
            print(f"| {n:,} | {-(-n // 50_000)} | {wall:.1f} | {peak:.0f} |", flush=True)


def peers(n: int) -> None:
    print(f"machine: {machine()}; {n:,} lines, {-(-n // 50_000)} batch files")
    print("| client | wall s | peak RSS MB |")
    print("|---|---:|---:|")
    for name in ("corral run --via batch-api", "openai SDK (files.content read whole)"):
        with tempfile.TemporaryDirectory() as tmp, Emulator() as url:
            source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
            write_input(source, n)
            env_cmd = (
                corral(source, out, url)
                if name.startswith("corral")
                else [sys.executable, "-c", SDK_PEER, str(source), str(out), url]
            )
            code, wall, peak = measured(env_cmd)
            assert code == 0, code
            check(out, n)
            print(f"| {name} | {wall:.1f} | {peak:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["rss", "peers"])
    parser.add_argument("--lines", type=int, nargs="+", default=[100_000, 200_000])
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", KEY)
    if args.what == "rss":
        rss(args.lines)
    else:
        peers(args.lines[0])


if __name__ == "__main__":
    main()
