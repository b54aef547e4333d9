"""``Client.map``: many calls with bounded in-flight work, each outcome as a value.

Use it as ``async with client.map(bodies) as results: async for r in results: ...``. The calls
run in a task group that this ``async with`` opens and closes in the caller's own task, so
leaving the block in any way (``break``, an exception, the caller being cancelled) cancels the
calls still running, there and then. An async generator cannot promise that: abandoned after a
``break``, it is closed later from another task, which asyncio reports as "exit cancel scope in
a different task" and trio as ``TrioInternalError`` (PEP 789 tells the story).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, NoReturn

import anyio
import attrs
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from corral.core import _errors as errors
from corral.core._wire import ChatCompletion

__all__ = ["MapResult", "MapResults", "MapRun"]


@attrs.frozen
class MapResult:
    """One outcome of ``Client.map``: the input's index and either a result or an error."""

    index: int
    result: ChatCompletion | None
    error: errors.CorralError | None


class MapResults:
    """The outcomes of one run, as they complete or (``ordered``) in input order."""

    def __init__(
        self,
        receive: MemoryObjectReceiveStream[MapResult],
        slots: anyio.Semaphore,
        ordered: bool,
    ) -> None:
        self._receive, self._slots, self._ordered = receive, slots, ordered
        self._pending: dict[int, MapResult] = {}
        self._ready: collections.deque[MapResult] = collections.deque()
        self._next = 0

    def __aiter__(self) -> MapResults:
        return self

    async def __anext__(self) -> MapResult:
        while not self._ready:
            try:
                outcome = await self._receive.receive()
            except anyio.EndOfStream:
                raise StopAsyncIteration from None
            if not self._ordered:
                return outcome
            self._pending[outcome.index] = outcome
            while self._next in self._pending:
                self._ready.append(self._pending.pop(self._next))
                self._next += 1
                self._slots.release()  # ordered: a slot frees when its result is handed out
        return self._ready.popleft()


class MapRun:
    """What ``Client.map`` returns: an async context manager whose value is the results."""

    def __init__(
        self,
        call: Callable[[Mapping[str, Any]], Awaitable[ChatCompletion]],
        bodies: Iterable[Mapping[str, Any]],
        concurrency: int,
        ordered: bool,
    ) -> None:
        if concurrency < 1:
            raise errors.InvalidInput(f"map concurrency must be at least 1, not {concurrency}")
        self._call, self._bodies, self._ordered = call, bodies, ordered
        self._concurrency = concurrency
        self._slots = anyio.Semaphore(concurrency)
        self._send, self._receive = anyio.create_memory_object_stream[MapResult](concurrency)
        self._tg: TaskGroup | None = None

    def __aiter__(self) -> NoReturn:
        raise errors.InvalidInput(
            "iterate the results inside `async with client.map(...) as results:`, so that "
            "leaving the loop early cancels the calls still running"
        )

    async def __aenter__(self) -> MapResults:
        if self._tg is not None:
            raise errors.InvalidInput("a client.map(...) run can be entered only once")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._produce, name="corral-map")
        return MapResults(self._receive, self._slots, self._ordered)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()  # whatever is still running is no longer wanted
        try:
            if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
                return bool(await self._tg.__aexit__(exc_type, exc, tb))
            # The body's own exception: the task group would wrap it in an ExceptionGroup;
            # close the group without it and let it propagate as itself.
            await self._tg.__aexit__(None, None, None)
            return False
        finally:
            self._receive.close()

    async def _produce(self) -> None:
        """Up to ``concurrency`` workers, each started with its first item, then taking the
        next from the shared iterator: a task per worker, not per item (a task and a
        semaphore hand-off cost more than a cache hit)."""
        bodies = enumerate(self._bodies)
        async with self._send, anyio.create_task_group() as tg:
            for worker in range(self._concurrency):
                first = await self._take(bodies)
                if first is None:
                    break
                tg.start_soon(self._work, bodies, first, name=f"corral-map-{worker}")

    async def _take(
        self, bodies: Iterator[tuple[int, Mapping[str, Any]]]
    ) -> tuple[int, Mapping[str, Any]] | None:
        """The next item, or None. Ordered, a slot is taken first (the consumer frees it), so
        the items started are always a prefix of the input."""
        if self._ordered:
            await self._slots.acquire()
        item = next(bodies, None)
        if item is None and self._ordered:
            self._slots.release()
        return item

    async def _work(
        self,
        bodies: Iterator[tuple[int, Mapping[str, Any]]],
        item: tuple[int, Mapping[str, Any]] | None,
    ) -> None:
        while item is not None:
            index, body = item
            try:
                outcome = MapResult(index, await self._call(body), None)
            except errors.CorralError as exc:
                outcome = MapResult(index, None, exc)
            await self._send.send(outcome)
            item = await self._take(bodies)
