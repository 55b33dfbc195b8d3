"""Event-loop lag: how late the loop runs a timer.

Everything nmi does for a request happens on one event loop; anything that
blocks it (a synchronous call, heavy CPU) delays every pod at once.  A task
asks to be woken every ``interval`` and records how late it was woken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopLag:
    def __init__(self, *, interval: float = 0.25, observe: Callable[[float], None] | None = None):
        self.interval = interval
        self.observe = observe
        self.last = 0.0
        self.max = 0.0

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - started - self.interval)
            self.last = lag
            self.max = max(self.max, lag)
            if self.observe is not None:
                self.observe(lag)
