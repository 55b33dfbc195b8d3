"""The controller's view of the cluster, indexed so that a change touches only what it affects.

Fed by five watches (pods with the ``aadpodidbinding`` label, bindings,
identities, nodes, and the AzureAssignedIdentities the controller writes);
every handler updates the indexes and answers *which pods* the change
concerns — a pod event that pod, a binding event the pods its old and new
selectors name, an identity event the pods of the bindings that name it, a
node event the pods on that node, an assignment event the pod it is for —
so the controller recomputes those pods' desired assignments and nothing
else (aad-pod-identity recomputed the whole cluster on every event).

Identities and bindings are kept as views (``nmi.kube.objects``) together
with the JSON the API server sent (less ``managedFields``): an
AzureAssignedIdentity embeds its identity and binding as they are, as
aad-pod-identity wrote them.  The assignments themselves - one per pod and
identity, the bulk of the controller's memory - are kept slim
(:class:`AssignmentView`): who, where, which state, and the names and
resourceVersions of what they embed, which is all a comparison needs.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..azure.provider_id import NodeResource, parse_provider_id
from ..kube.objects import (
    AzureIdentity,
    AzureIdentityBinding,
    Meta,
    Pod,
    field_ci,
)

JSON = dict[str, Any]
PodKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class Record:
    """A parsed object and the JSON it came from (what an assignment embeds)."""

    view: Any
    raw: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    uid: str
    provider_id: str
    machine: NodeResource | None  # the VM or scale-set instance; None: not an Azure VM


def parse_node(raw: Mapping[str, Any]) -> NodeInfo:
    meta = Meta.parse(raw.get("metadata"))
    provider_id = str((raw.get("spec") or {}).get("providerID") or "")
    return NodeInfo(meta.name, meta.uid, provider_id, parse_provider_id(provider_id))


def parse_pod(raw: Mapping[str, Any]) -> Pod:
    return Pod.parse(raw)


@dataclass(frozen=True, slots=True)
class Ref:
    """What an assignment says about the identity or binding it embeds."""

    namespace: str
    name: str
    resource_version: str

    @classmethod
    def parse(cls, raw: Any) -> Ref:
        meta = (field_ci(raw, "metadata") or {}) if isinstance(raw, Mapping) else {}
        return cls(  # interned: thousands of assignments name the same few objects
            sys.intern(str(meta.get("namespace") or "")),
            sys.intern(str(meta.get("name") or "")),
            sys.intern(str(meta.get("resourceVersion") or "")),
        )


@dataclass(frozen=True, slots=True)
class AssignmentView:
    """An AzureAssignedIdentity as the controller keeps it (legacy capitalised keys read)."""

    meta: Meta
    pod: str
    pod_namespace: str
    node_name: str
    state: str
    identity: Ref
    binding: Ref | None
    finalizers: tuple[str, ...] = ()
    #: Annotations of others (Meta keeps aad-pod-identity's own): kept on a replace.
    foreign_annotations: Mapping[str, str] = field(default_factory=dict)


_NO_RAW: Mapping[str, Any] = MappingProxyType({})
_EMPTY_MAP: Mapping[str, str] = MappingProxyType({})


def _without_managed_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    meta = out.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:
        out["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return out


def parse_identity(raw: Mapping[str, Any]) -> Record:
    return Record(AzureIdentity.parse(raw), _without_managed_fields(raw))


def parse_binding(raw: Mapping[str, Any]) -> Record:
    return Record(AzureIdentityBinding.parse(raw), _without_managed_fields(raw))


def parse_assignment(raw: Mapping[str, Any]) -> Record:
    """The slim view; none of the JSON is kept."""
    spec = field_ci(raw, "spec") or {}
    status = field_ci(raw, "status") or {}
    metadata = raw.get("metadata") or {}
    binding = field_ci(spec, "azureBindingRef")
    meta = Meta.parse(metadata)
    annotations = metadata.get("annotations")
    foreign = (
        {str(k): str(v) for k, v in annotations.items() if str(k) not in meta.annotations}
        if isinstance(annotations, Mapping)
        else {}
    )
    finalizers = metadata.get("finalizers")
    view = AssignmentView(
        meta=meta,
        pod=sys.intern(str(field_ci(spec, "pod") or "")),
        pod_namespace=sys.intern(str(field_ci(spec, "podNamespace") or "")),
        node_name=sys.intern(str(field_ci(spec, "nodeName") or "")),
        state=sys.intern(str(field_ci(status, "status") or "")),
        identity=Ref.parse(field_ci(spec, "azureIdentityRef")),
        binding=Ref.parse(binding) if isinstance(binding, Mapping) else None,
        finalizers=tuple(sys.intern(str(f)) for f in finalizers)
        if isinstance(finalizers, list)
        else (),
        foreign_annotations=foreign or _EMPTY_MAP,
    )
    return Record(view, _NO_RAW)


def pod_key(pod: Pod) -> PodKey:
    return (pod.meta.namespace, pod.meta.name)


class ControllerView:
    def __init__(self) -> None:
        self.pods: dict[PodKey, Pod] = {}
        self._pods_by_label: dict[str, set[PodKey]] = defaultdict(set)
        self._pods_by_node: dict[str, set[PodKey]] = defaultdict(set)
        self.bindings: dict[tuple[str, str], Record] = {}
        self._bindings_by_selector: dict[str, set[tuple[str, str]]] = defaultdict(set)
        self._bindings_by_identity: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
        self.identities: dict[tuple[str, str], Record] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.assignments: dict[tuple[str, str], Record] = {}
        self._assignments_by_pod: dict[PodKey, set[tuple[str, str]]] = defaultdict(set)
        self._assignments_by_node: dict[str, set[tuple[str, str]]] = defaultdict(set)

    # -- queries ----------------------------------------------------------------

    def pods_with_label(self, label: str) -> list[Pod]:
        return [self.pods[k] for k in self._pods_by_label.get(label, ())]

    def pods_on(self, node: str) -> list[Pod]:
        return [self.pods[k] for k in self._pods_by_node.get(node, ())]

    def bindings_with_selector(self, selector: str) -> list[Record]:
        keys = sorted(self._bindings_by_selector.get(selector, ()))
        return [self.bindings[k] for k in keys]

    def assignments_of(self, key: PodKey) -> list[Record]:
        return [self.assignments[k] for k in sorted(self._assignments_by_pod.get(key, ()))]

    def assignments_on(self, node: str) -> list[Record]:
        return [self.assignments[k] for k in sorted(self._assignments_by_node.get(node, ()))]

    def assigned_pods(self) -> Iterable[PodKey]:
        return list(self._assignments_by_pod)

    # -- watch handlers: each returns the pods the change concerns ------------------

    def on_pod(self, kind: str, old: Pod | None, new: Pod | None) -> set[PodKey]:
        if old is not None:
            key = pod_key(old)
            self.pods.pop(key, None)
            _drop(self._pods_by_label, old.binding_label or "", key)
            _drop(self._pods_by_node, old.node_name, key)
        if new is not None and kind != "DELETED":
            key = pod_key(new)
            self.pods[key] = new
            if new.binding_label:
                self._pods_by_label[new.binding_label].add(key)
            if new.node_name:
                self._pods_by_node[new.node_name].add(key)
        return {pod_key(p) for p in (old, new) if p is not None}

    def on_binding(self, kind: str, old: Record | None, new: Record | None) -> set[PodKey]:
        touched: set[PodKey] = set()
        for record in (old, new):
            if record is not None:
                touched |= self._pods_with_label_keys(record.view.selector)
        if old is not None:
            b: AzureIdentityBinding = old.view
            key = (b.meta.namespace, b.meta.name)
            self.bindings.pop(key, None)
            _drop(self._bindings_by_selector, b.selector, key)
            _drop(self._bindings_by_identity, (b.meta.namespace, b.azure_identity), key)
        if new is not None and kind != "DELETED":
            b = new.view
            key = (b.meta.namespace, b.meta.name)
            self.bindings[key] = new
            self._bindings_by_selector[b.selector].add(key)
            self._bindings_by_identity[(b.meta.namespace, b.azure_identity)].add(key)
        return touched | self._pods_with_assignment_of("binding", old, new)

    def on_identity(self, kind: str, old: Record | None, new: Record | None) -> set[PodKey]:
        touched: set[PodKey] = set()
        for record in (old, new):
            if record is None:
                continue
            i: AzureIdentity = record.view
            for bkey in self._bindings_by_identity.get((i.meta.namespace, i.meta.name), ()):
                touched |= self._pods_with_label_keys(self.bindings[bkey].view.selector)
        if old is not None:
            self.identities.pop((old.view.meta.namespace, old.view.meta.name), None)
        if new is not None and kind != "DELETED":
            self.identities[(new.view.meta.namespace, new.view.meta.name)] = new
        return touched | self._pods_with_assignment_of("identity", old, new)

    def on_node(self, kind: str, old: NodeInfo | None, new: NodeInfo | None) -> set[PodKey]:
        if old is not None:
            self.nodes.pop(old.name, None)
        if new is not None and kind != "DELETED":
            self.nodes[new.name] = new
        touched: set[PodKey] = set()
        for info in (old, new):
            if info is not None:
                touched |= set(self._pods_by_node.get(info.name, ()))
                for akey in self._assignments_by_node.get(info.name, ()):
                    a: AssignmentView = self.assignments[akey].view
                    touched.add((a.pod_namespace, a.pod))
        return touched

    def on_assignment(self, kind: str, old: Record | None, new: Record | None) -> set[PodKey]:
        """An assignment event — or one of the controller's own writes (:meth:`wrote`), which
        is in the view before its watch event arrives, so that a second reconcile does not
        write it again.  So events are compared with what the view holds: a stale copy of
        the same object (lower resourceVersion) is ignored, and a deletion removes only the
        object it names (by uid), not a newer one of the same name."""
        if kind == "DELETED" or new is None:
            gone = old if old is not None else new
            if gone is None:
                return set()
            current = self.assignments.get(_akey(gone))
            if current is not None and current.view.meta.uid == gone.view.meta.uid:
                self._remove(current)
            return {_apod(gone)}
        current = self.assignments.get(_akey(new))
        if current is not None and _stale(new, current):
            if current.view.meta.resource_version == new.view.meta.resource_version:
                # The watch's copy of our own write: keep one copy (the watch cache's).
                self.assignments[_akey(new)] = new
            return set()
        touched: set[PodKey] = set()
        if current is not None:
            self._remove(current)
            touched.add(_apod(current))
        key = _akey(new)
        a: AssignmentView = new.view
        self.assignments[key] = new
        self._assignments_by_pod[(a.pod_namespace, a.pod)].add(key)
        self._assignments_by_node[a.node_name].add(key)
        touched.add(_apod(new))
        return touched

    def wrote(self, raw: Mapping[str, Any] | None) -> None:
        """The API server's answer to one of the controller's writes of an assignment."""
        if raw:
            self.on_assignment("MODIFIED", None, parse_assignment(raw))

    def _remove(self, record: Record) -> None:
        a: AssignmentView = record.view
        key = _akey(record)
        self.assignments.pop(key, None)
        _drop(self._assignments_by_pod, (a.pod_namespace, a.pod), key)
        _drop(self._assignments_by_node, a.node_name, key)

    # -- helpers ----------------------------------------------------------------------

    def _pods_with_label_keys(self, label: str) -> set[PodKey]:
        return set(self._pods_by_label.get(label, ())) if label else set()

    def _pods_with_assignment_of(
        self, what: str, old: Record | None, new: Record | None
    ) -> set[PodKey]:
        """Pods whose assignments embed this binding or identity (it may be gone now)."""
        names = {(r.view.meta.namespace, r.view.meta.name) for r in (old, new) if r is not None}
        touched: set[PodKey] = set()
        for record in self.assignments.values():
            a: AssignmentView = record.view
            ref = a.binding if what == "binding" else a.identity
            if ref is not None and (ref.namespace, ref.name) in names:
                touched.add((a.pod_namespace, a.pod))
        return touched


def _akey(record: Record) -> tuple[str, str]:
    return (record.view.meta.namespace, record.view.meta.name)


def _apod(record: Record) -> PodKey:
    return (record.view.pod_namespace, record.view.pod)


def _stale(new: Record, current: Record) -> bool:
    """Whether ``new`` tells nothing newer than ``current``: the same object (uid) at the
    same or a lower resourceVersion (versions that are not numbers are never compared)."""
    if new.view.meta.uid != current.view.meta.uid:
        return False
    if new.view.meta.resource_version == current.view.meta.resource_version:
        return True
    try:
        return int(new.view.meta.resource_version) < int(current.view.meta.resource_version)
    except ValueError:
        return False


def _drop(index: dict[Any, set[Any]], key: Any, value: Any) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.discard(value)
        if not bucket:
            del index[key]
