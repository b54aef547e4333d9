"""Helpers shared by the benchmarks: an emulator subprocess on its own core, CPU accounting."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

CLIENT_CPU, SERVER_CPU = 0, 1


def pin_to(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_EMULATOR_PIDS: dict[str, int] = {}


def emulator_cpu_seconds(url: str) -> float:
    """CPU time used so far by the emulator serving ``url`` (from /proc; Linux only)."""
    with open(f"/proc/{_EMULATOR_PIDS[url]}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def emulator_process(*extra: str) -> Iterator[str]:
    """``corral serve`` in a subprocess pinned to the other core; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "corral.cli", "serve", "--port", str(port), *extra]
    if os.cpu_count() and os.cpu_count() > SERVER_CPU:  # type: ignore[operator]
        cmd = ["taskset", "-c", str(SERVER_CPU), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _EMULATOR_PIDS[f"http://127.0.0.1:{port}/v1"] = proc.pid
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def emulator_counts(url: str) -> dict[str, int]:
    """The running emulator's counters (requests received, per outcome)."""
    import json
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/_corral/counts") as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({model}), "
        f"Python {platform.python_version()}"
    )
