"""A change signal: wake everyone waiting for "the next change", without polling.

Why its own module: the cluster view (``index``), the Secret store and the
controller's work queue all announce changes this way, and none of them should
import another to get it.
"""

from __future__ import annotations

import asyncio


class ChangeSignal:
    """Wakes every waiter on the next change; waiting costs no polling."""

    def __init__(self) -> None:
        self.generation = 0
        self._future: asyncio.Future[None] | None = None

    def fire(self) -> None:
        self.generation += 1
        fut, self._future = self._future, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Wait for the next change; False on timeout."""
        if timeout <= 0:
            return False
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            return False
        return True
