"""What AzureAssignedIdentities one pod should have, and what they look like. Pure.

The seed's process, for one pod: it needs a node and the ``aadpodidbinding``
label; every AzureIdentityBinding whose ``selector`` equals that label gives
it the AzureIdentity the binding names in the binding's namespace; under
namespaced rules (``--forceNamespaced`` / ``FORCENAMESPACED``, or the
identity's annotation ``aadpodidentity.k8s.io/Behavior: namespaced``) the
identity, the binding and the pod must share one namespace.  Each (pod,
identity) is one AzureAssignedIdentity written exactly as aad-pod-identity
wrote it: name ``<pod>-<podNamespace>-<identity>``, namespace ``default``
(the identity's under namespaced rules), label ``nodename``, the finalizer,
the identity and binding embedded as the API server serves them,
``spec.pod``/``podNamespace``/``nodename`` and ``status.status``.

Two identities of the same name in different namespaces would need the same
assignment name: aad-pod-identity kept one silently (#1065).  The first (by
binding namespace and name) is kept here too — the name is what existing
tooling reads — and the clash is returned, so the pod gets a Warning Event.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..kube.objects import AzureIdentity, AzureIdentityBinding, Pod
from .view import AssignmentView, ControllerView, Record, Ref

GROUP_VERSION = "aadpodidentity.k8s.io/v1"
FINALIZER = "azureassignedidentity.finalizers.aadpodidentity.k8s.io"
NODE_LABEL = "nodename"
CREATED = "Created"
ASSIGNED = "Assigned"
ENDED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class Desired:
    """One AzureAssignedIdentity the pod should have."""

    namespace: str
    name: str
    pod: Pod
    identity: Record
    binding: Record

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def node(self) -> str:
        return self.pod.node_name

    @property
    def azure_identity(self) -> AzureIdentity:
        view: AzureIdentity = self.identity.view
        return view


@dataclass(frozen=True, slots=True)
class Clash:
    """Two identities of one name would make one assignment: the second was left out."""

    pod: Pod
    name: str
    kept: str  # namespace/name of the identity kept
    dropped: str


def namespaced(identity: AzureIdentity, force: bool) -> bool:
    return force or identity.namespaced


def assignment_name(pod: str, pod_namespace: str, identity: str) -> str:
    return f"{pod}-{pod_namespace}-{identity}"


def wants_identities(pod: Pod) -> bool:
    return bool(pod.node_name and pod.binding_label) and pod.phase not in ENDED_PHASES


def desired_for(
    view: ControllerView, pod: Pod, *, force_namespaced: bool
) -> tuple[list[Desired], list[Clash]]:
    """The assignments ``pod`` should have now, and the name clashes left out."""
    if not wants_identities(pod):
        return [], []
    out: dict[tuple[str, str], Desired] = {}
    clashes: list[Clash] = []
    label = pod.binding_label or ""
    for binding in view.bindings_with_selector(label):  # sorted: namespace, name
        b: AzureIdentityBinding = binding.view
        identity = view.identities.get((b.meta.namespace, b.azure_identity))
        if identity is None:
            continue
        i: AzureIdentity = identity.view
        if namespaced(i, force_namespaced) and not (
            i.meta.namespace == b.meta.namespace == pod.meta.namespace
        ):
            continue
        namespace = i.meta.namespace if namespaced(i, force_namespaced) else "default"
        name = assignment_name(pod.meta.name, pod.meta.namespace, i.meta.name)
        found = out.get((namespace, name))
        if found is not None:
            if found.azure_identity.meta.key != i.meta.key:
                clashes.append(Clash(pod, name, found.azure_identity.meta.key, i.meta.key))
            continue  # the same identity through a second binding: one assignment
        out[(namespace, name)] = Desired(namespace, name, pod, identity, binding)
    return list(out.values()), clashes


def build(
    desired: Desired, *, status: str, existing: AssignmentView | None = None
) -> dict[str, Any]:
    """The AzureAssignedIdentity object (for a create, or a replace of ``existing``: its
    resourceVersion as precondition, its labels, finalizers and annotations kept)."""
    metadata: dict[str, Any] = {
        "name": desired.name,
        "namespace": desired.namespace,
        "labels": {NODE_LABEL: desired.node},
        "finalizers": [FINALIZER],
    }
    if existing is not None:
        old = existing.meta
        metadata["resourceVersion"] = old.resource_version
        metadata["labels"] = {**old.labels, NODE_LABEL: desired.node}
        metadata["finalizers"] = list(dict.fromkeys([*existing.finalizers, FINALIZER]))
        annotations = {**existing.foreign_annotations, **old.annotations}
        if annotations:
            metadata["annotations"] = annotations
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzureAssignedIdentity",
        "metadata": metadata,
        "spec": {
            "azureIdentityRef": _embed(desired.identity.raw),
            "azureBindingRef": _embed(desired.binding.raw),
            "pod": desired.pod.meta.name,
            "podNamespace": desired.pod.meta.namespace,
            "nodename": desired.node,
        },
        "status": {"status": status},
    }


def _embed(raw: Mapping[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(dict(raw))
    obj.setdefault("apiVersion", GROUP_VERSION)
    return obj


def matches(existing: Record, desired: Desired) -> bool:
    """Whether an existing assignment already says what ``desired`` says (aad-pod-identity
    compared the binding's and identity's name and resourceVersion, pod, namespace, node)."""
    a: AssignmentView = existing.view
    if (a.pod, a.pod_namespace, a.node_name) != (
        desired.pod.meta.name,
        desired.pod.meta.namespace,
        desired.node,
    ):
        return False
    if a.meta.labels.get(NODE_LABEL) != desired.node:
        return False
    for have, record in ((a.identity, desired.identity), (a.binding, desired.binding)):
        want = record.raw.get("metadata") or {}
        if have != Ref(
            str(want.get("namespace") or ""),
            str(want.get("name") or ""),
            str(want.get("resourceVersion") or ""),
        ):
            return False
    return True
