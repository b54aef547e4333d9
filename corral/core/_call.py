"""One call, one context: the facts every layer needs, computed once and shared.

A ``Call`` travels with its ``Request`` (``request.options.call``) through every layer and
every attempt. The first layer that needs the parsed body, the token estimate or the usage
computes it here; the others read it. Layers that change the body (truncation) update it
here too. It also carries the stack's event sink and the call's labels and attempt number,
so a shell reports a decision with ``call.emit(SomeEvent, now, field=...)``, and builds no
event at all when nobody listens.

A ``Call`` is mutable on purpose (it accumulates facts as the call goes), and never holds a
secret: no headers, only the parsed body, which the caller wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from corral.core import _jsonlib as jsonlib
from corral.core._events import Event, EventSink

if TYPE_CHECKING:
    from corral.core._streaming import StreamParse
    from corral.core._wire import Usage

__all__ = ["Call"]

E = TypeVar("E", bound=Event)
_UNSET: Any = object()


@attrs.define(eq=False, repr=False)
class Call:
    sink: EventSink | None = None
    labels: Mapping[str, str] = attrs.field(factory=dict)
    #: 1 for the first attempt; set by Retry.
    attempt: int = 0
    #: Prompt estimate plus maximum output, set by the first layer that estimates it.
    tokens: int | None = None
    #: The usage the provider reported, once known (a stream reports it at its end).
    usage: Usage | None = None
    #: The one parse of the answer's SSE stream, shared by every layer and the caller
    #: (``corral.core._streaming.shared_parse`` installs it).
    stream: StreamParse | None = None
    _json: Any = _UNSET
    _body: bytes | None = None

    def json(self, body: bytes) -> Any:
        """``body`` parsed, once; None when it is empty or not JSON.

        Parsed again only for another body object (a request sent twice, one of them rewritten).
        """
        if self._json is _UNSET or body is not self._body:
            try:
                self._json = jsonlib.loads(body) if body else None
            except jsonlib.JSONDecodeError:
                self._json = None
            self._body, self.tokens = body, None
        return self._json

    def replace_json(self, parsed: Any, body: bytes) -> None:
        """A layer rewrote the body to ``body`` (truncation): later layers read ``parsed``."""
        self._json, self._body = parsed, body
        self.tokens = None

    def emit(self, event: type[E], now: float, /, **fields: Any) -> None:
        """Hand the sink one ``event``; nothing is built without a sink. Positional-only, so an
        event's own fields (``kind``, say) pass as keywords."""
        if self.sink is not None:
            self.sink(event(time=now, labels=self.labels, attempt=self.attempt, **fields))

    def __repr__(self) -> str:
        return f"Call(labels={dict(self.labels)!r}, attempt={self.attempt})"
