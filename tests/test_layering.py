"""The layers import only downwards (ARCHITECTURE.md): core -> middleware -> transports -> the
rest. Checked on the source, so a new import that breaks the layering fails here."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "corral"

#: Third-party packages core may use: attrs; orjson (jsonlib) and toktok (exact token counts)
#: when installed. None does I/O.
CORE_THIRD_PARTY = {"attrs", "orjson", "toktok"}
EVENT_LOOPS = {"anyio", "asyncio", "trio", "sniffio", "h11", "httpx", "httpx2", "aiohttp"}
#: What each layer must not import (corral subpackages and modules above it).
FORBIDDEN = {
    "core": {"corral.middleware", "corral.transports", "corral._client", "corral.batch",
             "corral.cli", "corral._clock", "corral.observe", "corral.integrations",
             "corral.testing", "corral.stores", "corral._gate", "corral._pacing"},
    "middleware": {"corral.transports", "corral._client", "corral.batch", "corral.cli",
                   "corral.testing", "corral.integrations"},
    "transports": {"corral.middleware", "corral._client", "corral.batch", "corral.cli",
                   "corral.testing"},
    "stores": {"corral.middleware", "corral.transports", "corral._client", "corral.batch",
               "corral.cli"},
}  # fmt: skip


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer_files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer: str) -> None:
    for path in layer_files(layer):
        for name in imports(path):
            for banned in FORBIDDEN[layer]:
                assert not (name == banned or name.startswith(banned + ".")), (
                    f"{path.relative_to(PACKAGE)} imports {name}"
                )


def test_core_imports_no_event_loop_and_only_its_third_party() -> None:
    stdlib = sys.stdlib_module_names
    for path in layer_files("core"):
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in EVENT_LOOPS, f"core/{path.name} imports {name}"
            assert top in stdlib or top == "corral" or top in CORE_THIRD_PARTY, (
                f"core/{path.name} imports {name}"
            )


def test_policies_never_await_or_touch_the_loop() -> None:
    """A policy (a class named ``*Policy`` or ``*Rules`` in a middleware module) is pure: no
    async method and no anyio, so property tests drive it with plain numbers."""
    found = 0
    for path in layer_files("middleware"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Policy", "Rules")):
                found += 1
                for inner in ast.walk(node):
                    assert not isinstance(inner, ast.AsyncFunctionDef | ast.Await), (
                        f"{path.name}:{node.name} awaits"
                    )
                    assert not (isinstance(inner, ast.Name) and inner.id == "anyio"), (
                        f"{path.name}:{node.name} uses anyio"
                    )
    assert found >= 4
