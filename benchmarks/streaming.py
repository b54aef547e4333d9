"""Streaming CPU per chunk: corral ``stream_chat`` beside raw aiohttp (+ json, + orjson).

Two shapes of the same streams, in the same run:

- bursty: 64 streams of ~200 chunks each, every event written at once (a read holds many);
- paced: one event per write, ``--pace`` seconds apart, so each read holds one event.

A minimal asyncio server pinned to core 1 sends OpenAI-shaped chunks, one chunked-encoding chunk
per event as providers do. Each client runs in its own process pinned to core 0 and takes every
chunk's text (``chunk.text`` for corral, ``choices[0].delta.content`` for the peers). Rounds
alternate the clients; the median of each client's rounds counts and the spread is printed.

    python benchmarks/streaming.py                 # 5 rounds, both shapes
    python benchmarks/streaming.py --repeat 3 --variants corral,raw-aiohttp-orjson
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, SERVER_CPU, cpu_seconds, free_port, machine, pin_to

KEY = "sk-bench-0123456789"
MODEL = "gpt-4o-mini"
VARIANTS = ["corral", "corral-bare", "raw-aiohttp-json", "raw-aiohttp-orjson"]


# -- the server -----------------------------------------------------------------------------


def _events(chunks: int) -> list[bytes]:
    """One stream's events as an OpenAI chat stream has them: role, words, finish, usage."""

    def event(choices: list[Any], **extra: Any) -> bytes:
        payload = {
            "id": "chatcmpl-bench0123456789",
            "object": "chat.completion.chunk",
            "created": 1732000000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    events = [event([choice({"role": "assistant", "content": ""})])]
    events += [event([choice({"content": f" word{i}"})]) for i in range(chunks - 3)]
    events.append(event([choice({}, "stop")]))
    usage = {"prompt_tokens": 9, "completion_tokens": chunks - 3, "total_tokens": chunks + 6}
    events.append(event([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return events


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class _Server(asyncio.Protocol):
    """Answers every request on a connection with the stream, bursty or paced."""

    def __init__(self, events: list[bytes], pace: float) -> None:
        self.pieces = [_HEAD + _chunked(events[0]), *(_chunked(e) for e in events[1:])]
        self.pieces[-1] += b"0\r\n\r\n"
        self.whole = b"".join(self.pieces)
        self.pace = pace
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self._answer()

    def _answer(self) -> None:
        assert self.transport is not None
        if self.pace <= 0:
            self.transport.write(self.whole)
            return
        loop = asyncio.get_running_loop()
        pieces = iter(self.pieces)

        def send() -> None:
            piece = next(pieces, None)
            if piece is not None and self.transport is not None and not self.transport.is_closing():
                self.transport.write(piece)
                loop.call_later(self.pace, send)

        send()


def serve(port: int, chunks: int, pace: float) -> None:
    pin_to(SERVER_CPU)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        events = _events(chunks)
        server = await loop.create_server(
            lambda: _Server(events, pace), "127.0.0.1", port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@contextlib.contextmanager
def server_process(chunks: int, pace: float) -> Iterator[str]:
    port = free_port()
    args = ["--serve", str(port), "--chunks", str(chunks), "--pace", str(pace)]
    proc = subprocess.Popen([sys.executable, __file__, *args])
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- the clients ----------------------------------------------------------------------------


async def _client(name: str, url: str, streams: int, rounds: int) -> tuple[float, int]:
    """Run ``streams`` concurrent streams ``rounds`` times after one warm-up round: (CPU s,
    chunks taken)."""
    messages = [{"role": "user", "content": "hello"}]
    if name.startswith("corral"):
        from corral import Client

        middleware = [] if name == "corral-bare" else None
        client = Client(url, KEY, model=MODEL, middleware=middleware)

        async def one() -> int:
            n = 0
            async for chunk in client.stream_chat(messages):
                chunk.text  # noqa: B018 (what a caller reads)
                n += 1
            return n

        closer: Any = client.aclose
    else:
        import aiohttp

        loads = json.loads
        if name.endswith("orjson"):
            import orjson

            loads = orjson.loads
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams))
        body = {"model": MODEL, "messages": messages, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}"}

        async def one() -> int:
            n = 0
            async with session.post(url + "/chat/completions", json=body, headers=headers) as r:
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].rstrip()
                    if data == b"[DONE]":
                        break
                    payload = loads(data)
                    choices = payload["choices"]
                    if choices:
                        choices[0]["delta"].get("content")
                    n += 1
            return n

        closer = session.close

    async def round_() -> int:
        results = await asyncio.gather(*(one() for _ in range(streams)))
        return sum(results)

    await round_()
    cpu0 = cpu_seconds()
    taken = 0
    for _ in range(rounds):
        taken += await round_()
    cpu = cpu_seconds() - cpu0
    await closer()
    return cpu, taken


def run_child(name: str, url: str, streams: int, rounds: int) -> dict[str, float]:
    pin_to(CLIENT_CPU)
    cpu, taken = asyncio.run(_client(name, url, streams, rounds))
    return {"cpu_us_per_chunk": cpu / taken * 1e6, "chunks": taken}


def spawn(name: str, url: str, streams: int, rounds: int) -> dict[str, float]:
    """Run one client in a child process; ``name@DIR`` imports corral from DIR (an older tree,
    e.g. ``git archive <commit> corral | tar -x -C DIR``), for before/after in one run."""
    name, _, tree = name.partition("@")
    env = {**os.environ, "PYTHONPATH": tree} if tree else None
    args = ["--child", name, "--url", url, "--streams", str(streams), "--rounds", str(rounds)]
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--serve", type=int)
    parser.add_argument("--url")
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per process")
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--paced-streams", type=int, default=32)
    parser.add_argument("--paced-chunks", type=int, default=100)
    parser.add_argument("--paced-pace", type=float, default=0.01)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds of processes")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.chunks, args.pace)
        return
    if args.child:
        print(json.dumps(run_child(args.child, args.url, args.streams, args.rounds)))
        return
    print(f"Machine: {machine()}; load {os.getloadavg()[0]:.2f}\n")
    shapes = [
        ("bursty", args.streams, args.chunks, 0.0, args.rounds),
        ("paced", args.paced_streams, args.paced_chunks, args.paced_pace, 1),
    ]
    names = args.variants.split(",")
    for shape, streams, chunks, pace, rounds in shapes:
        results: dict[str, list[float]] = {name: [] for name in names}
        with server_process(chunks, pace) as url:
            for _ in range(args.repeat):
                for name in names:
                    r = spawn(name, url, streams, rounds)
                    results[name].append(r["cpu_us_per_chunk"])
        print(
            f"### {shape}: {streams} streams x {chunks} chunks"
            + (f", one event every {pace * 1000:g} ms" if pace else ", all at once")
            + f", median of {args.repeat} rounds\n"
        )
        print("| client | CPU µs/chunk (median) | spread (min-max) | vs raw aiohttp + orjson |")
        print("|---|---:|---:|---:|")
        base = statistics.median(results.get("raw-aiohttp-orjson") or [float("nan")])
        for name, values in results.items():
            med = statistics.median(values)
            print(
                f"| {name} | {med:.1f} | {min(values):.1f}-{max(values):.1f} | {med / base:.2f}x |"
            )
        print()


if __name__ == "__main__":
    main()
