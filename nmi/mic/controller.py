"""The controller's reconcile: one pod at a time, from what it should have to what it has.

Watches put the keys of the pods a change concerns on a queue (``view.py``);
workers take one key at a time (a key queued again while it is being worked
on runs again afterwards) and bring that pod's AzureAssignedIdentities to
what :func:`desired.desired_for` says:

* a missing one is created — ``Assigned`` at once when its identity needs no
  ARM change (types other than 0, or a user-assigned identity the node's VM or
  scale set already carries), else ``Created`` — and the pod's need for the
  identity is told to the machine worker (``machines.py``), which puts the
  identity on the VM or scale set; when that is done, the pod is queued again
  and its assignment becomes ``Assigned``;
* one that says something else (the identity or binding changed, the pod is
  a new one of the same name on another node) is replaced;
* one that is not wanted any more (pod, binding or identity gone, label
  changed, node deleted) is deleted and its finalizer removed at once — the
  machine worker takes the identity off the VM or scale set when no pod there
  needs it, without holding the assignment back (no stuck finalizers:
  aad-pod-identity #644, #1151);
* a name clash between identities of one name in two namespaces is told to
  the pod in a Warning Event (aad-pod-identity #1065 kept one silently).

Every write goes through ``writes.Writes`` (leader only, paced, counted);
Events on bindings say ``binding applied`` / ``binding apply error`` as
aad-pod-identity's did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..azure.identities import IdentityFailure, IdentityState
from ..azure.provider_id import NodeResource, normalise_id
from ..kube.objects import (
    MIC_ERROR_ANNOTATION,
    MIC_STEP_ANNOTATION,
    AssignedState,
    AzureIdentityBinding,
    IdentityType,
    Pod,
)
from ..ops import events as ev
from .desired import ASSIGNED, CREATED, Clash, Desired, build, desired_for, matches
from .machines import Machines
from .metrics import MicMetrics
from .view import AssignmentView, ControllerView, PodKey, Record, pod_key
from .writes import NotLeader, WriteFailed, Writes

log = logging.getLogger(__name__)

CRD_PATH = "/apis/aadpodidentity.k8s.io/v1"
STEP_ANNOTATION = MIC_STEP_ANNOTATION
ERROR_ANNOTATION = MIC_ERROR_ANNOTATION
REMEMBERED_DELETES = 4096
BINDING_APPLIED = "binding applied"
BINDING_APPLY_ERROR = "binding apply error"
NAME_CLASH = "IdentityNameClash"


def assignment_path(namespace: str, name: str = "") -> str:
    base = f"{CRD_PATH}/namespaces/{namespace}/azureassignedidentities"
    return f"{base}/{name}" if name else base


@dataclass(frozen=True, slots=True)
class Need:
    machine: NodeResource
    identity: str  # normalised ARM id of the user-assigned identity


class Controller:
    def __init__(
        self,
        *,
        view: ControllerView,
        writes: Writes,
        machines: Machines,
        events: ev.EventRecorder | None,
        metrics: MicMetrics,
        force_namespaced: bool,
        workers: int = 8,
    ) -> None:
        self.view = view
        self.writes = writes
        self.machines = machines
        self.events = events
        self.metrics = metrics
        self.force_namespaced = force_namespaced
        self.nodes_synced = False
        self._workers = workers
        self._queue: asyncio.Queue[PodKey] = asyncio.Queue()
        self._queued: set[PodKey] = set()
        self._working: set[PodKey] = set()
        self._again: set[PodKey] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._needs: dict[PodKey, set[Need]] = {}
        self._need_pool: dict[tuple[str, str], Need] = {}
        # pod -> its assignments not yet Assigned -> when first wanted (the latency metric)
        self._wanted_since: dict[PodKey, dict[tuple[str, str], float]] = {}
        self._cycle_started: float | None = None
        self._deleted: dict[str, None] = {}  # uids deleted lately (the watch may lag)
        self.reconciles = 0
        self.idle = asyncio.Event()
        self.idle.set()

    # -- the queue ------------------------------------------------------------------

    def enqueue(self, keys: Iterable[PodKey]) -> None:
        """Queue pods for a reconcile.  What they need on their VMs and scale sets is told to
        the machine workers at once — not when the (paced) reconcile comes — so that a burst
        of pods becomes one ARM change per VM or scale set, not one per pacing interval."""
        for key in keys:
            self._refresh_needs(key)
            if key in self._working:
                self._again.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._queue.put_nowait(key)
                if self._cycle_started is None:
                    self._cycle_started = time.monotonic()
                self.idle.clear()

    def enqueue_all(self) -> None:
        self.enqueue(list(self.view.pods) + list(self.view.assigned_pods()))

    def start(self) -> None:
        for n in range(self._workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"mic-worker-{n}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queued.clear()
        self._working.clear()
        self._again.clear()
        self._needs.clear()
        self._wanted_since.clear()
        self.idle.set()

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._working.add(key)
            try:
                await self.reconcile(key)
            except NotLeader:
                pass
            except Exception:
                log.exception("reconcile of pod %s/%s failed; retrying", *key)
                asyncio.get_running_loop().call_later(5.0, self.enqueue, [key])
            finally:
                self._working.discard(key)
                self.reconciles += 1
                if key in self._again:
                    self._again.discard(key)
                    self.enqueue([key])
                if not self._queued and not self._working:
                    self._cycle_done()

    def _cycle_done(self) -> None:
        if self._cycle_started is not None:
            self.metrics.cycles.inc()
            self.metrics.cycle_seconds.observe(time.monotonic() - self._cycle_started)
            self._cycle_started = None
        self.idle.set()

    # -- one pod ------------------------------------------------------------------------

    async def reconcile(self, key: PodKey) -> None:
        pod = self.view.pods.get(key)
        desired, clashes = self._desired(pod)
        if pod is not None:
            for clash in clashes:
                self._event(
                    pod,
                    NAME_CLASH,
                    f"AzureIdentity {clash.dropped} is not assigned to this pod: its name clashes "
                    f"with AzureIdentity {clash.kept} (both would be AzureAssignedIdentity "
                    f"{clash.name}); rename one of them",
                )
        self._update_needs(key, desired)
        wanted_keys = {d.key for d in desired}
        since = self._wanted_since.get(key)
        if since is not None:  # only what the pod still wants is timed
            for gone in set(since) - wanted_keys:
                del since[gone]
        for record in self.view.assignments_of(key):
            a: AssignmentView = record.view
            akey = (a.meta.namespace, a.meta.name)
            if akey not in wanted_keys or a.meta.deleting:
                await self._delete(record)
        existing = {
            (r.view.meta.namespace, r.view.meta.name): r
            for r in self.view.assignments_of(key)
            if not r.view.meta.deleting
        }
        for d in desired:
            have = existing.get(d.key)
            ready = self._ready(d)
            if have is None:
                self._wanted_since.setdefault(key, {}).setdefault(d.key, time.monotonic())
                ready = await self._create(d)
            elif not matches(have, d):
                await self._replace(d, have, ASSIGNED if ready else CREATED)
            elif have.view.state != AssignedState.ASSIGNED and ready:
                await self._mark_assigned(d)
            if not ready:
                self._touch(d)
        if not self._wanted_since.get(key):
            self._wanted_since.pop(key, None)

    def _desired(self, pod: Pod | None) -> tuple[list[Desired], list[Clash]]:
        """The pod's assignments on nodes that exist, and the name clashes left out."""
        if pod is None:
            return [], []
        wanted, clashes = desired_for(self.view, pod, force_namespaced=self.force_namespaced)
        return [d for d in wanted if self._node_exists(d.node)], clashes

    def _refresh_needs(self, key: PodKey) -> None:
        self._update_needs(key, self._desired(self.view.pods.get(key))[0])

    def _node_exists(self, node: str) -> bool:
        """A deleted node's assignments go (no ARM call); before the nodes are known,
        every node counts as existing."""
        return not self.nodes_synced or node in self.view.nodes

    def _need_of(self, d: Desired) -> Need | None:
        identity = d.azure_identity
        if identity.type != IdentityType.USER_ASSIGNED_MSI or not identity.resource_id:
            return None
        info = self.view.nodes.get(d.node)
        if info is None or info.machine is None:
            return None
        key = (info.machine.key, identity.resource_id)
        need = self._need_pool.get(key)
        if need is None:  # one object per (machine, identity), shared by its pods
            if len(self._need_pool) > 100_000:
                self._need_pool.clear()
            need = self._need_pool[key] = Need(info.machine, normalise_id(identity.resource_id))
        return need

    def _update_needs(self, key: PodKey, desired: list[Desired]) -> None:
        now = {n for n in (self._need_of(d) for d in desired) if n is not None}
        before = self._needs.get(key, set())
        for need in before - now:
            if self._machine_has_nodes(need.machine):
                self.machines.need(need.machine, need.identity, -1)
            else:
                # The VM (or every node of the scale set) is gone: its identities go with
                # it, and no ARM call is made for a machine that has no node any more.
                self.machines.forget(need.machine)
        for need in now - before:
            self.machines.need(need.machine, need.identity, +1)
        if now:
            self._needs[key] = now
        else:
            self._needs.pop(key, None)

    def _machine_has_nodes(self, machine: NodeResource) -> bool:
        if not self.nodes_synced:
            return True
        return any(
            info.machine is not None and info.machine.key == machine.key
            for info in self.view.nodes.values()
        )

    def _ready(self, d: Desired) -> bool:
        """Whether the identity is usable on the pod's node without an ARM change."""
        identity = d.azure_identity
        if identity.type != IdentityType.USER_ASSIGNED_MSI:
            return True  # service principals (and federation) need nothing on the VM
        need = self._need_of(d)
        return need is not None and self.machines.present(need.machine, need.identity)

    def _touch(self, d: Desired) -> None:
        need = self._need_of(d)
        if need is not None:
            self.machines.touch(need.machine)
            return
        identity = d.azure_identity
        info = self.view.nodes.get(d.node)
        if not identity.resource_id:
            why = (
                f"AzureIdentity {identity.meta.key} (type 0) has no spec.resourceID: the "
                f"controller cannot put it on node {d.node}"
            )
        elif info is None or info.machine is None:
            why = (
                f"node {d.node} is not an Azure VM or scale-set instance (providerID "
                f"{info.provider_id if info else 'unknown'!r}): identity {identity.meta.key} "
                "cannot be put on it"
            )
        else:
            return
        self._binding_event(d.binding, BINDING_APPLY_ERROR, why, warning=True)

    # -- the writes ---------------------------------------------------------------------

    async def _create(self, d: Desired) -> bool:
        """Create the assignment, ``Assigned`` if its identity is usable on the node when the
        write's turn comes, else ``Created``; returns whether it was created ``Assigned``."""
        sent: list[str] = []

        def body() -> dict[str, Any]:
            status = ASSIGNED if self._ready(d) else CREATED
            sent.append(status)
            obj = build(d, status=status)
            if status == CREATED:
                obj["metadata"]["annotations"] = {STEP_ANNOTATION: self._step(d)}
            return obj

        try:
            self.view.wrote(await self.writes.create("create", assignment_path(d.namespace), body))
        except WriteFailed as exc:
            if exc.status != 409:
                raise
            return True  # our watch has not shown it yet: the event brings the pod back
        status = sent[-1] if sent else CREATED
        log.info(
            "AzureAssignedIdentity %s/%s created (%s)",
            d.namespace,
            d.name,
            status,
            extra={"fields": {"pod": d.pod.meta.key, "node": d.node}},
        )
        if status == ASSIGNED:
            self._assigned(d)
        return status == ASSIGNED

    async def _replace(self, d: Desired, record: Record, status: str) -> None:
        body = build(d, status=status, existing=record.view)
        if status == CREATED:
            body["metadata"].setdefault("annotations", {})[STEP_ANNOTATION] = self._step(d)
        else:
            for key in (STEP_ANNOTATION, ERROR_ANNOTATION):
                (body["metadata"].get("annotations") or {}).pop(key, None)
        self.view.wrote(
            await self.writes.replace("update", assignment_path(d.namespace, d.name), body)
        )
        if status == ASSIGNED:
            self._assigned(d)

    async def _mark_assigned(self, d: Desired) -> None:
        written = await self.writes.merge(
            "status",
            assignment_path(d.namespace, d.name),
            {
                "status": {"status": ASSIGNED},
                "metadata": {"annotations": {STEP_ANNOTATION: None, ERROR_ANNOTATION: None}},
            },
        )
        self.view.wrote(written)
        self._assigned(d)

    def _assigned(self, d: Desired) -> None:
        pending = self._wanted_since.get(pod_key(d.pod))
        since = pending.pop(d.key, None) if pending is not None else None
        if since is not None:
            self.metrics.assignment_latency.observe(time.monotonic() - since)
        self._binding_event(
            d.binding,
            BINDING_APPLIED,
            f"Binding {d.binding.view.meta.name} applied on node {d.node} for pod "
            f"{d.pod.meta.name}",
        )

    async def _delete(self, record: Record) -> None:
        a: AssignmentView = record.view
        if a.meta.uid and a.meta.uid in self._deleted:
            return  # done already; the watch has not shown it yet
        path = assignment_path(a.meta.namespace, a.meta.name)
        if not a.meta.deleting:
            await self.writes.delete("delete", path)
        if a.finalizers:
            await self.writes.merge("finalizer", path, {"metadata": {"finalizers": None}})
        if a.meta.uid:
            self._deleted[a.meta.uid] = None
            if len(self._deleted) > REMEMBERED_DELETES:
                del self._deleted[next(iter(self._deleted))]
        log.info("AzureAssignedIdentity %s/%s deleted", a.meta.namespace, a.meta.name)

    def _step(self, d: Desired) -> str:
        need = self._need_of(d)
        if need is None:
            return "waiting: the identity cannot be put on this node (see the binding's Events)"
        kind = "scale set" if need.machine.kind == "vmss" else "VM"
        return f"waiting for the {kind} {need.machine.name} to carry the identity"

    # -- what the machine workers report ---------------------------------------------

    async def machine_done(self, machine_key: str, state: IdentityState) -> None:
        """A VM or scale set has its identities: queue the pods waiting on it."""
        waiting: set[PodKey] = set()
        for info in self.view.nodes.values():
            if info.machine is None or info.machine.key != machine_key:
                continue
            for record in self.view.assignments_on(info.name):
                a: AssignmentView = record.view
                if a.state != AssignedState.ASSIGNED and not a.meta.deleting:
                    waiting.add((a.pod_namespace, a.pod))
        self.enqueue(waiting)

    async def machine_failed(self, machine_key: str, failures: dict[str, IdentityFailure]) -> None:
        """ARM refused some identities: tell each binding that asked for one of them, and why
        (a Warning Event), and each waiting assignment (its ``mic-error`` annotation, which
        ``nmi explain`` shows)."""
        told: set[str] = set()
        for key, needs in list(self._needs.items()):
            refused = {n.identity for n in needs if n.machine.key == machine_key} & set(failures)
            pod = self.view.pods.get(key)
            if not refused or pod is None:
                continue
            desired, _ = desired_for(self.view, pod, force_namespaced=self.force_namespaced)
            for d in desired:
                need = self._need_of(d)
                if need is None or need.identity not in refused:
                    continue
                failure = failures[need.identity]
                why = f"ARM {failure.status} {failure.code}: {failure.message}"[:1000]
                await self._annotate_error(d, why)
                if d.binding.view.meta.key in told:
                    continue
                told.add(d.binding.view.meta.key)
                self._binding_event(
                    d.binding,
                    BINDING_APPLY_ERROR,
                    f"AzureIdentity {d.azure_identity.meta.key} could not be put on "
                    f"{need.machine.resource_id}: ARM {failure.status} {failure.code}: "
                    f"{failure.message}",
                    warning=True,
                )

    async def machine_error(self, machine_key: str, message: str) -> None:
        """A VM's or scale set's worker failed (credentials, ARM unreachable, throttling):
        say so on the assignments waiting for it."""
        for info in list(self.view.nodes.values()):
            if info.machine is None or info.machine.key != machine_key:
                continue
            for record in self.view.assignments_on(info.name):
                a: AssignmentView = record.view
                await self._annotate((a.meta.namespace, a.meta.name), message)

    async def _annotate_error(self, d: Desired, why: str) -> None:
        await self._annotate(d.key, why)

    async def _annotate(self, key: tuple[str, str], why: str) -> None:
        record = self.view.assignments.get(key)
        if record is None or record.view.state == AssignedState.ASSIGNED:
            return
        if record.view.meta.deleting or record.view.meta.annotations.get(ERROR_ANNOTATION) == why:
            return  # gone, or said already: no write
        with contextlib.suppress(WriteFailed, NotLeader):
            written = await self.writes.merge(
                "annotate",
                assignment_path(*key),
                {"metadata": {"annotations": {ERROR_ANNOTATION: why}}},
            )
            self.view.wrote(written)

    # -- Events ---------------------------------------------------------------------------

    def _event(self, pod: Pod, reason: str, message: str) -> None:
        if self.events is not None:
            self.events.record(pod, reason=reason, message=message, action="Assign")

    def _binding_event(
        self, binding: Record, reason: str, message: str, *, warning: bool = False
    ) -> None:
        if self.events is None:
            return
        b: AzureIdentityBinding = binding.view
        self.events.record(
            ev.Involved(
                "AzureIdentityBinding",
                "aadpodidentity.k8s.io/v1",
                b.meta.namespace,
                b.meta.name,
                b.meta.uid,
            ),
            reason=reason,
            message=message,
            type=ev.WARNING if warning else ev.NORMAL,
            action="Assign",
        )
