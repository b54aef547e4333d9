"""Docs that cannot rot: every code block in README.md and docs/ runs here.

Python blocks run in a child interpreter and shell blocks in bash, in a scratch directory with
the files the docs name (``reviews.csv``, ``requests.jsonl``), against the emulator
(``OPENAI_BASE_URL``) and a real redis-server (the docs' ``redis://cache:6379``). A block that
cannot run here (it installs packages, or serves forever) is marked in the page with an HTML
comment ``<!-- not run: why -->`` right above it, and this test holds that reason to exist.
Blocks with no language (diagrams) and ``json`` samples are text, not code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing.server import serve_in_thread
from tests.support import CANARY_KEY, write_input

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python", "sh", "bash"}
FENCE = re.compile(
    r"(?:<!-- not run: (?P<why>[^>]+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S
)


def blocks() -> Iterator[tuple[str, str, str, str | None]]:
    for page in PAGES:
        for n, match in enumerate(FENCE.finditer(page.read_text())):
            lang = match["lang"]
            if lang in RUNNABLE:
                yield f"{page.name}#{n}", lang, match["code"], match["why"]


BLOCKS = list(blocks())


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    with serve_in_thread() as emu:
        yield emu.base_url


def scratch(tmp_path: Path) -> Path:
    (tmp_path / "reviews.csv").write_text(
        "id,review\nr1,Great phone case\nr2,Broke after a week\n", encoding="utf-8"
    )
    write_input(tmp_path / "requests.jsonl", 5)
    return tmp_path


@pytest.mark.parametrize(("where", "lang", "code", "why"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_every_code_block_runs(
    where: str,
    lang: str,
    code: str,
    why: str | None,
    tmp_path: Path,
    emulator_url: str,
    redis_url: str,
) -> None:
    if why is not None:
        assert len(why.strip()) > 10, f"{where}: say why it is not run"
        pytest.skip(f"not run: {why.strip()}")
    cwd = scratch(tmp_path)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "OPENAI_BASE_URL": emulator_url,
        "OPENAI_API_KEY": CANARY_KEY,
        "i": "0",
    }
    env.pop("CORRAL_API_KEY", None)
    code = code.replace("redis://cache:6379", redis_url.rsplit("/", 1)[0])
    code = code.replace("sk-...", CANARY_KEY)
    if lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        # `corral serve` runs until stopped: start it, wait until it listens, stop it.
        serve = (
            r"{ corral serve \1 --port 0 > serve.log 2>&1 & pid=$!; "
            r"for _ in $(seq 300); do grep -q listening serve.log && break; sleep 0.1; done; "
            r"kill $pid; grep -q listening serve.log; }"
        )
        code = re.sub(r"^corral serve (.*)$", serve, code, flags=re.M)
        argv = ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=120)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"{where} failed:\n{code}\n---\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]


def test_the_readme_demo_command_runs(tmp_path: Path) -> None:
    """The README's first command, minus the install it starts with (CI installs once)."""
    readme = (ROOT / "README.md").read_text()
    assert "corral demo" in readme
    done = subprocess.run(
        [sys.executable, "-m", "corral", "demo", "--requests", "300", "--dir", str(tmp_path)],
        capture_output=True,
        timeout=120,
    )
    err = done.stderr.decode()
    assert done.returncode == 0, err[-3000:]
    assert "300 succeeded, 0 failed" in err and "429s from its RPM/TPM limiter: 0" in err
