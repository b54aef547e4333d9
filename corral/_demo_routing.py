"""``corral demo --deployments``: reviews routed over two emulated deployments, the preferred
(cheaper) one killed a third of the way through; the run fails over and finishes.

Both deployments are emulated in this process (``corral.testing.deployments``), each metering
what it answered at its own prices; the run is ``corral run --deployments FILE --trace FILE``
on a file written next to the reviews, so the trace shows the failover call by call.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import anyio
import attrs

from corral._demo import sentiment_reply, write_reviews
from corral._deployments import read_deployments
from corral.batch._job import BatchJob, run_job
from corral.testing.deployments import emulated_deployments, serve_deployments

__all__ = ["run_routing_demo"]

_FILE = """\
[router]
strategy = "priority"
cooldown = 2.0

[[deployment]]
name = "cheap"
base_url = "http://127.0.0.1:0/v1"
api_key_env = "CORRAL_DEMO_CHEAP_KEY"
priority = 0
[deployment.prices]
as_of = 2026-11-01
input = 0.10
output = 0.40
[deployment.emulator]
latency = "0.02"
seed = 1

[[deployment]]
name = "backup"
base_url = "http://127.0.0.1:0/v1"
api_key_env = "CORRAL_DEMO_BACKUP_KEY"
priority = 1
[deployment.prices]
as_of = 2026-11-01
input = 0.15
output = 0.60
[deployment.emulator]
latency = "0.02"
seed = 2
"""


def run_routing_demo(requests: int, directory: Path, *, backend: str = "asyncio") -> int:
    """Serve two deployments, run the reviews over them, kill the preferred one mid-run."""
    directory.mkdir(parents=True, exist_ok=True)
    source, output = directory / "reviews.jsonl", directory / "results.jsonl"
    trace, config = directory / "trace.jsonl", directory / "deployments.toml"
    write_reviews(source, requests)
    for stale in (output, trace):
        stale.unlink(missing_ok=True)
    os.environ.setdefault("CORRAL_DEMO_CHEAP_KEY", "sk-corral-demo-cheap")
    os.environ.setdefault("CORRAL_DEMO_BACKUP_KEY", "sk-corral-demo-backup")
    config.write_text(_FILE)
    specs = [
        attrs.evolve(spec, config=attrs.evolve(spec.config, reply=sentiment_reply))
        for spec in emulated_deployments(read_deployments(config, check_env=False))
    ]
    with serve_deployments(specs) as running:
        text = _FILE
        for name, live in running.items():
            text = text.replace(
                f'name = "{name}"\nbase_url = "http://127.0.0.1:0/v1"',
                f'name = "{name}"\nbase_url = "{live.base_url}"',
            )
        config.write_text(text)
        cheap = running["cheap"]
        print(
            f"corral demo: {requests} reviews over two deployments ({config}):\n"
            f"  cheap  {cheap.base_url}  priority 0, $0.10/$0.40 per M tokens\n"
            f"  backup {running['backup'].base_url}  priority 1, $0.15/$0.60 per M tokens\n"
            f"  the cheap one is killed after {requests // 3} answers",
            file=sys.stderr,
        )
        stop = threading.Event()

        def killer() -> None:
            while not stop.wait(0.01):
                if cheap.emulator.counts.get("ok", 0) >= requests // 3:
                    cheap.kill()
                    return

        watcher = threading.Thread(target=killer, name="corral-demo-killer", daemon=True)
        watcher.start()
        job = BatchJob(
            source,
            output,
            deployments=config,
            concurrency=64,
            retries=6,
            timeout=30.0,
            trace=trace,
            resume_command=f"corral demo --deployments --dir {directory}",
        )
        try:
            result = anyio.run(run_job, job, backend=backend)
        finally:
            stop.set()
            watcher.join(timeout=5)
        answered = {name: live.emulator.counts.get("ok", 0) for name, live in running.items()}
        spent = {name: live.emulator.spent_usd for name, live in running.items()}
    failovers = sum(1 for line in trace.open() if '"router.failover"' in line)
    ids = [json.loads(line)["custom_id"] for line in output.open()]
    print(
        f"\n  answered by cheap: {answered['cheap']}, by backup: {answered['backup']}\n"
        f"  failovers in the trace: {failovers} (`corral trace {trace} --id ID` tells one)\n"
        f"  results: {len(ids)} lines, {len(set(ids))} distinct ids of {requests}\n"
        f"  spent (the emulators' own count): cheap ${spent['cheap']:.6f}, "
        f"backup ${spent['backup']:.6f}",
        file=sys.stderr,
    )
    return int(result.exit_code)
