"""The ``corral`` command: ``run`` a batch, ``serve`` the emulator, ``demo`` both together.

argparse (stdlib) parses the flags: the command is small enough that a dependency would buy
nothing, and it keeps ``pip install corral`` lean.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from corral.batch.progress import ProgressView, format_summary, summary_dict
from corral.batch.runner import BatchOptions, BatchRunner, estimate_cost, preflight
from corral.client import Client, default_middleware
from corral.core.errors import InvalidInput
from corral.core.models import Timeouts
from corral.middleware.cache import Cache, CacheRules
from corral.middleware.retry import Retry
from corral.middleware.truncate import Truncate
from corral.transports.base import Transport

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return i, n


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policies")
    g.add_argument("--rpm", type=_positive_int, help="requests per minute allowed (your quota)")
    g.add_argument("--tpm", type=_positive_int, help="tokens per minute allowed (your quota)")
    g.add_argument(
        "--quota-redis",
        metavar="URL",
        help="share the RPM/TPM quota with other processes through this Redis",
    )
    g.add_argument(
        "--quota-name", default="default", help="which shared quota (with --quota-redis)"
    )
    g.add_argument("--concurrency", type=_positive_int, default=64, help="max requests in flight")
    g.add_argument("--retries", type=int, default=4, help="retries per request after the first try")
    g.add_argument(
        "--retry-budget",
        type=float,
        default=0.2,
        help="retries allowed as a fraction of requests (shared budget)",
    )
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request, all tries")
    g.add_argument("--cache", type=Path, metavar="PATH", help="cache responses in this SQLite file")
    g.add_argument("--redis", metavar="URL", help="cache responses in Redis (redis://host:6379/0)")
    g.add_argument("--cache-ttl", type=float, default=7 * 24 * 3600.0, help="seconds")
    g.add_argument(
        "--truncate",
        action="store_true",
        help="drop old turns / trim to fit each model's context window",
    )
    g.add_argument("--transport", choices=["h11", "httpx", "httpx2", "aiohttp"], default="h11")
    g.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a JSONL batch (OpenAI Batch API format), resumably")
    run.add_argument("input", type=Path)
    run.add_argument("-o", "--output", type=Path, required=True, help="results JSONL (appended)")
    run.add_argument("--base-url", help="API base URL (default: $OPENAI_BASE_URL)")
    run.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key"
    )
    run.add_argument("--model", help="override the model of every request")
    run.add_argument("--strict", action="store_true", help="refuse the file if any line is bad")
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="rerun the requests that failed in the output file",
    )
    run.add_argument("--dry-run", action="store_true", help="estimate tokens and cost only")
    run.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="run only shard I of N (0-based) of the custom_ids, e.g. 0/4",
    )
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--allow-failures", action="store_true", help="exit 0 even if some failed")
    run.add_argument("--no-progress", action="store_true")
    _add_policy_flags(run)

    prep = sub.add_parser("prepare", help="fill a prompt template from a CSV/JSONL table")
    prep.add_argument("rows", type=Path, help="a CSV with a header row, or JSONL of objects")
    prep.add_argument("-o", "--output", type=Path, required=True, help="requests JSONL to write")
    prep.add_argument("--template", required=True, help='user message, e.g. "Sentiment: {review}"')
    prep.add_argument("--system", help="system message (may use {fields} too)")
    prep.add_argument("--model", required=True)
    prep.add_argument("--max-tokens", type=int)
    prep.add_argument("--id-field", help="the column to use as custom_id (default: row-N)")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible emulator")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--rpm", type=_positive_int)
    serve.add_argument("--tpm", type=_positive_int)
    serve.add_argument("--latency", default="0", help="0.05 | uniform:0.01,0.1 | lognormal:0.2,0.5")
    serve.add_argument("--tokens-per-second", type=float)
    serve.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=RATE",
        help="inject a fault, e.g. 500=0.02 reset=0.01 (repeatable)",
    )
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--api-key", action="append", help="accept only these keys (repeatable)")

    demo = sub.add_parser("demo", help="run 2000 reviews through a faulty, rate-limited emulator")
    demo.add_argument("--requests", type=_positive_int, default=2000)
    demo.add_argument("--dir", type=Path, default=Path("corral-demo"))
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    demo.add_argument("--json", action="store_true")
    return parser


def _transport(name: str, timeout: float) -> Transport:
    timeouts = Timeouts(connect=10, read=timeout, write=30, pool=timeout)
    if name in ("httpx", "httpx2"):
        from corral.transports.httpx_transport import HttpxTransport

        return HttpxTransport(package=name, timeouts=timeouts, max_connections=1000)
    if name == "aiohttp":
        from corral.transports.aiohttp_transport import AiohttpTransport

        return AiohttpTransport(timeouts=timeouts, max_connections=1000)
    from corral.transports.http11 import H11Transport

    return H11Transport(timeouts=timeouts, max_connections=1000)


async def _run_batch(args: argparse.Namespace, base_url: str | None, api_key: str | None) -> int:
    options = BatchOptions(
        input=args.input,
        output=args.output,
        concurrency=args.concurrency,
        strict=getattr(args, "strict", False),
        retry_failed=getattr(args, "retry_failed", False),
        model=getattr(args, "model", None),
        shard=getattr(args, "shard", None),
    )
    pre = preflight(options)
    for bad in pre.bad:
        print(f"corral: bad line {bad.where(options.input)}: {bad.reason}", file=sys.stderr)
    if pre.bad_count > len(pre.bad):
        print(f"corral: ... and {pre.bad_count - len(pre.bad)} more bad lines", file=sys.stderr)
    shared = getattr(args, "quota_redis", None)
    stack = default_middleware(
        rpm=None if shared else args.rpm,
        tpm=None if shared else args.tpm,
        concurrency=args.concurrency,
        max_attempts=args.retries + 1,
        timeout=args.timeout,
        retry_budget=args.retry_budget,
        cache=_cache(args),
        truncate=Truncate() if getattr(args, "truncate", False) else None,
    )
    if shared:  # the shared limiter takes the local one's place, just outside ConcurrencyLimit
        from corral.middleware.shared_ratelimit import SharedRateLimit  # needs the redis extra

        limiter_layer = SharedRateLimit(shared, name=args.quota_name, rpm=args.rpm, tpm=args.tpm)
        stack.insert(len(stack) - 1, limiter_layer)
    client = Client(
        base_url,
        api_key,
        api_key_env=getattr(args, "api_key_env", "OPENAI_API_KEY"),
        transport=_transport(args.transport, args.timeout),
        middleware=stack,
    )
    # RateLimit and SharedRateLimit both keep the seconds calls spent waiting in ``waited``.
    limiter: Any = next((m for m in stack if hasattr(m, "waited")), None)
    retry = next(m for m in stack if isinstance(m, Retry))
    runner = BatchRunner(client, options)
    view = ProgressView(pre.total, enabled=not getattr(args, "no_progress", False))
    started = time.monotonic()

    def wait() -> float:
        return limiter.waited if limiter is not None else 0.0

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            count = 0
            async for _ in signals:
                count += 1
                if count == 1:
                    print(
                        f"\ncorral: stopping; {runner.in_flight} in flight may finish "
                        "(Ctrl-C again to stop now)",
                        file=sys.stderr,
                    )
                    runner.stop()
                else:
                    runner.abort()

    async def draw() -> None:
        while True:
            view.update(runner.report, wait())
            await anyio.sleep(0.2)

    async with client, anyio.create_task_group() as tg:
        tg.start_soon(watch_signals)
        tg.start_soon(draw)
        await runner.run(pre)
        tg.cancel_scope.cancel()
    view.update(runner.report, wait(), force=True)
    view.close()
    report = runner.report
    metrics = client.metrics.snapshot() if client.metrics is not None else None
    summary = summary_dict(report, metrics, wait(), time.monotonic() - started, retry.retries)
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"\ncorral run summary ({options.output})\n{format_summary(summary)}", file=sys.stderr
        )
    if report.interrupted:
        print(
            f"corral: interrupted; rerun the same command to resume (done ids are skipped):\n"
            f"  corral run {options.input} -o {options.output}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    failed = sum(report.failed.values())
    if failed and not getattr(args, "allow_failures", False):
        print(
            f"corral: {failed} request(s) failed; see the error field in {options.output}, "
            "or rerun with --retry-failed",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _cache(args: argparse.Namespace) -> Cache | None:
    rules = CacheRules(ttl=getattr(args, "cache_ttl", None))
    if getattr(args, "redis", None):
        from corral.stores.redis import RedisStore

        return Cache(RedisStore(args.redis), rules)
    if getattr(args, "cache", None):
        from corral.stores import SQLiteStore

        return Cache(SQLiteStore(args.cache), rules)
    return None


def _dry_run(args: argparse.Namespace) -> int:
    options = BatchOptions(input=args.input, output=args.output, model=args.model)
    pre = preflight(options)
    est = estimate_cost(options)
    result = {
        "lines": pre.total,
        "bad_lines": pre.bad_count,
        "requests": est.requests,
        "input_tokens_estimate": est.input_tokens,
        "max_output_tokens": est.max_output_tokens,
        "cost_usd_range": [round(est.cost_low, 4), round(est.cost_high, 4)],
        "unpriced_models": list(est.unpriced_models),
    }
    print(json.dumps(result, indent=2))
    return EXIT_OK


def _prepare(args: argparse.Namespace) -> int:
    from corral.batch.templates import Template, write_requests

    params = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
    template = Template(args.template, args.model, args.system, params)
    written, problems = write_requests(template, args.rows, args.output, id_field=args.id_field)
    for problem in problems:
        print(f"corral: {problem}", file=sys.stderr)
    print(f"corral: wrote {written} request(s) to {args.output}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from corral.testing.emulator import EmulatorConfig, Fault, Latency
    from corral.testing.server import serve_forever

    faults = {}
    for spec in args.fault:
        kind, _, rate = spec.partition("=")
        try:
            faults[Fault(kind)] = float(rate)
        except ValueError:
            kinds = ", ".join(f.value for f in Fault)
            raise InvalidInput(
                f"--fault {spec!r}: expected KIND=RATE with KIND one of {kinds}"
            ) from None
    config = EmulatorConfig(
        api_keys=frozenset(args.api_key) if args.api_key else None,
        latency=Latency.parse(args.latency),
        tokens_per_second=args.tokens_per_second,
        rpm=args.rpm,
        tpm=args.tpm,
        faults=faults,
        seed=args.seed,
    )
    serve_forever(config, args.host, args.port)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from corral.demo import DEMO_EMULATOR, DEMO_LIMITS, write_reviews
    from corral.testing.server import serve_in_thread

    args.dir.mkdir(parents=True, exist_ok=True)
    source, output = args.dir / "reviews.jsonl", args.dir / "results.jsonl"
    write_reviews(source, args.requests)
    output.unlink(missing_ok=True)
    print(
        f"corral demo: {args.requests} reviews -> {source}\n"
        f"  emulator: {DEMO_LIMITS['rpm']} RPM, {DEMO_LIMITS['tpm']} TPM, ~80 ms latency, "
        "6% injected faults (500, 503, 429, resets, malformed and truncated bodies)\n"
        "  corral:   the same RPM/TPM, retries with backoff, concurrency 128",
        file=sys.stderr,
    )
    with serve_in_thread(DEMO_EMULATOR) as emu:
        run_args = argparse.Namespace(
            input=source,
            output=output,
            concurrency=128,
            retries=6,
            retry_budget=0.2,
            timeout=30.0,
            transport="h11",
            json=args.json,
            **DEMO_LIMITS,
        )
        code = anyio.run(
            _run_batch, run_args, emu.base_url, "sk-corral-demo-key", backend=args.backend
        )
        counts = emu.counts
    tally: dict[str, int] = {}
    with output.open("rb") as f:
        for raw in f:
            record = json.loads(raw)
            if record["error"] is None:
                answer = record["response"]["body"]["choices"][0]["message"]["content"]
                tally[answer] = tally.get(answer, 0) + 1
    injected = {
        k: v
        for k, v in counts.items()
        if k not in ("ok", "received", "connections", "rate_limited")
    }
    print(
        f"\n  emulator saw {counts.get('received', 0)} requests for {args.requests} reviews: "
        f"{counts.get('ok', 0)} ok\n"
        f"  429s from its RPM/TPM limiter: {counts.get('rate_limited', 0)} "
        f"(corral kept under the quota)\n"
        f"  injected faults (each retried by corral): {injected}\n"
        f"  sentiment: {tally}\n  results: {output}",
        file=sys.stderr,
    )
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "prepare":
            return _prepare(args)
        if args.dry_run:
            return _dry_run(args)
        return anyio.run(_run_batch, args, args.base_url, None, backend=args.backend)
    except InvalidInput as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def _entry() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
