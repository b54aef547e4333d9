"""Lazy re-exports for the packages' ``__init__``: a name's module loads when the name is first
used (PEP 562), so ``import corral`` costs only what building a ``Client`` needs (issue 15).

A package keeps its names in ``__all__`` and imports them under ``TYPE_CHECKING`` for the type
checker; at run time it hands this a table ``name -> module`` and installs the two functions
returned as its ``__getattr__`` and ``__dir__``. A value is stored in the package's namespace
once resolved, so the second use is a plain attribute read.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, names: Mapping[str, str], modules: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``names`` maps an exported name to the
    module defining it, ``modules`` an exported name to a module exported whole (``events``)."""
    namespace = sys.modules[package].__dict__
    whole = dict(modules or {})

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
        elif name in whole:
            value = importlib.import_module(whole[name])
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names, *whole})

    return __getattr__, __dir__
