"""Helpers shared by test modules (not a test module itself): input files and CLI children."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from corral.core import Handler, Request
from corral.transports._base import Transport

#: The canary key: the secrets tests assert that no piece of it leaks anywhere.
CANARY_KEY = "sk-canary-Zq8xW3vT9pL2mN5bR7yK"

#: Builds a transport of the parametrized kind (the ``transport_factory`` fixture).
TransportFactory = Callable[..., Transport]

#: Every transport the conformance suite runs (aiohttp only on asyncio).
TRANSPORTS = ["h11", "httpx", "httpx2", "aiohttp"]


def as_bytes(value: bytes | str) -> bytes:
    """A redis-py reply as bytes (its types allow str; a client without decode_responses
    returns bytes)."""
    return value if isinstance(value, bytes) else value.encode()


async def send(handler: Handler, request: Request) -> None:
    """``await handler(request)`` as a coroutine function, for ``TaskGroup.start_soon``."""
    await handler(request)


def make_transport(name: str, **kwargs: Any) -> Transport:
    """Build a transport by name with the options all of them share."""
    if name == "h11":
        from corral.transports._http11 import H11Transport

        return H11Transport(**kwargs)
    if name in ("httpx", "httpx2"):
        from corral.transports._httpx_transport import HttpxTransport

        return HttpxTransport(package=name, **kwargs)
    from corral.transports._aiohttp_transport import AiohttpTransport

    return AiohttpTransport(**kwargs)


#: Runs ``corral.cli.main`` in a child process (the same code as the console script).
CHILD = "import sys\nfrom corral.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def batch_line(custom_id: str, content: str, **body: Any) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": content}],
                **body,
            },
        }
    )


def write_input(path: Path, n: int, *, extra: Sequence[str] = (), prefix: str = "r") -> None:
    """``n`` Batch API lines with ids ``r0..r{n-1}``, then the ``extra`` raw lines."""
    with path.open("w") as f:
        for i in range(n):
            f.write(batch_line(f"{prefix}{i}", f"item {i}") + "\n")
        for line in extra:
            f.write(line + "\n")


def write_bodies(path: Path, contents: Sequence[str]) -> None:
    """Bare request bodies: their ids are ``line-N``."""
    with path.open("w") as f:
        for content in contents:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
            f.write(json.dumps(body) + "\n")


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def corral_child(*args: str) -> list[str]:
    """The argv of a ``corral`` child process."""
    return [sys.executable, "-c", CHILD, *args]


async def until(predicate: Callable[[], bool]) -> None:
    """Poll state a real server (another thread) changes until it holds, for at most 10 s: a
    server's own timers run on real time, which no test clock drives."""
    with anyio.fail_after(10):
        for _ in range(1_000):
            if predicate():
                return
            await anyio.sleep(0.01)
    raise AssertionError("the condition never held")


def wait_until(
    predicate: Any, timeout: float = 30.0, child: subprocess.Popen[Any] | None = None
) -> bool:
    """Poll ``predicate`` (bounded); False if it never held or the child exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if child is not None and child.poll() is not None:
            return bool(predicate())
        time.sleep(0.02)
    return False


def most_in_a_window(
    counted: Sequence[tuple[float, int, float]], window: float, column: int
) -> float:
    """The most ``column`` of ``counted`` ((time, requests, tokens) rows) in any ``window``."""
    return max(
        (
            sum(c[column] for c in counted if start <= c[0] < start + window)
            for start, *_ in counted
        ),
        default=0,
    )


class ScopeCount:
    """Counts the anyio cancel scopes entered on asyncio from ``start()`` on (monkeypatched,
    so pytest undoes it): for the paths that must enter none per call."""

    def __init__(self, monkeypatch: Any) -> None:
        self.entered = 0
        self._monkeypatch = monkeypatch

    def start(self) -> None:
        from anyio._backends._asyncio import CancelScope

        enter = CancelScope.__enter__

        def counting(scope: CancelScope) -> CancelScope:
            self.entered += 1
            return enter(scope)

        self._monkeypatch.setattr(CancelScope, "__enter__", counting)
