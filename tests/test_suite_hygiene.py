"""The test suite's own shape: test modules stand alone, conftest.py holds fixtures only.

A test module that imports another runs that module's tests' imports (and their side effects)
in a different order depending on which file pytest collects first, and couples two files
that change for different reasons. Shared helpers live in the support modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
SUPPORT = {"support", "strategies", "hostile"}


def _imported_modules(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names.append(base)
            if base == "tests" or node.level:
                names.extend(f"{base}.{alias.name}".lstrip(".") for alias in node.names)
    return names


def _test_module_imports(path: Path) -> list[str]:
    """The test modules (or conftest) that ``path`` imports."""
    bad = []
    for name in _imported_modules(ast.parse(path.read_text(), str(path))):
        parts = name.split(".")
        if parts[0] == "tests":
            parts = parts[1:]
        if (
            parts
            and parts[0] not in SUPPORT
            and (parts[0].startswith("test_") or parts[0] == "conftest")
        ):
            bad.append(name)
    return bad


def test_no_test_module_imports_another() -> None:
    found = {
        path.name: bad
        for path in sorted(TESTS.rglob("*.py"))
        if (bad := _test_module_imports(path))
    }
    assert found == {}


def test_an_import_of_a_test_module_is_found(tmp_path: Path) -> None:
    module = tmp_path / "test_x.py"
    module.write_text(
        "from tests.conftest import A\nfrom tests.test_batch import b\nimport test_cache\n"
        "from tests import hostile, test_gate\nfrom tests.support import C\n"
    )
    assert _test_module_imports(module) == [
        "tests.conftest",
        "tests.test_batch",
        "test_cache",
        "tests.test_gate",
    ]


def test_conftest_defines_only_fixtures() -> None:
    tree = ast.parse((TESTS / "conftest.py").read_text())
    others = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the module docstring
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
            "fixture" in ast.unparse(d) for d in node.decorator_list
        ):
            continue
        others.append(ast.unparse(node).splitlines()[0])
    assert others == []
