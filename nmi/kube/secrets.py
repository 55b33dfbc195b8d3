"""Secrets of service-principal identities, read on demand and kept fresh.

nmi does not watch every Secret of the cluster: the first time an identity
needs one, a watch on that single Secret (field selector ``metadata.name``)
starts, and from then on the Secret is served from memory and refreshed the
moment it changes, so a rotated credential is used without a restart and
without a GET per request.  Watches of Secrets no identity used for a while
are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from .changes import ChangeSignal
from .informer import Informer, RawApi
from .objects import Secret

log = logging.getLogger(__name__)


class SecretUnavailable(Exception):
    """The Secret could not be read (API server unreachable, forbidden, timeout)."""


@dataclass
class _Watched:
    informer: Informer[Secret]
    task: asyncio.Task[None]
    last_used: float


class SecretStore:
    """``await get(namespace, name)`` -> the current Secret, or None if absent."""

    def __init__(
        self, *, api: RawApi, idle_after: float = 900.0, sync_timeout: float = 10.0
    ) -> None:
        self._api = api
        self._idle_after = idle_after
        self._sync_timeout = sync_timeout
        self._watched: dict[tuple[str, str], _Watched] = {}
        self._lock = asyncio.Lock()
        self.changed = ChangeSignal()

    async def get(self, namespace: str, name: str) -> Secret | None:
        key = (namespace, name)
        watched = self._watched.get(key)
        if watched is None:
            async with self._lock:
                watched = self._watched.get(key)
                if watched is None:
                    watched = self._start(namespace, name)
        watched.last_used = time.monotonic()
        informer = watched.informer
        if not informer.synced.is_set():
            # Wait for the first LIST, but answer at once when it fails (forbidden, unreachable).
            waiters = {
                asyncio.ensure_future(informer.synced.wait()),
                asyncio.ensure_future(informer.failed.wait()),
            }
            try:
                await asyncio.wait(
                    waiters, timeout=self._sync_timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if not informer.synced.is_set():
                why = informer.last_error or "timeout"
                raise SecretUnavailable(f"secret {namespace}/{name} not readable: {why}")
        return watched.informer.store.get(f"{namespace}/{name}")

    def peek(self, namespace: str, name: str) -> Secret | None:
        """The Secret if it is watched and synced (no waiting, no I/O), else None."""
        watched = self._watched.get((namespace, name))
        if watched is None or not watched.informer.synced.is_set():
            return None
        watched.last_used = time.monotonic()
        return watched.informer.store.get(f"{namespace}/{name}")

    def _start(self, namespace: str, name: str) -> _Watched:
        informer: Informer[Secret] = Informer(
            api=self._api,
            path=f"/api/v1/namespaces/{namespace}/secrets",
            parse=Secret.parse,
            name=f"secret {namespace}/{name}",
            field_selector=f"metadata.name={name}",
            backoff_max=10.0,
            handler=lambda *_: self.changed.fire(),
        )
        task = asyncio.create_task(informer.run(), name=f"watch-secret-{namespace}-{name}")
        watched = _Watched(informer=informer, task=task, last_used=time.monotonic())
        self._watched[(namespace, name)] = watched
        return watched

    async def expire_idle(self) -> int:
        """Stop watches of Secrets unused for ``idle_after`` seconds."""
        now = time.monotonic()
        stale = [k for k, w in self._watched.items() if now - w.last_used > self._idle_after]
        for key in stale:
            watched = self._watched.pop(key)
            watched.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watched.task
        return len(stale)

    async def run_janitor(self) -> None:
        while True:
            await asyncio.sleep(max(self._idle_after / 4, 1.0))
            await self.expire_idle()

    async def close(self) -> None:
        for watched in self._watched.values():
            watched.task.cancel()
        for watched in self._watched.values():
            with contextlib.suppress(asyncio.CancelledError):
                await watched.task
        self._watched.clear()
