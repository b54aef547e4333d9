"""Import time of ``corral`` beside its peers (issue 15): fresh interpreters, interleaved rounds.

    python benchmarks/import_time.py                  # 20 rounds, this tree
    python benchmarks/import_time.py --runs 30 --tree /tmp/before --tree .   # two trees

Each round starts one fresh interpreter per snippet, in turn, so a burst of load on the shared
machine hits every row alike. A row shows the median over rounds (and the spread, p25-p75) of
two figures: the time the snippet itself took inside the interpreter (``import corral`` alone,
what the target is about) and the wall time of the whole process (interpreter start included,
what a CLI user waits for). ``python -c pass`` is the floor of the second.

``--instructions`` counts instead (``valgrind --tool=callgrind``, one run per row): a figure
the other engineers' load does not blur, to compare trees.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine

CLIENT = "import corral; corral.Client('http://127.0.0.1:9/v1', 'sk-bench-0123456789', model='m')"
PEERS = ["anyio", "attrs", "httpx", "openai", "h11"]


def snippets(trees: list[str]) -> list[tuple[str, str | None, str]]:
    """(label, tree or None for the peers, code) for every row."""
    rows: list[tuple[str, str | None, str]] = [("python -c pass", None, "pass")]
    for name in PEERS:
        found = subprocess.run(
            [sys.executable, "-c", f"import importlib.util as u; print(u.find_spec({name!r}))"],
            capture_output=True,
            text=True,
        )
        if found.stdout.strip() != "None":
            rows.append((f"import {name}", None, f"import {name}"))
    # corral's floor: the two dependencies ``import corral`` cannot avoid, together
    rows.append(("import anyio, attrs", None, "import anyio, attrs"))
    for tree in trees:
        suffix = f" [{tree}]" if len(trees) > 1 else ""
        rows.append((f"import corral{suffix}", tree, "import corral"))
        rows.append((f"import corral; Client(...){suffix}", tree, CLIENT))
    return rows


def _env(tree: str | None) -> dict[str, str]:
    """The environment of a fresh interpreter: ``tree`` first on its path, and .pyc files read
    and written (with PYTHONDONTWRITEBYTECODE set, every run would compile corral again)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if tree is not None:
        env["PYTHONPATH"] = str(Path(tree).resolve())
    return env


def run_once(code: str, tree: str | None) -> tuple[float, float]:
    """(seconds inside the snippet, seconds of the whole process) for one fresh interpreter."""
    env = _env(tree)
    # ``-c`` puts the working directory first on sys.path: run where no corral tree is
    timed = f"import time as _t\n_s = _t.perf_counter()\n{code}\nprint(_t.perf_counter() - _s)"
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", timed],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    return float(out.stdout.strip().splitlines()[-1]), wall


def instructions(code: str, tree: str | None) -> int:
    """Instructions a fresh interpreter executes for ``code`` (start-up included)."""
    env = _env(tree)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        subprocess.run(
            [
                *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
                *(sys.executable, "-c", code),
            ],
            env=env,
            cwd=tmp,
            capture_output=True,
            check=True,
        )
        with open(out) as f:
            found = re.search(r"^summary: (\d+)", f.read(), re.MULTILINE)
    assert found is not None, "no summary line in the callgrind output"
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tree", action="append", help="a corral source tree (default: .)")
    parser.add_argument("--instructions", action="store_true", help="callgrind counts instead")
    args = parser.parse_args()
    trees = args.tree or [str(Path(__file__).resolve().parent.parent)]
    rows = snippets(trees)
    for _label, tree, code in rows:  # warm the file cache and .pyc files once
        run_once(code, tree)
    if args.instructions:
        print(f"{machine()}, callgrind, one fresh interpreter per row\n")
        print("| what | instructions (millions) |\n|---|---:|")
        for label, tree, code in rows:
            if "openai" not in code and "httpx" not in code:
                print(f"| `{label}` | {instructions(code, tree) / 1e6:,.0f} |")
        return
    inner: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    wall: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    for _ in range(args.runs):
        for label, tree, code in rows:
            took, whole = run_once(code, tree)
            inner[label].append(took * 1e3)
            wall[label].append(whole * 1e3)
    print(f"{machine()}, {args.runs} fresh interpreters per row, interleaved\n")
    print("| what | in-process ms, median (p25-p75) | process wall ms, median (p25-p75) |")
    print("|---|---:|---:|")
    for label, _, _ in rows:
        print(f"| `{label}` | {_spread(inner[label])} | {_spread(wall[label])} |")


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.1f} ({q[0]:.1f}-{q[2]:.1f})"


if __name__ == "__main__":
    main()
