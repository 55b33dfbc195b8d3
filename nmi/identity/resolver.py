"""Turns a source IP and a request into a final identity decision.

The two waits of the request path live here, and both wait on the cluster
view's change signal rather than sleeping in a loop:

* the caller: a pod's IP appears in the watch a moment after the pod starts,
  so an unknown IP is given ``pod_lookup_timeout`` for it to show up;
* MIC: while an assignment is missing or ``Created`` the request re-decides on
  every change, bounded by ``--retry-attempts-for-created`` and
  ``--retry-attempts-for-assigned`` times ``--find-identity-retry-interval``;
* a new pod: pods, bindings and identities arrive on separate watches, so a
  pod created together with its binding can be seen first.  While a pod is
  younger than ``--new-pod-grace`` (from its ``creationTimestamp``), "nothing
  matches" is not final either: the request re-decides on every change until
  the pod is that old.  Older pods are refused at once.

The pod is re-read on every pass and must keep its UID: a pod that was deleted
or replaced while its request waited gets nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import Settings
from ..kube.index import ClusterIndex
from ..kube.objects import Pod
from .decide import Decision, Deny, IdentitySelector, ObjectIdOf, Wait, decide


@dataclass(frozen=True, slots=True)
class CallerProblem:
    """Why traffic from an IP cannot be attributed to exactly one pod."""

    kind: str  # "unknown" | "ambiguous"
    reason: str


class Resolver:
    def __init__(
        self, *, index: ClusterIndex, settings: Settings, object_id_of: ObjectIdOf
    ) -> None:
        self.index = index
        self.settings = settings
        self.object_id_of = object_id_of

    def caller_now(self, ip: str) -> Pod | CallerProblem:
        pods = self.index.pods_with_ip(ip)
        if len(pods) == 1:
            return pods[0]
        if pods:
            names = ", ".join(sorted(p.meta.key for p in pods))
            return CallerProblem("ambiguous", f"IP {ip} is claimed by several pods ({names})")
        return CallerProblem("unknown", f"no pod on node {self.index.node_name} has IP {ip}")

    async def caller(self, ip: str) -> Pod | CallerProblem:
        found = self.caller_now(ip)
        if not isinstance(found, CallerProblem) or found.kind != "unknown":
            return found
        deadline = time.monotonic() + self.settings.pod_lookup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if not await self.index.changed.wait(remaining):
                return found
            found = self.caller_now(ip)
            if not isinstance(found, CallerProblem) or found.kind != "unknown":
                return found

    def decide_now(self, pod: Pod, selector: IdentitySelector) -> Decision:
        return decide(
            index=self.index,
            settings=self.settings,
            pod=pod,
            selector=selector,
            object_id_of=self.object_id_of,
        )

    def _young_for(self, pod: Pod) -> float:
        """Seconds until ``pod`` is older than the new-pod grace (0: not young)."""
        grace = self.settings.new_pod_grace
        if grace <= 0 or not pod.created:
            return 0.0
        return max(0.0, min(grace, pod.created + grace - time.time()))

    async def resolve(self, pod: Pod, selector: IdentitySelector) -> tuple[Decision, float]:
        """The final decision, and the seconds spent waiting for MIC.

        A returned :class:`Wait` means the bound ran out.
        """
        started = time.monotonic()
        current = pod
        while True:
            decision = self.decide_now(current, selector)
            if isinstance(decision, Deny) and decision.kind == "not_found":
                grace = self._young_for(current)
                if grace <= 0 or not await self.index.changed.wait(grace):
                    return decision, time.monotonic() - started
                latest = self.index.pod(pod.meta.namespace, pod.meta.name)
                if latest is None or latest.meta.uid != pod.meta.uid or not latest.can_call:
                    return decision, time.monotonic() - started
                current = latest
                continue
            if not isinstance(decision, Wait):
                return decision, time.monotonic() - started
            bound = (
                self.settings.wait_for_created
                if decision.stage == "created"
                else self.settings.wait_for_assigned
            )
            remaining = started + bound - time.monotonic()
            if remaining <= 0 or not await self.index.changed.wait(remaining):
                if remaining > 0:
                    # The signal timed out: decide one last time on the final view.
                    decision = self.decide_now(current, selector)
                return decision, time.monotonic() - started
            latest = self.index.pod(pod.meta.namespace, pod.meta.name)
            if latest is None or latest.meta.uid != pod.meta.uid or not latest.can_call:
                return Deny(
                    "not_found", "the pod went away while waiting"
                ), time.monotonic() - started
            current = latest
