"""JSON in and out as bytes: orjson when installed (the ``speed`` extra), else the stdlib.

orjson cannot hold an integer outside [-2**63, 2**64): it refuses to write one and reads one as
a float, so ``2**64`` and ``2**64 + 1`` would read alike. Writing falls back to the stdlib for
those, and ``canonical`` (cache keys) reads them exactly, so its bytes are equal exactly when
the values are. A value no JSON can hold raises ``InvalidInput``.

orjson is imported on first use: its own imports (dataclasses, uuid, datetime) cost ~4 ms that
``import corral`` need not pay (issue 15).
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any, Literal, NoReturn

from corral.core._errors import InvalidInput

__all__ = ["JSONDecodeError", "canonical", "dumps", "dumps_canonical", "loads"]

#: orjson once imported, False when it is not installed, None before the first use.
_orjson: ModuleType | Literal[False] | None = None


def _import_orjson() -> ModuleType | Literal[False]:
    global _orjson
    try:
        import orjson
    except ImportError:  # pragma: no cover - exercised when the extra is absent
        _orjson = False
    else:
        _orjson = orjson
    return _orjson


JSONDecodeError: tuple[type[Exception], ...] = (ValueError, UnicodeDecodeError, RecursionError)
_PLUS = ord("+")


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises one of ``JSONDecodeError`` on bad input."""
    orjson = _orjson if _orjson is not None else _import_orjson()
    if orjson:
        return orjson.loads(data)
    return json.loads(data)


def _loads_exact(data: bytes | str) -> Any:
    """The stdlib's exact integers, refusing what orjson refuses (NaN, Infinity, 1e400)."""
    return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is too large for a float")
    return value


def dumps(value: Any) -> bytes:
    """JSON bytes; ``InvalidInput`` for what JSON cannot hold (a set, an object, NaN beside a
    huge integer...)."""
    orjson = _orjson if _orjson is not None else _import_orjson()
    if orjson:
        try:
            out: bytes = orjson.dumps(value)
            return out
        except TypeError:
            pass  # an integer beyond 64 bits, or something the stdlib will refuse too
    return _stdlib_dumps(value, sort_keys=False)


def dumps_canonical(value: Any) -> bytes:
    """Sorted keys, no spaces: equal values give equal bytes (for cache keys)."""
    orjson = _orjson if _orjson is not None else _import_orjson()
    if orjson:
        try:
            sorted_out: bytes = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
            return sorted_out
        except TypeError:
            pass
    return _stdlib_dumps(value, sort_keys=True)


def canonical(data: bytes | str) -> bytes:
    """The canonical bytes of a JSON text: equal for equal values, different otherwise.

    orjson reads an integer outside [-2**63, 2**64) as a float of magnitude 9.2e18 or more, and
    writes any such float with an exponent (``1.8446744073709552e+19``); when its output has no
    ``e+`` it read every number exactly. Otherwise (rare: such a float, or ``e+`` in a string)
    the stdlib reads the text again, exactly.
    """
    orjson = _orjson if _orjson is not None else _import_orjson()
    if orjson:
        out = dumps_canonical(orjson.loads(data))
        if _PLUS not in out or b"e+" not in out:  # a byte is a memchr; "e+" a slower search
            return out
    return dumps_canonical(_loads_exact(data))


def _stdlib_dumps(value: Any, *, sort_keys: bool) -> bytes:
    try:
        return json.dumps(
            value, separators=(",", ":"), sort_keys=sort_keys, ensure_ascii=False, allow_nan=False
        ).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # a lone surrogate: UnicodeError
        raise InvalidInput(f"not encodable as JSON: {exc}") from None
