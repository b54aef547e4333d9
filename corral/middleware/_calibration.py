"""How many of the provider's tokens one token of our estimate is: learnt from its headers.

A provider counts a call's prompt with its own rule (OpenAI: about four characters per token),
and corral's estimator errs high by design (three characters per token plus per-message
overheads). In ``settle="reserved"`` nothing is refunded, so every call over-reserves by the
difference and the limiter runs below the limit (74-85% in the issue-14 benchmark).

``x-ratelimit-remaining-tokens`` says what the provider's window holds: ``allowance -
remaining`` is what it has counted in the last ``window`` seconds, up to and including this
call. ``WindowSum`` keeps what *we* charged in our last ``window`` at the moment the call was
admitted; their ratio is a sample of the provider's tokens per token of ours. ``Calibration``
keeps the recent samples and scales every reservation by a high quantile of them, within
``[MIN_FACTOR, MAX_FACTOR]``; a ratio above 1 (the provider counts more, or other clients share
the key) slows the limiter down just as well. Until the samples are trusted the factor is 1.

Assumes ``remaining`` counts the same ``window`` the limiter is configured with (a provider's
per-minute figure with ``window=60``); samples that cannot be (nothing counted, or more than
a window) are ignored. Pure: time is an argument.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["MAX_FACTOR", "MIN_FACTOR", "Calibration", "WindowSum"]

#: The factor's bounds: a sample outside them is clamped, never trusted further.
MIN_FACTOR = 0.25
MAX_FACTOR = 4.0


class WindowSum:
    """Our charges over the last ``window`` seconds, in ``slices`` with a running total (the
    oldest slice counted for the share of it still inside the window)."""

    def __init__(self, window: float, slices: int = 200) -> None:
        self.window = window
        self._width = window / slices
        #: [slice start, amount], oldest first.
        self._slices: deque[list[float]] = deque()
        self._total = 0.0

    def add(self, now: float, amount: float) -> None:
        slices = self._slices
        if slices and now < slices[-1][0] + self._width:
            slices[-1][1] += amount
        else:
            slices.append([now, amount])
        self._total += amount

    def total(self, now: float) -> float:
        """What we charged in ``(now - window, now]``."""
        start = now - self.window
        slices = self._slices
        while slices and slices[0][0] + self._width <= start:
            self._total -= slices.popleft()[1]
        if not slices or slices[0][0] >= start:
            return self._total
        first_start, first = slices[0]
        return self._total - first * (start - first_start) / self._width


class Calibration:
    """The provider's tokens per token of ours, from ``observe``d windows."""

    #: Samples kept, and how many before the factor moves from 1.
    KEEP = 64
    TRUST = 16
    #: A window must hold this share of the allowance for its ratio to be a sample.
    FILLED = 0.1
    #: The quantile of the samples used: high, so that noise errs on the safe side.
    QUANTILE = 0.9

    #: A move of the factor by this share since the last one reported is reported.
    NOTABLE = 0.01

    def __init__(self) -> None:
        self.factor = 1.0
        self._reported = 1.0
        self._samples: deque[float] = deque(maxlen=self.KEEP)

    def observe(self, ours: float, counted: float, allowance: float) -> bool:
        """One response: ``ours`` charged in our window when the call was admitted,
        ``counted`` in the provider's (``allowance - remaining``). True if the factor moved by
        ``NOTABLE`` or more since it last said so."""
        if not (allowance * self.FILLED <= ours and 0 < counted < allowance):
            return False
        self._samples.append(min(MAX_FACTOR, max(MIN_FACTOR, counted / ours)))
        if len(self._samples) < self.TRUST:
            return False
        ranked = sorted(self._samples)
        self.factor = ranked[math.ceil(self.QUANTILE * len(ranked)) - 1]
        if abs(self.factor - self._reported) < self.NOTABLE * self._reported:
            return False
        self._reported = self.factor
        return True

    def scale(self, tokens: float) -> float:
        """``tokens`` of ours in the provider's count (not rounded: the buckets hold fractions,
        and rounding each small call up would give back much of what calibrating gains)."""
        return tokens * self.factor
