"""Which identity may this pod use for this request? Pure logic, no I/O.

Given the node's cluster view, the calling pod and the identity the request
names (if any), the answer is one of:

* :class:`Grant` - this AzureIdentity, and no other;
* :class:`UseNodeIdentity` - the pod matches an AzurePodIdentityException;
* :class:`Wait` - MIC has not finished (an assignment is ``Created``, or a
  binding matches and no assignment exists yet): the caller re-decides on the
  next change of the view, within the bounds of the retry flags;
* :class:`Deny` - the pod may not use what it asked for (or anything).

Rules that aad-pod-identity got wrong are fixed here: several identities and
no selector is the real IMDS "Multiple user assigned identities exist" error,
never an arbitrary pick; ids are compared case-insensitively everywhere; an
empty list after namespace filtering is a denial, never a crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import OperationMode, Settings
from ..kube.index import ClusterIndex
from ..kube.objects import (
    NAMESPACED_ANNOTATION,
    AssignedState,
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    Pod,
)
from ..ops.logs import redact_id as redact


@dataclass(frozen=True, slots=True)
class IdentitySelector:
    """The identity a request names: at most one of the three is set."""

    client_id: str = ""
    object_id: str = ""
    resource_id: str = ""

    @property
    def empty(self) -> bool:
        return not (self.client_id or self.object_id or self.resource_id)

    def describe(self) -> str:
        if self.client_id:
            return f"client_id {redact(self.client_id)}"
        if self.object_id:
            return f"object_id {redact(self.object_id)}"
        if self.resource_id:
            return f"resource id {self.resource_id.rsplit('/', 1)[-1]}"
        return "no identity selector"


@dataclass(frozen=True, slots=True)
class Grant:
    identity: AzureIdentity


@dataclass(frozen=True, slots=True)
class UseNodeIdentity:
    exception: str  # namespace/name of the matching AzurePodIdentityException


@dataclass(frozen=True, slots=True)
class Wait:
    """MIC is still working: ``created`` = no assignment yet, else ``assigned``."""

    stage: str
    reason: str


@dataclass(frozen=True, slots=True)
class Deny:
    """``not_found`` (nothing usable matches) or ``multiple`` (no selector, several)."""

    kind: str
    reason: str


Decision = Grant | UseNodeIdentity | Wait | Deny

NODE_IDENTITY = "node"  # the owner of what the node's own identity does (exception pods)


def owner_of(decision: Decision) -> str | None:
    """Whose tokens and errors a decision leads to: the AzureIdentity (its UID),
    :data:`NODE_IDENTITY`, or None for a refusal."""
    if isinstance(decision, Grant):
        return decision.identity.meta.uid_or_key
    if isinstance(decision, UseNodeIdentity):
        return NODE_IDENTITY
    return None


ObjectIdOf = Callable[[AzureIdentity], str | None]


def _no_object_ids(_: AzureIdentity) -> str | None:
    return None


def identity_matches(
    identity: AzureIdentity, sel: IdentitySelector, object_id_of: ObjectIdOf
) -> bool:
    if sel.client_id:
        return identity.client_id.lower() == sel.client_id.lower()
    if sel.resource_id:
        return bool(identity.resource_id) and (
            identity.resource_id.rstrip("/").lower() == sel.resource_id.rstrip("/").lower()
        )
    if sel.object_id:
        learned = object_id_of(identity)
        return learned is not None and learned.lower() == sel.object_id.lower()
    return True


def namespace_allows(identity: AzureIdentity, pod: Pod, settings: Settings) -> bool:
    """Namespaced mode (flag, env, managed mode or per-identity annotation)."""
    if settings.namespaced_everywhere or identity.namespaced:
        return identity.meta.namespace == pod.meta.namespace
    return True


def exception_for(index: ClusterIndex, pod: Pod) -> str | None:
    for exc in index.exceptions_in(pod.meta.namespace):
        if exc.matches(pod):
            return exc.meta.key
    return None


def _distinct(identities: Iterable[AzureIdentity]) -> list[AzureIdentity]:
    seen: dict[tuple[str, str], AzureIdentity] = {}
    for identity in identities:
        seen.setdefault((identity.meta.namespace, identity.meta.name), identity)
    return [seen[k] for k in sorted(seen)]


def namespaced_why(settings: Settings) -> str:
    """Why namespaced rules apply to every identity ("" when they do not)."""
    if settings.operation_mode is OperationMode.MANAGED:
        return "managed mode"
    if settings.force_namespaced:
        return "--forceNamespaced / FORCENAMESPACED=true"
    return ""


def binding_status(
    index: ClusterIndex, pod: Pod, binding: AzureIdentityBinding, settings: Settings
) -> tuple[AzureIdentity | None, str]:
    """(the identity, "") when this binding (whose selector is the pod's label) gives
    the pod its identity; (identity or None, why not) when it does not."""
    ns = binding.meta.namespace
    if settings.namespaced_everywhere and ns != pod.meta.namespace:
        return None, (
            f"namespaced rules ({namespaced_why(settings)}) use only bindings of the pod's "
            f"namespace {pod.meta.namespace!r}; this binding is in {ns!r}"
        )
    identity = index.identity(ns, binding.azure_identity)
    if identity is None:
        return None, f"AzureIdentity {ns}/{binding.azure_identity} does not exist"
    if not namespace_allows(identity, pod, settings):
        why = (
            f"annotation {NAMESPACED_ANNOTATION}: namespaced"
            if identity.namespaced
            else namespaced_why(settings)
        )
        return identity, (
            f"AzureIdentity {identity.meta.key} is namespaced ({why}) and the pod is in "
            f"namespace {pod.meta.namespace!r}"
        )
    return identity, ""


def bound_identities(index: ClusterIndex, pod: Pod, settings: Settings) -> list[AzureIdentity]:
    """Identities whose bindings select this pod (the managed-mode assignment)."""
    label = pod.binding_label
    if not label:
        return []
    found: list[AzureIdentity] = []
    for binding in index.bindings_with_selector(label):
        identity, why = binding_status(index, pod, binding, settings)
        if identity is not None and not why:
            found.append(identity)
    return _distinct(found)


USABLE = "usable"
PENDING = "pending"
IGNORED = "ignored"
_PENDING_WHY = "MIC has created it but not finished assigning the identity to the node"


def assignment_status(
    index: ClusterIndex, pod: Pod, assignment: AzureAssignedIdentity, settings: Settings
) -> tuple[str, str, AzureIdentity | None]:
    """(USABLE | PENDING | IGNORED, why, the live identity) of one of the pod's
    AzureAssignedIdentities.

    The assignment only records what the controller did; the decision also
    requires what it was made from, live: the binding must still exist and select
    the pod, and the identity must still exist — so deleting either, or relabelling
    the pod, stops service on the next request whether or not the controller has
    caught up — and it is the live identity's spec that is used.  Bindings,
    identities and assignments arrive on separate watches: while an assignment is
    younger than ``--new-pod-grace``, what it was made from may simply not have
    arrived yet, so it is PENDING (the request waits for the view to change)
    rather than IGNORED.
    """
    a = assignment
    young = bool(a.created) and time.time() - a.created < settings.new_pod_grace
    if a.meta.deleting:
        return IGNORED, "being deleted", None
    if a.state == AssignedState.UNASSIGNED:
        return IGNORED, "state Unassigned", None
    if a.node_name and a.node_name != index.node_name:
        return IGNORED, f"it is for node {a.node_name}", None
    embedded = a.identity
    identity = index.identity(embedded.meta.namespace, embedded.meta.name)
    if identity is None:
        if young:
            return PENDING, f"AzureIdentity {embedded.meta.key} not seen yet", embedded
        return IGNORED, f"AzureIdentity {embedded.meta.key} no longer exists", None
    why = _binding_problem(index, pod, a, identity, settings)
    if why:
        if young:
            return PENDING, f"{why} (not seen yet?)", identity
        return IGNORED, why, None
    if not namespace_allows(identity, pod, settings):
        return (
            IGNORED,
            f"identity {identity.meta.key} is outside the pod's namespace and namespaced "
            "rules apply",
            None,
        )
    if a.state in (AssignedState.ASSIGNED, AssignedState.LEGACY):
        return USABLE, "", identity
    if a.state == AssignedState.CREATED:
        return PENDING, _PENDING_WHY, identity
    return IGNORED, f"unknown state {a.state!r}", None


def _binding_problem(
    index: ClusterIndex,
    pod: Pod,
    assignment: AzureAssignedIdentity,
    identity: AzureIdentity,
    settings: Settings,
) -> str:
    """Why no live binding gives the pod this assignment's identity ("" when one does)."""
    label = pod.binding_label
    ref = assignment.binding
    if ref is not None and ref.meta.name:
        namespace = ref.meta.namespace or identity.meta.namespace
        binding = index.binding(namespace, ref.meta.name)
        if binding is None:
            return f"AzureIdentityBinding {namespace}/{ref.meta.name} no longer exists"
        candidates = [binding]
    else:  # written without a binding reference: any live binding will do
        candidates = index.bindings_with_selector(label) if label else []
    for binding in candidates:
        if binding.selector != label:
            continue
        if binding.meta.namespace != identity.meta.namespace:
            continue
        if binding.azure_identity != identity.meta.name:
            continue
        if settings.namespaced_everywhere and binding.meta.namespace != pod.meta.namespace:
            continue
        return ""
    if ref is not None and ref.meta.name:
        return (
            f"AzureIdentityBinding {candidates[0].meta.key} no longer gives this pod "
            f"{identity.meta.key} (selector or identity changed, or the pod's label)"
        )
    return f"no AzureIdentityBinding selects this pod for {identity.meta.key}"


def usable_assignments(
    index: ClusterIndex, pod: Pod, settings: Settings
) -> tuple[list[AzureIdentity], list[AzureIdentity]]:
    """The live identities of the pod's usable and pending assignments."""
    usable: list[AzureIdentity] = []
    pending: list[AzureIdentity] = []
    for a in index.assignments(pod.meta.namespace, pod.meta.name):
        status, _, identity = assignment_status(index, pod, a, settings)
        if identity is None:
            continue
        if status == USABLE:
            usable.append(identity)
        elif status == PENDING:
            pending.append(identity)
    return usable, pending


def decide(
    *,
    index: ClusterIndex,
    settings: Settings,
    pod: Pod,
    selector: IdentitySelector,
    object_id_of: ObjectIdOf = _no_object_ids,
) -> Decision:
    exception = exception_for(index, pod)
    if exception is not None:
        return UseNodeIdentity(exception)
    if settings.operation_mode is OperationMode.MANAGED:
        return _choose(
            bound_identities(index, pod, settings), [], selector, object_id_of, lambda: False
        )
    usable, pending = usable_assignments(index, pod, settings)

    def could_be_created() -> bool:  # only needed when nothing usable matches
        bound = bound_identities(index, pod, settings)
        return any(identity_matches(i, selector, object_id_of) for i in bound)

    if len(usable) == 1 and not pending:  # the common case: one Assigned identity
        only = usable[0]
        if selector.empty or identity_matches(only, selector, object_id_of):
            return Grant(only)
    return _choose(
        _distinct(usable),
        _distinct(pending),
        selector,
        object_id_of,
        could_be_created,
    )


def _choose(
    usable: list[AzureIdentity],
    pending: list[AzureIdentity],
    selector: IdentitySelector,
    object_id_of: ObjectIdOf,
    could_be_created: Callable[[], bool],
) -> Decision:
    if not selector.empty:
        for identity in usable:
            if identity_matches(identity, selector, object_id_of):
                return Grant(identity)
        if any(identity_matches(i, selector, object_id_of) for i in pending):
            return Wait("assigned", f"identity for {selector.describe()} is not yet Assigned")
        if could_be_created():
            return Wait("created", f"no AzureAssignedIdentity yet for {selector.describe()}")
        return Deny("not_found", f"no identity of this pod matches {selector.describe()}")
    keys = {(i.meta.namespace, i.meta.name) for i in (*usable, *pending)}
    if len(keys) > 1:
        return Deny("multiple", f"{len(keys)} identities are assigned to this pod")
    if usable:
        return Grant(usable[0])
    if pending:
        return Wait("assigned", "the pod's identity is not yet Assigned")
    if could_be_created():
        return Wait("created", "a binding matches this pod but no AzureAssignedIdentity exists yet")
    return Deny("not_found", "no identity is assigned to this pod")
