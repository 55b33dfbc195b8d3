"""Who is calling: the one pod of this node that sent traffic from an IP.

Why its own module: attributing a connection to a pod is the first security
decision of every request, and it must be the same on the synchronous
cache-hit path, on the full path (which may wait a moment for a new pod's IP
to appear in the watch) and in ``nmi explain``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import Settings
from ..kube.index import ClusterIndex
from ..kube.objects import Pod


@dataclass(frozen=True, slots=True)
class CallerProblem:
    """Why traffic from an IP cannot be attributed to exactly one pod."""

    kind: str  # "unknown" | "ambiguous"
    reason: str


class Callers:
    """IP -> the calling pod, on the node's live view."""

    def __init__(self, *, index: ClusterIndex, settings: Settings) -> None:
        self.index = index
        self.settings = settings

    def now(self, ip: str) -> Pod | CallerProblem:
        """The caller on the current view (a dictionary read)."""
        pods = self.index.pods_with_ip(ip)
        if len(pods) == 1:
            return pods[0]
        if pods:
            names = ", ".join(sorted(p.meta.key for p in pods))
            return CallerProblem("ambiguous", f"IP {ip} is claimed by several pods ({names})")
        return CallerProblem("unknown", f"no pod on node {self.index.node_name} has IP {ip}")

    async def wait(self, ip: str) -> Pod | CallerProblem:
        """The caller, giving an unknown IP ``pod_lookup_timeout`` to appear in the watch:
        a pod's IP reaches the API server a moment after the pod starts sending."""
        found = self.now(ip)
        if not isinstance(found, CallerProblem) or found.kind != "unknown":
            return found
        deadline = time.monotonic() + self.settings.pod_lookup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if not await self.index.changed.wait(remaining):
                return found
            found = self.now(ip)
            if not isinstance(found, CallerProblem) or found.kind != "unknown":
                return found
