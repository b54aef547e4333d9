"""Immutable, case-insensitive HTTP headers that never print a secret."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from corral.core._errors import InvalidInput

__all__ = ["SENSITIVE_HEADERS", "Headers", "redact"]

#: Header names whose values are credentials; they are masked in every repr.
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"}
)


# RFC 9110 section 5: a token for names; visible characters (and obs-text) with inner spaces
# or tabs for values, so no CR, LF or NUL can smuggle in another header.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
_FIELD_VALUE = re.compile(rb"(?:%s(?:[ \t\x21-\x7e\x80-\xff]*%s)?)?" % (_VCHAR, _VCHAR))


def redact(value: str) -> str:
    """Mask a credential, keeping only its scheme (``Bearer``) if it has one."""
    scheme, _, rest = value.partition(" ")
    return f"{scheme} [redacted]" if rest else "[redacted]"


class Headers:
    """An ordered multi-map of header fields; names are compared case-insensitively.

    Names are stored lower-cased (HTTP/1.1 field names are case-insensitive and h11 lower-cases
    them too), values as given. Instances are immutable: ``with_`` and ``without`` return copies.
    """

    __slots__ = ("_items", "_raw")

    def __init__(
        self, items: Headers | Mapping[str, str] | Iterable[tuple[str, str]] | None = None
    ) -> None:
        if items is None:
            self._items: tuple[tuple[str, str], ...] = ()
        elif isinstance(items, Headers):
            self._items = items._items
        elif isinstance(items, Mapping):
            self._items = tuple((k.lower(), v) for k, v in items.items())
        else:
            self._items = tuple((k.lower(), v) for k, v in items)

    @classmethod
    def from_raw(cls, raw: Iterable[tuple[bytes, bytes]]) -> Headers:
        """Build from wire bytes (latin-1, as RFC 9110 allows for field values)."""
        new = cls.__new__(cls)
        new._items = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw)
        return new

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (case-insensitive), or ``default``."""
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` in order, for fields a server may repeat."""
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def with_(self, name: str, value: str) -> Headers:
        """A copy where ``name`` has exactly this one value."""
        lower = name.lower()
        new = Headers.__new__(Headers)
        new._items = (*((k, v) for k, v in self._items if k != lower), (lower, value))
        return new

    def without(self, name: str) -> Headers:
        """A copy with every ``name`` field removed, e.g. one the transport sets itself."""
        lower = name.lower()
        new = Headers.__new__(Headers)
        new._items = tuple((k, v) for k, v in self._items if k != lower)
        return new

    def items(self) -> tuple[tuple[str, str], ...]:
        """The (lowercased name, value) pairs in order, repeats kept."""
        return self._items

    def raw(self) -> tuple[tuple[bytes, bytes], ...]:
        """The fields as wire bytes, checked against RFC 9110's field syntax.

        Computed and checked once per instance (a client's headers go out with every request),
        so a transport need not check them again per request. Raises ``InvalidInput`` naming
        the field, e.g. for a value with a line break (header injection).
        """
        try:
            return self._raw
        except AttributeError:
            pass
        raw = []
        for name, value in self._items:
            try:
                wire = (name.encode("latin-1"), value.encode("latin-1"))
            except UnicodeEncodeError:
                wire = (b"", b"")
            if not _FIELD_NAME.fullmatch(wire[0]) or not _FIELD_VALUE.fullmatch(wire[1]):
                shown = redact(value) if name in SENSITIVE_HEADERS else value
                raise InvalidInput(f"header {name!r} has an invalid name or value: {shown!r}")
            raw.append(wire)
        self._raw: tuple[tuple[bytes, bytes], ...] = tuple(raw)
        return self._raw

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return sorted(self._items) == sorted(other._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items)))

    def __repr__(self) -> str:
        shown = [(k, redact(v) if k in SENSITIVE_HEADERS else v) for k, v in self._items]
        return f"Headers({shown!r})"

    __str__ = __repr__
