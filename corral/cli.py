"""The ``corral`` command: ``run`` a batch, ``prepare`` one, ``serve`` the emulator, ``demo``.

argparse (stdlib) parses the flags: the command is small enough that a dependency would buy
nothing, and it keeps ``pip install corral`` lean. This module only turns arguments into
values (``BatchJob``, ``EmulatorConfig``) and calls the library; every mistake a user can make
ends as one ``corral: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio
import attrs

from corral import __version__
from corral.batch._job import TRANSPORTS, VIAS, BatchJob, ExitCode, needs_extra, run_job
from corral.batch._paths import check_input
from corral.batch._runner import BatchOptions, estimate_cost, preflight
from corral.batch._store import scan_output
from corral.core._errors import InvalidInput

__all__ = ["main"]

_DAY = 24 * 3600.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one ``corral: ...`` line (and exit 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"corral: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(ExitCode.REFUSED)


class _Help(argparse.HelpFormatter):
    """Adds "(default: X)" to every flag that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or not text:
            return text
        if action.option_strings and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text


def _number(kind: type[int] | type[float], *, minimum: float, strict: bool) -> Any:
    """An argparse type: a finite number above (``strict``) or at least ``minimum``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            relation = "more than" if strict else "at least"
            raise argparse.ArgumentTypeError(f"must be {relation} {minimum:g}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


_count = _number(int, minimum=1, strict=False)
_non_negative_int = _number(int, minimum=0, strict=False)
_seconds = _number(float, minimum=0, strict=True)
_fraction = _number(float, minimum=0, strict=False)


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
    g.add_argument("--rpm", type=_count, help="requests per minute your quota allows")
    g.add_argument("--tpm", type=_count, help="tokens per minute your quota allows")
    g.add_argument(
        "--quota-redis",
        metavar="URL",
        help="share the RPM/TPM quota with other processes through this Redis (redis extra)",
    )
    g.add_argument("--quota-name", default="default", help="which shared quota (--quota-redis)")
    g.add_argument("--concurrency", type=_count, default=64, help="requests in flight at most")
    g.add_argument(
        "--retries", type=_non_negative_int, default=4, help="retries per request after its try"
    )
    g.add_argument(
        "--retry-budget",
        type=_fraction,
        default=0.2,
        help="retries allowed as a fraction of requests, shared by all",
    )
    g.add_argument(
        "--timeout", type=_seconds, default=600.0, help="seconds per request, all tries included"
    )
    g.add_argument(
        "--max-outage",
        type=_fraction,
        default=600.0,
        metavar="SECONDS",
        help="seconds to wait for a provider that is down before stopping (resumable)",
    )
    g.add_argument(
        "--max-pause",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="longest pause a 429's Retry-After may impose on the whole quota",
    )
    g.add_argument("--cache", type=Path, metavar="PATH", help="cache responses in this SQLite file")
    g.add_argument("--redis", metavar="URL", help="cache responses in Redis (redis extra)")
    g.add_argument("--cache-ttl", type=_seconds, default=7 * _DAY, help="cache entry life, seconds")
    g.add_argument(
        "--truncate", action="store_true", help="trim prompts to fit each model's context window"
    )
    g.add_argument("--transport", choices=TRANSPORTS, default="h11", help="HTTP client to use")
    g.add_argument(
        "--backend",
        choices=["asyncio", "uvloop", "trio"],
        default="asyncio",
        help="event loop: asyncio, asyncio on uvloop (speed extra), or trio (trio extra)",
    )


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits as the provider counts them (with --rpm/--tpm)")
    g.add_argument(
        "--window",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="the provider enforces the per-minute limits over any window this long",
    )
    g.add_argument(
        "--settle",
        choices=["reserved", "usage"],
        default="reserved",
        help="a call costs its reservation (prompt estimate + max_tokens, as OpenAI counts) "
        "or is refunded to its usage (for providers that count usage)",
    )
    g.add_argument(
        "--burst-requests",
        type=_seconds,
        metavar="N",
        help="calls sent at once (default: 2%% of a window)",
    )
    g.add_argument(
        "--burst-tokens",
        type=_seconds,
        metavar="N",
        help="tokens sent at once (default: 2%% of a window)",
    )
    g.add_argument(
        "--no-calibrate",
        action="store_true",
        help="keep corral's own prompt estimate (by default token reservations are scaled "
        "to the provider's count, learnt from its x-ratelimit-remaining-tokens)",
    )


def _add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ray (ray extra)")
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on the Ray cluster at ADDRESS (a new local one without it); same output file",
    )
    g.add_argument(
        "--ray-actors", type=_count, default=2, help="actors calling the API (--concurrency each)"
    )


def _add_batch_api_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Batch API back-end (half the price, results within 24 hours)")
    g.add_argument(
        "--via",
        choices=VIAS,
        default="live",
        help="send the lines as live calls, or through the provider's Batch API",
    )
    g.add_argument(
        "--cancel",
        action="store_true",
        help="cancel this output's batches at the provider, merge what they finished",
    )
    g.add_argument(
        "--batch-max-requests", type=_count, default=50_000, help="requests per batch file"
    )
    g.add_argument(
        "--batch-max-bytes", type=_count, default=200 * 1024 * 1024, help="bytes per batch file"
    )
    g.add_argument(
        "--batch-poll",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="seconds between polls after a change (growing to 60 while nothing changes)",
    )
    g.add_argument(
        "--batch-rounds",
        type=_count,
        default=3,
        help="rounds in all: the first, then resends of what expired, failed or went missing",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="corral",
        description="Call OpenAI-compatible APIs at scale: resumable batches within your limits.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, formatter_class=_Help)
        assert isinstance(p, _Parser)
        return p

    run = command("run", "run a JSONL batch (OpenAI Batch API format), resumably")
    run.add_argument("input", type=Path, help="requests JSONL: Batch API lines or request bodies")
    run.add_argument(
        "-o", "--output", type=Path, required=True, help="results JSONL (created or resumed)"
    )
    run.add_argument("--base-url", help="API base URL (default: $OPENAI_BASE_URL, else OpenAI)")
    run.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="environment variable holding the key (default: CORRAL_API_KEY, then OPENAI_API_KEY)",
    )
    run.add_argument("--model", help="send every request to this model instead of its own")
    run.add_argument("--strict", action="store_true", help="refuse the file if any line is bad")
    run.add_argument(
        "--retry-failed", action="store_true", help="rerun the requests that failed in the output"
    )
    run.add_argument(
        "--force-resume",
        action="store_true",
        help="resume although the model, base URL, shard or (explicit-id) input changed",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="estimate tokens and cost of what is left; send nothing",
    )
    run.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="run only shard I of N (0-based) of the custom_ids, e.g. 0/4",
    )
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    run.add_argument(
        "--allow-failures", action="store_true", help="exit 0 even if the output holds failures"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress display")
    run.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="append every decision (waits, retries, pauses, cache, breaker) as JSON lines",
    )
    _add_policy_flags(run)
    _add_routing_flags(run)
    _add_limit_flags(run)
    _add_batch_api_flags(run)
    _add_ray_flags(run)

    prep = command("prepare", "fill a prompt template from a CSV/JSONL table into requests")
    prep.add_argument("rows", type=Path, help="a CSV with a header row (UTF-8), or JSONL objects")
    prep.add_argument("-o", "--output", type=Path, required=True, help="requests JSONL to write")
    prep.add_argument(
        "--template",
        required=True,
        help='user message with {column} fields, e.g. "Sentiment: {review}"; {{ }} for braces',
    )
    prep.add_argument("--system", help="system message (may use {column} fields too)")
    prep.add_argument("--model", required=True, help="the model every request names")
    prep.add_argument("--max-tokens", type=_count, help="max_tokens of every request")
    prep.add_argument("--id-field", help="the column to use as custom_id (default: row-N)")

    serve = command("serve", "run the OpenAI-compatible emulator (for tests and demos)")
    serve.add_argument(
        "--deployments",
        type=Path,
        metavar="FILE",
        help="serve every deployment of this TOML file at its base_url, with its limits, "
        "prices and [deployment.emulator] faults (other flags are ignored)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_non_negative_int, default=8000, help="TCP port")
    serve.add_argument("--rpm", type=_count, help="requests per minute it allows (429 beyond)")
    serve.add_argument("--tpm", type=_count, help="tokens per minute it allows (429 beyond)")
    serve.add_argument(
        "--latency",
        default="0",
        help="seconds to first byte: 0.05 | uniform:0.01,0.1 | lognormal:MEDIAN,SIGMA",
    )
    serve.add_argument("--tokens-per-second", type=_seconds, help="streaming pace")
    serve.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=RATE",
        help="inject a fault with this probability, e.g. 500=0.02 reset=0.01 (repeatable)",
    )
    serve.add_argument("--seed", type=int, default=0, help="random seed for latency and faults")
    serve.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="accept only this Bearer key (repeatable; default: any non-empty key)",
    )
    serve.add_argument(
        "--models",
        help="comma-separated models it serves (default: current OpenAI model names)",
    )
    serve.add_argument("--any-model", action="store_true", help="accept every model name")
    serve.add_argument(
        "--count",
        choices=["usage", "reserved"],
        default="usage",
        help="how TPM is charged: the real usage, or prompt estimate + max_tokens at admission",
    )
    serve.add_argument(
        "--faults-use-quota", action="store_true", help="injected faults count against RPM/TPM"
    )
    serve.add_argument(
        "--window",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="it enforces the per-minute limits over any window this long",
    )
    bounds = serve.add_argument_group("bounds on each client")
    bounds.add_argument(
        "--max-body", type=_count, default=32 * 1024 * 1024, help="request body bytes (413 beyond)"
    )
    bounds.add_argument(
        "--request-timeout",
        type=_seconds,
        default=30.0,
        help="seconds a request may take to arrive (408 beyond)",
    )
    bounds.add_argument(
        "--keepalive-timeout", type=_seconds, default=60.0, help="seconds an idle connection stays"
    )
    bounds.add_argument(
        "--max-connections", type=_count, default=1000, help="open connections at most"
    )

    trace = command("trace", "tell one request's story from a --trace file")
    trace.add_argument("file", type=Path, help="the JSONL file written by corral run --trace")
    trace.add_argument("--id", required=True, help="the custom_id to tell the story of")

    demo = command("demo", "run 2000 reviews through a faulty, rate-limited emulator")
    demo.add_argument("--requests", type=_count, default=2000, help="number of reviews")
    demo.add_argument("--dir", type=Path, default=Path("corral-demo"), help="where files go")
    demo.add_argument(
        "--backend", choices=["asyncio", "trio"], default="asyncio", help="event loop"
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    demo.add_argument(
        "--deployments",
        action="store_true",
        help="route over two emulated deployments and kill the preferred one mid-run",
    )
    return parser


_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


def resume_command(argv: Sequence[str]) -> str:
    """The exact command line, quoted, with any ``user:password@`` in URLs blanked."""
    words = [_USERINFO.sub(r"\g<scheme>***@", word) for word in argv]
    return shlex.join(["corral", *(w for w in words if w != "--retry-failed")])


def _job(args: argparse.Namespace, argv: Sequence[str]) -> BatchJob:
    if args.ray is not None and args.backend == "trio":
        raise InvalidInput("--ray actors run on asyncio; drop --backend trio")
    if args.transport == "aiohttp" and args.backend == "trio":
        raise InvalidInput("--transport aiohttp runs only on asyncio; use --backend asyncio")
    if args.backend == "trio":
        with needs_extra("trio", "--backend trio"):
            import trio  # noqa: F401
    if args.backend == "uvloop":
        with needs_extra("speed", "--backend uvloop"):
            import uvloop  # noqa: F401
    return BatchJob(
        input=args.input,
        output=args.output,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        model=args.model,
        shard=args.shard,
        strict=args.strict,
        retry_failed=args.retry_failed,
        force_resume=args.force_resume,
        allow_failures=args.allow_failures,
        rpm=args.rpm,
        tpm=args.tpm,
        concurrency=args.concurrency,
        retries=args.retries,
        retry_budget=args.retry_budget,
        timeout=args.timeout,
        max_outage=args.max_outage,
        max_pause=args.max_pause,
        cache=args.cache,
        redis=args.redis,
        cache_ttl=args.cache_ttl,
        truncate=args.truncate,
        quota_redis=args.quota_redis,
        quota_name=args.quota_name,
        transport=args.transport,
        progress=not args.no_progress,
        json_summary=args.json,
        resume_command=resume_command(argv),
        window=args.window,
        settle=args.settle,
        burst_requests=args.burst_requests,
        burst_tokens=args.burst_tokens,
        calibrate=not args.no_calibrate,
        trace=args.trace,
        **_routing_fields(args),
        via=args.via,
        cancel=args.cancel,
        batch_max_requests=args.batch_max_requests,
        batch_max_bytes=args.batch_max_bytes,
        batch_poll=args.batch_poll,
        batch_rounds=args.batch_rounds,
        ray=args.ray,
        ray_actors=args.ray_actors,
    )


def _dry_run(args: argparse.Namespace) -> int:
    check_input(args.input)
    options = BatchOptions(input=args.input, output=args.output, model=args.model, shard=args.shard)
    pre = preflight(options)
    done = scan_output(args.output, repair=False).done if args.output.is_file() else None
    est = estimate_cost(options, done=done, **_dry_run_prices(args))
    result = {
        "lines": pre.total,
        "bad_lines": pre.bad_count,
        "already_done": len(done) if done is not None else 0,
        "requests": est.requests,
        "input_tokens_estimate": est.input_tokens,
        "max_output_tokens": est.max_output_tokens,
        "cost_usd_range": [round(est.cost_low, 4), round(est.cost_high, 4)],
        "unpriced_models": list(est.unpriced_models),
        **_dry_run_budget(args, est.cost_high),
    }
    print(json.dumps(result, indent=2))
    return ExitCode.OK


def _prepare(args: argparse.Namespace) -> int:
    from corral.batch._templates import Template, write_requests

    params = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
    template = Template(args.template, args.model, args.system, params)
    written, problems = write_requests(template, args.rows, args.output, id_field=args.id_field)
    for problem in problems:
        print(f"corral: {problem}", file=sys.stderr)
    print(f"corral: wrote {written} request(s) to {args.output}", file=sys.stderr)
    return ExitCode.FAILED if problems else ExitCode.OK


def _faults(specs: Sequence[str]) -> dict[Any, float]:
    from corral.testing.emulator import Fault

    kinds = ", ".join(f.value for f in Fault)
    faults = {}
    for spec in specs:
        kind, _, rate = spec.partition("=")
        try:
            fault, probability = Fault(kind), float(rate)
        except ValueError:
            raise InvalidInput(
                f"--fault {spec!r}: expected KIND=RATE with KIND one of {kinds}"
            ) from None
        if not 0 <= probability <= 1:
            raise InvalidInput(f"--fault {spec!r}: the rate is a probability from 0 to 1")
        faults[fault] = probability
    if sum(faults.values()) > 1:
        raise InvalidInput(f"--fault rates add up to {sum(faults.values()):g}; at most 1")
    return faults


def _latency(text: str) -> Any:
    from corral.testing.emulator import Latency

    kind, _, params = text.partition(":")
    try:
        latency = Latency.parse(text)
        values = [float(v) for v in params.split(",")] if params else [float(kind)]
    except ValueError:
        latency, values = None, []
    if (
        latency is None
        or latency.kind not in ("fixed", "uniform", "lognormal")
        or not all(math.isfinite(v) and v >= 0 for v in values)
    ):
        raise InvalidInput(
            f"--latency {text!r}: expected SECONDS (0.05), uniform:LOW,HIGH or "
            "lognormal:MEDIAN,SIGMA with non-negative numbers"
        )
    return latency


def _serve(args: argparse.Namespace) -> int:
    if args.deployments is not None:
        return _serve_deployments(args)
    from corral.testing.emulator import EmulatorConfig
    from corral.testing.server import ServerLimits, serve_forever

    config = EmulatorConfig(
        api_keys=frozenset(args.api_key) if args.api_key else None,
        latency=_latency(args.latency),
        tokens_per_second=args.tokens_per_second,
        rpm=args.rpm,
        tpm=args.tpm,
        faults=_faults(args.fault),
        seed=args.seed,
        any_model=args.any_model,
        count=args.count,
        faults_use_quota=args.faults_use_quota,
        window=args.window,
    )
    if args.models:
        config = attrs.evolve(config, models=frozenset(m.strip() for m in args.models.split(",")))
    try:
        limits = ServerLimits(
            max_body=args.max_body,
            request_timeout=args.request_timeout,
            keepalive_timeout=args.keepalive_timeout,
            max_connections=args.max_connections,
        )
        serve_forever(config, args.host, args.port, limits=limits)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InvalidInput(
                f"port {args.port} on {args.host} is already in use; pick another with --port"
            ) from None
        raise InvalidInput(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return ExitCode.OK


def _trace(args: argparse.Namespace) -> int:
    from corral.observe import format_story, read_trace

    events = list(read_trace(args.file, args.id))
    if not events:
        raise InvalidInput(f"{args.file}: no events for custom_id {args.id!r}")
    print(f"custom_id {args.id}: {len(events)} events\n{format_story(events)}")
    return ExitCode.OK


def _demo(args: argparse.Namespace) -> int:
    from corral._demo import run_demo

    if args.deployments:
        from corral._demo_routing import run_routing_demo

        return run_routing_demo(args.requests, args.dir, backend=args.backend)
    return run_demo(args.requests, args.dir, backend=args.backend, json_summary=args.json)


def _add_routing_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployments and the spend cap")
    g.add_argument(
        "--deployments",
        type=Path,
        metavar="FILE",
        help="route every call over the deployments of this TOML file (docs/routing.md)",
    )
    g.add_argument(
        "--budget-usd",
        type=_fraction,
        metavar="USD",
        help="stop admitting when the next call's worst case would pass this spend cap "
        f"(exit {int(ExitCode.BUDGET)}; the rest stays resumable)",
    )
    g.add_argument(
        "--budget-redis",
        metavar="URL",
        help="share the --budget-usd cap with other processes through this Redis",
    )
    g.add_argument("--budget-name", default="default", help="which shared budget (--budget-redis)")


def _routing_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "deployments": args.deployments,
        "budget_usd": args.budget_usd,
        "budget_redis": args.budget_redis,
        "budget_name": args.budget_name,
    }


def _dry_run_prices(args: argparse.Namespace) -> dict[str, Any]:
    """With --deployments, the dry run prices calls at the preferred deployment's prices."""
    if args.deployments is None:
        return {}
    from corral._deployments import read_deployments
    from corral.batch._routing import deployment_prices

    file = read_deployments(args.deployments, check_env=False)
    first = min(file.deployments, key=lambda d: d.priority)
    return {"prices": deployment_prices(first)}


def _dry_run_budget(args: argparse.Namespace, high: float) -> dict[str, Any]:
    """The projected cost against ``--budget-usd``, and where the prices came from."""
    out: dict[str, Any] = {}
    if args.deployments is not None:
        from corral._deployments import read_deployments

        file = read_deployments(args.deployments, check_env=False)
        first = min(file.deployments, key=lambda d: d.priority)
        out["priced_at"] = {"deployment": first.name, "prices_as_of": str(first.prices.as_of)}
    if args.budget_usd is not None:
        out["budget_usd"] = args.budget_usd
        out["within_budget"] = high <= args.budget_usd
    return out


def _serve_deployments(args: argparse.Namespace) -> int:
    from corral._deployments import read_deployments
    from corral.testing.deployments import emulated_deployments, serve_deployments_forever

    specs = emulated_deployments(read_deployments(args.deployments, check_env=False))
    try:
        serve_deployments_forever(specs)
    except OSError as exc:
        raise InvalidInput(f"cannot serve the deployments: {exc.strerror or exc}") from None
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(words)
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
        if args.command == "trace":
            return _trace(args)
        if args.dry_run:
            return _dry_run(args)
        job = _job(args, words)
        if job.ray is not None:  # in the main thread, where Ctrl-C arrives
            from corral.integrations.ray import run_ray_job

            return int(run_ray_job(job).exit_code)
        uvloop = args.backend == "uvloop"  # anyio's asyncio backend, on uvloop's loop
        backend = "asyncio" if uvloop else args.backend
        options = {"use_uvloop": True} if uvloop else {}
        result = anyio.run(run_job, job, backend=backend, backend_options=options)
        return int(result.exit_code)
    except InvalidInput as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return ExitCode.REFUSED


def _entry() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
