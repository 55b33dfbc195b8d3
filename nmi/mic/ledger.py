"""What the controller added to each VM and scale set, kept where a new leader finds it.

Why: aad-pod-identity removed an identity from a VM or scale set whenever no
assignment on it used the identity any more — also one a person had put
there for another purpose.  nmi's controller removes only what it added
itself, so it must remember what that was across restarts and leader
changes: a ConfigMap (``nmi-mic-ledger`` in the controller's namespace), one
key per VM or scale set (a hash of its ARM id; the value holds the id and
the identities added).  An identity is recorded *before* the PATCH that adds
it (a controller that dies in between then still owns it: the identity is
never left behind) and forgotten after the PATCH that removes it.  Writes
carry the ConfigMap's resourceVersion and are retried on conflict; only the
leader writes (the same fencing as every other write).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp

from ..kube.informer import RawApi
from .writes import WriteFailed, Writes

log = logging.getLogger(__name__)

ATTEMPTS = 5


def ledger_key(resource_id: str) -> str:
    """A ConfigMap key for a VM's or scale set's ARM id (keys allow [-._a-zA-Z0-9])."""
    return "m-" + hashlib.sha256(resource_id.lower().encode()).hexdigest()[:24]


class Ledger:
    def __init__(self, *, api: RawApi, writes: Writes, namespace: str, name: str) -> None:
        self.api = api
        self.writes = writes
        self.namespace = namespace
        self.name = name
        self.path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        self._added: dict[str, set[str]] = {}  # resource id (normalised) -> identity ids
        self._version = ""
        self._exists = False

    def machines(self) -> list[str]:
        """The VMs and scale sets (normalised ARM ids) that have identities recorded."""
        return [k for k, v in self._added.items() if v]

    def added(self, resource_id: str) -> frozenset[str]:
        return frozenset(self._added.get(resource_id.lower(), ()))

    async def load(self) -> None:
        resp = await self.api.get(self.path, [], timeout=aiohttp.ClientTimeout(total=30))
        async with resp:
            body = await resp.read()
            if resp.status == 404:
                self._added, self._version, self._exists = {}, "", False
                return
            if resp.status != 200:
                raise WriteFailed(
                    "GET", self.path, resp.status, body[:200].decode(errors="replace")
                )
        doc = json.loads(body)
        self._version = str((doc.get("metadata") or {}).get("resourceVersion") or "")
        self._exists = True
        added: dict[str, set[str]] = {}
        for value in (doc.get("data") or {}).values():
            try:
                entry = json.loads(value)
                added[str(entry["resource"]).lower()] = {str(i).lower() for i in entry["added"]}
            except (ValueError, KeyError, TypeError):
                log.warning(
                    "ledger %s/%s: an unreadable entry was skipped", self.namespace, self.name
                )
        self._added = added

    async def record(
        self, resource_id: str, *, add: Iterable[str] = (), forget: Iterable[str] = ()
    ) -> None:
        """Add and forget identities of one VM or scale set, durably."""
        add, forget = {a.lower() for a in add}, {f.lower() for f in forget}
        if not add and not forget:
            return
        key = resource_id.lower()
        for _ in range(ATTEMPTS):
            current = set(self._added.get(key, ()))
            updated = (current | add) - forget
            if updated == current:
                return
            try:
                await self._write(key, resource_id, updated)
                return
            except WriteFailed as exc:
                if exc.status not in (409, 404):
                    raise
                await self.load()  # somebody else wrote (or the map went): read again
        raise WriteFailed("PUT", self.path, 409, "the ledger kept changing")

    async def _write(self, key: str, resource_id: str, identities: set[str]) -> None:
        data = {
            ledger_key(k): json.dumps({"resource": k, "added": sorted(v)}, separators=(",", ":"))
            for k, v in self._added.items()
            if k != key and v
        }
        if identities:
            data[ledger_key(key)] = json.dumps(
                {"resource": resource_id.lower(), "added": sorted(identities)},
                separators=(",", ":"),
            )
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "data": data,
        }
        if self._exists:
            body["metadata"]["resourceVersion"] = self._version
            doc = await self.writes.replace("ledger", self.path, body)
        else:
            doc = await self.writes.create(
                "ledger", f"/api/v1/namespaces/{self.namespace}/configmaps", body
            )
        self._exists = True
        self._version = str(((doc or {}).get("metadata") or {}).get("resourceVersion") or "")
        if identities:
            self._added[key] = set(identities)
        else:
            self._added.pop(key, None)
