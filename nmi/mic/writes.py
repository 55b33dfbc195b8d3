"""The controller's Kubernetes writes: paced, bounded, and only by the leader.

Why its own module: every write the controller makes goes through one door so
that three rules hold for all of them —

* **fencing**: a write is made only while this replica holds the lease
  (``is_leader()``, which turns false before the lease could expire for the
  others: see ``leader.py``); otherwise :class:`NotLeader` is raised and
  nothing is sent;
* **pacing**: at most ``--clientQps`` writes per second (a token bucket) and
  ``--createDeleteBatch`` in flight;
* **accounting**: each write is counted and timed for aad-pod-identity's
  metrics, and a failed one is an error with the API server's status.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from ..ratelimit import Pacer

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


class WriteApi(Protocol):
    async def post(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse: ...

    async def put(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse: ...

    async def patch(
        self,
        path: str,
        body: Any,
        *,
        content_type: str = ...,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse: ...

    async def delete(
        self, path: str, *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse: ...


class NotLeader(Exception):
    """This replica does not hold the lease: it must not write."""


class WriteFailed(Exception):
    def __init__(self, verb: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{verb} {path}: HTTP {status}: {message}")
        self.status = status


class Writes:
    def __init__(
        self,
        *,
        api: WriteApi,
        qps: float,
        in_flight: int,
        is_leader: Callable[[], bool],
        observe: Callable[[str, float, bool], None] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.api = api
        self._pacer = Pacer(rate=qps, burst=max(1.0, qps))
        self._slots = asyncio.Semaphore(in_flight)
        self._is_leader = is_leader
        self._observe = observe
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.count = 0

    async def _send(self, what: str, verb: str, path: str, call: Any) -> JSON | None:
        async with self._slots:
            await self._pacer.wait()
            if not self._is_leader():
                raise NotLeader()
            started = time.monotonic()
            error = True
            try:
                resp = await call()
                async with resp:
                    body = await resp.read()
                    if resp.status == 404 and verb in ("DELETE", "PATCH"):
                        error = False
                        return None  # already gone: what we wanted
                    if resp.status >= 300:
                        raise WriteFailed(verb, path, resp.status, _message(body))
                error = False
                self.count += 1
                doc = json.loads(body) if body else None
                return doc if isinstance(doc, dict) else None
            finally:
                if self._observe is not None:
                    self._observe(what, time.monotonic() - started, error)

    async def create(self, what: str, path: str, body: JSON | Callable[[], JSON]) -> JSON | None:
        """POST ``body`` — or what ``body()`` returns when its turn comes: a create that
        waited for its turn says what is true when it is sent (an assignment whose identity
        reached the VM meanwhile is created ``Assigned``: one write instead of two)."""
        return await self._send(
            what,
            "POST",
            path,
            lambda: self.api.post(path, body() if callable(body) else body, timeout=self._timeout),
        )

    async def replace(self, what: str, path: str, body: JSON) -> JSON | None:
        return await self._send(
            what, "PUT", path, lambda: self.api.put(path, body, timeout=self._timeout)
        )

    async def merge(self, what: str, path: str, patch: JSON) -> JSON | None:
        return await self._send(
            what,
            "PATCH",
            path,
            lambda: self.api.patch(path, patch, content_type=MERGE_PATCH, timeout=self._timeout),
        )

    async def delete(self, what: str, path: str) -> JSON | None:
        return await self._send(
            what, "DELETE", path, lambda: self.api.delete(path, timeout=self._timeout)
        )


def _message(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("message") or doc.get("reason") or "")[:300]
    except (ValueError, AttributeError):
        return body[:300].decode("utf-8", "replace")
