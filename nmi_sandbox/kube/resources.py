"""The resource table: which kinds the emulated server serves, and how it describes them.

Why this exists: routing, admission, the store and discovery all ask the same
questions about a resource -- its group/version/plural, whether it is namespaced,
where it is stored, which subresources and field selectors it has, whether it is a
custom resource, what its error messages call it.  One immutable :class:`Resource`
per served resource answers them, and the discovery documents (``/api``,
``/apis``, ``/apis/<group>/<version>``) are generated from the same table, so a
resource is served exactly when it is advertised.

Served: namespaces, nodes, pods (with ``status`` and ``binding``), secrets,
configmaps (the controller's ledger), serviceaccounts (with ``token``, the
``authentication.k8s.io/v1`` TokenRequest), core ``v1`` events
and their ``events.k8s.io/v1`` view (two views of one storage),
``coordination.k8s.io/v1`` leases, and the four
``aadpodidentity.k8s.io/v1`` custom resources of aad-pod-identity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import FieldError, KubeApiError, error
from .meta import JSON

__all__ = [
    "AAD_GROUP",
    "BY_GVR",
    "BY_KIND",
    "BY_STORAGE",
    "GROUPS",
    "KUBE_VERSION",
    "RESOURCES",
    "FieldGetter",
    "Resource",
    "api_versions",
    "group_document",
    "group_list",
    "resource_for_kind",
    "resource_list",
    "root_paths",
]

KUBE_VERSION = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.0",
    "gitCommit": "7c48c2bd72b9bf5c44d21d7338cc7bea77d0ad2a",
    "gitTreeState": "clean",
    "buildDate": "2024-04-17T17:27:03Z",
    "goVersion": "go1.22.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}

# subresources that are another kind, created with POST: (group, version, kind)
_CREATE_SUBRESOURCES = {
    "binding": ("", "", "Binding"),
    "token": ("authentication.k8s.io", "v1", "TokenRequest"),
}

_MAIN_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

FieldGetter = Callable[[JSON], str]


def _get_path(obj: object, dotted: str) -> object:
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _str_field(dotted: str) -> FieldGetter:
    def get(obj: JSON) -> str:
        value = _get_path(obj, dotted)
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return get


def _bool_field(dotted: str) -> FieldGetter:
    def get(obj: JSON) -> str:
        return "true" if _get_path(obj, dotted) is True else "false"

    return get


# --------------------------------------------------------------------------- event views

_INVOLVED = ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")

# core/v1 Event key -> events.k8s.io/v1 Event key (pkg/apis/events/v1/conversion.go)
_EVENT_KEYS = {
    "involvedObject": "regarding",
    "related": "related",
    "message": "note",
    "reason": "reason",
    "type": "type",
    "action": "action",
    "reportingComponent": "reportingController",
    "reportingInstance": "reportingInstance",
    "eventTime": "eventTime",
    "series": "series",
    "source": "deprecatedSource",
    "firstTimestamp": "deprecatedFirstTimestamp",
    "lastTimestamp": "deprecatedLastTimestamp",
    "count": "deprecatedCount",
}


def _identity(obj: JSON) -> JSON:
    return obj


def _event_to_events_v1(obj: JSON) -> JSON:
    out: JSON = {"kind": "Event", "apiVersion": "events.k8s.io/v1"}
    if "metadata" in obj:
        out["metadata"] = obj["metadata"]
    for core_key, v1_key in _EVENT_KEYS.items():
        if obj.get(core_key) is not None:
            out[v1_key] = obj[core_key]
    out.setdefault("eventTime", None)  # MicroTime without omitempty: null on the wire
    return out


def _event_from_events_v1(obj: JSON) -> JSON:
    out: JSON = {"kind": "Event", "apiVersion": "v1"}
    if "metadata" in obj:
        out["metadata"] = obj["metadata"]
    for core_key, v1_key in _EVENT_KEYS.items():
        if obj.get(v1_key) is not None:
            out[core_key] = obj[v1_key]
    return out


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Resource:
    """One served resource (group, version, plural) and how the server treats it."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    storage: str  # several resources may be views of one storage (events)
    custom: bool = False
    status_subresource: bool = False
    subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()
    fields: Mapping[str, FieldGetter] = field(default_factory=dict)
    returns_deleted_object: bool = False
    allow_unconditional_update: bool = True
    to_view: Callable[[JSON], JSON] = _identity  # stored form -> this resource's form
    from_view: Callable[[JSON], JSON] = _identity  # this resource's form -> stored form

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def is_view(self) -> bool:
        """True if this resource is another shape of a storage (events.k8s.io events)."""
        return self.to_view is not _identity

    @property
    def qualified(self) -> str:
        """``pods`` or ``azureidentities.aadpodidentity.k8s.io`` as error messages say."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def details(self, name: str) -> JSON:
        d: JSON = {"name": name}
        if self.group:
            d["group"] = self.group
        d["kind"] = self.plural
        return d

    def not_found(self, name: str) -> KubeApiError:
        return error(404, "NotFound", f'{self.qualified} "{name}" not found', self.details(name))

    def already_exists(self, name: str) -> KubeApiError:
        return error(
            409, "AlreadyExists", f'{self.qualified} "{name}" already exists', self.details(name)
        )

    def conflict(self, name: str, why: str) -> KubeApiError:
        return error(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {self.qualified} "{name}": {why}',
            self.details(name),
        )

    def forbidden(self, name: str, why: str) -> KubeApiError:
        return error(
            403, "Forbidden", f'{self.qualified} "{name}" is forbidden: {why}', self.details(name)
        )

    def invalid(self, name: str, errors: list[FieldError]) -> KubeApiError:
        text = "[" + ", ".join(str(e) for e in errors) + "]"
        if len(errors) == 1:
            text = str(errors[0])
        details: JSON = {"name": name}
        if self.group:
            details["group"] = self.group
        details["kind"] = self.kind
        details["causes"] = [e.cause() for e in errors]
        return error(422, "Invalid", f'{self.qualified_kind} "{name}" is invalid: {text}', details)


def _fields(
    namespaced: bool, extra: Mapping[str, FieldGetter] | None = None
) -> dict[str, FieldGetter]:
    out: dict[str, FieldGetter] = {"metadata.name": _str_field("metadata.name")}
    if namespaced:
        out["metadata.namespace"] = _str_field("metadata.namespace")
    out.update(extra or {})
    return out


_CORE_EVENT_FIELDS: dict[str, FieldGetter] = {
    **{f"involvedObject.{k}": _str_field(f"involvedObject.{k}") for k in _INVOLVED},
    "reason": _str_field("reason"),
    "reportingComponent": _str_field("reportingComponent"),
    "source": _str_field("source.component"),
    "type": _str_field("type"),
}

_EVENTS_V1_FIELDS: dict[str, FieldGetter] = {
    **{f"regarding.{k}": _str_field(f"involvedObject.{k}") for k in _INVOLVED},
    "reason": _str_field("reason"),
    "reportingController": _str_field("reportingComponent"),
    "type": _str_field("type"),
}

AAD_GROUP = "aadpodidentity.k8s.io"


def _crd(plural: str, singular: str, kind: str, *, status: bool = True) -> Resource:
    """A CRD of aad-pod-identity, as daemonset/crds/crds.yaml declares it.

    AzureAssignedIdentity has no status subresource: MIC creates it with its
    status and patches ``/status/status`` on the main resource.
    """
    return Resource(
        group=AAD_GROUP,
        version="v1",
        plural=plural,
        singular=singular,
        kind=kind,
        namespaced=True,
        storage=plural,
        custom=True,
        status_subresource=status,
        subresources=("status",) if status else (),
        fields=_fields(True),
        allow_unconditional_update=False,
    )


RESOURCES: tuple[Resource, ...] = (
    Resource(
        group="",
        version="v1",
        plural="namespaces",
        singular="namespace",
        kind="Namespace",
        namespaced=False,
        storage="namespaces",
        status_subresource=True,
        subresources=("status",),
        short_names=("ns",),
        fields=_fields(False, {"status.phase": _str_field("status.phase")}),
        returns_deleted_object=True,
    ),
    Resource(
        group="",
        version="v1",
        plural="nodes",
        singular="node",
        kind="Node",
        namespaced=False,
        storage="nodes",
        status_subresource=True,
        subresources=("status",),
        short_names=("no",),
        fields=_fields(False, {"spec.unschedulable": _bool_field("spec.unschedulable")}),
    ),
    Resource(
        group="",
        version="v1",
        plural="pods",
        singular="pod",
        kind="Pod",
        namespaced=True,
        storage="pods",
        status_subresource=True,
        subresources=("status", "binding"),
        short_names=("po",),
        fields=_fields(
            True,
            {
                "spec.nodeName": _str_field("spec.nodeName"),
                "spec.restartPolicy": _str_field("spec.restartPolicy"),
                "spec.schedulerName": _str_field("spec.schedulerName"),
                "spec.serviceAccountName": _str_field("spec.serviceAccountName"),
                "spec.hostNetwork": _bool_field("spec.hostNetwork"),
                "status.phase": _str_field("status.phase"),
                "status.podIP": _str_field("status.podIP"),
                "status.nominatedNodeName": _str_field("status.nominatedNodeName"),
            },
        ),
        returns_deleted_object=True,
    ),
    Resource(
        group="",
        version="v1",
        plural="secrets",
        singular="secret",
        kind="Secret",
        namespaced=True,
        storage="secrets",
        fields=_fields(True, {"type": _str_field("type")}),
    ),
    Resource(  # the controller's ledger (nmi-mic-ledger)
        group="",
        version="v1",
        plural="configmaps",
        singular="configmap",
        kind="ConfigMap",
        namespaced=True,
        storage="configmaps",
        short_names=("cm",),
        fields=_fields(True),
    ),
    Resource(
        group="",
        version="v1",
        plural="serviceaccounts",
        singular="serviceaccount",
        kind="ServiceAccount",
        namespaced=True,
        storage="serviceaccounts",
        subresources=("token",),
        short_names=("sa",),
        fields=_fields(True),
    ),
    Resource(
        group="",
        version="v1",
        plural="events",
        singular="event",
        kind="Event",
        namespaced=True,
        storage="events",
        short_names=("ev",),
        fields=_fields(True, _CORE_EVENT_FIELDS),
    ),
    Resource(
        group="events.k8s.io",
        version="v1",
        plural="events",
        singular="event",
        kind="Event",
        namespaced=True,
        storage="events",
        short_names=("ev",),
        fields=_fields(True, _EVENTS_V1_FIELDS),
        to_view=_event_to_events_v1,
        from_view=_event_from_events_v1,
    ),
    # leader election: no short name, no subresource, only the metadata field selectors
    Resource(
        group="coordination.k8s.io",
        version="v1",
        plural="leases",
        singular="lease",
        kind="Lease",
        namespaced=True,
        storage="leases",
        fields=_fields(True),
    ),
    _crd("azureidentities", "azureidentity", "AzureIdentity"),
    _crd("azureidentitybindings", "azureidentitybinding", "AzureIdentityBinding"),
    _crd("azureassignedidentities", "azureassignedidentity", "AzureAssignedIdentity", status=False),
    _crd("azurepodidentityexceptions", "azurepodidentityexception", "AzurePodIdentityException"),
)

BY_GVR: dict[tuple[str, str, str], Resource] = {
    (r.group, r.version, r.plural): r for r in RESOURCES
}
BY_KIND: dict[tuple[str, str], Resource] = {(r.api_version, r.kind): r for r in RESOURCES}
# the canonical resource of each storage (the one whose view is the stored form)
BY_STORAGE: dict[str, Resource] = {r.storage: r for r in reversed(RESOURCES) if not r.is_view}
GROUPS: dict[str, list[str]] = {}
for _r in RESOURCES:
    if _r.group:
        _versions = GROUPS.setdefault(_r.group, [])
        if _r.version not in _versions:
            _versions.append(_r.version)


def resource_for_kind(api_version: str, kind: str) -> Resource:
    """The resource serving ``kind`` in ``api_version`` (a RESTMapper's answer)."""
    res = BY_KIND.get((api_version, kind))
    if res is None:
        raise error(404, "NotFound", f'no matches for kind "{kind}" in version "{api_version}"')
    return res


# --------------------------------------------------------------------------- discovery


def root_paths() -> JSON:
    """``GET /``."""
    paths = [
        "/.well-known/openid-configuration",
        "/api",
        "/api/v1",
        "/apis",
        "/healthz",
        "/livez",
        "/openid/v1/jwks",
        "/readyz",
        "/version",
    ]
    for group, versions in GROUPS.items():
        paths.append(f"/apis/{group}")
        paths += [f"/apis/{group}/{v}" for v in versions]
    return {"paths": sorted(paths)}


def api_versions(server_address: str) -> JSON:
    """``GET /api``."""
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def group_document(group: str) -> JSON:
    """An ``APIGroup`` body without its TypeMeta (an item of ``GET /apis``)."""
    versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in GROUPS[group]]
    return {"name": group, "versions": versions, "preferredVersion": versions[0]}


def group_list() -> JSON:
    """``GET /apis``."""
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [group_document(g) for g in GROUPS],
    }


def resource_list(group: str, version: str) -> JSON:
    """``GET /api/v1`` or ``GET /apis/<group>/<version>``."""
    resources: list[JSON] = []
    for res in RESOURCES:
        if res.group != group or res.version != version:
            continue
        entry: JSON = {
            "name": res.plural,
            "singularName": res.singular,
            "namespaced": res.namespaced,
            "kind": res.kind,
            "verbs": list(_MAIN_VERBS),
        }
        if res.short_names:
            entry["shortNames"] = list(res.short_names)
        if res.custom:
            entry["categories"] = []
        resources.append(entry)
        for sub in res.subresources:
            sub_entry: JSON = {
                "name": f"{res.plural}/{sub}",
                "singularName": "",
                "namespaced": res.namespaced,
            }
            if sub in _CREATE_SUBRESOURCES:
                sub_group, sub_version, sub_kind = _CREATE_SUBRESOURCES[sub]
                if sub_group:
                    sub_entry["group"], sub_entry["version"] = sub_group, sub_version
                sub_entry["kind"] = sub_kind
                sub_entry["verbs"] = ["create"]
            else:
                sub_entry["kind"] = res.kind
                sub_entry["verbs"] = ["get", "patch", "update"]
            resources.append(sub_entry)
    if not group:
        resources.append(
            {
                "name": "bindings",
                "singularName": "binding",
                "namespaced": True,
                "kind": "Binding",
                "verbs": ["create"],
            }
        )
    out: JSON = {"kind": "APIResourceList"}
    if group:
        out["apiVersion"] = "v1"
    out["groupVersion"] = f"{group}/{version}" if group else version
    out["resources"] = resources
    return out
