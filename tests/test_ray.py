"""corral on Ray Data (issue 17): actors sharing one quota and one cache through Redis, rows that
never fail their batch, exactly once across reruns, and ``corral run --ray``.

One local Ray for the module (``ray.init(num_cpus=2)``), started after the API key is in the
environment, so its workers inherit it as a cluster's nodes would have it set.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from corral.batch._items import IdSet
from corral.core._errors import InvalidInput
from corral.testing import EmulatorConfig, Fault, serve_in_thread
from tests.support import CANARY_KEY

ray = pytest.importorskip("ray")
ray_data = pytest.importorskip("ray.data")

from corral.integrations.ray import (  # noqa: E402
    ActorConfig,
    CorralActor,
    Template,
    done_ids,
    map_requests,
    skip_done,
)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "CORRAL_API_KEY")}
    os.environ["OPENAI_API_KEY"] = CANARY_KEY
    os.environ.pop("CORRAL_API_KEY", None)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.WARNING)  # pytest would keep its debug lines
    ray_data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def body(i: int, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": f"review {i}"}], **extra}


def write_rows(path: Path, n: int) -> None:
    """Rows with the body as a nested object; every other row sets a temperature (Arrow then
    gives the others a null one, which must not reach the provider)."""
    with path.open("w") as f:
        for i in range(n):
            extra = {"max_tokens": 16, **({"temperature": 0.5} if i % 2 else {})}
            f.write(json.dumps({"custom_id": f"r{i}", "body": body(i, **extra)}) + "\n")


def test_two_actors_share_one_quota_through_redis_every_id_once(
    tmp_path: Path, redis_url: str
) -> None:
    """Two actors, one RPM/TPM quota in Redis (1000 calls per 10 s), an emulator enforcing the
    same limits over a 10-second window and injecting faults: every id comes back exactly once,
    at most 0.1% 429s from the quota; read tasks run beside the actors (fractional CPUs), so
    the pipeline never hangs.  The window is 10 s, not 2, because the limiter's headroom for
    the time between admission and arrival is its burst, 2% of a window: 40 ms of scheduling
    delay on a loaded machine overran a 2-second window, 200 ms do not."""
    rows = 2000  # 0.1% of it is 2 429s: a bound one jittered window edge cannot break
    write_rows(tmp_path / "in.jsonl", rows)
    limits = EmulatorConfig(
        rpm=6_000,
        tpm=600_000,
        window=10.0,
        faults={Fault.SERVER_ERROR: 0.02, Fault.RESET: 0.01},
        seed=7,
    )
    with serve_in_thread(limits) as emu:
        config = ActorConfig(
            base_url=emu.base_url,
            rpm=6_000,
            tpm=600_000,
            window=10.0,
            quota_redis=redis_url,
            quota_name="test-ray-quota",
            timeout=30,
        )
        ds = ray_data.read_json(str(tmp_path / "in.jsonl"))
        out = map_requests(ds, config, actors=2, batch_size=100).take_all()
        counts = emu.counts
    ids = Counter(row["custom_id"] for row in out)
    assert set(ids) == {f"r{i}" for i in range(rows)}
    assert max(ids.values()) == 1  # 0 duplicates
    assert all(row["error_kind"] is None for row in out), [r for r in out if r["error_kind"]][:3]
    assert all(row["response"].startswith("Emulated answer") for row in out)
    assert all(row["prompt_tokens"] > 0 for row in out)
    assert counts.get("rate_limited", 0) <= counts["received"] // 1000, counts  # <= 0.1% 429s
    assert counts.get("500", 0) > 0, counts  # the faults happened and were retried


def test_a_failed_row_never_fails_its_batch(tmp_path: Path) -> None:
    """Bad JSON, a row without an id, a non-object body and a prompt past the context window sit
    in one batch with good rows: each gets its error columns, the good ones their answers."""
    good = [{"custom_id": f"g{i}", "body": json.dumps(body(i))} for i in range(4)]
    huge = {"model": "small-model", "messages": [{"role": "user", "content": "word " * 20_000}]}
    bad = [
        {"custom_id": "bad-json", "body": "{not json"},
        {"custom_id": "", "body": json.dumps(body(9))},
        {"custom_id": "not-object", "body": "[1, 2]"},
        {"custom_id": "too-long", "body": json.dumps(huge)},
    ]
    with serve_in_thread() as emu:
        ds = ray_data.from_items(good + bad, override_num_blocks=1)
        out = map_requests(ds, ActorConfig(base_url=emu.base_url), actors=1, batch_size=8)
        rows = {row["custom_id"]: row for row in out.take_all()}
    assert len(rows) == 8
    for i in range(4):
        assert rows[f"g{i}"]["error_kind"] is None and rows[f"g{i}"]["response"]
    assert rows["bad-json"]["error_kind"] == "invalid_input"
    assert "not valid JSON" in rows["bad-json"]["error_message"]
    assert rows[""]["error_kind"] == "invalid_input" and "custom_id" in rows[""]["error_message"]
    assert rows["not-object"]["error_kind"] == "invalid_input"
    assert rows["too-long"]["error_kind"] == "context_length_exceeded"
    assert {rows[k]["error_scope"] for k in ("bad-json", "not-object", "too-long")} == {"line"}
    assert all("body" not in row for row in rows.values())  # the request is not echoed back


def test_template_rows_and_a_cache_shared_through_redis(redis_url: str) -> None:
    """Rows of fields fill a prompt template; a row missing a field gets its error. The same
    rows sent again by another process (an actor built here) are answered from the Redis cache
    the Ray actors filled: the emulator sees no new request."""
    import pyarrow as pa

    template = Template("Sentiment of: {review}", model="m", params={"max_tokens": 8})
    items: list[dict[str, str | None]] = [
        {"custom_id": f"t{i}", "review": f"great case {i}"} for i in range(20)
    ]
    items.append({"custom_id": "t-missing", "review": None})
    with serve_in_thread() as emu:
        config = ActorConfig(
            base_url=emu.base_url, template=template, cache_redis=redis_url + "?db=3"
        )
        first = map_requests(ray_data.from_items(items), config, batch_size=8).take_all()
        assert emu.counts["received"] == 20
        actor = CorralActor(config)
        try:
            again = actor(pa.Table.from_pylist(items)).to_pylist()
        finally:
            actor.close()
        assert emu.counts["received"] == 20
    rows = {row["custom_id"]: row for row in first}
    assert rows["t-missing"]["error_kind"] == "invalid_input"
    assert "review" in rows["t-missing"]["error_message"]
    assert rows["t3"]["review"] == "great case 3"  # the input's fields stay
    assert {r["custom_id"]: r["response"] for r in again} == {
        r["custom_id"]: r["response"] for r in first
    }


def test_a_rerun_skips_the_ids_already_written(tmp_path: Path) -> None:
    """Run 1 writes part of the rows to Parquet (as if it stopped there); run 2 over every row
    skips those: the output directory then holds every id exactly once, each sent once."""
    items = [{"custom_id": f"r{i}", "body": json.dumps(body(i))} for i in range(120)]
    out = tmp_path / "out"
    with serve_in_thread() as emu:
        config = ActorConfig(base_url=emu.base_url)
        assert len(done_ids(out)) == 0  # nothing written yet
        map_requests(ray_data.from_items(items[:50]), config).write_parquet(str(out))
        rest = skip_done(ray_data.from_items(items), out)
        map_requests(rest, config, batch_size=20).write_parquet(str(out))
        assert emu.counts["received"] == 120
    import pyarrow.parquet as pq

    ids = Counter(pq.read_table(out, columns=["custom_id"]).column("custom_id").to_pylist())
    assert set(ids) == {f"r{i}" for i in range(120)} and max(ids.values()) == 1


def test_done_ids_reads_jsonl_written_by_ray_and_refuses_an_unknown_format(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    ray_data.from_items([{"custom_id": f"j{i}", "response": "x"} for i in range(5)]).write_json(
        str(out)
    )
    done = done_ids(out, format="json")
    assert len(done) == 5 and "j4" in done and "j5" not in done
    with pytest.raises(InvalidInput, match="format"):
        done_ids(out, format="csv")
    assert isinstance(done_ids(tmp_path / "missing"), IdSet)


def test_an_actor_keeps_one_loop_and_one_client_across_batches() -> None:
    """The loop (and the Client's connection pool) outlive a batch: two calls, one client."""
    import pyarrow as pa

    with serve_in_thread() as emu:
        actor = CorralActor(ActorConfig(base_url=emu.base_url, api_key=CANARY_KEY))
        try:
            client = actor._client
            for n in range(2):
                table = pa.table({"custom_id": [f"a{n}"], "body": [json.dumps(body(n))]})
                out = actor(table).to_pylist()
                assert out[0]["error_kind"] is None and actor._client is client
            assert emu.counts["received"] == 2 and emu.counts["connections"] == 1
        finally:
            actor.close()


def test_actor_config_refuses_bad_values() -> None:
    with pytest.raises(InvalidInput, match="concurrency"):
        ActorConfig(concurrency=0)
    with pytest.raises(InvalidInput, match="rpm"):
        ActorConfig(rpm=0)
    assert "sk-" not in repr(ActorConfig(api_key=CANARY_KEY))
    with pytest.raises(InvalidInput, match="settle"):
        ActorConfig(settle="maybe")


def test_the_limits_as_the_provider_counts_them_reach_every_actor(redis_url: str) -> None:
    """``corral run --ray``'s --window/--settle/--burst-*/--no-calibrate reach the actors'
    limiters: a local quota split between them, a shared one whole."""
    from corral.batch._job import BatchJob
    from corral.integrations.ray import _actor_config
    from corral.middleware import RateLimit
    from corral.middleware._shared_ratelimit import SharedRateLimit

    job = BatchJob(
        input=Path("in.jsonl"),
        output=Path("out.jsonl"),
        rpm=600,
        tpm=60_000,
        window=10.0,
        settle="usage",
        burst_requests=4,
        burst_tokens=800,
        calibrate=False,
    )
    config = attrs.evolve(_actor_config(job, "http://127.0.0.1:1/v1"), actors=2)
    (local,) = [m for m in config.middleware() if isinstance(m, RateLimit)]
    c = local.config
    assert (c.rpm, c.tpm, c.window, c.settle) == (300, 30_000, 10.0, "usage")
    assert (c.burst_requests, c.burst_tokens, c.calibrate) == (2, 400, False)
    shared_config = attrs.evolve(config, quota_redis=redis_url)
    (shared,) = [m for m in shared_config.middleware() if isinstance(m, SharedRateLimit)]
    s = shared.config
    assert (s.rpm, s.tpm, s.window, s.settle) == (600, 60_000, 10.0, "usage")
    assert (s.burst_requests, s.burst_tokens) == (4, 800)


# -- corral run --ray ---------------------------------------------------------------------------


def write_batch_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            line = {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body(i)}) + "\n")
        f.write("{broken\n")


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corral_run_ray_end_to_end_and_resume(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``corral run --ray``: the output is the local run's (one Batch API record per id, the
    bad line's failure included, a manifest beside it); after losing its last 100 lines (a
    crash), the same command sends exactly those again."""
    from corral.cli import main

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_batch_input(src, 300)
    with serve_in_thread(EmulatorConfig(rpm=9_000, window=10.0, seed=3)) as emu:
        argv = [
            "run", str(src), "-o", str(dst), "--ray", "--ray-actors", "2", "--no-progress",
            "--base-url", emu.base_url, "--rpm", "9000", "--window", "10",
            "--quota-redis", redis_url,
            "--quota-name", "test-ray-cli", "--allow-failures",
        ]  # fmt: skip
        assert main(argv) == 0
        first = records(dst)
        assert (dst.parent / "out.jsonl.manifest.json").exists()
        lines = dst.read_text().splitlines(keepends=True)
        dst.write_text("".join(lines[:-100]))
        assert main(argv) == 0
        assert emu.counts["received"] == 400
        assert emu.counts.get("rate_limited", 0) == 0
    final = records(dst)
    ids = Counter(r["custom_id"] for r in final)
    assert set(ids) == {f"c{i}" for i in range(300)} | {"line-301"} and max(ids.values()) == 1
    assert len(first) == 301
    ok = [r for r in final if r["error"] is None]
    assert len(ok) == 300 and all(r["response"]["status_code"] == 200 for r in ok)
    assert all(r["id"].startswith("batch_req_") for r in final)
    (bad,) = [r for r in final if r["error"] is not None]
    assert bad["error"]["code"] == "invalid_input" and "in.jsonl:301" in bad["error"]["message"]


def test_corral_run_ray_stops_on_a_refused_key_and_writes_nothing(tmp_path: Path) -> None:
    """Every call refused the same way (401): exit 2, no record written, so the same command
    resumes once the key is fixed."""
    from corral.cli import main

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_batch_input(src, 20)
    src.write_text("".join(src.read_text().splitlines(keepends=True)[:-1]))  # no bad line
    with serve_in_thread(EmulatorConfig(api_keys=frozenset({"sk-the-other-key-42"}))) as emu:
        argv = ["run", str(src), "-o", str(dst), "--ray", "--base-url", emu.base_url]
        assert main([*argv, "--no-progress"]) == 2
    assert dst.read_text() == ""


def test_corral_run_ray_refuses_local_only_flags(tmp_path: Path) -> None:
    from corral.cli import main

    src = tmp_path / "in.jsonl"
    write_batch_input(src, 2)
    argv = ["run", str(src), "-o", str(tmp_path / "o.jsonl"), "--ray", "--no-progress"]
    assert main([*argv, "--cache", str(tmp_path / "c.db")]) == 2
    assert main([*argv, "--backend", "trio"]) == 2
    assert not (tmp_path / "o.jsonl").exists()


def test_two_actors_share_one_budget_through_redis(redis_url: str) -> None:
    """One spend cap in Redis for both actors: what they spent together stays within it, the
    calls past it come back as ``budget_exceeded`` rows (scope ``budget``) and were not sent."""
    from corral.middleware._metrics import DEFAULT_PRICES

    price, cap = DEFAULT_PRICES["gpt-4o-mini"], 0.0002
    items = [
        {"custom_id": f"b{i}", "body": json.dumps(body(i, model="gpt-4o-mini", max_tokens=16))}
        for i in range(80)
    ]
    with serve_in_thread() as emu:
        config = ActorConfig(
            base_url=emu.base_url,
            budget_usd=cap,
            budget_redis=redis_url,
            budget_name="test-ray-budget",
        )
        ds = ray_data.from_items(items, override_num_blocks=4)
        out = map_requests(ds, config, actors=2, batch_size=20).take_all()
        received = emu.counts["received"]
    ok = [row for row in out if row["error_kind"] is None]
    refused = [row for row in out if row["error_kind"] == "budget_exceeded"]
    assert len(ok) + len(refused) == 80 and ok and refused
    assert {row["error_scope"] for row in refused} == {"budget"}
    assert received == len(ok)  # a refused call was never sent
    spent = sum(
        r["prompt_tokens"] * price.input + r["completion_tokens"] * price.output for r in ok
    )
    assert spent / 1e6 <= cap


def test_a_budget_over_several_actors_needs_redis() -> None:
    with pytest.raises(InvalidInput, match="budget_redis"):
        ActorConfig(budget_usd=1.0, actors=2)
