"""Failover: corral's Router beside LiteLLM's Router on the same two emulated deployments.

Three scenarios, each run once per client on fresh emulators (in this process, threads):

- ``none``: nothing fails (each client's own pace, for scale).
- ``kill``: the preferred deployment is killed (connections reset, port closed) after it has
  answered ``--kill-after`` calls; the other takes over.
- ``429``: the preferred deployment allows 600 requests per minute, which the clients are not
  told; above it it answers 429 with the wait (Retry-After); the other has no limit.

Each client runs in its own process (LiteLLM from its own venv, ``--litellm-python``), sends
``--requests`` chat calls with ``--concurrency`` in flight and reports its errors. This
process watches the emulators' counters: the time from the kill to the backup's first answer
(time to shift), the 429s the preferred one answered, and who served how much.

    python benchmarks/failover.py --litellm-python /tmp/litellm-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from corral.middleware._prices import PriceTable
from corral.testing.deployments import EmulatedDeployment, serve_deployments
from corral.testing.emulator import EmulatorConfig, Latency

CORRAL_CLIENT = """
import anyio, json, sys, time
from corral import Client
path, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bodies = ({"model": "gpt-4o-mini", "max_tokens": 5,
           "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(n))
async def main():
    errors = {}
    started = time.time()
    async with Client(deployments=path) as client, client.map(bodies, concurrency=c) as results:
        async for r in results:
            if r.error is not None:
                errors[r.error.kind] = errors.get(r.error.kind, 0) + 1
    print(json.dumps({"errors": errors, "seconds": time.time() - started}))
anyio.run(main)
"""

LITELLM_CLIENT = """
import asyncio, json, os, sys, time
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import litellm
from litellm import Router
litellm.suppress_debug_info = True
primary, backup, n, c = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def deployment(url, order):
    return {"model_name": "gpt-4o-mini", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": url, "api_key": "sk-bench", "order": order}}
router = Router(model_list=[deployment(primary, 1), deployment(backup, 2)],
                num_retries=4, allowed_fails=2, cooldown_time=5, timeout=30)
async def main():
    sem, errors = asyncio.Semaphore(c), {}
    async def one(i):
        async with sem:
            try:
                await router.acompletion(model="gpt-4o-mini", max_tokens=5,
                    messages=[{"role": "user", "content": f"question {i}"}])
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    started = time.time()
    await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps({"errors": errors, "seconds": time.time() - started}))
asyncio.run(main())
"""

DEPLOYMENTS = """
[router]
strategy = "priority"
cooldown = 5.0
allowed_fails = 2
max_attempts = 5

[[deployment]]
name = "preferred"
base_url = "{preferred}"
api_key_env = "BENCH_KEY"
priority = 0

[[deployment]]
name = "backup"
base_url = "{backup}"
api_key_env = "BENCH_KEY"
priority = 1
"""


def spec(name: str, **config: Any) -> EmulatedDeployment:
    emulator = EmulatorConfig(latency=Latency.fixed(0.02), any_model=True, **config)
    return EmulatedDeployment(name, "127.0.0.1", 0, "/v1", emulator, PriceTable(None))


def run(client: str, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    preferred = spec("preferred", rpm=600) if scenario == "429" else spec("preferred")
    with serve_deployments([preferred, spec("backup")]) as live:
        p, b = live["preferred"], live["backup"]
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "deployments.toml"
            config.write_text(DEPLOYMENTS.format(preferred=p.base_url, backup=b.base_url))
            if client == "corral":
                argv = [sys.executable, "-c", CORRAL_CLIENT, str(config)]
            else:
                argv = [args.litellm_python, "-c", LITELLM_CLIENT, p.base_url, b.base_url]
            argv += [str(args.requests), str(args.concurrency)]
            env = {**os.environ, "BENCH_KEY": "sk-bench"}
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            killed: list[float] = []
            shifted: list[float] = []

            def watch() -> None:
                while proc.poll() is None:
                    now = time.time()
                    if (
                        scenario == "kill"
                        and not killed
                        and p.emulator.counts["ok"] >= args.kill_after
                    ):
                        base = b.emulator.counts["ok"]
                        p.kill()
                        killed.append(time.time())
                    if killed and not shifted and b.emulator.counts["ok"] > base:
                        shifted.append(now)
                    time.sleep(0.001)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            out, err = proc.communicate(timeout=600)
            watcher.join(timeout=5)
            if proc.returncode != 0:
                raise SystemExit(f"{client} failed:\n{err.decode()[-3000:]}")
            report = json.loads(out.decode().strip().splitlines()[-1])
        return {
            "client": client,
            "scenario": scenario,
            "seconds": round(report["seconds"], 2),
            "errors": report["errors"],
            "shift_ms": round((shifted[0] - killed[0]) * 1000, 1) if shifted else None,
            "preferred_ok": p.emulator.counts["ok"],
            "backup_ok": b.emulator.counts["ok"],
            "preferred_429": p.emulator.counts["rate_limited"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--kill-after", type=int, default=1000)
    parser.add_argument("--litellm-python", help="a python with litellm installed")
    args = parser.parse_args()
    clients = ["corral"] + (["litellm"] if args.litellm_python else [])
    for scenario in ("none", "kill", "429"):
        for client in clients:
            print(json.dumps(run(client, scenario, args)), flush=True)


if __name__ == "__main__":
    main()
