"""What to reserve for the answer of a call that sets no ``max_tokens``.

A provider counts such a call's real output, but the limiter must reserve before the call. A
fixed guess (1024 tokens) either wastes most of the quota or, if small, overruns it; instead
``OutputEstimate`` keeps, per model, the last ``size`` observed ``completion_tokens`` (per
choice) and reserves a high ``quantile`` of them, padded while the samples are few
(``1 + 2 / samples``); before the first answer it reserves the conservative
``DEFAULT_MAX_OUTPUT``. An answer longer than the estimate has it recomputed at once; shorter
ones lower it as they accumulate. Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections import deque

import attrs

from corral.core._tokens import DEFAULT_MAX_OUTPUT

__all__ = ["OutputEstimate"]


@attrs.define
class _Model:
    samples: deque[int]
    estimate: int = DEFAULT_MAX_OUTPUT
    #: Samples added since ``estimate`` was computed.
    stale: int = 0


class OutputEstimate:
    """Per model: a running high percentile of ``completion_tokens``, starting conservative."""

    #: Recompute the percentile after this many new samples (a larger one is taken at once).
    RECOMPUTE = 16

    def __init__(self, quantile: float = 0.99, size: int = 256) -> None:
        self.quantile = quantile
        self.size = size
        self._models: dict[str, _Model] = {}

    def reserve(self, model: str) -> int:
        """Output tokens to reserve for one choice of a call to ``model``."""
        state = self._models.get(model)
        if state is None:
            return DEFAULT_MAX_OUTPUT
        if state.stale and (state.stale >= self.RECOMPUTE or len(state.samples) < self.RECOMPUTE):
            state.estimate = self._percentile(state.samples)
            state.stale = 0
        return state.estimate

    def observe(self, model: str, completion_tokens: int) -> None:
        """One choice's real output, from a call that reserved by this estimate."""
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _Model(deque(maxlen=self.size))
        state.samples.append(max(0, completion_tokens))
        state.stale += 1
        if completion_tokens > state.estimate:  # an underestimate is looked at again at once
            state.estimate = self._percentile(state.samples)
            state.stale = 0

    def _percentile(self, samples: deque[int]) -> int:
        ordered = sorted(samples)
        k = len(ordered)
        value = ordered[max(0, math.ceil(self.quantile * k) - 1)]
        return max(1, math.ceil(value * (1 + 2 / k)))
