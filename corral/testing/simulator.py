"""A simulated provider for virtual-time runs: the emulator's logic without sockets.

``SimulatedProvider`` is a handler: it asks an ``Emulator`` what to answer (the same RPM/TPM
sliding window, latency and faults as the real server), sleeps the latency on the stack's clock
and returns the response. Under trio's ``MockClock`` a million calls take seconds of real time.
"""

from __future__ import annotations

import anyio
import attrs

from corral._clock import current_time
from corral.core._compose import Clock
from corral.core._errors import ReadError, ReadTimeout
from corral.core._headers import Headers
from corral.core._models import Request, Response
from corral.testing.emulator import Emulator, EmulatorConfig, Fault

__all__ = ["SimulatedProvider"]


class SimulatedProvider:
    """A handler that answers like the emulator without sockets, waiting its latency on the
    loop's clock, so a simulation under trio's ``MockClock`` runs in virtual time."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        clock: Clock = current_time,
        any_model: bool = True,
    ) -> None:
        """``any_model`` as in ``serve_in_thread``: simulations name models freely."""
        config = config or EmulatorConfig()
        self.emulator = Emulator(attrs.evolve(config, any_model=True) if any_model else config)
        self._clock = clock

    @property
    def counts(self) -> dict[str, int]:
        """Requests received, per outcome (a copy)."""
        return dict(self.emulator.counts)

    async def __call__(self, request: Request) -> Response:
        """Answer ``request`` as the emulator would at this moment; a reset or a hang comes out
        as the typed error a transport would raise."""
        path = "/" + request.url.split("://", 1)[-1].split("/", 1)[-1]
        plan = self.emulator.handle(
            self._clock(), request.method, path, dict(request.headers.items()), request.body
        )
        if plan.delay > 0:
            await anyio.sleep(plan.delay)
        if plan.fault in (Fault.RESET, Fault.RESET_AFTER_FIRST_BYTE, Fault.TRUNCATE):
            raise ReadError("simulated connection reset", request_sent=True)
        if plan.fault is Fault.HANG:
            raise ReadTimeout("simulated hang", request_sent=True)
        body = plan.body if plan.events is None else b"".join(plan.events)
        return Response(plan.status, Headers(plan.headers), body)

    async def aclose(self) -> None:
        """Nothing to release; present so the simulator fits wherever a transport does."""
        return None
