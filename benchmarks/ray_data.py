"""corral on Ray Data beside ray.data.llm's HTTP processor (issue 17): same rows, same server.

One emulator subprocess (pinned to core 1) with an RPM/TPM quota and latency; a local Ray with
2 CPUs; two actors each. corral's actors share the quota through a redis-server started here;
ray.data.llm's processor gets its documented knobs (batch_size, concurrency=2 actors,
max_retries so a 429 is retried rather than failing the dataset, num_cpus=0.25 for the same
reason as corral's actors). Reports wall time, the emulator's 429s, and utilisation: requests
answered per second over the quota's requests per second.

    python benchmarks/ray_data.py --rows 20000 --rpm 60000 --latency 0.02
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import time
from typing import Any

from _common import emulator_counts, emulator_process, free_port, machine

KEY = "sk-bench-ray-0123456789"


def rows(n: int) -> list[dict[str, Any]]:
    def body(i: int) -> str:
        messages = [{"role": "user", "content": f"Is review {i} positive? It is great."}]
        return json.dumps({"model": "gpt-4o-mini", "max_tokens": 16, "messages": messages})

    return [{"custom_id": f"r{i}", "body": body(i)} for i in range(n)]


def redis_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def run_corral(ray_data: Any, url: str, items: list[dict[str, Any]], args: Any) -> int:
    from corral.integrations.ray import ActorConfig, map_requests

    config = ActorConfig(
        base_url=url,
        rpm=args.rpm,
        tpm=args.tpm,
        quota_redis=args.redis,
        quota_name=f"bench-{time.time()}",
        concurrency=args.concurrency,
    )
    ds = ray_data.from_items(items, override_num_blocks=args.blocks)
    out = map_requests(ds, config, actors=2, batch_size=args.batch_size).take_all()
    return sum(row["error_kind"] is None for row in out)


def run_ray_llm(ray_data: Any, url: str, items: list[dict[str, Any]], args: Any) -> int:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(
        url=f"{url}/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        batch_size=args.batch_size,
        concurrency=2,
        max_retries=args.llm_retries,
        http_request_stage={"num_cpus": 0.25},
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {"custom_id": row["custom_id"], "payload": json.loads(row["body"])},
        postprocess=lambda row: {
            "custom_id": row["custom_id"],
            "response": row["http_response"]["choices"][0]["message"]["content"],
        },
    )
    ds = ray_data.from_items(items, override_num_blocks=args.blocks)
    return len(processor(ds).take_all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rpm", type=int, default=60_000)
    parser.add_argument("--tpm", type=int, default=10_000_000)
    parser.add_argument("--latency", default="0.02")
    parser.add_argument("--concurrency", type=int, default=64, help="corral: per actor")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--llm-retries", type=int, default=5)
    parser.add_argument("--only", choices=["corral", "ray-llm"], help="run one client")
    args = parser.parse_args()
    os.environ["OPENAI_API_KEY"] = KEY
    import ray
    import ray.data as ray_data

    redis_proc, args.redis = redis_server()
    items = rows(args.rows)
    limits = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--latency", args.latency]
    print(
        f"# {machine()}; {args.rows} rows, rpm {args.rpm}, tpm {args.tpm}, latency {args.latency}"
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_data.DataContext.get_current().enable_progress_bars = False
    clients = {"corral": run_corral, "ray-llm": run_ray_llm}
    try:
        for name, run in clients.items():
            if args.only and name != args.only:
                continue
            with emulator_process(*limits, "--any-model") as url:
                started = time.monotonic()
                try:
                    done = run(ray_data, url, items, args)
                    failure = ""
                except Exception as exc:  # a dataset that fails is a result too
                    done, failure = 0, f" FAILED: {type(exc).__name__}: {str(exc)[:200]}"
                wall = time.monotonic() - started
                counts = emulator_counts(url)
            rate, quota_rate = done / wall, args.rpm / 60
            print(
                f"| {name} | {done} | {wall:.1f} | {counts.get('rate_limited', 0)} | "
                f"{counts.get('received', 0)} | {rate:.0f} | {rate / quota_rate:.0%} |{failure}"
            )
    finally:
        ray.shutdown()
        redis_proc.terminate()


if __name__ == "__main__":
    main()
