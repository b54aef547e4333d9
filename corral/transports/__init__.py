"""Transports execute a ``Request`` on a real (or in-memory) connection."""

from corral.transports.base import Transport
from corral.transports.http11 import H11Transport
from corral.transports.memory import MemoryTransport

__all__ = ["H11Transport", "MemoryTransport", "Transport"]
