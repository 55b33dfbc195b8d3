"""Leader election on a ``coordination.k8s.io/v1`` Lease: exactly one replica acts.

The algorithm of client-go's ``leaderelection`` on a Lease:

* a candidate reads the Lease; absent, it creates it as its holder; held by
  another, it takes it over only once the record has not changed for a whole
  ``leaseDurationSeconds`` *as observed on its own clock* (no trust in the
  other's clock), with ``leaseTransitions`` + 1; every write carries the
  ``resourceVersion`` read, so two candidates cannot both win (409);
* the holder renews every ``retry_period``; it *is* the leader only while its
  last successful renewal is younger than ``renew_deadline`` (half the lease
  duration).  So a leader cut off from the API server stops acting at most
  ``renew_deadline`` after its last renewal — before any other replica can
  take the lease, which needs a full ``leaseDurationSeconds`` without a change;
* on a clean stop the holder releases the Lease (empty holder, duration 1 s)
  so that another replica takes over at once.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

JSON = dict[str, Any]


def micro_time(when: float | None = None) -> str:
    """``metav1.MicroTime``: RFC 3339 with exactly six fractional digits, UTC."""
    moment = datetime.datetime.fromtimestamp(time.time() if when is None else when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        *,
        api: Any,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float,
        renew_deadline: float,
        retry_period: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._clock = clock
        self._renewed_at: float | None = None
        self._observed: tuple[str, float] | None = None  # (record, when first seen)
        self.elected = asyncio.Event()
        self.lost = asyncio.Event()
        self.transitions = 0  # times this replica became the leader
        self.holder = ""
        self._timeout = aiohttp.ClientTimeout(total=max(1.0, retry_period))

    def is_leader(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and self._clock() - renewed < self.renew_deadline

    async def run(self) -> None:
        """Campaign, then hold; on losing the lease set ``lost`` and campaign again."""
        while True:
            try:
                held = await self._try()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log.warning("leader election: %s", exc)
                held = False
            if held:
                if not self.elected.is_set():
                    self.transitions += 1
                    self.lost.clear()
                    self.elected.set()
                    log.info("became the leader (lease %s/%s)", self.namespace, self.name)
            elif self.elected.is_set() and not self.is_leader():
                self._step_down()
            await asyncio.sleep(self.retry_period)
            if self.elected.is_set() and not self.is_leader():
                self._step_down()

    def _step_down(self) -> None:
        log.error("lost the lease %s/%s: not acting any more", self.namespace, self.name)
        self.elected.clear()
        self._renewed_at = None
        self.lost.set()

    async def _try(self) -> bool:
        now_wall = time.time()
        resp = await self.api.get(self.path, [], timeout=self._timeout)
        async with resp:
            body = await resp.read()
            status = resp.status
        if status == 404:
            created = await self._write(
                "POST",
                self.collection,
                self._lease(None, now_wall, transitions=0, acquire=now_wall),
            )
            return created
        if status != 200:
            raise ValueError(f"GET lease: HTTP {status}")
        lease = json.loads(body)
        spec = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        self.holder = holder
        record = json.dumps(spec, sort_keys=True)
        now = self._clock()
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, now)
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        expired = now - self._observed[1] >= duration
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            acquire = spec.get("acquireTime")
            return await self._write(
                "PUT", self.path, self._lease(lease, now_wall, transitions, acquire_raw=acquire)
            )
        if holder and not expired:
            return False
        return await self._write(
            "PUT", self.path, self._lease(lease, now_wall, transitions + 1, acquire=now_wall)
        )

    def _lease(
        self,
        current: JSON | None,
        now: float,
        transitions: int,
        *,
        acquire: float | None = None,
        acquire_raw: Any = None,
    ) -> JSON:
        metadata: JSON = {"name": self.name, "namespace": self.namespace}
        if current is not None:
            metadata["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration)),
                "acquireTime": micro_time(acquire) if acquire is not None else acquire_raw,
                "renewTime": micro_time(now),
                "leaseTransitions": transitions,
            },
        }

    async def _write(self, verb: str, path: str, body: JSON) -> bool:
        started = self._clock()
        call = self.api.post if verb == "POST" else self.api.put
        resp = await call(path, body, timeout=self._timeout)
        async with resp:
            await resp.read()
            if resp.status in (200, 201):
                self._renewed_at = started  # counted from before the request left
                self.holder = self.identity
                return True
            if resp.status == 409:  # another replica wrote first
                return False
            raise ValueError(f"{verb} lease: HTTP {resp.status}")

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), if this replica holds it."""
        if not self.is_leader():
            return
        self.elected.clear()
        self._renewed_at = None
        try:
            resp = await self.api.get(self.path, [], timeout=self._timeout)
            async with resp:
                lease = json.loads(await resp.read())
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update({"holderIdentity": "", "leaseDurationSeconds": 1})
            put = await self.api.put(self.path, lease, timeout=self._timeout)
            async with put:
                await put.read()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            log.warning("lease not released: %s", exc)
