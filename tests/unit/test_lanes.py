"""Upstream lanes: fair between pods, bounded, and nothing sent that nobody waits for."""

import asyncio
import threading

import pytest

from nmi.tokens.lanes import Abandoned, Lane, Ticket
from nmi.tokens.model import UpstreamError


class Gate:
    """Blocks the lane's worker threads until released; records the call order."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self._event = threading.Event()

    def call(self, name: str):  # type: ignore[no-untyped-def]
        def run() -> str:
            self.order.append(name)
            self._event.wait(5)
            return name

        return run

    def release(self) -> None:
        self._event.set()


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_a_pods_burst_does_not_delay_another_pods_first_call() -> None:
    lane = Lane(name="imds", slots=1, max_queued_per_requester=50)
    gate = Gate()
    try:
        busy = asyncio.create_task(lane.run(Ticket("a"), gate.call("a0")))
        await until(lambda: lane.busy == 1)
        storm = [
            asyncio.create_task(lane.run(Ticket("a"), gate.call(f"a{i}"))) for i in range(1, 20)
        ]
        await asyncio.sleep(0)
        late = asyncio.create_task(lane.run(Ticket("b"), gate.call("b0")))
        await until(lambda: lane.queued == 20)
        gate.release()
        await asyncio.gather(busy, late, *storm)
        # b's only call runs right after a's first queued one: round robin, not FIFO.
        assert gate.order.index("b0") <= 2, gate.order
    finally:
        lane.close()


async def test_queues_are_bounded_per_requester_and_in_all() -> None:
    lane = Lane(name="aad", slots=1, max_queued_per_requester=2, max_queued=3)
    gate = Gate()
    try:
        running = asyncio.create_task(lane.run(Ticket("a"), gate.call("run")))
        await until(lambda: lane.busy == 1)
        queued = [asyncio.create_task(lane.run(Ticket("a"), gate.call(f"q{i}"))) for i in range(2)]
        await until(lambda: lane.queued == 2)
        with pytest.raises(UpstreamError) as info:
            await lane.run(Ticket("a"), gate.call("over"))
        assert info.value.status == 429 and info.value.retryable and info.value.retry_after
        other = asyncio.create_task(lane.run(Ticket("b"), gate.call("b")))
        await until(lambda: lane.queued == 3)
        with pytest.raises(UpstreamError):
            await lane.run(Ticket("c"), gate.call("c"))  # the lane is full
        assert lane.rejected == 2
        gate.release()
        await asyncio.gather(running, other, *queued)
        assert "over" not in gate.order and "c" not in gate.order
    finally:
        lane.close()


async def test_a_call_nobody_waits_for_is_never_sent() -> None:
    lane = Lane(name="imds", slots=1)
    gate = Gate()
    wanted = True
    try:
        running = asyncio.create_task(lane.run(Ticket("a"), gate.call("run")))
        await until(lambda: lane.busy == 1)
        dropped = asyncio.create_task(lane.run(Ticket("b", lambda: wanted), gate.call("gone")))
        await until(lambda: lane.queued == 1)
        wanted = False  # every client of that call hung up
        gate.release()
        await running
        with pytest.raises(Abandoned):
            await dropped
        assert gate.order == ["run"] and lane.abandoned == 1 and lane.calls == 1
    finally:
        lane.close()


async def test_a_cancelled_waiter_gives_its_place_and_slot_back() -> None:
    lane = Lane(name="imds", slots=1)
    gate = Gate()
    try:
        running = asyncio.create_task(lane.run(Ticket("a"), gate.call("run")))
        await until(lambda: lane.busy == 1)
        waiting = asyncio.create_task(lane.run(Ticket("b"), gate.call("never")))
        await until(lambda: lane.queued == 1)
        waiting.cancel()
        gate.release()
        await running
        assert await lane.run(Ticket("c"), gate.call("next")) == "next"
        assert "never" not in gate.order and lane.busy == 0
    finally:
        lane.close()


async def test_a_queue_that_does_not_move_fails_retryably() -> None:
    lane = Lane(name="aad", slots=1, queue_timeout=0.05)
    gate = Gate()
    try:
        running = asyncio.create_task(lane.run(Ticket("a"), gate.call("run")))
        await until(lambda: lane.busy == 1)
        with pytest.raises(UpstreamError) as info:
            await lane.run(Ticket("b"), gate.call("late"))
        assert info.value.status == 503 and info.value.retryable
        gate.release()
        await running
        assert "late" not in gate.order
    finally:
        lane.close()
