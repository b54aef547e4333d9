"""JSON in and out as bytes: orjson when installed (the ``speed`` extra), else the stdlib."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JSONDecodeError", "dumps", "dumps_canonical", "loads"]

try:
    import orjson
except ImportError:  # pragma: no cover - exercised when the extra is absent
    orjson = None  # type: ignore[assignment]

JSONDecodeError: tuple[type[Exception], ...] = (ValueError, UnicodeDecodeError, RecursionError)


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises one of ``JSONDecodeError`` on bad input."""
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data)


def dumps(value: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def dumps_canonical(value: Any) -> bytes:
    """Sorted keys, no spaces: equal values give equal bytes (for cache keys)."""
    if orjson is not None:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
