"""The default stack's fast paths (issue 15) keep their behaviour: what each layer saves per call
is measured in benchmarks/stack_overhead.py; these check what the cheaper code still does."""

from __future__ import annotations

import anyio
import pytest
import trio.testing

from corral.core import Request, Response, api_request, build_stack, errors
from corral.core._models import RequestOptions
from corral.middleware._deadline import Deadline
from corral.transports import MemoryTransport

pytestmark = pytest.mark.anyio


def chat(deadline: float | None = None) -> Request:
    return api_request(
        "http://h/v1",
        "/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        api_key="sk-test",
        options=RequestOptions(deadline=deadline),
    )


def ok(_: Request) -> Response:
    return Response(200, [("content-type", "application/json")], b'{"choices":[]}')


async def test_a_timeout_inside_the_call_is_not_reported_as_the_deadline() -> None:
    """Only the Deadline's own expiry becomes ``DeadlineExceeded``: a ``TimeoutError`` an inner
    layer raises long before the deadline propagates as it is."""

    async def own_timeout(request: Request, call_next: object) -> Response:
        with anyio.fail_after(0.001):
            await anyio.sleep(1)
        raise AssertionError("unreachable")

    stack = build_stack([Deadline(600.0), own_timeout], MemoryTransport(ok))
    with pytest.raises(TimeoutError) as caught:
        await stack(chat())
    assert not isinstance(caught.value, errors.DeadlineExceeded)


def test_the_deadline_still_cancels_a_hanging_call_in_virtual_time() -> None:
    """The cheaper scope still bounds the call: a handler that never answers ends at the
    deadline, on trio's MockClock (exactly 7 s)."""

    async def hang(_: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def main() -> float:
        start = anyio.current_time()
        with pytest.raises(errors.DeadlineExceeded):
            await build_stack([Deadline(7.0)], MemoryTransport(hang))(chat())
        return anyio.current_time() - start

    took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert took == pytest.approx(7.0)


async def test_the_call_s_own_earlier_deadline_wins_and_reaches_inner_layers() -> None:
    seen: list[float | None] = []

    async def look(request: Request, call_next: object) -> Response:
        seen.append(request.options.deadline)
        return ok(request)

    now = anyio.current_time()
    await build_stack([Deadline(600.0), look], MemoryTransport(ok))(chat(deadline=now + 5))
    await build_stack([Deadline(600.0), look], MemoryTransport(ok))(chat())
    assert seen[0] == now + 5
    assert seen[1] is not None and now + 599 < seen[1] <= anyio.current_time() + 600
