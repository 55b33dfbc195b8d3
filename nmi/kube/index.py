"""The node's view of the cluster, indexed for the questions a request asks.

Watch handlers feed it; requests only read it.  Every lookup on the request
path is a dictionary access: pod by IP, assignments by pod, bindings by
selector, exceptions by namespace.  Each change bumps a generation and wakes
whoever waits for one (a request waiting for ``Created -> Assigned``), so
waiting never polls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from .changes import ChangeSignal
from .informer import ADDED, DELETED, MODIFIED
from .objects import (
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    Pod,
)


class ClusterIndex:
    """Indexes over the watched objects; all methods are synchronous and cheap."""

    def __init__(self, *, node_name: str) -> None:
        self.node_name = node_name
        self.changed = ChangeSignal()
        # Called (synchronously, from the watch handler) when a pod stops being a caller:
        # deleted, ended, or replaced by a new pod of the same name.
        self.pod_gone: list[Callable[[Pod], None]] = []
        self._pods_by_ip: dict[str, dict[str, Pod]] = defaultdict(dict)
        self._pods: dict[str, Pod] = {}
        self._assigned_by_pod: dict[tuple[str, str], dict[str, AzureAssignedIdentity]] = (
            defaultdict(dict)
        )
        self._identities: dict[tuple[str, str], AzureIdentity] = {}
        self._bindings_by_selector: dict[str, dict[str, AzureIdentityBinding]] = defaultdict(dict)
        self._bindings: dict[tuple[str, str], AzureIdentityBinding] = {}
        self._exceptions_by_ns: dict[str, dict[str, AzurePodIdentityException]] = defaultdict(dict)

    # -- queries ------------------------------------------------------------

    def pods_with_ip(self, ip: str) -> list[Pod]:
        """Pods of this node that may be the sender of traffic from ``ip``."""
        found = self._pods_by_ip.get(ip)
        return [p for p in found.values() if p.can_call] if found else []

    def pod(self, namespace: str, name: str) -> Pod | None:
        return self._pods.get(f"{namespace}/{name}")

    def pods(self) -> Iterable[Pod]:
        return self._pods.values()

    def assignments(self, namespace: str, pod: str) -> list[AzureAssignedIdentity]:
        found = self._assigned_by_pod.get((namespace, pod))
        return list(found.values()) if found else []

    def identity(self, namespace: str, name: str) -> AzureIdentity | None:
        return self._identities.get((namespace, name))

    def identities(self) -> Iterable[AzureIdentity]:
        return self._identities.values()

    def bindings_with_selector(self, selector: str) -> list[AzureIdentityBinding]:
        found = self._bindings_by_selector.get(selector)
        return list(found.values()) if found else []

    def bindings(self) -> Iterable[AzureIdentityBinding]:
        return self._bindings.values()

    def binding(self, namespace: str, name: str) -> AzureIdentityBinding | None:
        return self._bindings.get((namespace, name))

    def exceptions_in(self, namespace: str) -> list[AzurePodIdentityException]:
        found = self._exceptions_by_ns.get(namespace)
        return list(found.values()) if found else []

    def assigned_identity_keys(self) -> set[str]:
        """UIDs (or namespace/name) of identities MIC assigned to pods on this node."""
        keys: set[str] = set()
        for bucket in self._assigned_by_pod.values():
            for assignment in bucket.values():
                keys.add(assignment.identity.meta.uid_or_key)
        return keys

    def bound_identity_keys(self) -> set[str]:
        """UIDs of identities whose bindings select a pod of this node (managed mode)."""
        keys: set[str] = set()
        for pod in self._pods.values():
            label = pod.binding_label
            if not label or not pod.can_call:
                continue
            for binding in self.bindings_with_selector(label):
                if binding.meta.namespace != pod.meta.namespace:
                    continue
                ident = self._identities.get((binding.meta.namespace, binding.azure_identity))
                if ident is not None:
                    keys.add(ident.meta.uid_or_key)
        return keys

    # -- watch handlers -----------------------------------------------------

    def on_pod(self, kind: str, old: Pod | None, new: Pod | None) -> None:
        if old is not None:
            key = old.meta.key
            for ip in old.ips:
                bucket = self._pods_by_ip.get(ip)
                if bucket is not None:
                    bucket.pop(key, None)
                    if not bucket:
                        del self._pods_by_ip[ip]
            self._pods.pop(key, None)
        if new is not None and kind in (ADDED, MODIFIED):
            key = new.meta.key
            self._pods[key] = new
            for ip in new.ips:
                self._pods_by_ip[ip][key] = new
        if (
            old is not None
            and old.can_call
            and (new is None or kind == DELETED or new.meta.uid != old.meta.uid or not new.can_call)
        ):
            for listener in self.pod_gone:
                listener(old)
        self.changed.fire()

    def on_assigned(
        self, kind: str, old: AzureAssignedIdentity | None, new: AzureAssignedIdentity | None
    ) -> None:
        if old is not None:
            pod_key = (old.pod_namespace, old.pod)
            bucket = self._assigned_by_pod.get(pod_key)
            if bucket is not None:
                bucket.pop(old.meta.key, None)
                if not bucket:
                    del self._assigned_by_pod[pod_key]
        if new is not None and kind in (ADDED, MODIFIED):
            self._assigned_by_pod[(new.pod_namespace, new.pod)][new.meta.key] = new
        self.changed.fire()

    def on_identity(self, kind: str, old: AzureIdentity | None, new: AzureIdentity | None) -> None:
        if old is not None:
            self._identities.pop((old.meta.namespace, old.meta.name), None)
        if new is not None and kind in (ADDED, MODIFIED):
            self._identities[(new.meta.namespace, new.meta.name)] = new
        self.changed.fire()

    def on_binding(
        self, kind: str, old: AzureIdentityBinding | None, new: AzureIdentityBinding | None
    ) -> None:
        if old is not None:
            bucket = self._bindings_by_selector.get(old.selector)
            if bucket is not None:
                bucket.pop(old.meta.key, None)
                if not bucket:
                    del self._bindings_by_selector[old.selector]
            self._bindings.pop((old.meta.namespace, old.meta.name), None)
        if new is not None and kind in (ADDED, MODIFIED):
            self._bindings_by_selector[new.selector][new.meta.key] = new
            self._bindings[(new.meta.namespace, new.meta.name)] = new
        self.changed.fire()

    def on_exception(
        self,
        kind: str,
        old: AzurePodIdentityException | None,
        new: AzurePodIdentityException | None,
    ) -> None:
        if old is not None:
            bucket = self._exceptions_by_ns.get(old.meta.namespace)
            if bucket is not None:
                bucket.pop(old.meta.key, None)
        if new is not None and kind in (ADDED, MODIFIED):
            self._exceptions_by_ns[new.meta.namespace][new.meta.key] = new
        self.changed.fire()

    # Convenience for tests and tools that feed objects directly.
    def put(
        self,
        obj: Pod
        | AzureAssignedIdentity
        | AzureIdentity
        | AzureIdentityBinding
        | AzurePodIdentityException,
    ) -> None:
        handler, current = self._route(obj)
        handler(MODIFIED if current is not None else ADDED, current, obj)

    def remove(
        self,
        obj: Pod
        | AzureAssignedIdentity
        | AzureIdentity
        | AzureIdentityBinding
        | AzurePodIdentityException,
    ) -> None:
        handler, current = self._route(obj)
        if current is not None:
            handler(DELETED, current, None)

    def _route(self, obj: object) -> tuple[Callable[[str, Any, Any], None], Any]:
        if isinstance(obj, Pod):
            return self.on_pod, self._pods.get(obj.meta.key)
        if isinstance(obj, AzureAssignedIdentity):
            bucket = self._assigned_by_pod.get((obj.pod_namespace, obj.pod), {})
            return self.on_assigned, bucket.get(obj.meta.key)
        if isinstance(obj, AzureIdentity):
            return self.on_identity, self._identities.get((obj.meta.namespace, obj.meta.name))
        if isinstance(obj, AzureIdentityBinding):
            return self.on_binding, self._bindings.get((obj.meta.namespace, obj.meta.name))
        if isinstance(obj, AzurePodIdentityException):
            return self.on_exception, self._exceptions_by_ns.get(obj.meta.namespace, {}).get(
                obj.meta.key
            )
        raise TypeError(type(obj).__name__)
