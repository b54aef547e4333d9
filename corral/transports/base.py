"""What a transport is: the last handler of a stack, plus ``aclose``."""

from __future__ import annotations

import functools
from typing import Protocol
from urllib.parse import urlsplit

import attrs

from corral.core.errors import InvalidInput
from corral.core.models import Request, Response

__all__ = ["Origin", "Transport", "split_url"]


class Transport(Protocol):
    """Sends one request. Must raise only corral errors (``TransportError`` for the wire).

    Transports never follow redirects: a 3xx comes back as it is, so a credential is never
    re-sent to a host the caller did not name. (An API that redirects is misconfigured; point
    ``base_url`` at the final location.)
    """

    async def __call__(self, request: Request) -> Response: ...

    async def aclose(self) -> None: ...


@attrs.frozen
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @functools.cached_property
    def host_bytes(self) -> bytes:
        """The Host header as sent (IDNA for a non-ASCII name); computed once per origin."""
        return self.host_header.encode("idna")


@functools.lru_cache(maxsize=512)
def split_url(url: str) -> tuple[Origin, str]:
    """(origin, request-target) of an absolute http(s) URL; ``InvalidInput`` names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"URL scheme must be http or https, got {parts.scheme!r} in {url!r}")
    if not parts.hostname:
        raise InvalidInput(f"URL has no host: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput(f"URL has a bad port: {url!r}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Origin(parts.scheme, parts.hostname, port), target
