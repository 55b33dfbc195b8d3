"""Typed, immutable views of the Kubernetes objects nmi reads.

The ``aadpodidentity.k8s.io/v1`` objects are read exactly as aad-pod-identity
wrote them: Go's ``encoding/json`` matched keys case-insensitively (preferring
an exact match), so objects written before v1.6 with ``ClientID``,
``Selector`` or ``PodLabels`` are still valid and must be understood.  Parsing
happens once, in the watch handler, so the request path only touches these
small frozen objects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

NAMESPACED_ANNOTATION = "aadpodidentity.k8s.io/Behavior"
NAMESPACED_VALUE = "namespaced"
BINDING_LABEL = "aadpodidbinding"
# Written by the controller (nmi mic) on an assignment that is not Assigned yet: the step it
# waits on, and the last error ARM gave for it (shown by ``nmi explain``).
MIC_STEP_ANNOTATION = "aadpodidentity.k8s.io/mic-step"
MIC_ERROR_ANNOTATION = "aadpodidentity.k8s.io/mic-error"
# Federation (spec.type 3, and the "shadow" trial of types 0-2): the audience of the
# service-account token presented to Azure AD, the trial switch and its application.
FEDERATED_AUDIENCE_ANNOTATION = "aadpodidentity.k8s.io/federated-token-audience"
FEDERATION_ANNOTATION = "aadpodidentity.k8s.io/federation"
FEDERATION_SHADOW = "shadow"
FEDERATION_CLIENT_ID_ANNOTATION = "aadpodidentity.k8s.io/federation-client-id"

GROUP = "aadpodidentity.k8s.io"
VERSION = "v1"


class IdentityType:
    """``spec.type`` of an AzureIdentity."""

    USER_ASSIGNED_MSI = 0
    SERVICE_PRINCIPAL = 1
    SERVICE_PRINCIPAL_CERTIFICATE = 2
    FEDERATED = 3  # the calling pod's own service-account token, exchanged with Azure AD
    ALL = (0, 1, 2, 3)


class AssignedState:
    """``status.status`` of an AzureAssignedIdentity."""

    LEGACY = ""  # written by MIC before 1.5: usable
    CREATED = "Created"
    ASSIGNED = "Assigned"
    UNASSIGNED = "Unassigned"


def field_ci(obj: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """``obj[key]``, matching the key case-insensitively like Go's encoding/json."""
    if not obj:
        return default
    if key in obj:
        return obj[key]
    lowered = key.lower()
    for k, v in obj.items():
        if k.lower() == lowered:
            return v
    return default


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _timestamp(value: Any) -> float:
    """An RFC 3339 timestamp as the API server writes it, in epoch seconds (0: none)."""
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value).timestamp()  # 3.11 reads the trailing "Z"
    except ValueError:
        return 0.0


_EMPTY: Mapping[str, str] = MappingProxyType({})
OWN_ANNOTATION_PREFIX = NAMESPACED_ANNOTATION.split("/")[0].lower() + "/"


def _str_map(value: Any) -> Mapping[str, str]:
    """A string map; empty ones share one object, and keys and values repeated across
    objects (label names, namespaces) are interned: the view of a cluster holds
    thousands of these."""
    if not isinstance(value, Mapping) or not value:
        return _EMPTY
    return {sys.intern(str(k)): sys.intern(_str(v)) for k, v in value.items()}


def _own_annotations(value: Any) -> Mapping[str, str]:
    """Only aad-pod-identity's annotations: nothing else is read, and others (a
    last-applied-configuration, a sidecar's status) can be kilobytes each."""
    if not isinstance(value, Mapping) or not value:
        return _EMPTY
    own = {
        str(k): _str(v)
        for k, v in value.items()
        if str(k).lower().startswith(OWN_ANNOTATION_PREFIX)
    }
    return own or _EMPTY


@dataclass(frozen=True, slots=True)
class Meta:
    """The parts of ``metadata`` nmi uses."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    deleting: bool = False

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> Meta:
        m = raw or {}
        return cls(
            namespace=sys.intern(_str(m.get("namespace"))),
            name=_str(m.get("name")),
            uid=_str(m.get("uid")),
            resource_version=_str(m.get("resourceVersion")),
            labels=_str_map(m.get("labels")),
            annotations=_own_annotations(m.get("annotations")),
            deleting=bool(m.get("deletionTimestamp")),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def uid_or_key(self) -> str:
        """The UID (an object recreated under the same name is another object), or
        ``namespace/name`` for objects without one (embedded copies, tests)."""
        return self.uid or self.key


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod scheduled on this node."""

    meta: Meta
    node_name: str
    phase: str
    ips: tuple[str, ...]
    host_network: bool
    created: float = 0.0  # metadata.creationTimestamp, seconds since the epoch (0: unknown)
    ended: bool = False  # every container has terminated (the sandbox, and its IP, may be gone)
    ready: bool = False  # condition Ready is True
    service_account: str = "default"  # spec.serviceAccountName
    # "namespace/serviceAccountName", computed once: a federated token's cache key uses it.
    service_account_key: str = field(init=False, compare=False, default="")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Pod:
        spec = raw.get("spec") or {}
        status = raw.get("status") or {}
        ips: list[str] = []
        for entry in status.get("podIPs") or ():
            ip = _str(entry.get("ip")) if isinstance(entry, Mapping) else ""
            if ip and ip not in ips:
                ips.append(ip)
        single = _str(status.get("podIP"))
        if single and single not in ips:
            ips.insert(0, single)
        containers = [c for c in status.get("containerStatuses") or () if isinstance(c, Mapping)]
        ended = bool(containers) and all(
            isinstance(c.get("state"), Mapping) and "terminated" in c["state"] for c in containers
        )
        ready = any(
            isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
        return cls(
            meta=Meta.parse(raw.get("metadata")),
            node_name=_str(spec.get("nodeName")),
            phase=_str(status.get("phase")),
            ips=tuple(ips),
            host_network=bool(spec.get("hostNetwork")),
            created=_timestamp((raw.get("metadata") or {}).get("creationTimestamp")),
            ended=ended,
            ready=ready,
            service_account=sys.intern(
                _str(spec.get("serviceAccountName") or spec.get("serviceAccount")) or "default"
            ),
        )

    def __post_init__(self) -> None:
        key = sys.intern(f"{self.meta.namespace}/{self.service_account}")
        object.__setattr__(self, "service_account_key", key)

    @property
    def can_call(self) -> bool:
        """Whether traffic from this pod's IP may be attributed to it.

        Pods that finished (Succeeded/Failed) or whose containers have all
        ended may still show an IP that has already been handed to a new pod;
        host-network pods share the node's address, and their traffic is not
        intercepted anyway.  (A terminating pod may still call, but only
        through the interface it was pinned to: see ``identity/caller.py``.)
        """
        return (
            self.phase in ("Pending", "Running")
            and not self.host_network
            and bool(self.ips)
            and not self.ended
        )

    @property
    def binding_label(self) -> str | None:
        return self.meta.labels.get(BINDING_LABEL)


@dataclass(frozen=True, slots=True)
class SecretRef:
    name: str
    namespace: str


@dataclass(frozen=True, slots=True)
class AzureIdentity:
    """An Azure identity that pods may be bound to."""

    meta: Meta
    type: int | None
    client_id: str
    resource_id: str
    tenant_id: str
    ad_endpoint: str
    secret_ref: SecretRef | None
    auxiliary_tenant_ids: tuple[str, ...] = ()
    # Annotation aadpodidentity.k8s.io/federated-token-audience ("": the daemon's flag).
    federated_audience: str = ""
    # Annotation aadpodidentity.k8s.io/federation: shadow (types 0-2 only), and the
    # application to try (aadpodidentity.k8s.io/federation-client-id, else spec.clientID).
    shadow: bool = False
    federation_client_id: str = ""
    # A digest of everything that produces this identity's credential.  Changes of
    # unrelated metadata (labels, status, resourceVersion) keep it, so cached tokens
    # survive them; a changed client id, tenant, endpoint or secret reference does not.
    fingerprint: str = field(init=False, repr=False, compare=False, default="")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> AzureIdentity:
        spec = field_ci(raw, "spec") or {}
        raw_type = field_ci(spec, "type")
        id_type: int | None
        try:
            id_type = int(raw_type) if raw_type is not None and raw_type != "" else 0
        except (TypeError, ValueError):
            id_type = None
        if id_type is not None and id_type not in IdentityType.ALL:
            id_type = None
        ref_raw = field_ci(spec, "clientPassword")
        ref: SecretRef | None = None
        if isinstance(ref_raw, Mapping):
            name = _str(field_ci(ref_raw, "name"))
            if name:
                ref = SecretRef(name=name, namespace=_str(field_ci(ref_raw, "namespace")))
        aux = field_ci(spec, "auxiliaryTenantIDs") or ()
        meta = Meta.parse(raw.get("metadata"))
        notes = {k.lower(): v.strip() for k, v in meta.annotations.items()}
        return cls(
            meta=meta,
            type=id_type,
            client_id=_str(field_ci(spec, "clientID")),
            resource_id=_str(field_ci(spec, "resourceID")),
            tenant_id=_str(field_ci(spec, "tenantID")),
            ad_endpoint=_str(field_ci(spec, "adEndpoint")),
            secret_ref=ref,
            auxiliary_tenant_ids=tuple(_str(t) for t in aux if t) if isinstance(aux, list) else (),
            federated_audience=notes.get(FEDERATED_AUDIENCE_ANNOTATION, ""),
            shadow=id_type in (0, 1, 2)
            and notes.get(FEDERATION_ANNOTATION, "").lower() == FEDERATION_SHADOW,
            federation_client_id=notes.get(FEDERATION_CLIENT_ID_ANNOTATION, ""),
        )

    @property
    def namespaced(self) -> bool:
        """Per-identity namespaced behaviour (annotation, value case-insensitive)."""
        for k, v in self.meta.annotations.items():
            if k.lower() == NAMESPACED_ANNOTATION.lower() and v.lower() == NAMESPACED_VALUE:
                return True
        return False

    def __post_init__(self) -> None:
        # Computed once, when the watch delivers the object: the request path only reads it.
        ref = self.secret_ref
        parts = [
            str(self.type),
            self.client_id.lower(),
            self.resource_id.lower(),
            self.tenant_id.lower(),
            self.ad_endpoint.lower(),
            f"{ref.namespace}/{ref.name}" if ref else "",
            self.federated_audience,
        ]
        digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
        object.__setattr__(self, "fingerprint", digest)


@dataclass(frozen=True, slots=True)
class AzureIdentityBinding:
    """Which pods (label ``aadpodidbinding``) may use which AzureIdentity."""

    meta: Meta
    azure_identity: str
    selector: str

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> AzureIdentityBinding:
        spec = field_ci(raw, "spec") or {}
        return cls(
            meta=Meta.parse(raw.get("metadata")),
            azure_identity=_str(field_ci(spec, "azureIdentity")),
            selector=_str(field_ci(spec, "selector")),
        )


@dataclass(frozen=True, slots=True)
class AzureAssignedIdentity:
    """MIC's record that an identity is (being) assigned to one pod on a node."""

    meta: Meta
    pod: str
    pod_namespace: str
    node_name: str
    identity: AzureIdentity
    binding: AzureIdentityBinding | None
    state: str
    created: float = 0.0  # metadata.creationTimestamp, epoch seconds (0: unknown)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> AzureAssignedIdentity:
        spec = field_ci(raw, "spec") or {}
        status = field_ci(raw, "status") or {}
        identity_raw = field_ci(spec, "azureIdentityRef") or {}
        binding_raw = field_ci(spec, "azureBindingRef")
        return cls(
            meta=Meta.parse(raw.get("metadata")),
            pod=_str(field_ci(spec, "pod")),
            pod_namespace=_str(field_ci(spec, "podNamespace")),
            node_name=_str(field_ci(spec, "nodeName")),
            identity=AzureIdentity.parse(identity_raw if isinstance(identity_raw, Mapping) else {}),
            binding=AzureIdentityBinding.parse(binding_raw)
            if isinstance(binding_raw, Mapping)
            else None,
            state=_str(field_ci(status, "status")),
            created=_timestamp((raw.get("metadata") or {}).get("creationTimestamp")),
        )


@dataclass(frozen=True, slots=True)
class AzurePodIdentityException:
    """Pod labels that make a pod use the node's own identity."""

    meta: Meta
    pod_labels: Mapping[str, str]

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> AzurePodIdentityException:
        spec = field_ci(raw, "spec") or {}
        return cls(
            meta=Meta.parse(raw.get("metadata")), pod_labels=_str_map(field_ci(spec, "podLabels"))
        )

    def matches(self, pod: Pod) -> bool:
        """Any single label pair matches (value compared case-insensitively), as NMI did."""
        for key, value in self.pod_labels.items():
            actual = pod.meta.labels.get(key)
            if actual is not None and actual.lower() == value.lower():
                return True
        return False


@dataclass(frozen=True, slots=True)
class Secret:
    """A Secret holding a service principal's credential."""

    meta: Meta
    data: Mapping[str, bytes]

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Secret:
        data: dict[str, bytes] = {}
        for key, value in (raw.get("data") or {}).items():
            try:
                data[str(key)] = base64.b64decode(_str(value), validate=True)
            except (binascii.Error, ValueError):
                continue
        for key, value in (raw.get("stringData") or {}).items():
            data[str(key)] = _str(value).encode()
        return cls(meta=Meta.parse(raw.get("metadata")), data=data)

    def __repr__(self) -> str:  # never show credential material
        return f"Secret({self.meta.key!r}, keys={sorted(self.data)!r})"
