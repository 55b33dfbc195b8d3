"""The identity decision, waited for while the controller catches up.

The waits of the request path live here, and all wait on the cluster view's
change signal rather than sleeping in a loop:

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

from ..config import Settings
from ..kube.index import ClusterIndex
from ..kube.objects import Pod
from .decide import Decision, Deny, IdentitySelector, ObjectIdOf, Wait, decide


class Resolver:
    """Decides (``decide_now``) and waits for a final decision (``resolve``)."""

    def __init__(
        self, *, index: ClusterIndex, settings: Settings, object_id_of: ObjectIdOf
    ) -> None:
        self.index = index
        self.settings = settings
        self.object_id_of = object_id_of

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
            if remaining <= 0:
                return decision, time.monotonic() - started
            # Woken by a change, or after at most the grace: an assignment whose binding
            # or identity has not arrived is pending only for that long (see decide).
            step = min(remaining, self.settings.new_pod_grace or remaining)
            if not await self.index.changed.wait(step):
                if step >= remaining:
                    # The signal timed out: decide one last time on the final view.
                    return self.decide_now(current, selector), time.monotonic() - started
                continue
            latest = self.index.pod(pod.meta.namespace, pod.meta.name)
            if latest is None or latest.meta.uid != pod.meta.uid or not latest.can_call:
                return Deny(
                    "not_found", "the pod went away while waiting"
                ), time.monotonic() - started
            current = latest
