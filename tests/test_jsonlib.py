"""JSON for cache keys and request bodies: exact for any integer, typed errors for the rest."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core import _errors as errors
from corral.core import _jsonlib as jsonlib

#: JSON values as ``loads`` returns them, with integers of any size and only finite floats.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**70).map(lambda n: n * (-1) ** (n % 2))
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON types all the way down (1 == 1.0 == True in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@given(json_values)
def test_canonical_bytes_give_back_the_exact_value(value: Any) -> None:
    """Hence two different values never share canonical bytes (nor a cache key)."""
    text = jsonlib.dumps(value)
    assert same(json.loads(text), value)
    canonical = jsonlib.canonical(text)
    assert same(json.loads(canonical), value)
    assert jsonlib.canonical(json.dumps(value, indent=1).encode()) == canonical


def test_integers_beyond_64_bits_stay_apart() -> None:
    for a, b in ((2**64, 2**64 + 1), (-(2**63) - 1, -(2**63) - 2), (10**30, 10**30 + 1)):
        assert jsonlib.canonical(jsonlib.dumps({"seed": a})) != jsonlib.canonical(
            jsonlib.dumps({"seed": b})
        )
        assert json.loads(jsonlib.canonical(jsonlib.dumps([a, b]))) == [a, b]


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": 1e400}',
        b"[NaN, 123456789012345678901]",
        b"[Infinity]",
        b"[-1e999, 10000000000000000000]",
    ],
)
def test_non_finite_numbers_are_not_json(text: bytes) -> None:
    with pytest.raises(jsonlib.JSONDecodeError):
        jsonlib.canonical(text)


@pytest.mark.parametrize(
    "value",
    [object(), {"a": {1, 2}}, b"bytes", [math.nan, 2**64], {"x": 2**64, "y": object()}],
)
def test_unencodable_values_raise_invalid_input(value: Any) -> None:
    with pytest.raises(errors.InvalidInput, match="JSON"):
        jsonlib.dumps(value)
    with pytest.raises(errors.InvalidInput, match="JSON"):
        jsonlib.dumps_canonical(value)


def test_circular_values_raise_invalid_input() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(errors.InvalidInput):
        jsonlib.dumps(loop)


def test_nesting_deeper_than_orjson_writes_is_still_canonical() -> None:
    deep = b"[" * 300 + b"]" * 300
    assert jsonlib.canonical(deep) == deep


def test_a_plus_in_a_string_or_a_large_float_takes_the_exact_path_to_the_same_bytes() -> None:
    assert jsonlib.canonical(b'{"b": "e+", "a": 1.5e20}') == b'{"a":1.5e+20,"b":"e+"}'
    assert jsonlib.canonical(b'{"b": "e+", "a": 150000000000000000000}') == (
        b'{"a":150000000000000000000,"b":"e+"}'
    )
