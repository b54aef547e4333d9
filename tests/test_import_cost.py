"""``import corral`` loads what building a ``Client`` needs and nothing more (issue 15).

What only some paths need loads on first use: the sync facade's thread portal, ``Client.map``,
routing and deployment files, the rate limiter, the cache, truncation, budgets, the batch runner,
the stores, h11 and TLS (the transport is built with the first ``Client``), and asyncio (trio
programs never load it). Checked in a fresh interpreter, on the modules it holds: a time would
depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
