"""The public API: what the packages export is documented and importable from the top.

The API reference (docs/api.md, mkdocstrings) lists a name only when it has a docstring of its
own (``show_if_no_docstring: false``), so an undocumented export silently vanishes from the
docs. This walks every package's ``__all__`` as it is now, so a name added later is checked too.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import types
from collections.abc import Iterator
from typing import Any

PACKAGES = [
    "corral",
    "corral.core",
    "corral.middleware",
    "corral.transports",
    "corral.batch",
    "corral.observe",
    "corral.stores",
    "corral.testing",
]


def _own_doc(cls: type) -> str | None:
    """A class's own docstring: not a base's, not the signature dataclasses write in its place."""
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str) or not doc.strip():
        return None
    if dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        return None
    return doc


def _methods(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties (and ``__call__``) of ``cls`` and its corral bases."""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("corral"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") and name != "__call__":
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            if inspect.isfunction(value):
                yield f"{klass.__module__}.{klass.__qualname__}.{name}", value


def _assignment_has_docstring(module_name: str, name: str, seen: set[str]) -> bool:
    """Whether ``name = ...`` in ``module_name`` (or where it imports it from) has a docstring.

    A type alias has no ``__doc__`` at run time; mkdocstrings reads the string literal that
    follows the assignment in the source.
    """
    if module_name in seen:
        return False
    seen.add(module_name)
    module = sys.modules[module_name]
    tree = ast.parse(inspect.getsource(module))
    body: list[ast.stmt] = []
    for node in tree.body:  # a lazy package imports its names under ``if TYPE_CHECKING:``
        body.extend(node.body if isinstance(node, ast.If) else [node])
    for i, node in enumerate(body):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            following = body[i + 1] if i + 1 < len(body) else None
            return (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            )
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and any((alias.asname or alias.name) == name for alias in node.names)
        ):
            importlib.import_module(node.module)
            return _assignment_has_docstring(node.module, name, seen)
    return False


def _undocumented() -> list[str]:
    missing: list[str] = []
    done: set[int] = set()
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            if name.startswith("__"):
                continue  # __version__
            value = getattr(module, name)
            where = f"{package}.{name}"
            if isinstance(value, types.ModuleType):
                if not (value.__doc__ or "").strip():
                    missing.append(where)
            elif id(value) in done:
                continue
            elif isinstance(value, type):
                done.add(id(value))
                if _own_doc(value) is None:
                    missing.append(where)
                missing.extend(m for m, f in _methods(value) if not (f.__doc__ or "").strip())
            elif inspect.isfunction(value) or inspect.isbuiltin(value):
                done.add(id(value))
                if not (value.__doc__ or "").strip():
                    missing.append(where)
            elif not _assignment_has_docstring(package, name, set()):
                missing.append(where)  # a type alias or constant: a string literal after it
    return sorted(set(missing))


def test_every_export_and_its_public_methods_have_a_docstring() -> None:
    assert _undocumented() == []


def test_a_missing_docstring_is_found() -> None:
    """The walk sees a method without a docstring (the test above cannot pass vacuously)."""

    class Undocumented:
        def method(self) -> None:
            pass

    Undocumented.__module__ = "corral.fake"
    assert [name for name, f in _methods(Undocumented) if not f.__doc__] == [
        "corral.fake.test_a_missing_docstring_is_found.<locals>.Undocumented.method"
    ]
    assert _own_doc(Undocumented) is None


def test_the_stack_is_importable_from_the_top() -> None:
    from corral import (
        AiohttpTransport,
        Cache,
        CircuitBreaker,
        Client,
        ConcurrencyLimit,
        Deadline,
        H11Transport,
        HttpxTransport,
        MemoryTransport,
        Metrics,
        RateLimit,
        Retry,
        Truncate,
    )

    names = [
        Client,
        RateLimit,
        Retry,
        Cache,
        Metrics,
        Truncate,
        Deadline,
        CircuitBreaker,
        ConcurrencyLimit,
        H11Transport,
        HttpxTransport,
        AiohttpTransport,
        MemoryTransport,
    ]
    assert all(isinstance(cls, type) for cls in names)


def test_every_exported_name_resolves() -> None:
    """``__all__`` names nothing that is missing (lazy names included)."""
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{package}.{name}"
