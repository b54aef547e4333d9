"""``Gate``: a resizable counting semaphore that costs next to nothing when a slot is free.

Used for concurrency limits and for the h11 connection pool, on every call. anyio's Semaphore
and CapacityLimiter checkpoint twice on every acquire even when they need not wait; at tens of
thousands of calls a second that is a measurable share of the CPU. A waiter still waits (and
can be cancelled) as usual, and taking a free slot checkpoints once every few calls
(``Pacer``), so a loop that only ever finds free slots still honours cancellation.
"""

from __future__ import annotations

from collections import deque

import anyio

from corral._pacing import Pacer

__all__ = ["Gate"]


class Gate:
    """Counts slots up to a ``limit`` that may change; waiters are served first come, first served.

    Taking a free slot checkpoints only every few calls (anyio's CapacityLimiter checkpoints
    twice per acquire, a measurable share of a cached or in-memory call's cost).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[anyio.Event] = deque()
        self._pace = Pacer()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued; never waits."""
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return True
        return False

    async def acquire(self) -> None:
        await self._pace()  # before taking anything: a cancellation here leaves no slot taken
        if self.try_acquire():
            return
        handed = anyio.Event()
        self._waiters.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self.release()  # a slot arrived as we were cancelled: pass it on
            else:
                self._waiters.remove(handed)
            raise

    def release(self) -> None:
        self.used -= 1
        self._hand_over()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.used < self.limit:
            self.used += 1
            self._waiters.popleft().set()
