"""Cancel scopes without anyio's backend lookup on every one.

``anyio.CancelScope()`` finds the running backend through sniffio each time it is built (~2 µs);
a stack builds scopes per call. Here the backend's own scope class is found once per backend (by
building one the usual way) and used directly after that.
"""

from __future__ import annotations

import math

import anyio

from corral._clock import running_loop

__all__ = ["new_scope"]

_CLASSES: dict[bool, type[anyio.CancelScope]] = {}


def new_scope(deadline: float = math.inf) -> anyio.CancelScope:
    """``anyio.CancelScope(deadline=deadline)`` for the running backend."""
    on_asyncio = running_loop() is not None
    cls = _CLASSES.get(on_asyncio)
    if cls is None:
        cls = _CLASSES[on_asyncio] = type(anyio.CancelScope())
    return cls(deadline=deadline)
