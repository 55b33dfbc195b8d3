"""The start-up taint: no pod is scheduled on a new node before nmi guards it.

Why: pods that start on a node before nmi has installed its rules talk to the
node's IMDS directly — the node's identity, to any pod.  Cilium solves the same
race with ``node.cilium.io/agent-not-ready``: node pools are created with a
taint that only the agent's DaemonSet tolerates, and the agent removes it from
its node once it works.  nmi does the same with ``--startup-taint``: once the
interception is installed and verified, it removes that taint from its own node
(a JSON patch guarded by the node's resourceVersion, retried on conflict).
RBAC: ``get`` and ``patch`` on nodes.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import aiohttp

log = logging.getLogger(__name__)

ATTEMPTS = 5


class NodeApi(Protocol):
    async def get(
        self, path: str, params: list[tuple[str, str]], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse: ...

    async def patch(
        self,
        path: str,
        body: Any,
        *,
        content_type: str = ...,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse: ...


class TaintError(Exception):
    pass


async def remove_startup_taint(api: NodeApi, node: str, key: str) -> bool:
    """Remove every taint with ``key`` from ``node``; True when one was removed."""
    path = f"/api/v1/nodes/{node}"
    timeout = aiohttp.ClientTimeout(total=30)
    for _ in range(ATTEMPTS):
        resp = await api.get(path, [], timeout=timeout)
        async with resp:
            body = await resp.read()
            if resp.status != 200:
                raise TaintError(f"GET node {node}: HTTP {resp.status}")
        doc = json.loads(body)
        taints = (doc.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if not (isinstance(t, dict) and t.get("key") == key)]
        if len(kept) == len(taints):
            return False
        version = (doc.get("metadata") or {}).get("resourceVersion", "")
        patch = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": version},
            {"op": "replace", "path": "/spec/taints", "value": kept},
        ]
        resp = await api.patch(path, patch, timeout=timeout)
        async with resp:
            detail = await resp.read()
            if resp.status == 200:
                log.info("start-up taint %s removed from node %s", key, node)
                return True
            if resp.status not in (409, 422):  # a lost race with another writer: again
                raise TaintError(f"PATCH node {node}: HTTP {resp.status}: {detail[:200]!r}")
    raise TaintError(f"node {node} kept changing; taint {key} not removed")
