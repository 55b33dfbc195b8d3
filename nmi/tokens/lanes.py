"""Upstream calls, queued fairly per pod, bounded, and dropped when nobody waits.

Why: one node's pods share two upstream services with hard limits — the node
IMDS (Azure allows 5 concurrent managed-identity requests and about 20 per
second per VM) and Azure AD (throttled per application).  Without a queue of
its own, the calls of three pods asking for a stream of distinct resources
made a fourth pod's first token wait 13-34 s, and calls whose clients had long
hung up were still sent.  So every upstream call goes through a :class:`Lane`:

* one lane per service, each with its own threads (MSAL is synchronous), so a
  slow Azure AD never holds up the node IMDS and the other way round;
* calls wait in one queue per requester (the pod whose miss caused the call;
  background refreshes have a queue of their own) and free slots are handed
  out round-robin between the queues: each pod's misses wait behind its own,
  never behind another pod's burst;
* the queues are bounded — per requester and in all — and a call over the
  bound fails at once as retryable (429), rather than growing memory;
* when a call's turn comes and nobody waits for its result any more (every
  client hung up, see :attr:`Ticket.wanted`), it is dropped, not sent;
* optional pacing: a rate for the whole lane (the node IMDS) and a rate per
  key (each Azure AD application).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from ..ratelimit import Buckets, Pacer
from .model import UpstreamError

R = TypeVar("R")

REFRESH = "(refresh)"  # the requester of background refreshes


@dataclass(slots=True)
class Ticket:
    """Who a call is for: the requester's queue, and whether anyone still wants it."""

    requester: str
    wanted: Callable[[], bool] = field(default=lambda: True)


class Abandoned(Exception):
    """Nobody waited for the call any more when its turn came: it was not sent."""


class Lane:
    def __init__(
        self,
        *,
        name: str,
        slots: int,
        max_queued_per_requester: int = 8,
        max_queued: int = 512,
        queue_timeout: float = 30.0,
        pacer: Pacer | None = None,
        key_rate: float = 0.0,
        key_burst: float = 1.0,
        key_wait_limit: float = 10.0,
    ) -> None:
        self.name = name
        self.slots = slots
        self.max_queued_per_requester = max_queued_per_requester
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.pacer = pacer
        self._key_buckets = Buckets(rate=key_rate, burst=key_burst) if key_rate > 0 else None
        self.key_wait_limit = key_wait_limit
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix=name)
        self._free = slots
        self._queues: collections.OrderedDict[
            str, collections.deque[tuple[Ticket, asyncio.Future[None]]]
        ] = collections.OrderedDict()
        self.queued = 0
        # Observability.
        self.calls = 0
        self.abandoned = 0
        self.rejected = 0

    @property
    def busy(self) -> int:
        return self.slots - self._free

    async def run(self, ticket: Ticket, fn: Callable[[], R], *, key: str = "") -> R:
        """Run ``fn`` on the lane's threads when ``ticket``'s turn comes."""
        queue = self._queues.get(ticket.requester)
        if (queue is not None and len(queue) >= self.max_queued_per_requester) or (
            self.queued >= self.max_queued
        ):
            self.rejected += 1
            raise self._error("too_many_requests", "too many upstream calls queued", 429)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if queue is None:
            queue = self._queues[ticket.requester] = collections.deque()
        queue.append((ticket, turn))
        self.queued += 1
        self._dispatch()
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.queue_timeout)
        except TimeoutError:
            if not turn.done():
                turn.cancel()  # still queued: _dispatch skips it
                raise self._error("queue_timeout", "the upstream queue is too slow", 503) from None
            raise
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release()  # granted in the meantime: give the slot back
            elif not turn.done():
                turn.cancel()
            raise
        try:
            await self._pace(key)
            self.calls += 1
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self._release()

    async def _pace(self, key: str) -> None:
        if self.pacer is not None:
            await self.pacer.wait()
        if self._key_buckets is not None and key:
            over = self._key_buckets.take(key)
            if over is not None:
                delay = over.wait_time()
                if delay > self.key_wait_limit:
                    raise self._error("too_many_requests", "upstream calls paced", 429)
                await asyncio.sleep(delay)
                over.take()

    def _release(self) -> None:
        self._free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots out round-robin over the requesters' queues."""
        while self._free > 0 and self.queued > 0:
            requester, queue = next(iter(self._queues.items()))
            ticket, turn = queue.popleft()
            self.queued -= 1
            if queue:
                self._queues.move_to_end(requester)  # its next call waits for the others
            else:
                del self._queues[requester]
            if turn.done():
                continue  # its waiter gave up (timeout, cancellation)
            if not ticket.wanted():
                self.abandoned += 1
                turn.set_exception(Abandoned())
                continue
            self._free -= 1
            turn.set_result(None)

    def _error(self, error: str, description: str, status: int) -> UpstreamError:
        return UpstreamError(
            error=error,
            description=f"{self.name}: {description}",
            status=status,
            retryable=True,
            retry_after=1 if status == 429 else 5,
            source=self.name,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
