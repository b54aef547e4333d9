"""Validators for the middleware's frozen configurations, and the end of an exhaustive match.

A bad value fails when the middleware is built, not on the first call, with an ``InvalidInput``
that names the class and the field (``RateLimitConfig.rpm must be ...``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NoReturn

from corral.core._errors import InvalidInput

__all__ = ["at_least", "between", "finite", "never", "optional"]

Validator = Callable[[Any, Any, Any], None]


def _fail(instance: object, attribute: Any, what: str, value: object) -> NoReturn:
    raise InvalidInput(f"{type(instance).__name__}.{attribute.name} must be {what}, got {value!r}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def at_least(minimum: int) -> Validator:
    """An integer >= ``minimum``."""

    def check(instance: object, attribute: Any, value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            _fail(instance, attribute, f"an integer >= {minimum}", value)

    return check


def finite(*, minimum: float = 0.0, open_below: bool = False) -> Validator:
    """A finite number >= ``minimum`` (> it with ``open_below``)."""
    what = f"a finite number {'>' if open_below else '>='} {minimum:g}"

    def check(instance: object, attribute: Any, value: object) -> None:
        if (
            not _number(value)
            or not math.isfinite(value)  # type: ignore[arg-type]
            or value < minimum  # type: ignore[operator]
            or (open_below and value == minimum)
        ):
            _fail(instance, attribute, what, value)

    return check


def between(low: float, high: float, *, open_low: bool = True, open_high: bool = True) -> Validator:
    """A number in the interval from ``low`` to ``high`` (open ends by default)."""
    what = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def check(instance: object, attribute: Any, value: object) -> None:
        ok = (
            _number(value)
            and (low < value if open_low else low <= value)  # type: ignore[operator]
            and (value < high if open_high else value <= high)  # type: ignore[operator]
        )
        if not ok:
            _fail(instance, attribute, f"a number {what}", value)

    return check


def optional(check: Validator) -> Validator:
    """None, or a value ``check`` accepts."""

    def maybe(instance: object, attribute: Any, value: object) -> None:
        if value is not None:
            check(instance, attribute, value)

    return maybe


def never(value: NoReturn) -> NoReturn:
    """The last ``case`` of a match over a decision union: mypy proves it unreachable."""
    raise AssertionError(f"unhandled decision {value!r}")
