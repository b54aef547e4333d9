"""`corral run` keeps its promise under ordinary mistakes (issue 11): one output, one run, one
truth. Each test drives the command line against a live emulator where a server is involved."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from corral.batch._lock import lock_path
from corral.batch._manifest import manifest_path
from corral.cli import main, resume_command
from corral.testing.emulator import EmulatorConfig, Latency
from corral.testing.server import serve_in_thread
from tests.support import (
    batch_line,
    corral_child,
    read_output,
    wait_until,
    write_bodies,
    write_input,
)

KEY = "sk-contract-Zq8xW3vT9pL2mN5bR7yK"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("CORRAL_BASE_URL", raising=False)


def run_args(source: Path, out: Path, base_url: str, *flags: str) -> list[str]:
    return ["run", str(source), "-o", str(out), "--base-url", base_url, "--no-progress", *flags]


def refused(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``corral:`` line a refusal prints (asserts there is exactly one, no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("corral: "), err
    assert "Traceback" not in err
    return lines[0]


def ids_once(out: Path, expected: set[str]) -> list[dict[str, Any]]:
    records = read_output(out)
    counts = Counter(r["custom_id"] for r in records)
    assert set(counts) == expected and set(counts.values()) == {1}, counts.most_common(3)
    return records


# 1. An output that is the input, or any requests file, is refused before anything is touched.


@pytest.mark.parametrize("retry_failed", [False, True])
@pytest.mark.parametrize("spelling", ["same", "symlink", "hardlink"])
def test_output_that_is_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str, retry_failed: bool
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 5)
    before = source.read_bytes()
    out = {"same": source, "symlink": tmp_path / "link", "hardlink": tmp_path / "hard"}[spelling]
    if spelling == "symlink":
        out.symlink_to(source)
    elif spelling == "hardlink":
        os.link(source, out)
    flags = ["--retry-failed"] if retry_failed else []
    assert main(run_args(source, out, "http://127.0.0.1:9/v1", *flags)) == 2
    assert "input" in refused(capsys)
    assert source.read_bytes() == before


def test_output_holding_request_lines_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, other = tmp_path / "in.jsonl", tmp_path / "other-requests.jsonl"
    write_input(source, 5)
    write_input(other, 3)
    before = other.read_bytes()
    for flags in ([], ["--retry-failed"]):
        assert main(run_args(source, other, "http://127.0.0.1:9/v1", *flags)) == 2
        assert f"{other}:1" in refused(capsys)
        assert other.read_bytes() == before


# 2. One run per output.


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 40)
    config = EmulatorConfig(latency=Latency.fixed(0.1))
    with serve_in_thread(config) as emu:
        cmd = corral_child(*run_args(source, out, emu.base_url, "--concurrency", "1"))
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            holder = lock_path(out)
            assert wait_until(lambda: out.exists() and out.stat().st_size > 0, child=child)
            assert holder.read_text().strip() == str(child.pid)
            for flags in ([], ["--retry-failed"]):
                started = time.monotonic()
                assert main(run_args(source, out, emu.base_url, *flags)) == 2
                assert time.monotonic() - started < 10  # at once, not after the other run
                assert f"pid {child.pid}" in refused(capsys)
        finally:
            child.kill()
            child.wait(timeout=30)
        # The kernel dropped the dead run's lock: the same command resumes and completes.
        assert main(run_args(source, out, emu.base_url)) == 0
    ids_once(out, {f"r{i}" for i in range(40)})


# 3. A resume whose input or answer-changing options differ is refused, naming the change.


def test_resume_after_the_input_changed_is_refused_for_line_numbered_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "bodies.jsonl", tmp_path / "out.jsonl"
    write_bodies(source, ["alpha", "beta", "gamma"])
    with serve_in_thread() as emu:
        assert main(run_args(source, out, emu.base_url)) == 0
        capsys.readouterr()
        assert json.loads(manifest_path(out).read_text())["positional_ids"] is True
        write_bodies(source, ["inserted", "alpha", "beta", "gamma"])
        before = out.read_bytes()
        for flags in ([], ["--force-resume"]):
            assert main(run_args(source, out, emu.base_url, *flags)) == 2
            message = refused(capsys)
            assert "input file" in message and "line numbers" in message
        assert out.read_bytes() == before
        assert emu.counts["received"] == 3


def test_resume_with_other_options_is_refused_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 6)
    with serve_in_thread() as emu, serve_in_thread() as other:
        assert main(run_args(source, out, emu.base_url, "--shard", "0/2")) == 0
        capsys.readouterr()
        assert main(run_args(source, out, emu.base_url, "--shard", "1/2")) == 2
        assert "--shard (0/2 -> 1/2)" in refused(capsys)
        assert main(run_args(source, out, emu.base_url, "--shard", "0/2", "--model", "gpt-4o")) == 2
        assert "--model (none -> gpt-4o)" in refused(capsys)
        assert main(run_args(source, out, other.base_url, "--shard", "0/2")) == 2
        assert "base URL" in refused(capsys)
        # Explicit custom_ids: an edited input may be resumed on purpose.
        write_input(source, 6, extra=[batch_line("added", "one more")])
        assert main(run_args(source, out, emu.base_url, "--shard", "0/2")) == 2
        assert "input file's contents" in refused(capsys)
        forced = run_args(source, out, emu.base_url, "--shard", "0/2", "--force-resume")
        assert main(forced) == 0
        assert other.counts.get("received", 0) == 0


# 4. A full disk: every byte or stop, and the file resumes as it is.


def _file_size_limit(limit: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_stops_cleanly_and_the_file_resumes_as_is(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 60)
    with serve_in_thread() as emu:
        cmd = corral_child(*run_args(source, out, emu.base_url, "--concurrency", "4"))
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        full = subprocess.run(
            cmd, capture_output=True, timeout=60, preexec_fn=_file_size_limit(6000), env=env
        )
        err = full.stderr.decode()
        assert full.returncode == 1, err
        assert "Traceback" not in err and "File too large" in err and "rerun" in err
        records = read_output(out)  # every line whole: the short write was cut back off
        assert 0 < len(records) < 60 and out.stat().st_size <= 6000
        assert f"{len(records)} results are safely in" in err
        assert main(run_args(source, out, emu.base_url)) == 0
    ids_once(out, {f"r{i}" for i in range(60)})


# 5. --retry-failed keeps a symlinked output a symlink and never follows a planted temp file.


def test_retry_failed_keeps_symlinks_and_ignores_planted_temp_files(tmp_path: Path) -> None:
    source, real, link = tmp_path / "in.jsonl", tmp_path / "real.jsonl", tmp_path / "out.jsonl"
    write_input(source, 4, extra=['{"custom_id": "fixed", "body": "not an object"}'])
    link.symlink_to(real)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for planted in (link.with_name("out.jsonl.tmp"), real.with_name("real.jsonl.tmp")):
        planted.symlink_to(victim)
    with serve_in_thread() as emu:
        assert main(run_args(source, link, emu.base_url)) == 1  # the bad line is a failure
        write_input(source, 4, extra=[batch_line("fixed", "now fine")])  # explicit ids
        assert main(run_args(source, link, emu.base_url, "--retry-failed", "--force-resume")) == 0
    assert link.is_symlink() and link.resolve() == real
    assert victim.read_text() == "precious"
    ids_once(real, {"r0", "r1", "r2", "r3", "fixed"})


# 6. Only a regular file can be an output.


@pytest.mark.parametrize("target", ["/dev/full", "/dev/null", "fifo"])
def test_output_must_be_a_regular_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 3)
    out = Path(target)
    if target == "fifo":
        out = tmp_path / "pipe"
        os.mkfifo(out)
    assert main(run_args(source, out, "http://127.0.0.1:9/v1")) == 2
    assert "regular file" in refused(capsys)


def test_output_to_a_pipe_is_refused(tmp_path: Path) -> None:
    """``-o /dev/stdout | cat``: the child's stdout is a pipe."""
    source = tmp_path / "in.jsonl"
    write_input(source, 3)
    cmd = corral_child(*run_args(source, Path("/dev/stdout"), "http://127.0.0.1:9/v1"))
    done = subprocess.run(cmd, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.decode().startswith("corral: ") and b"regular file" in done.stderr


# 7. and 8. Ids: a bad line's line-N counts in the duplicate check; a BOM keeps line 1's id.


def test_a_bad_lines_line_number_id_collides_with_an_explicit_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("{not json\n" + batch_line("line-1", "explicit") + "\n")
    assert main(run_args(source, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1")) == 2
    assert "duplicate custom_id" in refused(capsys)


def test_a_byte_order_mark_keeps_line_one(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + (batch_line("first", "a") + "\n").encode())
    with serve_in_thread() as emu:
        assert main(run_args(source, out, emu.base_url)) == 0
    assert [r["custom_id"] for r in read_output(out)] == ["first"]
    assert read_output(out)[0]["error"] is None


# 9. A rerun tells what the file holds and keeps failing while it holds failures.


def test_a_rerun_reports_the_failures_the_file_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 5, extra=["{bad"] * 3)
    with serve_in_thread() as emu:
        args = run_args(source, out, emu.base_url, "--json")
        assert main(args) == 1
        capsys.readouterr()
        assert main(args) == 1
        captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["this_run"]["sent"] == 0
    assert summary["output_file"] == {
        "records": 8,
        "succeeded": 5,
        "failed": 3,
        "failed_by_kind": {"invalid_input": 3},
        "not_yet_written": 0,
    }
    assert "holds 3 failed" in captured.err and "--retry-failed" in captured.err


# 10. Errors that would repeat on every line stop the run; an outage waits; line errors are
# written.


def test_a_wrong_key_stops_the_run_writing_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 300)
    with serve_in_thread(EmulatorConfig(api_keys=frozenset({KEY}))) as emu:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-Zq8xW3vT9pL2mN5bR7yK")
        assert main(run_args(source, out, emu.base_url, "--concurrency", "8")) == 2
        err = capsys.readouterr().err
        assert "credentials" in err and "rerun" in err
        assert emu.counts["received"] <= 8 + 3  # a few confirmations, not 300 calls
        assert out.read_bytes() == b""  # opened (and locked) for the run; no record
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        assert main(run_args(source, out, emu.base_url)) == 0
    ids_once(out, {f"r{i}" for i in range(300)})


def test_an_unknown_model_stops_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 50)
    with serve_in_thread(any_model=False) as emu:
        args = run_args(source, out, emu.base_url, "--model", "gpt-nonexistent")
        assert main(args) == 2
        assert "--model" in capsys.readouterr().err
    assert out.read_bytes() == b""  # opened (and locked) for the run; no record


def test_a_server_that_is_down_waits_then_stops_resumably(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 50)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    started = time.monotonic()
    assert main(run_args(source, out, dead, "--max-outage", "2", "--retries", "1")) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "unreachable" in err and "--max-outage" in err and "rerun" in err
    assert out.read_bytes() == b""  # opened (and locked) for the run; no record


class FlakyProxy:
    """A TCP proxy to ``target`` that can go down (refusing connections) and come back."""

    def __init__(self, target: int) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_an_outage_mid_run_pauses_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 400)
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(0.01))) as emu:
        proxy = FlakyProxy(emu.port)
        proxy.up()
        base = f"http://127.0.0.1:{proxy.port}/v1"

        def outage() -> None:
            wait_until(lambda: emu.counts.get("received", 0) >= 100)
            proxy.down()
            time.sleep(3)
            proxy.up()

        flapper = threading.Thread(target=outage, daemon=True)
        flapper.start()
        code = main(run_args(source, out, base, "--json", "--concurrency", "16"))
        flapper.join(timeout=30)
        proxy.down()
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert summary["this_run"]["resent_after_outage"] > 0
    records = ids_once(out, {f"r{i}" for i in range(400)})
    assert all(r["error"] is None for r in records)


def test_errors_about_one_line_are_written_while_others_succeed(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    huge = "word " * 200_000  # past the model's context window: a 400 about this line only
    write_input(source, 20, extra=[batch_line("too-long", huge)])
    with serve_in_thread() as emu:
        assert main(run_args(source, out, emu.base_url)) == 1
    records = {
        r["custom_id"]: r for r in ids_once(out, {*(f"r{i}" for i in range(20)), "too-long"})
    }
    assert records["too-long"]["error"]["code"] == "context_length_exceeded"
    assert sum(r["error"] is None for r in records.values()) == 20


# 11. A line that asks to stream is answered whole, paid once.


def test_stream_lines_are_answered_as_one_completion(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        batch_line("s", "stream me", stream=True, stream_options={"include_usage": True}) + "\n"
    )
    with serve_in_thread() as emu:
        assert main(run_args(source, out, emu.base_url)) == 0
        assert emu.counts["received"] == 1
    (record,) = read_output(out)
    assert record["error"] is None
    assert record["response"]["body"]["object"] == "chat.completion"


# 12. The resume hint is the exact command.


def test_resume_command_quotes_every_flag_and_hides_url_passwords() -> None:
    argv = ["run", "my in.jsonl", "-o", "out.jsonl", "--base-url", "http://u:secret@h/v1"]
    argv += ["--model", "gpt-4o", "--shard", "1/4", "--rpm", "500", "--retry-failed"]
    command = resume_command(argv)
    assert shlex.split(command) == [
        "corral",
        "run",
        "my in.jsonl",
        "-o",
        "out.jsonl",
        "--base-url",
        "http://***@h/v1",
        "--model",
        "gpt-4o",
        "--shard",
        "1/4",
        "--rpm",
        "500",
    ]
    assert "secret" not in command


def test_sigterm_prints_the_exact_resume_command(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 200)
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(0.05))) as emu:
        args = run_args(source, out, emu.base_url, "--model", "gpt-4o", "--shard", "1/2")
        args += ["--rpm", "6000", "--concurrency", "2"]
        child = subprocess.Popen(
            corral_child(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert wait_until(lambda: out.exists() and out.stat().st_size > 0, child=child)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130
    assert resume_command(args) in err.decode()


# 13. The summary tells per-call waits, service latency and latency with waits apart.


def test_summary_separates_waits_from_service_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 40)
    with serve_in_thread(EmulatorConfig(latency=Latency.fixed(0.02))) as emu:
        assert main(run_args(source, out, emu.base_url, "--json", "--rpm", "1200")) == 0
    summary = json.loads(capsys.readouterr().out)
    elapsed = summary["elapsed_s"]
    wait, service = summary["wait_per_call_s"], summary["service_latency_s"]
    assert 0 < summary["rate_limit_wait_per_call_s"] <= elapsed  # per call, not a sum
    assert wait["max"] <= elapsed and wait["mean"] > 0
    assert 0.02 <= service["p50"] < summary["latency_incl_waits_s"]["p95"]
    assert summary["this_run"]["transport_resends"] == 0


# 14. Every refused input: exit 2, one `corral:` line, no traceback.


REFUSALS: dict[str, Any] = {
    "missing output directory": lambda t: ["run", t["in"], "-o", f"{t['dir']}/nope/out.jsonl"],
    "unwritable output": lambda t: ["run", t["in"], "-o", t["readonly"]],
    "output is a directory": lambda t: ["run", t["in"], "-o", t["dir"]],
    "missing input": lambda t: ["run", f"{t['dir']}/missing.jsonl", "-o", t["out"]],
    "unreadable input": lambda t: ["run", t["unreadable"], "-o", t["out"]],
    "input is a directory": lambda t: ["run", t["dir"], "-o", t["out"]],
    "empty input": lambda t: ["run", t["empty"], "-o", t["out"]],
    "prepare missing rows": lambda t: [
        "prepare",
        f"{t['dir']}/no.csv",
        "-o",
        t["out"],
        "--template",
        "{a}",
        "--model",
        "m",
    ],
    "prepare utf-16 csv": lambda t: [
        "prepare",
        t["utf16"],
        "-o",
        t["out"],
        "--template",
        "{a}",
        "--model",
        "m",
    ],
    "aiohttp extra missing": lambda t: ["run", t["in"], "-o", t["out"], "--transport", "aiohttp"],
    "redis extra missing": lambda t: ["run", t["in"], "-o", t["out"], "--redis", "redis://x"],
    "quota redis extra missing": lambda t: [
        "run",
        t["in"],
        "-o",
        t["out"],
        "--quota-redis",
        "redis://x",
        "--rpm",
        "10",
    ],
    "trio extra missing": lambda t: ["run", t["in"], "-o", t["out"], "--backend", "trio"],
    "uvloop missing": lambda t: ["run", t["in"], "-o", t["out"], "--backend", "uvloop"],
    "aiohttp on trio": lambda t: [
        "run",
        t["in"],
        "-o",
        t["out"],
        "--transport",
        "aiohttp",
        "--backend",
        "trio",
    ],
    "serve on a busy port": lambda t: ["serve", "--port", t["busy"]],
    "bad latency": lambda t: ["serve", "--latency", "fast"],
    "unknown latency kind": lambda t: ["serve", "--latency", "gamma:1,2"],
    "negative latency": lambda t: ["serve", "--latency", "-1"],
    "bad fault kind": lambda t: ["serve", "--fault", "boom=0.1"],
    "faults over one": lambda t: ["serve", "--fault", "500=0.7", "--fault", "reset=0.5"],
    "corrupt cache": lambda t: ["run", t["in"], "-o", t["out"], "--cache", t["corrupt"]],
    "zero timeout": lambda t: ["run", t["in"], "-o", t["out"], "--timeout", "0"],
    "negative timeout": lambda t: ["run", t["in"], "-o", t["out"], "--timeout", "-5"],
    "nan timeout": lambda t: ["run", t["in"], "-o", t["out"], "--timeout", "nan"],
    "negative retries": lambda t: ["run", t["in"], "-o", t["out"], "--retries", "-1"],
    "nan retry budget": lambda t: ["run", t["in"], "-o", t["out"], "--retry-budget", "nan"],
    "negative retry budget": lambda t: ["run", t["in"], "-o", t["out"], "--retry-budget", "-1"],
    "zero rpm": lambda t: ["run", t["in"], "-o", t["out"], "--rpm", "0"],
    "negative tpm": lambda t: ["run", t["in"], "-o", t["out"], "--tpm", "-10"],
    "zero concurrency": lambda t: ["run", t["in"], "-o", t["out"], "--concurrency", "0"],
    "text concurrency": lambda t: ["run", t["in"], "-o", t["out"], "--concurrency", "many"],
    "unknown flag": lambda t: ["run", t["in"], "-o", t["out"], "--turbo"],
    "no command": lambda t: [],
    "placeholder key": lambda t: ["run", t["in"], "-o", t["out"], "--api-key-env", "PLACEHOLDER"],
    "missing key variable": lambda t: ["run", t["in"], "-o", t["out"], "--api-key-env", "NOPE"],
}
#: Cases that need an optional dependency to look absent: (third-party modules, corral modules).
_MISSING_EXTRA = {
    "aiohttp extra missing": (["aiohttp"], ["corral.transports._aiohttp_transport"]),
    "redis extra missing": (["redis", "redis.asyncio"], ["corral.stores.redis"]),
    "quota redis extra missing": (
        ["redis", "redis.asyncio"],
        ["corral.middleware._shared_ratelimit"],
    ),
    "trio extra missing": (["trio"], []),
    "uvloop missing": (["uvloop"], []),
}


def exit_code(argv: list[str]) -> int:
    """``main``'s status whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_is_one_line_and_exit_2(
    case: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if os.geteuid() == 0 and case in ("unwritable output", "unreadable input"):
        pytest.skip("root may read and write any file")
    write_input(tmp_path / "in.jsonl", 2)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "readonly.jsonl").write_text("")
    (tmp_path / "readonly.jsonl").chmod(0o400)
    write_input(tmp_path / "unreadable.jsonl", 1)
    (tmp_path / "unreadable.jsonl").chmod(0)
    (tmp_path / "rows16.csv").write_text("a,b\n1,2\n", encoding="utf-16")
    (tmp_path / "corrupt.db").write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv("PLACEHOLDER", "sk-xxxxxxxx")
    monkeypatch.setenv("CORRAL_API_KEY", KEY)  # must not stand in for --api-key-env NOPE
    blocked, forgotten = _MISSING_EXTRA.get(case, ([], []))
    for module in forgotten:
        monkeypatch.delitem(sys.modules, module, raising=False)
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        files = {
            "dir": str(tmp_path),
            "in": str(tmp_path / "in.jsonl"),
            "out": str(tmp_path / "out.jsonl"),
            "empty": str(tmp_path / "empty.jsonl"),
            "readonly": str(tmp_path / "readonly.jsonl"),
            "unreadable": str(tmp_path / "unreadable.jsonl"),
            "utf16": str(tmp_path / "rows16.csv"),
            "corrupt": str(tmp_path / "corrupt.db"),
            "busy": str(busy.getsockname()[1]),
        }
        assert exit_code(REFUSALS[case](files)) == 2
    assert len(refused(capsys)) < 400


# 15. Keys, empty input and dry runs say what they mean.


def test_an_explicit_key_variable_is_the_only_one_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 2)
    monkeypatch.setenv("CORRAL_API_KEY", KEY)
    monkeypatch.delenv("TEAM_KEY", raising=False)
    assert main(run_args(source, tmp_path / "o.jsonl", "http://127.0.0.1:9/v1",
                         "--api-key-env", "TEAM_KEY")) == 2  # fmt: skip
    message = refused(capsys)
    assert "TEAM_KEY" in message and "api_key=" not in message
    monkeypatch.delenv("CORRAL_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(run_args(source, tmp_path / "o.jsonl", "http://127.0.0.1:9/v1")) == 2
    message = refused(capsys)
    assert "OPENAI_API_KEY" in message and "--api-key-env" in message
    assert "api_key=" not in message


@pytest.mark.parametrize("key", ["sk-xxxxxxxx", "sk-...", "<your key>", "YOUR_API_KEY", "sk-"])
def test_placeholder_keys_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 1)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    assert main(run_args(source, tmp_path / "o.jsonl", "http://127.0.0.1:9/v1")) == 2
    assert "placeholder" in refused(capsys)


def test_dry_run_leaves_out_what_is_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 10)
    with serve_in_thread() as emu:
        assert main(run_args(source, out, emu.base_url, "--shard", "0/2")) == 0
    capsys.readouterr()
    before = out.read_bytes()
    assert main(["run", str(source), "-o", str(out), "--dry-run"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    done = len(read_output(out))
    assert estimate["already_done"] == done and estimate["requests"] == 10 - done
    assert out.read_bytes() == before


# 17. Help and version.


def test_every_flag_has_help_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    from corral.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, (name, action.dest)
    top = parser.format_help()
    for name in ("run", "prepare", "serve", "demo"):
        assert f"\n    {name} " in top
    assert "[" not in top.split("positional arguments")[-1].split("options")[0]
    assert "{run" not in top
    serve_help = " ".join(commands.choices["serve"].format_help().split())
    assert "--api-key KEY" in serve_help and "Bearer key" in serve_help


def test_version_three_ways() -> None:
    import corral

    assert re.fullmatch(r"\d+\.\d+\.\d+.*", corral.__version__)
    for argv in (corral_child("--version"), [sys.executable, "-m", "corral", "--version"]):
        done = subprocess.run(argv, capture_output=True, timeout=60)
        assert (
            done.returncode == 0 and done.stdout.decode().strip() == f"corral {corral.__version__}"
        )


# Issue 12 item 13 in the batch: a relay that echoes the key never gets it into the output.


class _EchoKey(BaseHTTPRequestHandler):
    """A relay that repeats the Authorization header in answers and errors."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        auth = self.headers.get("authorization", "")
        answer: dict[str, object]
        if "bad" in body["messages"][0]["content"]:
            status, answer = 400, {"error": {"message": f"rejected {auth}", "code": auth}}
        else:
            message = {"role": "assistant", "content": f"you sent {auth}"}
            answer = {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}
        data = json.dumps(answer).encode()
        self.send_response(status if "bad" in body["messages"][0]["content"] else 200)
        self.send_header("content-type", "application/json")
        self.send_header("x-request-id", f"req-{auth}")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_echoed_key_never_reaches_the_output(tmp_path: Path) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 3, extra=[batch_line("b", "bad request")])
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _EchoKey)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        assert main(run_args(source, out, base)) == 1
    finally:
        httpd.shutdown()
        httpd.server_close()
    text = out.read_text()
    records = ids_once(out, {"r0", "r1", "r2", "b"})
    assert sum(r["error"] is None for r in records) == 3
    assert "[redacted]" in text
    assert not [KEY[i : i + 8] for i in range(len(KEY) - 7) if KEY[i : i + 8] in text]


def test_a_hostile_retry_after_pauses_the_run_at_most_max_pause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12 item 1 through the CLI: a 429 asking for 3 years costs ``--max-pause``."""
    from corral.testing.emulator import Fault

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 60)
    config = EmulatorConfig(faults={Fault.RATE_LIMIT: 0.05}, fault_retry_after=99_999_999, seed=3)
    with serve_in_thread(config) as emu:
        started = time.monotonic()
        args = run_args(source, out, emu.base_url, "--rpm", "60000", "--max-pause", "0.5")
        assert main([*args, "--timeout", "30", "--json"]) == 0
        assert time.monotonic() - started < 60  # not 99,999,999 s, nor a deadline per call
        assert emu.counts.get("429", 0) + emu.counts.get("rate_limited", 0) > 0
    ids_once(out, {f"r{i}" for i in range(60)})


# Issue 13 item 3: a trace file tells why a line took long.


def test_trace_tells_one_requests_story(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from corral.testing.emulator import Fault

    source, out, trace = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "trace.jsonl"
    write_input(source, 40)
    config = EmulatorConfig(faults={Fault.SERVER_ERROR: 0.3}, seed=11)
    with serve_in_thread(config) as emu:
        args = run_args(source, out, emu.base_url, "--trace", str(trace), "--retry-budget", "5")
        assert main([*args, "--rpm", "60000"]) == 0
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    retried = [e for e in events if e["event"] == "retry.scheduled"]
    assert retried and all(e["kind"] == "server_error" and e["delay"] > 0 for e in retried)
    custom_id = retried[0]["labels"]["custom_id"]
    capsys.readouterr()
    assert main(["trace", str(trace), "--id", custom_id]) == 0
    story = capsys.readouterr().out
    assert f"custom_id {custom_id}" in story and "retry.scheduled attempt 1" in story
    assert KEY not in trace.read_text()
    assert main(["trace", str(trace), "--id", "no-such-id"]) == 2
    assert "no events" in refused(capsys)


def test_https_to_a_plain_http_server_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11 item 10: a wrong scheme fails every line alike; stop, say so, exit 2."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 100)
    with serve_in_thread() as emu:
        started = time.monotonic()
        https = emu.base_url.replace("http://", "https://")
        assert main(run_args(source, out, https, "--concurrency", "4")) == 2
        assert time.monotonic() - started < 30
        assert emu.counts.get("received", 0) == 0
    err = capsys.readouterr().err
    assert "http:// vs https://" in err and "--base-url" in err
    assert out.read_bytes() == b""  # opened (and locked) for the run; no record
