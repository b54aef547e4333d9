"""What a limiter sent in the last window, so a restarted run does not burst into it.

A provider keeps counting a run's calls for a window after they were sent, also after the run
was killed. ``SendLog`` keeps one window of sends in ``SLICES`` slices (bounded memory however
fast the run goes); ``recent`` reports them as ``(seconds ago, requests, tokens)``, each slice
dated by its end (the latest its calls can have been sent, so they are assumed to stay in the
provider's window as long as they possibly can). ``room`` turns such a history into what a
bucket may start with. Pure: time is an argument.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["SLICES", "SendLog", "Sent", "room"]

SLICES = 12

#: A history: (seconds before now, requests, tokens) per slice.
Sent = tuple[tuple[float, int, int], ...]


class SendLog:
    """The last ``window`` seconds of sends, in slices of ``window / SLICES``."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._width = window / SLICES
        #: [slice end, requests, tokens], oldest first.
        self._slices: deque[list[float]] = deque()

    def add(self, now: float, requests: int, tokens: float) -> None:
        slices = self._slices
        if not slices or now > slices[-1][0]:
            slices.append([now + self._width, 0, 0])
            while slices[0][0] + self.window <= now:
                slices.popleft()
        last = slices[-1]
        last[1] += requests
        last[2] += tokens

    def recent(self, now: float) -> Sent:
        """The sends that may still count in a provider's window ending at ``now``."""
        return tuple(
            (now - min(end, now), int(requests), int(tokens))
            for end, requests, tokens in self._slices
            if end + self.window > now
        )


def room(
    allowance: float, rate: float, window: float, sent: Iterable[tuple[float, float]]
) -> float:
    """The most a bucket refilling at ``rate`` may hold now so that no ``window`` holds more than
    ``allowance`` together with ``sent`` ((seconds ago, amount) pairs).

    A send ``age`` seconds ago leaves the window in ``window - age`` seconds; until then what we
    send (at most the level plus ``rate`` per second) shares the window with it, so the level
    may be at most ``allowance - rate * x - (what is still there just before x)`` for every
    such moment ``x``. Negative: the bucket starts in debt (it waits).
    """
    leaving = sorted((window - age, amount) for age, amount in sent if 0 <= age < window)
    still = sum(amount for _, amount in leaving)
    best = allowance - still
    for x, amount in leaving:
        best = min(best, allowance - still - rate * x)
        still -= amount
    return best
