"""Token buckets: pacing calls to the node IMDS, and fairness between pods.

Azure allows a VM 20 managed-identity token requests per second and 5 at
once; beyond that IMDS answers 429.  nmi paces its own IMDS calls below
that (:class:`Pacer`, queueing, never failing) so pods never see those 429s
because of each other.  Per pod, a :class:`Buckets` keyed by pod UID caps the
requests that can cost upstream work or waiting, so one looping pod cannot
starve the rest.  Only requests that would cost upstream calls or a wait
spend the budget; cache hits never do.  Over its budget a pod gets 429 with
``Retry-After`` at once — never a hang.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("_clock", "_last", "burst", "rate", "tokens")

    def __init__(self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until one token is available."""
        self._refill()
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def retry_after(self) -> int:
        return max(1, math.ceil(self.wait_time()))


class Pacer:
    """Waits (in order of arrival) until a call may go out at ``rate`` per second."""

    def __init__(self, *, rate: float, burst: float) -> None:
        self._bucket = TokenBucket(rate=rate, burst=burst)
        self._lock = asyncio.Lock()
        self.waited = 0.0

    async def wait(self) -> None:
        async with self._lock:
            while not self._bucket.take():
                delay = self._bucket.wait_time()
                self.waited += delay
                await asyncio.sleep(delay)


class Buckets:
    """One token bucket per key (pod UID), the least recently used forgotten first."""

    def __init__(self, *, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.limited = 0

    def take(self, key: str) -> TokenBucket | None:
        """None when allowed; else the (empty) bucket, for its Retry-After."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(rate=self.rate, burst=self.burst)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if bucket.take():
            return None
        self.limited += 1
        return bucket
