"""An in-process Kubernetes API server that speaks the real wire protocol.

Why this exists: the daemon keeps a live view of the cluster with
``kubernetes_asyncio`` list+watch and reads raw watch lines, and no real API
server (nor etcd) can run on the machines the tests and the local sandbox run
on.  Mocking the client library would test the mock, so instead this module
serves HTTPS on loopback and the daemon's production code path (kubeconfig
loading, TLS with ``certificate-authority-data``, bearer tokens, list
pagination, watch resumption, 410 handling, bookmarks) runs unchanged against
it.

What is emulated, as the real kube-apiserver does it:

* one global, monotonically increasing ``resourceVersion`` shared by all
  resources (like the etcd revision); every effective write bumps it, a no-op
  update does not (like the real server);
* GET, LIST (``limit``/``continue`` with consistent snapshots, label and field
  selectors, ``resourceVersion``/``resourceVersionMatch``), WATCH (chunked JSON
  lines, synthetic ADDED events, resumption from history, 410 ``Expired`` as an
  ``ERROR`` event, bookmarks, ``timeoutSeconds``, selector move-in/move-out),
  POST (``generateName``), PUT (optimistic concurrency), PATCH (JSON merge,
  strategic merge treated as JSON merge for built-in types, RFC 6902 JSON
  patch), DELETE (finalizers and ``deletionTimestamp``), DELETE collection, the
  ``status`` subresource and ``pods/binding``;
* errors are ``Status`` objects with the real reasons and messages;
* admission and registry behaviour the daemon can observe: objects cannot be
  created in a missing or terminating namespace, pod status is reset to
  ``Pending`` on create, custom-resource ``status`` is dropped on create and
  ignored on main-resource updates, secrets' ``stringData`` is folded into
  ``data``, namespaces get their ``kubernetes.io/metadata.name`` label, core
  ``v1`` and ``events.k8s.io/v1`` events are two views of one storage.
  LIST items of built-in kinds carry no ``kind``/``apiVersion`` (custom
  resources do), exactly as on the wire of a real server.

Custom resources are stored as given (no structural-schema pruning), so legacy
capitalised keys such as ``ClientID``, ``Selector`` or ``PodLabels`` survive.

Tests drive the store directly with :meth:`KubeApiServer.create`,
:meth:`~KubeApiServer.patch` and friends (these behave like the HTTP verbs and
emit watch events) and inject faults with :meth:`~KubeApiServer.compact`,
:meth:`~KubeApiServer.drop_watches` and :meth:`~KubeApiServer.restart`.
Everything runs on the event loop that called :meth:`~KubeApiServer.start`; the
synchronous store methods must be called from that loop's thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import collections
import copy
import datetime
import errno
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from nmi_sandbox.tls import CertificateAuthority

__all__ = ["KubeApiError", "KubeApiServer"]

logger = logging.getLogger("nmi_sandbox.kube_api")

JSON = dict[str, Any]

_KUBE_VERSION = {
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

_PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")
_INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_MAIN_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_BINDING_SUCCESS: JSON = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Success",
    "code": 201,
}
_TOO_LARGE_RV_WAIT = 3.0  # seconds the real cacher waits for a future resourceVersion
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand alphabet


# --------------------------------------------------------------------------- errors


class KubeApiError(Exception):
    """A failed API call; ``status`` is the ``Status`` object the server answers with."""

    def __init__(self, status: JSON) -> None:
        super().__init__(status.get("message", ""))
        self.status = status
        self.code: int = int(status["code"])
        self.reason: str = str(status.get("reason", ""))


def _status(code: int, reason: str, message: str, details: JSON | None = None) -> JSON:
    st: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    }
    if reason:
        st["reason"] = reason
    if details is not None:
        st["details"] = details
    st["code"] = code
    return st


def _error(code: int, reason: str, message: str, details: JSON | None = None) -> KubeApiError:
    return KubeApiError(_status(code, reason, message, details))


def _unauthorized() -> KubeApiError:
    return _error(401, "Unauthorized", "Unauthorized")


def _bad_request(message: str) -> KubeApiError:
    return _error(400, "BadRequest", message)


def _resource_not_found() -> KubeApiError:
    return _error(404, "NotFound", "the server could not find the requested resource", {})


def _method_not_allowed() -> KubeApiError:
    return _error(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        {},
    )


def _unsupported_media_type(accepted: str) -> KubeApiError:
    return _error(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: "
        + accepted,
        {},
    )


def _expired(message: str) -> KubeApiError:
    return _error(410, "Expired", message)


def _too_large_rv(requested: int, current: int) -> KubeApiError:
    return _error(
        504,
        "Timeout",
        f"Too large resource version: {requested}, current: {current}",
        {
            "causes": [
                {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
            ],
            "retryAfterSeconds": 1,
        },
    )


def _internal(message: str) -> KubeApiError:
    # errToAPIStatus' fallback for plain errors: code 500, reason Unknown ("").
    return _error(500, "", message)


@dataclass(frozen=True)
class _FieldError:
    """One field.Error of the real validation code."""

    type: str  # Required | Invalid | Forbidden
    path: str
    detail: str = ""
    value: Any = None

    def __str__(self) -> str:
        if self.type == "Required":
            text = "Required value"
        elif self.type == "Invalid":
            text = f"Invalid value: {json.dumps(self.value)}"
        else:
            text = self.type
        if self.detail:
            text += f": {self.detail}"
        return f"{self.path}: {text}"

    def cause(self) -> JSON:
        reason = {
            "Required": "FieldValueRequired",
            "Invalid": "FieldValueInvalid",
            "Forbidden": "FieldValueForbidden",
        }[self.type]
        message = str(self)[len(self.path) + 2 :]
        return {"reason": reason, "message": message, "field": self.path}


# --------------------------------------------------------------------------- resources

FieldGetter = Callable[[JSON], str]


def _get_path(obj: Any, dotted: str) -> Any:
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


@dataclass(frozen=True)
class _Resource:
    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    storage: str
    custom: bool = False
    status_subresource: bool = False
    subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()
    fields: Mapping[str, FieldGetter] = field(default_factory=dict)
    returns_deleted_object: bool = False
    allow_unconditional_update: bool = True
    to_view: Callable[[JSON], JSON] = _identity
    from_view: Callable[[JSON], JSON] = _identity

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

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
        return _error(404, "NotFound", f'{self.qualified} "{name}" not found', self.details(name))

    def already_exists(self, name: str) -> KubeApiError:
        return _error(
            409, "AlreadyExists", f'{self.qualified} "{name}" already exists', self.details(name)
        )

    def conflict(self, name: str, why: str) -> KubeApiError:
        return _error(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {self.qualified} "{name}": {why}',
            self.details(name),
        )

    def forbidden(self, name: str, why: str) -> KubeApiError:
        return _error(
            403, "Forbidden", f'{self.qualified} "{name}" is forbidden: {why}', self.details(name)
        )

    def invalid(self, name: str, errors: list[_FieldError]) -> KubeApiError:
        text = "[" + ", ".join(str(e) for e in errors) + "]"
        if len(errors) == 1:
            text = str(errors[0])
        details: JSON = {"name": name}
        if self.group:
            details["group"] = self.group
        details["kind"] = self.kind
        details["causes"] = [e.cause() for e in errors]
        return _error(422, "Invalid", f'{self.qualified_kind} "{name}" is invalid: {text}', details)


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


def _crd(plural: str, singular: str, kind: str, *, status: bool = True) -> _Resource:
    """A CRD of aad-pod-identity, as daemonset/crds.yaml declares it.

    AzureAssignedIdentity has no status subresource: MIC creates it with its
    status and patches ``/status/status`` on the main resource.
    """
    return _Resource(
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


_RESOURCES: tuple[_Resource, ...] = (
    _Resource(
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
    _Resource(
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
    _Resource(
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
    _Resource(
        group="",
        version="v1",
        plural="secrets",
        singular="secret",
        kind="Secret",
        namespaced=True,
        storage="secrets",
        fields=_fields(True, {"type": _str_field("type")}),
    ),
    _Resource(
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
    _Resource(
        group="",
        version="v1",
        plural="serviceaccounts",
        singular="serviceaccount",
        kind="ServiceAccount",
        namespaced=True,
        storage="serviceaccounts",
        short_names=("sa",),
        fields=_fields(True),
    ),
    _Resource(
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
    _Resource(
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
    _crd("azureidentities", "azureidentity", "AzureIdentity"),
    _crd("azureidentitybindings", "azureidentitybinding", "AzureIdentityBinding"),
    _crd("azureassignedidentities", "azureassignedidentity", "AzureAssignedIdentity", status=False),
    _crd("azurepodidentityexceptions", "azurepodidentityexception", "AzurePodIdentityException"),
)

_BY_GVR: dict[tuple[str, str, str], _Resource] = {
    (r.group, r.version, r.plural): r for r in _RESOURCES
}
_BY_KIND: dict[tuple[str, str], _Resource] = {(r.api_version, r.kind): r for r in _RESOURCES}
# the canonical resource of each storage (the one whose view is the stored form)
_BY_STORAGE: dict[str, _Resource] = {
    r.storage: r for r in reversed(_RESOURCES) if r.to_view is _identity
}
_GROUPS: dict[str, list[str]] = {}
for _r in _RESOURCES:
    if _r.group:
        versions = _GROUPS.setdefault(_r.group, [])
        if _r.version not in versions:
            versions.append(_r.version)


# --------------------------------------------------------------------------- validation

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")

_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
    "regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


def _qualified_name_problem(key: str) -> str | None:
    if not key:
        return "name part must be non-empty"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return "prefix part " + _SUBDOMAIN_MSG
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or "
            "'123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        )
    return None


def _label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
            "'MyValue',  or 'my_value',  or '12345', regex used for validation is "
            "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        )
    return None


def _validate_meta(res: _Resource, obj: JSON) -> list[_FieldError]:
    errs: list[_FieldError] = []
    meta = obj["metadata"]
    name = meta.get("name", "")
    if res.storage == "namespaces":
        if len(name) > 63 or not _DNS1123_LABEL.match(name):
            errs.append(_FieldError("Invalid", "metadata.name", _LABEL_MSG, name))
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        errs.append(_FieldError("Invalid", "metadata.name", _SUBDOMAIN_MSG, name))
    labels = meta.get("labels")
    if labels is not None and not isinstance(labels, dict):
        errs.append(_FieldError("Invalid", "metadata.labels", "must be an object", labels))
    for key, value in (labels or {}).items():
        problem = _qualified_name_problem(key)
        if problem:
            errs.append(_FieldError("Invalid", "metadata.labels", problem, key))
        if not isinstance(value, str):
            errs.append(_FieldError("Invalid", "metadata.labels", "must be a string", value))
            continue
        problem = _label_value_problem(value)
        if problem:
            errs.append(_FieldError("Invalid", "metadata.labels", problem, value))
    annotations = meta.get("annotations")
    if annotations is not None and not isinstance(annotations, dict):
        errs.append(
            _FieldError("Invalid", "metadata.annotations", "must be an object", annotations)
        )
    for key, value in (annotations or {}).items():
        problem = _qualified_name_problem(key)
        if problem:
            errs.append(_FieldError("Invalid", "metadata.annotations", problem, key))
        if not isinstance(value, str):
            errs.append(_FieldError("Invalid", "metadata.annotations", "must be a string", value))
    finalizers = meta.get("finalizers")
    if finalizers is not None and (
        not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers)
    ):
        errs.append(_FieldError("Invalid", "metadata.finalizers", "must be strings", finalizers))
    return errs


def _pod_qos(spec: JSON) -> str:
    containers = list(spec.get("containers") or []) + list(spec.get("initContainers") or [])
    any_set = False
    guaranteed = bool(containers)
    for c in containers:
        resources = c.get("resources") or {}
        compute = ("cpu", "memory")
        requests = {k: v for k, v in (resources.get("requests") or {}).items() if k in compute}
        limits = {k: v for k, v in (resources.get("limits") or {}).items() if k in compute}
        if requests or limits:
            any_set = True
        if set(limits) != set(compute) or any(requests.get(k, v) != v for k, v in limits.items()):
            guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _default_pod(obj: JSON) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    # the ServiceAccount admission plugin
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spec["serviceAccountName"] = sa
    spec["serviceAccount"] = sa
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            if not isinstance(c, dict):
                continue
            c.setdefault("resources", {})
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            image = str(c.get("image", ""))
            tag = image.rsplit("/", 1)[-1]
            latest = "@" not in tag and (":" not in tag or tag.endswith(":latest"))
            c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")


def _validate_pod(obj: JSON) -> list[_FieldError]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [_FieldError("Required", "spec")]
    errs: list[_FieldError] = []
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        errs.append(_FieldError("Required", "spec.containers"))
        return errs
    for i, c in enumerate(containers):
        if not isinstance(c, dict):
            errs.append(_FieldError("Invalid", f"spec.containers[{i}]", "must be an object", c))
            continue
        if not c.get("name"):
            errs.append(_FieldError("Required", f"spec.containers[{i}].name"))
        if not c.get("image"):
            errs.append(_FieldError("Required", f"spec.containers[{i}].image"))
    return errs


_POD_UPDATE_MSG = (
    "pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
    "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
    "(allow it to be set to 1 if it was previously negative)"
)


def _pod_mutable_masked(spec: Any) -> Any:
    if not isinstance(spec, dict):
        return spec
    out = copy.deepcopy(spec)
    for key in (
        "activeDeadlineSeconds",
        "tolerations",
        "terminationGracePeriodSeconds",
        "schedulingGates",
    ):
        out.pop(key, None)
    for key in ("containers", "initContainers"):
        for c in out.get(key) or []:
            if isinstance(c, dict):
                c.pop("image", None)
    return out


def _validate_pod_update(new: JSON, old: JSON) -> list[_FieldError]:
    if _pod_mutable_masked(new.get("spec")) != _pod_mutable_masked(old.get("spec")):
        return [_FieldError("Forbidden", "spec", _POD_UPDATE_MSG)]
    return []


def _prepare_secret(obj: JSON) -> None:
    obj.setdefault("type", "Opaque")
    data = obj.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _bad_request(
            'Secret in version "v1" cannot be handled as a Secret: data must be an object'
        )
    for key, value in data.items():
        try:
            base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad_request(
                f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data '
                f"at key {key!r}: {e}"
            ) from None
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict):
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        obj["data"] = data
    else:
        obj.pop("data", None)


def _validate_secret(obj: JSON) -> list[_FieldError]:
    return [
        _FieldError(
            "Invalid",
            "data",
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            key,
        )
        for key in obj.get("data") or {}
        if not _CONFIG_KEY.match(key)
    ]


def _normalize_time(value: Any, path: str, *, micro: bool) -> Any:
    if value is None or value == "":
        return value
    try:
        parsed = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise _bad_request(
            f'Event in version "v1" cannot be handled as a Event: parsing time "{value}" '
            f'as "2006-01-02T15:04:05Z07:00" ({path})'
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return _format_time(parsed.astimezone(datetime.UTC), micro=micro)


def _prepare_event(obj: JSON) -> None:
    for key in ("firstTimestamp", "lastTimestamp"):
        if key in obj:
            obj[key] = _normalize_time(obj[key], key, micro=False)
    if "eventTime" in obj:
        obj["eventTime"] = _normalize_time(obj["eventTime"], "eventTime", micro=True)
    series = obj.get("series")
    if isinstance(series, dict) and "lastObservedTime" in series:
        series["lastObservedTime"] = _normalize_time(
            series["lastObservedTime"], "series.lastObservedTime", micro=True
        )
    obj.setdefault("involvedObject", {})
    obj.setdefault("source", {})
    obj.setdefault("eventTime", None)
    obj.setdefault("reportingComponent", "")
    obj.setdefault("reportingInstance", "")


def _validate_core_event(obj: JSON) -> list[_FieldError]:
    ns = obj["metadata"].get("namespace", "")
    involved = obj.get("involvedObject") or {}
    involved_ns = involved.get("namespace", "") if isinstance(involved, dict) else ""
    if (not involved_ns and ns not in ("", "default")) or (involved_ns and involved_ns != ns):
        return [
            _FieldError(
                "Invalid", "involvedObject.namespace", "does not match event.namespace", involved_ns
            )
        ]
    return []


def _validate_events_v1(view: JSON) -> list[_FieldError]:
    errs: list[_FieldError] = []
    if not view.get("eventTime"):
        errs.append(_FieldError("Required", "eventTime"))
    if view.get("type") not in ("Normal", "Warning"):
        errs.append(
            _FieldError(
                "Invalid", "type", "has invalid value: " + str(view.get("type")), view.get("type")
            )
        )
    for key in ("reportingController", "reportingInstance", "action", "reason"):
        if not view.get(key):
            errs.append(_FieldError("Required", key))
    for key in (
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
        "deprecatedCount",
        "deprecatedSource",
    ):
        if view.get(key):
            errs.append(_FieldError("Invalid", key, "needs to be unset", view.get(key)))
    return errs


# --------------------------------------------------------------------------- selectors

_SPECIAL = frozenset("=!(),<>")


def _lex_label_selector(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in _SPECIAL:
            two = text[i : i + 2]
            if two in ("==", "!="):
                tokens.append((two, two))
                i += 2
            else:
                tokens.append((ch, ch))
                i += 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in _SPECIAL:
                j += 1
            word = text[i:j]
            tokens.append((word if word in ("in", "notin") else "id", word))
            i = j
    return tokens


@dataclass(frozen=True)
class _LabelRequirement:
    key: str
    op: str  # exists | !exists | = | != | in | notin | gt | lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, Any]) -> bool:
        present = self.key in labels
        value = str(labels.get(self.key, ""))
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if not present:
            return False
        try:
            actual = int(value)
        except ValueError:
            return False
        bound = int(self.values[0])
        return actual > bound if self.op == "gt" else actual < bound


def _parse_label_selector(text: str) -> tuple[_LabelRequirement, ...]:
    tokens = _lex_label_selector(text)
    if not tokens:
        return ()
    pos = 0

    def peek() -> tuple[str, str]:
        return tokens[pos] if pos < len(tokens) else ("end", "")

    def fail(found: str, expected: str) -> KubeApiError:
        return _bad_request(f"unable to parse requirement: found '{found}', expected: {expected}")

    reqs: list[_LabelRequirement] = []
    while True:
        kind, text_ = peek()
        if kind == "!":
            pos += 1
            kind, key = peek()
            if kind != "id":
                raise fail(key, "identifier after '!'")
            pos += 1
            req = _LabelRequirement(key, "!exists")
        elif kind == "id":
            key = text_
            pos += 1
            op_kind, op_text = peek()
            if op_kind in ("end", ","):
                req = _LabelRequirement(key, "exists")
            elif op_kind in ("=", "==", "!="):
                pos += 1
                vkind, vtext = peek()
                value = ""
                if vkind == "id":
                    value = vtext
                    pos += 1
                elif vkind not in ("end", ","):
                    raise fail(vtext, "identifier")
                req = _LabelRequirement(key, "!=" if op_kind == "!=" else "=", (value,))
            elif op_kind in ("in", "notin"):
                pos += 1
                if peek()[0] != "(":
                    raise fail(peek()[1], "'('")
                pos += 1
                values: list[str] = []
                while True:
                    vkind, vtext = peek()
                    if vkind == ")" and not values:
                        break
                    if vkind != "id":
                        raise fail(vtext, "identifier")
                    values.append(vtext)
                    pos += 1
                    sep = peek()[0]
                    if sep == ",":
                        pos += 1
                        continue
                    if sep == ")":
                        break
                    raise fail(peek()[1], "',' or ')'")
                pos += 1
                if not values:
                    raise _bad_request(
                        "unable to parse requirement: values: Invalid value: null: for 'in', "
                        "'notin' operators, values set can't be empty"
                    )
                req = _LabelRequirement(key, op_kind, tuple(values))
            elif op_kind in (">", "<"):
                pos += 1
                vkind, vtext = peek()
                if vkind != "id":
                    raise fail(vtext, "identifier")
                pos += 1
                try:
                    int(vtext)
                except ValueError:
                    raise _bad_request(
                        f'unable to parse requirement: values[0]: Invalid value: "{vtext}": '
                        "for 'Gt', 'Lt' operators, the value must be an integer"
                    ) from None
                req = _LabelRequirement(key, "gt" if op_kind == ">" else "lt", (vtext,))
            else:
                raise fail(op_text, "'=', '!=', '==', 'in', notin'")
        else:
            raise fail(text_, "!, identifier, or 'end of string'")
        problem = _qualified_name_problem(req.key)
        if problem:
            raise _bad_request(
                f'unable to parse requirement: key: Invalid value: "{req.key}": {problem}'
            )
        if req.op in ("=", "!=", "in", "notin"):
            for i, v in enumerate(req.values):
                problem = _label_value_problem(v)
                if problem:
                    raise _bad_request(
                        f"unable to parse requirement: values[{i}][{req.key}]: "
                        f'Invalid value: "{v}": {problem}'
                    )
        reqs.append(req)
        kind, text_ = peek()
        if kind == "end":
            break
        if kind != ",":
            raise fail(text_, "',' or 'end of string'")
        pos += 1
        if peek()[0] == "end":
            raise fail("", "identifier")
    return tuple(reqs)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def _unescape_field_value(value: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            if i + 1 >= len(value) or value[i + 1] not in "\\,=":
                raise _bad_request(f"invalid field selector: invalid escape sequence in '{value}'")
            out.append(value[i + 1])
            i += 2
            continue
        if ch in ",=":
            raise _bad_request(f"invalid field selector: unescaped '{ch}' in '{value}'")
        out.append(ch)
        i += 1
    return "".join(out)


def _parse_field_selector(text: str, res: _Resource) -> tuple[tuple[str, bool, str], ...]:
    """(field, equal?, value) terms of a field selector, rejecting unsupported fields."""
    terms: list[tuple[str, bool, str]] = []
    for term in _split_unescaped(text, ","):
        if not term:
            continue
        found: tuple[str, str, str] | None = None
        i = 0
        while i < len(term) and found is None:
            if term[i] == "\\":
                i += 2
                continue
            for op in ("!=", "==", "="):
                if term.startswith(op, i):
                    found = (term[:i], op, term[i + len(op) :])
                    break
            i += 1
        if found is None:
            raise _bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        name, op, raw = found
        value = _unescape_field_value(raw)
        if name not in res.fields:
            raise _bad_request(f"field label not supported: {name}")
        terms.append((name, op != "!=", value))
    return tuple(terms)


@dataclass(frozen=True)
class _Filter:
    """Which stored objects a LIST or WATCH request sees."""

    res: _Resource
    namespace: str | None = None
    labels: tuple[_LabelRequirement, ...] = ()
    fields: tuple[tuple[str, bool, str], ...] = ()

    @classmethod
    def build(
        cls,
        res: _Resource,
        namespace: str | None,
        label_selector: str | None,
        field_selector: str | None,
    ) -> _Filter:
        return cls(
            res,
            namespace if res.namespaced else None,
            _parse_label_selector(label_selector or ""),
            _parse_field_selector(field_selector or "", res),
        )

    @property
    def has_selectors(self) -> bool:
        return bool(self.labels or self.fields)

    def __call__(self, obj: JSON) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(req.matches(labels) for req in self.labels):
            return False
        return all(
            (self.res.fields[name](obj) == value) == equal for name, equal, value in self.fields
        )


# --------------------------------------------------------------------------- patches


def _merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if strategic and patch.get("$patch") == "delete":
        return None
    result: JSON = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            merged = _merge_patch(result.get(key), value, strategic=strategic)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


class _JsonPatchError(Exception):
    pass


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise _JsonPatchError("missing path")
    if path == "":
        return []
    if not path.startswith("/"):
        raise _JsonPatchError(f"invalid path: {path}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise _JsonPatchError(f"invalid array index: {token}")
    idx = int(token)
    if idx > len(container) or (idx == len(container) and not allow_end):
        raise _JsonPatchError(f"array index out of bounds: {idx}")
    return idx


def _resolve(doc: Any, tokens: list[str]) -> Any:
    cur = doc
    for tok in tokens:
        if isinstance(cur, dict):
            if tok not in cur:
                raise _JsonPatchError(f"missing value at /{'/'.join(tokens)}")
            cur = cur[tok]
        elif isinstance(cur, list):
            cur = cur[_index(cur, tok, allow_end=False)]
        else:
            raise _JsonPatchError(f"missing value at /{'/'.join(tokens)}")
    return cur


def _jp_add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, allow_end=True), value)
    else:
        raise _JsonPatchError(f"cannot add to /{'/'.join(tokens)}")
    return doc


def _jp_remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise _JsonPatchError("cannot remove the document root")
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _JsonPatchError(f"unable to remove nonexistent key: {last}: missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, allow_end=False))
    raise _JsonPatchError(f"cannot remove /{'/'.join(tokens)}")


def _json_patch(doc: JSON, ops: list[Any]) -> Any:
    out: Any = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict):
            raise _JsonPatchError("patch operation must be an object")
        kind = op.get("op")
        path = _pointer(op.get("path"))
        if kind in ("add", "replace", "test") and "value" not in op:
            raise _JsonPatchError(f"missing value for op {kind}")
        if kind == "add":
            out = _jp_add(out, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _jp_remove(out, path)
        elif kind == "replace":
            _resolve(out, path)
            if path:
                _jp_remove(out, path)
            out = _jp_add(out, path, copy.deepcopy(op["value"]))
        elif kind == "move":
            source = _pointer(op.get("from"))
            value = _resolve(out, source)
            if source:
                _jp_remove(out, source)
            out = _jp_add(out, path, value)
        elif kind == "copy":
            value = copy.deepcopy(_resolve(out, _pointer(op.get("from"))))
            out = _jp_add(out, path, value)
        elif kind == "test":
            if not _json_equal(_resolve(out, path), op["value"]):
                raise _JsonPatchError(f"testing value {op.get('path')} failed: test failed")
        else:
            raise _JsonPatchError(f"Unexpected kind: {kind}")
    return out


# --------------------------------------------------------------------------- store helpers


def _format_time(when: datetime.datetime, *, micro: bool = False) -> str:
    if micro:
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> str:
    return _format_time(datetime.datetime.now(datetime.UTC))


def _key(obj: JSON) -> tuple[str, str]:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


def _with_rv(obj: JSON, rv: int) -> JSON:
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


@dataclass(frozen=True)
class _Event:
    rv: int
    storage: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: JSON
    prev: JSON | None


def _filter_event(flt: _Filter, ev: _Event) -> tuple[str, JSON] | None:
    """What a watcher with this filter sees of an event (the cacher's convertToWatchEvent)."""
    if ev.type == "ADDED":
        return ("ADDED", ev.obj) if flt(ev.obj) else None
    if ev.type == "DELETED":
        return ("DELETED", ev.obj) if flt(ev.obj) else None
    now = flt(ev.obj)
    before = ev.prev is not None and flt(ev.prev)
    if now and before:
        return ("MODIFIED", ev.obj)
    if now:
        return ("ADDED", ev.obj)
    if before and ev.prev is not None:
        return ("DELETED", _with_rv(ev.prev, ev.rv))
    return None


class _Watcher:
    """One open watch stream: a queue of pending events and a wake-up signal."""

    def __init__(self, flt: _Filter, loop: asyncio.AbstractEventLoop) -> None:
        self.flt = flt
        self.loop = loop
        self.queue: collections.deque[tuple[str, JSON]] = collections.deque()
        self.wake = asyncio.Event()
        self.closed = False

    def _signal(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.wake.set()
        else:
            self.loop.call_soon_threadsafe(self.wake.set)

    def push(self, ev: _Event) -> None:
        item = _filter_event(self.flt, ev)
        if item is not None:
            self.queue.append(item)
            self._signal()

    def close(self) -> None:
        self.closed = True
        self._signal()


def _encode_continue(rv: int, start: tuple[str, str], epoch: int) -> str:
    payload = {"v": "meta.k8s.io/v1", "rv": rv, "start": "/".join(start) + "\x00", "c": epoch}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, tuple[str, str], int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if payload.get("v") != "meta.k8s.io/v1":
            raise ValueError("continue key is not valid: incorrect encoded start resourceVersion")
        ns, _, name = str(payload["start"]).rstrip("\x00").partition("/")
        return int(payload["rv"]), (ns, name), int(payload.get("c", 0))
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise _bad_request(f"continue key is not valid: {e}") from None


_CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter, or use the continue token in "
    "this response to retrieve the remainder of the results. Continuing with the provided "
    "token results in an inconsistent list - objects that were created, modified, or deleted "
    "between the time the first chunk was returned and now may show up in the list."
)


@dataclass
class _Page:
    items: list[JSON]
    rv: int
    cont: str = ""
    remaining: int | None = None


def _parse_rv(value: str) -> int:
    try:
        rv = int(value)
    except ValueError:
        raise _bad_request(f'invalid resource version: "{value}"') from None
    if rv < 0:
        raise _bad_request(f'invalid resource version: "{value}"')
    return rv


def _parse_int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise _bad_request(f"invalid {name}: {value!r}") from None


# --------------------------------------------------------------------------- the server


class KubeApiServer:
    """A Kubernetes API server on loopback (HTTPS, bearer token), see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        ca: CertificateAuthority | None = None,
        bookmark_interval: float = 1.0,
        history_limit: int = 10000,
    ) -> None:
        self.host = host
        self.port = port
        self.token: str = token if token is not None else secrets.token_urlsafe(32)
        self.bookmark_interval = bookmark_interval
        self.history_limit = max(1, history_limit)
        self.requests: collections.Counter[str] = collections.Counter()

        ips = ["127.0.0.1", "::1"]
        try:
            ipaddress.ip_address(host)
            if host not in ips and host not in ("0.0.0.0", "::"):
                ips.append(host)
            names = ["localhost"]
        except ValueError:
            names = ["localhost", host] if host != "localhost" else ["localhost"]
        self._ca = ca or CertificateAuthority()
        self._cert = self._ca.issue_server(names, ips)
        self._ssl = self._cert.ssl_context()
        self.ca_pem: bytes = self._cert.ca_pem

        self._rv = 0
        self._history: collections.deque[_Event] = collections.deque()
        self._history_start = 0  # every event with rv > this is still in _history
        self._epoch = 0  # bumped by compact(): continue tokens from before are expired
        self._objects: dict[str, dict[tuple[str, str], JSON]] = {
            storage: {} for storage in _BY_STORAGE
        }
        self._watchers: set[_Watcher] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

        ns_res = _BY_STORAGE["namespaces"]
        for name in _INITIAL_NAMESPACES:
            self._create(ns_res, None, {"metadata": {"name": name}})

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; afterwards :attr:`port` is the real port."""
        if self._runner is not None:
            raise RuntimeError("KubeApiServer already started")
        self._loop = asyncio.get_running_loop()
        app = web.Application(client_max_size=3 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            sock = await self._bind()
            site = web.SockSite(runner, sock, ssl_context=self._ssl)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = int(sock.getsockname()[1])
        self._runner = runner
        logger.info("kube API emulator listening on %s", self.url)

    def _try_bind(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _bind(self) -> socket.socket:
        if self.port == 0:
            # A port from the kernel's ephemeral range could be taken by some outgoing
            # connection while the server is down in restart(); pick one below it.
            low = _ephemeral_port_floor()
            for _ in range(50):
                if low <= 10000:
                    break
                try:
                    return self._try_bind(secrets.randbelow(low - 10000) + 10000)
                except OSError:
                    continue
            return self._try_bind(0)
        # Same port again (restart): ride out sockets of the previous life still closing.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while True:
            try:
                return self._try_bind(self.port)
            except OSError as e:
                if e.errno != errno.EADDRINUSE or loop.time() >= deadline:
                    raise
                logger.debug("port %d still in use, retrying", self.port)
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Close the listener and every open watch stream (state is kept)."""
        self.drop_watches()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.info("kube API emulator on %s stopped", self.url)

    async def restart(self, *, downtime: float = 0.0) -> None:
        """Stop, stay down for ``downtime`` seconds, and serve again on the same port."""
        await self.stop()
        if downtime > 0:
            await asyncio.sleep(downtime)
        await self.start()

    def kubeconfig_dict(self) -> JSON:
        """A kubeconfig (as a dict) pointing at this server with its CA and token."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [
                {
                    "name": "emulator",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "emulator", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
        }

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`kubeconfig_dict` as YAML to ``path`` (mode 0600) and return it."""
        p = Path(path)
        p.write_text(yaml.safe_dump(self.kubeconfig_dict(), sort_keys=False))
        p.chmod(0o600)
        return p

    # ----------------------------------------------------------------- direct store access

    @staticmethod
    def _resource_for(api_version: str, kind: str) -> _Resource:
        res = _BY_KIND.get((api_version, kind))
        if res is None:
            raise _error(
                404, "NotFound", f'no matches for kind "{kind}" in version "{api_version}"'
            )
        return res

    @staticmethod
    def _namespace_for(res: _Resource, namespace: str | None) -> str | None:
        return (namespace or "default") if res.namespaced else None

    def create(self, obj: JSON) -> JSON:
        """Create ``obj`` like POST does (``apiVersion`` and ``kind`` select the resource).

        Namespaced objects without ``metadata.namespace`` go to ``default``.  As on
        the real server, a pod's ``status`` is reset to ``Pending`` and a custom
        resource's ``status`` is dropped; set them with ``patch(..., subresource="status")``.
        """
        res = self._resource_for(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
        meta = obj.get("metadata") or {}
        return copy.deepcopy(
            res.to_view(self._create(res, self._namespace_for(res, meta.get("namespace")), obj))
        )

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JSON | None:
        """The object, or None."""
        res = self._resource_for(api_version, kind)
        ns = self._namespace_for(res, namespace)
        found = self._objects[res.storage].get((ns or "", name))
        return copy.deepcopy(res.to_view(found)) if found is not None else None

    def replace(self, obj: JSON) -> JSON:
        """Update ``obj`` like PUT does (a set ``metadata.resourceVersion`` is a precondition)."""
        res = self._resource_for(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
        meta = obj.get("metadata") or {}
        ns = self._namespace_for(res, meta.get("namespace"))
        return copy.deepcopy(res.to_view(self._update(res, ns, str(meta.get("name", "")), obj)))

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        patch: JSON,
        *,
        subresource: str | None = None,
    ) -> JSON:
        """Apply a JSON merge patch like PATCH does (``subresource="status"`` for status)."""
        res = self._resource_for(api_version, kind)
        if subresource not in (None, *(s for s in res.subresources if s == "status")):
            raise _resource_not_found()
        ns = self._namespace_for(res, namespace)
        result = self._patch(res, ns, name, "application/merge-patch+json", patch, subresource)
        return copy.deepcopy(res.to_view(result))

    def delete(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JSON | None:
        """Delete like DELETE does; None if absent.

        Returns the deleted object, or (if finalizers are pending) the object now
        carrying ``deletionTimestamp``.
        """
        res = self._resource_for(api_version, kind)
        ns = self._namespace_for(res, namespace)
        if (ns or "", name) not in self._objects[res.storage]:
            return None
        obj, _ = self._delete(res, ns, name)
        return copy.deepcopy(res.to_view(obj))

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[JSON]:
        """Matching objects (all namespaces if ``namespace`` is None), each with kind/apiVersion."""
        res = self._resource_for(api_version, kind)
        flt = _Filter.build(res, namespace, label_selector, field_selector)
        page = self._list(flt, None, None, None, None)
        return [copy.deepcopy(res.to_view(o)) for o in page.items]

    def compact(self) -> None:
        """Forget all event history, like an etcd compaction at the current revision."""
        self._history.clear()
        self._history_start = self._rv
        self._epoch += 1
        logger.info("history compacted at resourceVersion %d", self._rv)

    def drop_watches(self) -> None:
        """End every open watch stream cleanly; clients have to re-watch."""
        for watcher in list(self._watchers):
            watcher.close()

    def watch_count(self, resource: str) -> int:
        """How many watch streams are open on ``resource`` (a plural, e.g. ``pods``)."""
        return sum(1 for w in self._watchers if w.flt.res.plural == resource and not w.closed)

    async def wait_for_watchers(self, resource: str, count: int = 1, timeout: float = 10) -> None:
        """Resolve once ``count`` watch streams are open on ``resource``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.watch_count(resource) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.watch_count(resource)} watch(es) open on {resource}, "
                    f"wanted {count} within {timeout}s"
                )
            await self._wait_change(remaining)

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion."""
        return str(self._rv)

    # ----------------------------------------------------------------- change notification

    async def _wait_change(self, timeout: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait([fut], timeout=timeout)
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                if fut.get_loop() is _running_loop():
                    fut.set_result(None)
                else:
                    fut.get_loop().call_soon_threadsafe(_resolve_future, fut)

    async def _wait_rv(self, rv: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._rv < rv:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _too_large_rv(rv, self._rv)
            await self._wait_change(remaining)

    # ----------------------------------------------------------------- storage primitives

    def _commit(self, storage: str, etype: str, obj: JSON, prev: JSON | None) -> JSON:
        self._rv += 1
        rv = self._rv
        obj["metadata"]["resourceVersion"] = str(rv)
        key = _key(obj)
        if etype == "DELETED":
            del self._objects[storage][key]
        else:
            self._objects[storage][key] = obj
        ev = _Event(rv, storage, etype, obj, prev)
        self._history.append(ev)
        while len(self._history) > self.history_limit:
            self._history_start = self._history.popleft().rv
        for watcher in list(self._watchers):
            if watcher.flt.res.storage == storage and not watcher.closed:
                watcher.push(ev)
        logger.debug("%s %s %s/%s rv=%d", etype, storage, key[0], key[1], rv)
        self._notify()
        return obj

    def _state_at(self, storage: str, rv: int) -> dict[tuple[str, str], JSON]:
        """The objects of ``storage`` as they were at ``rv`` (must be >= _history_start)."""
        state = dict(self._objects[storage])
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            if ev.storage != storage:
                continue
            key = _key(ev.obj)
            if ev.type == "ADDED":
                state.pop(key, None)
            elif ev.prev is not None:
                state[key] = ev.prev
        return state

    def _list(
        self,
        flt: _Filter,
        rv_param: str | None,
        rv_match: str | None,
        limit: int | None,
        cont: str | None,
    ) -> _Page:
        storage = flt.res.storage
        start: tuple[str, str] | None = None
        if cont:
            if rv_param:
                raise _bad_request("specifying resource version is not allowed when using continue")
            token_rv, start, epoch = _decode_continue(cont)
            if token_rv == -1:
                list_rv, state = self._rv, self._objects[storage]
            elif epoch != self._epoch or token_rv < self._history_start:
                err = _expired(_CONTINUE_EXPIRED)
                err.status["metadata"] = {"continue": _encode_continue(-1, start, self._epoch)}
                raise err
            else:
                list_rv, state = token_rv, self._state_at(storage, token_rv)
        elif rv_match == "Exact":
            if not rv_param or rv_param == "0":
                raise _bad_request(
                    'resourceVersionMatch "Exact" requires a non-zero resourceVersion'
                )
            wanted = _parse_rv(rv_param)
            if wanted > self._rv:
                raise _too_large_rv(wanted, self._rv)
            if wanted < self._history_start:
                raise _expired(f"too old resource version: {wanted} ({self._history_start})")
            list_rv, state = wanted, self._state_at(storage, wanted)
        else:
            list_rv, state = self._rv, self._objects[storage]
        keys = sorted(state)
        if start is not None:
            keys = [k for k in keys if k > start]
        if flt.namespace is not None:
            keys = [k for k in keys if k[0] == flt.namespace]
        items: list[JSON] = []
        last: tuple[str, str] | None = None
        examined = 0
        for key in keys:
            if limit is not None and limit > 0 and len(items) >= limit:
                break
            examined += 1
            last = key
            if flt(state[key]):
                items.append(state[key])
        page = _Page(items, list_rv)
        if limit is not None and limit > 0 and examined < len(keys) and last is not None:
            page.cont = _encode_continue(list_rv, last, self._epoch)
            if not flt.has_selectors:
                page.remaining = len(keys) - examined
        return page

    # ----------------------------------------------------------------- verbs (store level)

    def _check_namespace(self, res: _Resource, namespace: str | None, name: str) -> None:
        if not res.namespaced or namespace is None:
            return
        ns_obj = self._objects["namespaces"].get(("", namespace))
        if ns_obj is None:
            raise _BY_STORAGE["namespaces"].not_found(namespace)
        if ns_obj["metadata"].get("deletionTimestamp"):
            raise res.forbidden(
                name,
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated",
            )

    def _create(
        self, res: _Resource, namespace: str | None, view: JSON, *, dry_run: bool = False
    ) -> JSON:
        if not isinstance(view.get("metadata", {}), dict):
            raise _bad_request("metadata must be an object")
        storage_res = _BY_STORAGE[res.storage]
        obj = res.from_view(copy.deepcopy(view))
        obj["apiVersion"], obj["kind"] = storage_res.api_version, storage_res.kind
        meta: JSON = obj.setdefault("metadata", {})
        if res.namespaced:
            given = meta.get("namespace") or ""
            if given and given != namespace:
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise _internal("resourceVersion should not be set on objects to be created")
        name = str(meta.get("name") or "")
        generate = str(meta.get("generateName") or "")
        if not name and not generate:
            raise res.invalid(
                "", [_FieldError("Required", "metadata.name", "name or generateName is required")]
            )
        self._check_namespace(res, namespace, name or generate)
        if not name:
            bucket = self._objects[res.storage]
            while True:
                name = generate + "".join(secrets.choice(_NAME_CHARS) for _ in range(5))
                if (namespace or "", name) not in bucket:
                    break
            meta["name"] = name
        for system in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "selfLink",
            "managedFields",
        ):
            meta.pop(system, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        errs: list[_FieldError] = []
        if res.custom:
            meta["generation"] = 1
            if res.status_subresource:  # without one, status is part of the object
                obj.pop("status", None)
        storage = res.storage
        if storage == "pods":
            _default_pod(obj)
            spec = obj.get("spec")
            qos = _pod_qos(spec if isinstance(spec, dict) else {})
            obj["status"] = {"phase": "Pending", "qosClass": qos}
            errs += _validate_pod(obj)
        elif storage == "namespaces":
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
            labels = meta.setdefault("labels", {})
            if isinstance(labels, dict):
                labels["kubernetes.io/metadata.name"] = name
        elif storage == "secrets":
            _prepare_secret(obj)
            errs += _validate_secret(obj)
        elif storage == "events":
            if res.to_view is not _identity:
                errs += _validate_events_v1(res.to_view(obj))
            else:
                errs += _validate_core_event(obj)
            _prepare_event(obj)
        errs = _validate_meta(res, obj) + errs
        if errs:
            raise res.invalid(name, errs)
        if (namespace or "", name) in self._objects[storage]:
            raise res.already_exists(name)
        if dry_run:
            return obj
        return self._commit(storage, "ADDED", obj, None)

    def _update(
        self,
        res: _Resource,
        namespace: str | None,
        name: str,
        view: JSON,
        subresource: str | None = None,
        *,
        dry_run: bool = False,
    ) -> JSON:
        storage = res.storage
        existing = self._objects[storage].get((namespace or "", name))
        if existing is None:
            raise res.not_found(name)
        if not isinstance(view.get("metadata", {}), dict):
            raise _bad_request("metadata must be an object")
        obj = res.from_view(copy.deepcopy(view))
        meta: JSON = obj.setdefault("metadata", {})
        body_name = str(meta.get("name") or "")
        if body_name != name:
            raise _bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        if res.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        old_meta = existing["metadata"]
        rv = str(meta.get("resourceVersion") or "")
        if rv and rv != old_meta["resourceVersion"]:
            raise res.conflict(
                name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        if not rv and not res.allow_unconditional_update:
            raise res.invalid(
                name,
                [
                    _FieldError(
                        "Invalid", "metadata.resourceVersion", "must be specified for an update", 0
                    )
                ],
            )
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            raise res.conflict(
                name,
                f"Precondition failed: UID in precondition: {old_meta['uid']}, "
                f"UID in object meta: {meta['uid']}",
            )
        storage_res = _BY_STORAGE[storage]
        if subresource == "status":
            cand = copy.deepcopy(existing)
            if "status" in obj:
                cand["status"] = obj["status"]
            else:
                cand.pop("status", None)
        else:
            cand = obj
            meta = cand["metadata"]
            for system in (
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "selfLink",
                "managedFields",
            ):
                if system in old_meta:
                    meta[system] = old_meta[system]
                else:
                    meta.pop(system, None)
            meta["name"] = name
            if res.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if res.status_subresource:
                if "status" in existing:
                    cand["status"] = copy.deepcopy(existing["status"])
                else:
                    cand.pop("status", None)
            cand["apiVersion"], cand["kind"] = storage_res.api_version, storage_res.kind
            errs: list[_FieldError] = []
            if storage == "pods":
                _default_pod(cand)
                errs += _validate_pod(cand) or _validate_pod_update(cand, existing)
            elif storage == "namespaces":
                cand["spec"] = copy.deepcopy(existing.get("spec", {}))
                labels = meta.setdefault("labels", {})
                if isinstance(labels, dict):
                    labels["kubernetes.io/metadata.name"] = name
            elif storage == "secrets":
                _prepare_secret(cand)
                errs += _validate_secret(cand)
                if cand.get("type") != existing.get("type"):
                    errs.append(
                        _FieldError("Invalid", "type", "field is immutable", cand.get("type"))
                    )
            elif storage == "events":
                _prepare_event(cand)
            errs = _validate_meta(res, cand) + errs
            if old_meta.get("deletionTimestamp"):
                added = [
                    f
                    for f in meta.get("finalizers") or []
                    if f not in (old_meta.get("finalizers") or [])
                ]
                if added:
                    errs.append(
                        _FieldError(
                            "Forbidden",
                            "metadata.finalizers",
                            "no new finalizers can be added if the object is being deleted, found "
                            f"new finalizers {json.dumps(added)}",
                        )
                    )
            if errs:
                raise res.invalid(name, errs)
            if res.custom:
                strip = ("metadata", "status", "apiVersion", "kind")
                before = {k: v for k, v in existing.items() if k not in strip}
                after = {k: v for k, v in cand.items() if k not in strip}
                if before != after:
                    meta["generation"] = int(old_meta.get("generation", 1)) + 1
        cand["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        if cand == existing:
            return existing  # a no-op update writes nothing, like the real server
        if dry_run:
            return cand
        deleting = bool(cand["metadata"].get("deletionTimestamp"))
        if deleting and not cand["metadata"].get("finalizers") and storage != "namespaces":
            deleted = self._commit(storage, "DELETED", cand, existing)
            self._after_delete(deleted)
            return deleted
        result = self._commit(storage, "MODIFIED", cand, existing)
        if storage == "namespaces" and deleting:
            self._maybe_finish_namespace(name)
        return result

    def _patch(
        self,
        res: _Resource,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: Any,
        subresource: str | None,
        *,
        dry_run: bool = False,
    ) -> JSON:
        existing = self._objects[res.storage].get((namespace or "", name))
        if existing is None:
            raise res.not_found(name)
        current = res.to_view(copy.deepcopy(existing))
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _bad_request(
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            try:
                patched = _json_patch(current, patch)
            except _JsonPatchError as e:
                raise _error(
                    422,
                    "Invalid",
                    "the server rejected our request due to an error in our request",
                    {"causes": [{"reason": "UnexpectedServerResponse", "message": str(e)}]},
                ) from None
        elif content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            if content_type.startswith("application/strategic") and res.custom:
                raise _unsupported_media_type(
                    "application/json-patch+json, application/merge-patch+json, "
                    "application/apply-patch+yaml"
                )
            if not isinstance(patch, dict):
                raise _bad_request(
                    "json: cannot unmarshal array into Go value of type map[string]interface {}"
                )
            patched = _merge_patch(
                current, patch, strategic=content_type.startswith("application/strategic")
            )
        else:
            raise _unsupported_media_type(
                "application/json-patch+json, application/merge-patch+json, "
                "application/apply-patch+yaml"
                + ("" if res.custom else ", application/strategic-merge-patch+json")
            )
        if not isinstance(patched, dict):
            raise _bad_request("the patched object is not a JSON object")
        return self._update(res, namespace, name, patched, subresource, dry_run=dry_run)

    def _delete(
        self,
        res: _Resource,
        namespace: str | None,
        name: str,
        preconditions: JSON | None = None,
        *,
        dry_run: bool = False,
    ) -> tuple[JSON, bool]:
        """Delete; returns (object, removed-now?)."""
        storage = res.storage
        existing = self._objects[storage].get((namespace or "", name))
        if existing is None:
            raise res.not_found(name)
        old_meta = existing["metadata"]
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != old_meta["uid"]:
            raise res.conflict(
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, "
                f"UID in object meta: {old_meta['uid']}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != old_meta["resourceVersion"]:
            raise res.conflict(
                name,
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {old_meta['resourceVersion']}",
            )
        if storage == "namespaces":
            if name in _PROTECTED_NAMESPACES:
                raise res.forbidden(name, "this namespace may not be deleted")
            if old_meta.get("deletionTimestamp"):
                return existing, False
            cand = copy.deepcopy(existing)
            cand["metadata"]["deletionTimestamp"] = _now()
            cand["metadata"]["deletionGracePeriodSeconds"] = 0
            cand.setdefault("status", {})["phase"] = "Terminating"
            if dry_run:
                return cand, False
            result = self._commit(storage, "MODIFIED", cand, existing)
            self._purge_namespace(name)
            return result, (("", name) not in self._objects[storage])
        if old_meta.get("finalizers"):
            if old_meta.get("deletionTimestamp"):
                return existing, False
            cand = copy.deepcopy(existing)
            cand["metadata"]["deletionTimestamp"] = _now()
            cand["metadata"]["deletionGracePeriodSeconds"] = 0
            if dry_run:
                return cand, False
            return self._commit(storage, "MODIFIED", cand, existing), False
        if dry_run:
            return existing, True
        deleted = self._commit(storage, "DELETED", copy.deepcopy(existing), existing)
        self._after_delete(deleted)
        return deleted, True

    def _after_delete(self, obj: JSON) -> None:
        ns = obj["metadata"].get("namespace")
        if ns:
            ns_obj = self._objects["namespaces"].get(("", ns))
            if ns_obj is not None and ns_obj["metadata"].get("deletionTimestamp"):
                self._maybe_finish_namespace(ns)

    def _purge_namespace(self, namespace: str) -> None:
        """The namespace controller: delete everything in a terminating namespace."""
        for storage, bucket in self._objects.items():
            res = _BY_STORAGE[storage]
            if not res.namespaced:
                continue
            for key in sorted(k for k in bucket if k[0] == namespace):
                if key in bucket:
                    self._delete(res, namespace, key[1])
        self._maybe_finish_namespace(namespace)

    def _maybe_finish_namespace(self, namespace: str) -> None:
        ns_obj = self._objects["namespaces"].get(("", namespace))
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        if ns_obj["metadata"].get("finalizers"):
            return
        for storage, bucket in self._objects.items():
            if _BY_STORAGE[storage].namespaced and any(k[0] == namespace for k in bucket):
                return
        final = copy.deepcopy(ns_obj)
        final["spec"] = {}
        self._commit("namespaces", "DELETED", final, ns_obj)

    def _bind_pod(self, namespace: str, name: str, body: JSON) -> None:
        res = _BY_STORAGE["pods"]
        existing = self._objects["pods"].get((namespace, name))
        if existing is None:
            raise res.not_found(name)
        target = body.get("target") or {}
        node = target.get("name") if isinstance(target, dict) else None
        if not node:
            raise _error(
                422,
                "Invalid",
                f'Binding.meta.k8s.io "{name}" is invalid: target.name: Required value',
                {"name": name, "kind": "Binding"},
            )
        current = (existing.get("spec") or {}).get("nodeName")
        if current:
            raise res.conflict(name, f'pod {name} is already assigned to node "{current}"')
        cand = copy.deepcopy(existing)
        cand.setdefault("spec", {})["nodeName"] = node
        conditions = cand.setdefault("status", {}).setdefault("conditions", [])
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": _now(),
            }
        )
        self._commit("pods", "MODIFIED", cand, existing)

    # ----------------------------------------------------------------- HTTP

    def _count(self, key: str) -> None:
        self.requests[key] += 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            self._authenticate(request)
            response = await self._route(request)
        except KubeApiError as e:
            logger.debug("%s %s -> %d %s", request.method, request.path_qs, e.code, e)
            return self._json(e.status, e.code)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("kube API emulator failed on %s %s", request.method, request.path_qs)
            err = _internal(f"emulator error: {e!r}")
            return self._json(err.status, 500)
        logger.debug("%s %s -> %d", request.method, request.path_qs, response.status)
        return response

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.token.encode()
        ):
            logger.debug("unauthorized %s %s", request.method, request.path_qs)
            raise _unauthorized()

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts:
            return self._json(self._root_paths())
        head = parts[0]
        if head in ("healthz", "livez", "readyz") and request.method in ("GET", "HEAD"):
            self._count(f"GET /{head}")
            return web.Response(text="ok", content_type="text/plain")
        if parts == ["version"] and request.method == "GET":
            self._count("GET /version")
            return self._json(dict(_KUBE_VERSION))
        if head == "api":
            if len(parts) == 1:
                self._count("GET /api")
                return self._json(
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                        ],
                    }
                )
            if parts[1] != "v1":
                raise _resource_not_found()
            if len(parts) == 2:
                self._count("GET /api/v1")
                return self._json(self._resource_list("", "v1"))
            group, version, rest = "", "v1", parts[2:]
        elif head == "apis":
            if len(parts) == 1:
                self._count("GET /apis")
                return self._json(self._group_list())
            group = parts[1]
            if group not in _GROUPS:
                raise _resource_not_found()
            if len(parts) == 2:
                self._count(f"GET /apis/{group}")
                return self._json({"kind": "APIGroup", "apiVersion": "v1", **self._group(group)})
            version = parts[2]
            if version not in _GROUPS[group]:
                raise _resource_not_found()
            if len(parts) == 3:
                self._count(f"GET /apis/{group}/{version}")
                return self._json(self._resource_list(group, version))
            rest = parts[3:]
        else:
            raise _resource_not_found()
        return await self._resource_request(request, group, version, rest)

    @staticmethod
    def _json(body: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=json.dumps(body, separators=(",", ":")).encode(),
            status=status,
            content_type="application/json",
        )

    def _root_paths(self) -> JSON:
        paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
        for group, versions in _GROUPS.items():
            paths.append(f"/apis/{group}")
            paths += [f"/apis/{group}/{v}" for v in versions]
        return {"paths": sorted(paths)}

    @staticmethod
    def _group(group: str) -> JSON:
        versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in _GROUPS[group]]
        return {"name": group, "versions": versions, "preferredVersion": versions[0]}

    def _group_list(self) -> JSON:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group(g) for g in _GROUPS],
        }

    @staticmethod
    def _resource_list(group: str, version: str) -> JSON:
        resources: list[JSON] = []
        for res in _RESOURCES:
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
                resources.append(
                    {
                        "name": f"{res.plural}/{sub}",
                        "singularName": "",
                        "namespaced": res.namespaced,
                        "kind": "Binding" if sub == "binding" else res.kind,
                        "verbs": ["create"] if sub == "binding" else ["get", "patch", "update"],
                    }
                )
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

    async def _read_body(self, request: web.Request) -> Any:
        raw = await request.read()
        media = request.content_type.lower()
        try:
            if media in ("application/yaml", "application/x-yaml", "text/yaml"):
                return yaml.safe_load(raw)
            return json.loads(raw or b"null")
        except (ValueError, yaml.YAMLError) as e:
            raise _bad_request(f"couldn't get version/kind; json parse error: {e}") from None

    @staticmethod
    def _check_type(res: _Resource, body: Any) -> JSON:
        if not isinstance(body, dict):
            raise _bad_request(
                "the body of the request must be a JSON object, got " + type(body).__name__
            )
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if res.custom:
            if not kind:
                raise _bad_request(f"Object 'Kind' is missing in '{json.dumps(body)}'")
            if not api_version:
                raise _bad_request(f"Object 'apiVersion' is missing in '{json.dumps(body)}'")
        if api_version and api_version != res.api_version:
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({res.api_version})"
            )
        if kind and kind != res.kind:
            raise _bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({res.kind})"
            )
        return body

    async def _resource_request(
        self, request: web.Request, group: str, version: str, rest: builtins.list[str]
    ) -> web.StreamResponse:
        watch_path = False
        if rest and rest[0] == "watch":
            watch_path, rest = True, rest[1:]
        if not rest:
            raise _resource_not_found()
        namespace: str | None = None
        name: str | None = None
        sub: str | None = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, plural, tail = rest[1], rest[2], rest[3:]
        else:
            plural, tail = rest[0], rest[1:]
        if len(tail) > 2:
            raise _resource_not_found()
        if tail:
            name = tail[0]
        if len(tail) == 2:
            sub = tail[1]
        q = request.query
        if (group, plural, name) == ("", "bindings", None) and namespace is not None:
            # the legacy "bindings" resource: POST a Binding named after the pod
            if request.method != "POST":
                raise _method_not_allowed()
            self._count("POST bindings")
            body = await self._read_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
                raise _bad_request("the body of the request must be a Binding object")
            self._bind_pod(namespace, str(body["metadata"].get("name", "")), body)
            return self._json(_BINDING_SUCCESS, 201)
        res = _BY_GVR.get((group, version, plural))
        if res is None or (namespace is not None and not res.namespaced):
            raise _resource_not_found()
        if res.namespaced and namespace is None and name is not None:
            raise _resource_not_found()
        if sub is not None and sub not in res.subresources:
            raise _resource_not_found()
        method = request.method
        counted = res.plural + (f"/{sub}" if sub else "")
        dry_run = q.get("dryRun") == "All"
        if name is None:
            if method == "GET":
                if watch_path or _flag(q.get("watch")):
                    self._count(f"WATCH {counted}")
                    return await self._watch(request, res, namespace)
                self._count(f"LIST {counted}")
                return await self._list_response(res, namespace, q)
            if method == "POST" and (namespace is not None or not res.namespaced):
                self._count(f"POST {counted}")
                body = self._check_type(res, await self._read_body(request))
                created = self._create(res, namespace, body, dry_run=dry_run)
                return self._json(res.to_view(created), 201)
            if method == "DELETE" and (namespace is not None or not res.namespaced):
                self._count(f"DELETECOLLECTION {counted}")
                return self._delete_collection(res, namespace, q, dry_run=dry_run)
            raise _method_not_allowed()
        if watch_path:
            if method != "GET" or sub is not None:
                raise _method_not_allowed()
            self._count(f"WATCH {counted}")
            return await self._watch(request, res, namespace, single=name)
        if sub == "binding":
            if method != "POST":
                raise _method_not_allowed()
            self._count(f"POST {counted}")
            body = await self._read_body(request)
            if not isinstance(body, dict):
                raise _bad_request("the body of the request must be a Binding object")
            assert namespace is not None
            self._bind_pod(namespace, name, body)
            return self._json(_BINDING_SUCCESS, 201)
        if method == "GET":
            if _flag(q.get("watch")):
                self._count(f"WATCH {counted}")
                return await self._watch(request, res, namespace, single=name)
            self._count(f"GET {counted}")
            found = self._objects[res.storage].get((namespace or "", name))
            if found is None:
                raise res.not_found(name)
            return self._json(res.to_view(found))
        if method == "PUT":
            self._count(f"PUT {counted}")
            body = self._check_type(res, await self._read_body(request))
            return self._json(
                res.to_view(self._update(res, namespace, name, body, sub, dry_run=dry_run))
            )
        if method == "PATCH":
            self._count(f"PATCH {counted}")
            media = request.content_type.lower()
            body = await self._read_body(request)
            return self._json(
                res.to_view(self._patch(res, namespace, name, media, body, sub, dry_run=dry_run))
            )
        if method == "DELETE" and sub is None:
            self._count(f"DELETE {counted}")
            options = await self._read_body(request) if request.can_read_body else None
            preconditions = options.get("preconditions") if isinstance(options, dict) else None
            obj, removed = self._delete(res, namespace, name, preconditions, dry_run=dry_run)
            if removed and not res.returns_deleted_object:
                details = res.details(name)
                details["uid"] = obj["metadata"].get("uid", "")
                return self._json(
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": details,
                    }
                )
            return self._json(res.to_view(obj))
        raise _method_not_allowed()

    def _list_kind(self, res: _Resource) -> str:
        return f"{res.kind}List"

    async def _list_response(
        self, res: _Resource, namespace: str | None, q: Mapping[str, str]
    ) -> web.Response:
        flt = _Filter.build(res, namespace, q.get("labelSelector"), q.get("fieldSelector"))
        rv_param = q.get("resourceVersion") or None
        rv_match = q.get("resourceVersionMatch") or None
        if rv_match not in (None, "Exact", "NotOlderThan"):
            raise _bad_request(f'invalid resourceVersionMatch: "{rv_match}"')
        if rv_param and rv_param != "0" and rv_match != "Exact" and not q.get("continue"):
            wanted = _parse_rv(rv_param)
            if wanted > self._rv:
                await self._wait_rv(wanted, _TOO_LARGE_RV_WAIT)
        page = self._list(
            flt, rv_param, rv_match, _parse_int(q.get("limit"), "limit"), q.get("continue")
        )
        meta: JSON = {"resourceVersion": str(page.rv)}
        if page.cont:
            meta["continue"] = page.cont
        if page.remaining is not None:
            meta["remainingItemCount"] = page.remaining
        items = [res.to_view(o) for o in page.items]
        if not res.custom:
            # typed lists of built-in kinds carry no per-item TypeMeta on the wire
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        return self._json(
            {
                "kind": self._list_kind(res),
                "apiVersion": res.api_version,
                "metadata": meta,
                "items": items,
            }
        )

    def _delete_collection(
        self, res: _Resource, namespace: str | None, q: Mapping[str, str], *, dry_run: bool
    ) -> web.Response:
        flt = _Filter.build(res, namespace, q.get("labelSelector"), q.get("fieldSelector"))
        page = self._list(flt, None, None, None, None)
        deleted: list[JSON] = []
        for obj in page.items:
            meta = obj["metadata"]
            key = (meta.get("namespace") or "", meta["name"])
            if key not in self._objects[res.storage]:
                continue
            try:
                result, _ = self._delete(res, meta.get("namespace"), meta["name"], dry_run=dry_run)
            except KubeApiError as e:
                if e.code != 404:
                    raise
                continue
            deleted.append(res.to_view(result))
        return self._json(
            {
                "kind": self._list_kind(res),
                "apiVersion": res.api_version,
                "metadata": {"resourceVersion": str(self._rv)},
                "items": deleted,
            }
        )

    # ----------------------------------------------------------------- WATCH

    def _bookmark(self, res: _Resource, rv: int, *, initial_end: bool = False) -> JSON:
        meta: JSON = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}

    async def _watch(
        self,
        request: web.Request,
        res: _Resource,
        namespace: str | None,
        *,
        single: str | None = None,
    ) -> web.StreamResponse:
        q = request.query
        field_selector = q.get("fieldSelector") or ""
        if single is not None:
            name_sel = "metadata.name=" + single.replace("\\", "\\\\").replace(",", "\\,").replace(
                "=", "\\="
            )
            field_selector = f"{field_selector},{name_sel}" if field_selector else name_sel
        flt = _Filter.build(res, namespace, q.get("labelSelector"), field_selector)
        rv_param = q.get("resourceVersion") or ""
        bookmarks = _flag(q.get("allowWatchBookmarks"))
        send_initial = _flag(q.get("sendInitialEvents"))
        timeout_s = _parse_int(q.get("timeoutSeconds"), "timeoutSeconds")
        start_rv: int | None = None
        if rv_param not in ("", "0"):
            start_rv = _parse_rv(rv_param)
            if start_rv > self._rv:
                await self._wait_rv(start_rv, _TOO_LARGE_RV_WAIT)
        loop = asyncio.get_running_loop()

        # Snapshot and registration happen without an await in between, so no
        # write can fall between the initial events and the live ones.
        initial: list[tuple[str, JSON]] = []
        error: JSON | None = None
        watcher: _Watcher | None = None
        snapshot_rv = self._rv
        if start_rv is None or send_initial:
            initial = [("ADDED", o) for o in self._list(flt, None, None, None, None).items]
        elif start_rv < self._history_start:
            error = _status(
                410, "Expired", f"too old resource version: {start_rv} ({self._history_start})"
            )
        else:
            for ev in self._history:
                if ev.rv > start_rv and ev.storage == res.storage:
                    item = _filter_event(flt, ev)
                    if item is not None:
                        initial.append(item)
        if error is None:
            watcher = _Watcher(flt, loop)
            self._watchers.add(watcher)
            self._notify()

        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"},
        )
        response.enable_chunked_encoding()

        async def send(etype: str, obj: JSON) -> None:
            line = json.dumps({"type": etype, "object": obj}, separators=(",", ":"))
            await response.write(line.encode() + b"\n")

        try:
            await response.prepare(request)
            if error is not None:
                await send("ERROR", error)
                return response
            assert watcher is not None
            for etype, obj in initial:
                await send(etype, res.to_view(obj))
            if send_initial and bookmarks:
                await send("BOOKMARK", self._bookmark(res, snapshot_rv, initial_end=True))
            deadline = loop.time() + timeout_s if timeout_s and timeout_s > 0 else None
            next_bookmark = loop.time() + self.bookmark_interval if bookmarks else None
            while True:
                watcher.wake.clear()
                while watcher.queue:
                    etype, obj = watcher.queue.popleft()
                    await send(etype, res.to_view(obj))
                if watcher.closed:
                    break
                now = loop.time()
                if deadline is not None and now >= deadline:
                    break
                if next_bookmark is not None and now >= next_bookmark:
                    # the queue is drained: every event up to the current rv was sent
                    await send("BOOKMARK", self._bookmark(res, self._rv))
                    next_bookmark = now + self.bookmark_interval
                    continue
                wait = 5.0
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if next_bookmark is not None:
                    wait = min(wait, next_bookmark - now)
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                try:
                    async with asyncio.timeout(max(wait, 0)):
                        await watcher.wake.wait()
                except TimeoutError:
                    pass
        except ConnectionError:
            logger.debug("watch client on %s went away", res.plural)
        finally:
            if watcher is not None:
                watcher.closed = True
                self._watchers.discard(watcher)
                self._notify()
        return response


def _ephemeral_port_floor() -> int:
    """The lowest port the kernel hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
