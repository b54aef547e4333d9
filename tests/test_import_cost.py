"""``import corral`` loads what building a ``Client`` needs and nothing more (issue 15).

What only some paths need loads on first use: the sync facade's thread portal, ``Client.map``,
routing and deployment files, the rate limiter, the cache, truncation, budgets, the batch runner,
the stores, h11 and TLS (the transport is built with the first ``Client``), asyncio (trio
programs never load it), streaming and its SSE parser, the events of a retry, a breaker or an
adaptive limit, rate-limit headers, and ``random`` (a Retry's first jitter). Checked in a fresh
interpreter, on the modules it holds: a time would depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from corral.core._wire import ChatAccumulator
from corral.middleware import (
    Aggregator,
    AIMDPolicy,
    BreakerConfig,
    BreakerPolicy,
    ConcurrencyConfig,
)

LAZY = [
    "anyio.from_thread",
    "asyncio",
    "ssl",
    "h11",
    "email.utils",
    "html",
    "urllib.parse",
    "orjson",
    "corral._mapping",
    "corral._deployments",
    "corral.batch",
    "corral.stores",
    "corral.observe",
    "corral.transports._http11",
    "corral.middleware._ratelimit",
    "corral.middleware._router",
    "corral.middleware._budget",
    "corral.middleware._cache",
    "corral.middleware._truncate",
    "corral.core._optional_events",
    "corral.core._stack_events",
    "corral.core._streaming",
    "corral.core._sse",
    "corral.core._quota",
    "random",
]


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_import_corral_leaves_the_rarer_paths_unloaded() -> None:
    loaded = loaded_after("import corral")
    assert "corral._client" in loaded
    assert sorted(loaded & set(LAZY)) == []


def test_building_the_default_client_loads_no_rarer_path_but_its_transport() -> None:
    loaded = loaded_after(
        "import corral\ncorral.Client('http://127.0.0.1:9/v1', 'sk-test-0123456789', model='m')"
    )
    assert "corral.transports._http11" in loaded
    # H11Transport brings h11, TLS and its asyncio stream (it imports asyncio itself)
    unused = set(LAZY) - {"h11", "ssl", "asyncio", "urllib.parse", "corral.transports._http11"}
    assert sorted(loaded & unused) == []


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("SyncClient", "corral._client"),
        ("MapResult", "corral._mapping"),
        ("load_router", "corral._deployments"),
        ("RateLimit", "corral.middleware._ratelimit"),
        ("Router", "corral.middleware._router"),
        ("Cache", "corral.middleware._cache"),
        ("H11Transport", "corral.transports._http11"),
        ("run_job", "corral.batch"),
        ("Truncate", "corral.core._optional_events"),
    ],
)
def test_a_lazy_name_loads_its_module_when_first_used(name: str, module: str) -> None:
    loaded = loaded_after(f"import corral\nobj = corral.{name}\nassert obj.__name__ == {name!r}")
    assert module in loaded


def test_json_uses_orjson_once_first_used() -> None:
    """orjson loads with the first JSON call, and serves it (the ``speed`` extra is installed
    in the test environment)."""
    loaded = loaded_after(
        "from corral.core import _jsonlib as j\n"
        "assert j.loads(b'[18446744073709551615]') == [18446744073709551615]\n"
        "assert j.dumps({'a': [1]}) == b'{\"a\":[1]}'\n"
        "assert j._orjson is not None and j._orjson is not False"
    )
    assert "orjson" in loaded


def test_the_clock_finds_an_asyncio_loop_started_after_corral_was_imported() -> None:
    """``current_time`` looks asyncio up lazily; a loop started later is still the clock read."""
    code = (
        "import corral, corral._clock as clock, sys\n"
        "assert 'asyncio' not in sys.modules\n"
        "import asyncio\n"
        "async def main():\n"
        "    loop = asyncio.get_running_loop()\n"
        "    loop.time = lambda: 1234.5\n"
        "    return clock.current_time()\n"
        "print(asyncio.run(main()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["1234.5"]


def test_no_event_class_is_built_before_its_first_use() -> None:
    """The event types of the default stack's decisions (a retry, a breaker trip, an adaptive
    limit's move) are attrs classes: built on the first use of one, not by ``import corral``."""
    loaded = loaded_after(
        "import corral\nimport corral.core._events as e\nprint(sorted(vars(e)))\n"
        "assert 'RetryScheduled' not in vars(e) and 'BreakerOpened' not in vars(e)\n"
        "assert e.RetryScheduled(time=1.0, kind='x', delay=0.5).name == 'retry.scheduled'"
    )
    assert "corral.core._stack_events" in loaded


#: A fresh interpreter runs one retried call through the default stack (asyncio and trio): the
#: delay is the seeded jitter's first draw, and the stream after it arrives whole.
RETRY_THEN_STREAM = """
import sys, anyio, corral
from corral.core._models import Response
from corral.transports import MemoryTransport
assert "random" not in sys.modules
SSE = (b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"he"}}]}\\n\\n'
       b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"llo"}}]}\\n\\n'
       b'data: [DONE]\\n\\n')
class Body:
    async def __aiter__(self):
        yield SSE[:50]
        yield SSE[50:]
    async def aclose(self):
        pass
answers = [Response(500), Response(200, {"content-type": "text/event-stream"}, stream=Body())]
events = []
layers = corral.default_middleware(seed=7)
layers[2] = corral.Retry(seed=7, base=0.001, cap=0.001)
client = corral.Client("http://x/v1", "sk-test-0123456789", model="m", middleware=layers,
                       transport=MemoryTransport(lambda request: answers.pop(0)),
                       events=events.append)
async def main():
    return "".join([c.text async for c in client.stream_chat([{"role": "user", "content": "q"}])])
assert anyio.run(main, backend=sys.argv[1]) == "hello"
assert [type(e).__name__ for e in events] == ["RetryScheduled"]
import random
assert events[0].delay == random.Random(7).random() * 0.001, events
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_retry_draws_its_jitter_and_a_stream_decodes_after_their_lazy_imports(
    backend: str,
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", RETRY_THEN_STREAM, backend],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "build",
    [
        lambda: BreakerPolicy(BreakerConfig()),
        lambda: AIMDPolicy(ConcurrencyConfig(adaptive=True)),
        lambda: Aggregator(),
        lambda: ChatAccumulator(),
    ],
)
def test_state_holders_compare_by_identity_and_serve_as_keys(build: Callable[[], object]) -> None:
    """Mutable state (a breaker's circuit, an adaptive limit, a metrics aggregator, a stream's
    accumulator) has no value equality: two are never equal, and each is hashable."""
    one, other = build(), build()
    assert one == one and one != other
    assert {one: 1, other: 2}[one] == 1
