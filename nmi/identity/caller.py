"""Who is calling: the one pod of this node that sent traffic from an IP.

Why its own module: attributing a connection to a pod is the first security
decision of every request, and it must be the same on the synchronous
cache-hit path, on the full path (which may wait a moment for a new pod's IP
to appear in the watch) and in ``nmi explain``.

An IP alone is not enough.  The network plugin frees a pod's IP before the API
server shows the pod gone, and a new sandbox can get that IP at once: by IP it
would be the old pod, with the old pod's identity.  So each pod is also pinned
to what the node can see of it — the host-side interface its traffic arrives
through (its veth; ``ifindex`` of the connection, see ``imds/listener.py``) —
when it is first seen: from the node's /32 route to its IP when the pod
appears (:meth:`Callers.hint`), else from its first connection.  Traffic from
the pod's IP through another interface is refused ("moved") until the API
server catches up: the old pod is gone or its containers have ended (then the
IP's new owner is pinned afresh), or — a recreated sandbox of the same pod —
its object has changed since the move was first seen and it is Ready again.
Nothing else moves a pin: refusing is the safe side.  A terminating pod is
served only through the interface it was pinned to while it ran (its shutdown
may need a token), never pinned afresh.  On a shared bridge
(kubenet) every pod arrives through the same interface and pinning adds
nothing: that residual risk is documented with the network plugins.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..config import Settings
from ..kube.index import ClusterIndex
from ..kube.objects import Pod

log = logging.getLogger(__name__)

MAX_PINS = 65536


@dataclass(frozen=True, slots=True)
class CallerProblem:
    """Why traffic from an IP cannot be attributed to exactly one pod."""

    kind: str  # "unknown" | "ambiguous" | "moved" | "terminating"
    reason: str


@dataclass(slots=True)
class _Pin:
    ifindex: int
    resource_version: str  # of the pod object when pinned
    moved_to: int = 0  # the other interface traffic arrived through, if any
    moved_version: str = ""  # the pod's resourceVersion when the move was first seen


class Callers:
    """IP (and arrival interface) -> the calling pod, on the node's live view."""

    def __init__(self, *, index: ClusterIndex, settings: Settings) -> None:
        self.index = index
        self.settings = settings
        self._pins: dict[tuple[str, str], _Pin] = {}
        self.moved = 0  # refusals: an IP arriving through another interface

    def now(self, ip: str, ifindex: int = 0) -> Pod | CallerProblem:
        """The caller on the current view (dictionary reads; a pin is written once)."""
        pods = self.index.pods_with_ip(ip)
        if len(pods) != 1:
            if pods:
                names = ", ".join(sorted(p.meta.key for p in pods))
                return CallerProblem("ambiguous", f"IP {ip} is claimed by several pods ({names})")
            return CallerProblem("unknown", f"no pod on node {self.index.node_name} has IP {ip}")
        pod = pods[0]
        if not ifindex:  # no arrival interface known (IPv6, a test transport)
            if pod.meta.deleting:
                return CallerProblem("terminating", f"pod {pod.meta.key} is terminating")
            return pod
        pin = self._pins.get((pod.meta.uid_or_key, ip))
        if pin is None:
            if pod.meta.deleting:
                # A terminating pod is served through the interface it had while it ran
                # (its shutdown may need a token), never pinned afresh: by now its IP
                # may belong to a new sandbox.
                return CallerProblem(
                    "terminating", f"pod {pod.meta.key} is terminating and was never seen calling"
                )
            self._pin(pod, ip, ifindex)
            return pod
        if pin.ifindex == ifindex:
            return pod
        return self._moved(pod, pin, ip, ifindex)

    def _moved(self, pod: Pod, pin: _Pin, ip: str, ifindex: int) -> Pod | CallerProblem:
        if pin.moved_to != ifindex:
            pin.moved_to = ifindex
            pin.moved_version = pod.meta.resource_version
            log.warning(
                "traffic from %s (pod %s) arrives through interface %d, pinned to %d: refused "
                "until the API server catches up",
                ip,
                pod.meta.key,
                ifindex,
                pin.ifindex,
            )
        elif pod.meta.resource_version != pin.moved_version and pod.ready:
            # The API server has seen the pod since, and it is Ready: a recreated sandbox.
            log.info("pod %s re-pinned to interface %d", pod.meta.key, ifindex)
            self._pin(pod, ip, ifindex)
            return pod
        self.moved += 1
        return CallerProblem(
            "moved",
            f"IP {ip} of pod {pod.meta.key} arrives through another interface than the pod's "
            "(its IP may have been given to a new pod before the API server shows it)",
        )

    def _pin(self, pod: Pod, ip: str, ifindex: int) -> None:
        if len(self._pins) >= MAX_PINS:
            self.prune()
        self._pins[(pod.meta.uid_or_key, ip)] = _Pin(ifindex, pod.meta.resource_version)

    def hint(self, pod: Pod, ip: str, ifindex: int) -> None:
        """Pin a pod that has not called yet to the interface the node routes its IP to."""
        if ifindex and (pod.meta.uid_or_key, ip) not in self._pins:
            self._pin(pod, ip, ifindex)

    def pinned(self, pod: Pod, ip: str) -> int:
        pin = self._pins.get((pod.meta.uid_or_key, ip))
        return pin.ifindex if pin is not None else 0

    def prune(self) -> int:
        """Forget the pins of pods (or pod IPs) that are gone."""
        alive = {(p.meta.uid_or_key, ip) for p in self.index.pods() for ip in p.ips}
        gone = [key for key in self._pins if key not in alive]
        for key in gone:
            del self._pins[key]
        return len(gone)

    async def wait(self, ip: str, ifindex: int = 0) -> Pod | CallerProblem:
        """The caller, giving an unknown IP ``pod_lookup_timeout`` to appear in the watch:
        a pod's IP reaches the API server a moment after the pod starts sending."""
        found = self.now(ip, ifindex)
        if not isinstance(found, CallerProblem) or found.kind != "unknown":
            return found
        deadline = time.monotonic() + self.settings.pod_lookup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if not await self.index.changed.wait(remaining):
                return found
            found = self.now(ip, ifindex)
            if not isinstance(found, CallerProblem) or found.kind != "unknown":
                return found
