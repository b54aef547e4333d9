"""The shared limiter's algorithm: the Lua scripts Redis runs, and the Python model of them.

Generic cell rate algorithm (GCRA) per dimension (requests, tokens). A dimension is a ``Cell``:
one unit every ``interval`` seconds, ``burst`` units at once. Its state is one number, the
theoretical arrival time (TAT): the moment the cell would be empty again. A cost of ``n``
units is admitted when ``max(TAT, now) + n * interval - burst * interval <= now`` and moves
the TAT to ``max(TAT, now) + n * interval``; otherwise it waits the difference. A settle moves
the TAT back (refund) or forward (charge) by the difference, never before ``now``. A pause (a
429) is a third number: nothing is admitted before it; a stored pause further than
``max_pause`` ahead is cut to ``max_pause`` when read. A pause also empties both cells at its
end, so the quota resumes at the steady rate rather than with a burst.

``_RESERVE`` checks the pause and both cells and reserves both or neither, atomically.
Each script reads the time from ``ARGV`` when given (tests, so they are exact) and otherwise
from ``redis.call('TIME')``: every process is judged by the Redis server's clock, so a skewed
local clock changes nothing. Keys expire once their TAT (or pause) is past, plus a margin:
an expired key reads as 0, which the algorithm treats exactly like a TAT in the past.

``GcraPolicy`` is the same algorithm in Python, pure (time is an argument), including what
Redis keeps of a number a script stores (Lua's ``tostring``: 14 significant digits);
tests/test_gcra.py checks on generated sequences that the scripts on a real Redis agree with it.
"""

from __future__ import annotations

import math
from typing import Any, cast

import attrs

from corral.middleware._buckets import PROCEED, Delay, Proceed

__all__ = [
    "PAUSE",
    "RESERVE",
    "SETTLE",
    "Cell",
    "GcraPolicy",
    "GcraState",
    "ScriptArgs",
    "decode",
    "stored",
]

#: A script's ARGV as redis-py sends it.
ScriptArgs = list[float | int | str]

_NOW = """
local now
if ARGV[{i}] ~= '' then now = tonumber(ARGV[{i}]) else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: requests cell, tokens cell, pause.  ARGV: req interval, req burst, tok interval,
# tok burst, tokens, ttl margin ms, max pause s, now ('' : Redis TIME).  An interval of 0
# switches that dimension off.  Answers {1, '0'} (reserved) or {0, wait seconds}.
RESERVE = (
    _NOW.format(i=8)
    + """
local margin = tonumber(ARGV[6])
local pause = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
local max_pause = tonumber(ARGV[7])
if pause > now + max_pause then
  pause = now + max_pause
  redis.call('SET', KEYS[3], tostring(pause), 'PX', math.ceil(max_pause * 1000) + 1000)
end
if pause > now then return {0, tostring(pause - now)} end
local function cell(key, interval, burst, cost)
  if interval <= 0 then return nil, 0 end
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local wait = new_tat - burst * interval - now
  if wait > 0 then return nil, wait end
  return new_tat, 0
end
local r_tat, r_wait = cell(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), 1)
local k_tat, k_wait = cell(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
local wait = math.max(r_wait, k_wait)
if wait > 0 then return {0, tostring(wait)} end
if r_tat then
  redis.call('SET', KEYS[1], tostring(r_tat), 'PX', math.ceil((r_tat - now) * 1000) + margin)
end
if k_tat then
  redis.call('SET', KEYS[2], tostring(k_tat), 'PX', math.ceil((k_tat - now) * 1000) + margin)
end
return {1, '0'}
"""
)

# KEYS: tokens cell.  ARGV: tok interval, token delta (actual - reserved), ttl margin ms, now.
SETTLE = (
    _NOW.format(i=4)
    + """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
tat = tat + tonumber(ARGV[2]) * tonumber(ARGV[1])
if tat < now then tat = now end
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil((tat - now) * 1000) + tonumber(ARGV[3]))
return 1
"""
)

# KEYS: pause, requests cell, tokens cell.  ARGV: seconds, now, req interval, req burst,
# tok interval, tok burst, ttl margin ms.  Besides the pause, each cell is drained to empty
# at its end (TAT >= until + burst * interval): no credit builds up while paused.
PAUSE = (
    _NOW.format(i=2)
    + """
local until_ = now + tonumber(ARGV[1])
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > pause then
  redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
local margin = tonumber(ARGV[7])
local function drain(key, interval, burst)
  if interval <= 0 then return end
  local tat = tonumber(redis.call('GET', key) or '0')
  local empty = until_ + burst * interval
  if empty > tat then
    redis.call('SET', key, tostring(empty), 'PX', math.ceil((empty - now) * 1000) + margin)
  end
end
drain(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
drain(KEYS[3], tonumber(ARGV[5]), tonumber(ARGV[6]))
return 1
"""
)


def stored(value: float) -> float:
    """What Redis keeps of a number a script writes with ``tostring``: 14 significant digits."""
    return float(f"{value:.14g}")


@attrs.frozen
class Cell:
    """One dimension: a unit every ``interval`` seconds, ``burst`` at once (interval 0: off)."""

    interval: float = 0.0
    burst: float = 0.0


@attrs.frozen
class GcraState:
    """What Redis holds for one quota name: the two TATs and the pause (0: no key)."""

    requests: float = 0.0
    tokens: float = 0.0
    pause: float = 0.0


@attrs.frozen
class GcraPolicy:
    """The scripts' algorithm in Python: pure, each method takes the state and ``now`` and
    returns the new state (and the decision). The shell runs the scripts; this is their model.
    """

    requests: Cell
    tokens: Cell
    max_pause: float

    def reserve(
        self, state: GcraState, now: float, tokens: int
    ) -> tuple[GcraState, Proceed | Delay]:
        """``RESERVE``: both cells take their cost, or neither and the wait is answered.

        ``tokens`` must fit the token burst (the shell refuses larger calls before asking).
        """
        pause = state.pause
        if pause > now + self.max_pause:
            pause = now + self.max_pause  # the script answers with this, and stores it rounded
            state = attrs.evolve(state, pause=stored(pause))
        if pause > now:
            return state, Delay(now + stored(pause - now))
        r_tat, r_wait = self._cell(state.requests, self.requests, 1, now)
        k_tat, k_wait = self._cell(state.tokens, self.tokens, tokens, now)
        wait = max(r_wait, k_wait)
        if wait > 0:
            return state, Delay(now + stored(wait))
        return (
            attrs.evolve(
                state,
                requests=state.requests if r_tat is None else stored(r_tat),
                tokens=state.tokens if k_tat is None else stored(k_tat),
            ),
            PROCEED,
        )

    @staticmethod
    def _cell(tat: float, cell: Cell, cost: float, now: float) -> tuple[float | None, float]:
        if cell.interval <= 0:
            return None, 0.0
        tat = max(tat, now)
        new_tat = tat + cost * cell.interval
        wait = new_tat - cell.burst * cell.interval - now
        if wait > 0:
            return None, wait
        return new_tat, 0.0

    def settle(self, state: GcraState, now: float, delta: int) -> GcraState:
        """``SETTLE``: move the token TAT by ``delta`` (actual - reserved), never before now."""
        tat = max(max(state.tokens, now) + delta * self.tokens.interval, now)
        return attrs.evolve(state, tokens=stored(tat))

    def pause(self, state: GcraState, now: float, seconds: float) -> GcraState:
        """``PAUSE``: nothing is admitted before ``now + seconds`` (a longer pause stays), and
        each cell is empty then (no credit accumulates while paused)."""
        until = now + seconds
        if until > state.pause:
            state = attrs.evolve(state, pause=stored(until))

        def drained(cell: Cell, tat: float) -> float:
            empty = until + cell.burst * cell.interval
            return stored(empty) if cell.interval > 0 and empty > tat else tat

        return attrs.evolve(
            state,
            requests=drained(self.requests, state.requests),
            tokens=drained(self.tokens, state.tokens),
        )

    def reserve_args(self, tokens: int, margin_ms: int, now: float | None = None) -> ScriptArgs:
        """``RESERVE``'s ARGV; ``now`` None: the script reads Redis's clock."""
        r, k = self.requests, self.tokens
        when = "" if now is None else now
        return [r.interval, r.burst, k.interval, k.burst, tokens, margin_ms, self.max_pause, when]

    def settle_args(self, delta: int, margin_ms: int, now: float | None = None) -> ScriptArgs:
        """``SETTLE``'s ARGV; ``now`` None: the script reads Redis's clock."""
        return [self.tokens.interval, delta, margin_ms, "" if now is None else now]

    def pause_args(self, seconds: float, margin_ms: int, now: float | None = None) -> ScriptArgs:
        """``PAUSE``'s ARGV; ``now`` None: the script reads Redis's clock."""
        r, k = self.requests, self.tokens
        when = "" if now is None else now
        return [seconds, when, r.interval, r.burst, k.interval, k.burst, margin_ms]


def decode(reply: object, now: float) -> Proceed | Delay:
    """``RESERVE``'s answer as a decision on the local clock (``now``)."""
    admitted, wait = cast(list[Any], reply)
    if int(admitted):
        return PROCEED
    seconds = float(wait)
    return Delay(now + seconds if math.isfinite(seconds) else math.inf)
