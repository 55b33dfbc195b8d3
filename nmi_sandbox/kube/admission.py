"""Defaulting and validation: what the real server does to an object before storing it.

Why this exists: the daemon observes the server's registry strategies and
admission, not just its storage -- a pod comes back ``Pending`` with its
defaults and QoS class, a Secret's ``stringData`` is folded into ``data``, a
namespace carries its ``kubernetes.io/metadata.name`` label, bad names and
labels are refused with 422 ``Invalid`` and the real field messages, and a
controller writing a Lease must send MicroTimes the real server can parse.
:func:`admit_create` and :func:`admit_update` apply those rules per kind and
return the validation errors; the registry raises them.  Everything else about
a write (names, preconditions, storage) belongs to the registry.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import json
import re
from typing import Any

from .errors import FieldError, KubeApiError, bad_request
from .meta import (
    JSON,
    LABEL_MSG,
    SUBDOMAIN_MSG,
    format_time,
    is_dns1123_label,
    is_dns1123_subdomain,
    label_value_problem,
    qualified_name_problem,
)
from .resources import Resource

__all__ = ["admit_create", "admit_update", "next_generation"]

_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


# --------------------------------------------------------------------------- metadata


def _validate_meta(res: Resource, obj: JSON) -> list[FieldError]:
    errs: list[FieldError] = []
    meta = obj["metadata"]
    name = meta.get("name", "")
    if res.storage == "namespaces":
        if not is_dns1123_label(name):
            errs.append(FieldError("Invalid", "metadata.name", LABEL_MSG, name))
    elif not is_dns1123_subdomain(name):
        errs.append(FieldError("Invalid", "metadata.name", SUBDOMAIN_MSG, name))
    labels = meta.get("labels")
    if labels is not None and not isinstance(labels, dict):
        errs.append(FieldError("Invalid", "metadata.labels", "must be an object", labels))
    for key, value in (labels or {}).items():
        problem = qualified_name_problem(key)
        if problem:
            errs.append(FieldError("Invalid", "metadata.labels", problem, key))
        if not isinstance(value, str):
            errs.append(FieldError("Invalid", "metadata.labels", "must be a string", value))
            continue
        problem = label_value_problem(value)
        if problem:
            errs.append(FieldError("Invalid", "metadata.labels", problem, value))
    annotations = meta.get("annotations")
    if annotations is not None and not isinstance(annotations, dict):
        errs.append(FieldError("Invalid", "metadata.annotations", "must be an object", annotations))
    for key, value in (annotations or {}).items():
        problem = qualified_name_problem(key)
        if problem:
            errs.append(FieldError("Invalid", "metadata.annotations", problem, key))
        if not isinstance(value, str):
            errs.append(FieldError("Invalid", "metadata.annotations", "must be a string", value))
    finalizers = meta.get("finalizers")
    if finalizers is not None and (
        not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers)
    ):
        errs.append(FieldError("Invalid", "metadata.finalizers", "must be strings", finalizers))
    return errs


def _validate_finalizers_update(cand: JSON, existing: JSON) -> list[FieldError]:
    old_meta, meta = existing["metadata"], cand["metadata"]
    if not old_meta.get("deletionTimestamp"):
        return []
    old = old_meta.get("finalizers") or []
    added = [f for f in meta.get("finalizers") or [] if f not in old]
    if not added:
        return []
    return [
        FieldError(
            "Forbidden",
            "metadata.finalizers",
            "no new finalizers can be added if the object is being deleted, found "
            f"new finalizers {json.dumps(added)}",
        )
    ]


# --------------------------------------------------------------------------- pods


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


def _validate_pod(obj: JSON) -> list[FieldError]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [FieldError("Required", "spec")]
    errs: list[FieldError] = []
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        errs.append(FieldError("Required", "spec.containers"))
        return errs
    for i, c in enumerate(containers):
        if not isinstance(c, dict):
            errs.append(FieldError("Invalid", f"spec.containers[{i}]", "must be an object", c))
            continue
        if not c.get("name"):
            errs.append(FieldError("Required", f"spec.containers[{i}].name"))
        if not c.get("image"):
            errs.append(FieldError("Required", f"spec.containers[{i}].image"))
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


def _validate_pod_update(new: JSON, old: JSON) -> list[FieldError]:
    if _pod_mutable_masked(new.get("spec")) != _pod_mutable_masked(old.get("spec")):
        return [FieldError("Forbidden", "spec", _POD_UPDATE_MSG)]
    return []


# --------------------------------------------------------------------------- secrets


def _prepare_secret(obj: JSON) -> None:
    obj.setdefault("type", "Opaque")
    data = obj.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise bad_request(
            'Secret in version "v1" cannot be handled as a Secret: data must be an object'
        )
    for key, value in data.items():
        try:
            base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(
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


def _validate_secret(obj: JSON) -> list[FieldError]:
    return [
        FieldError(
            "Invalid",
            "data",
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            key,
        )
        for key in obj.get("data") or {}
        if not _CONFIG_KEY.match(key)
    ]


# --------------------------------------------------------------------------- events


def _normalize_time(value: Any, path: str, *, micro: bool) -> Any:
    # lenient (any ISO 8601 form), as this emulator has always been for Events
    if value is None or value == "":
        return value
    try:
        parsed = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise bad_request(
            f'Event in version "v1" cannot be handled as a Event: parsing time "{value}" '
            f'as "2006-01-02T15:04:05Z07:00" ({path})'
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return format_time(parsed.astimezone(datetime.UTC), micro=micro)


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


def _validate_core_event(obj: JSON) -> list[FieldError]:
    ns = obj["metadata"].get("namespace", "")
    involved = obj.get("involvedObject") or {}
    involved_ns = involved.get("namespace", "") if isinstance(involved, dict) else ""
    if (not involved_ns and ns not in ("", "default")) or (involved_ns and involved_ns != ns):
        return [
            FieldError(
                "Invalid", "involvedObject.namespace", "does not match event.namespace", involved_ns
            )
        ]
    return []


def _validate_events_v1(view: JSON) -> list[FieldError]:
    errs: list[FieldError] = []
    if not view.get("eventTime"):
        errs.append(FieldError("Required", "eventTime"))
    if view.get("type") not in ("Normal", "Warning"):
        errs.append(
            FieldError(
                "Invalid", "type", "has invalid value: " + str(view.get("type")), view.get("type")
            )
        )
    for key in ("reportingController", "reportingInstance", "action", "reason"):
        if not view.get(key):
            errs.append(FieldError("Required", key))
    for key in (
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
        "deprecatedCount",
        "deprecatedSource",
    ):
        if view.get(key):
            errs.append(FieldError("Invalid", key, "needs to be unset", view.get(key)))
    return errs


# --------------------------------------------------------------------------- leases

# metav1.MicroTime parses with RFC3339Micro: exactly six fractional digits and a zone
# ("2006-01-02T15:04:05.000000Z07:00"); anything else is a 400 before validation runs.
_RFC3339_MICRO = "2006-01-02T15:04:05.000000Z07:00"
_MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")
_LEASE_STRINGS = ("holderIdentity",)
_LEASE_INT32 = ("leaseDurationSeconds", "leaseTransitions")
_LEASE_TIMES = ("acquireTime", "renewTime")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _lease_decode_error(message: str) -> KubeApiError:
    return bad_request(f'Lease in version "v1" cannot be handled as a Lease: {message}')


def _micro_time(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _lease_decode_error(
            f"json: cannot unmarshal {_json_type(value)} into Go struct field "
            f"LeaseSpec.spec.{key} of type string"
        )
    parsed: datetime.datetime | None = None
    if _MICRO_TIME.match(value):
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    if parsed is None:
        raise _lease_decode_error(f'parsing time "{value}" as "{_RFC3339_MICRO}"')
    return format_time(parsed.astimezone(datetime.UTC), micro=True)


def _prepare_lease(obj: JSON) -> None:
    """Decode the spec as the typed LeaseSpec would: types checked, nulls dropped, UTC times."""
    spec = obj.get("spec")
    if spec is None:
        spec = obj["spec"] = {}
    if not isinstance(spec, dict):
        raise _lease_decode_error(
            f"json: cannot unmarshal {_json_type(spec)} into Go struct field "
            "Lease.spec of type v1.LeaseSpec"
        )
    for key in (*_LEASE_STRINGS, *_LEASE_INT32, *_LEASE_TIMES):
        if key in spec and spec[key] is None:
            del spec[key]  # a nil pointer: omitted on the wire
    for key in _LEASE_STRINGS:
        if key in spec and not isinstance(spec[key], str):
            raise _lease_decode_error(
                f"json: cannot unmarshal {_json_type(spec[key])} into Go struct "
                f"field LeaseSpec.spec.{key} of type string"
            )
    for key in _LEASE_INT32:
        value = spec.get(key)
        if key in spec and (
            not isinstance(value, int) or isinstance(value, bool) or not -(2**31) <= value < 2**31
        ):
            found = _json_type(value)
            if found == "number":
                found += " " + json.dumps(value)
            raise _lease_decode_error(
                f"json: cannot unmarshal {found} into Go struct field "
                f"LeaseSpec.spec.{key} of type int32"
            )
    for key in _LEASE_TIMES:
        if key in spec:
            spec[key] = _micro_time(spec[key], key)


def _validate_lease(obj: JSON) -> list[FieldError]:
    spec = obj["spec"]
    errs: list[FieldError] = []
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and duration <= 0:
        errs.append(
            FieldError("Invalid", "spec.leaseDurationSeconds", "must be greater than 0", duration)
        )
    transitions = spec.get("leaseTransitions")
    if transitions is not None and transitions < 0:
        errs.append(
            FieldError(
                "Invalid",
                "spec.leaseTransitions",
                "must be greater than or equal to 0",
                transitions,
            )
        )
    return errs


# --------------------------------------------------------------------------- entry points


def admit_create(res: Resource, obj: JSON) -> list[FieldError]:
    """Default a new object in place and return its validation errors.

    The registry has set its name, namespace, uid and timestamps.  Decoding errors
    (a Secret's bad base64, a Lease's unparsable time) raise 400 right away.
    """
    meta = obj["metadata"]
    errs: list[FieldError] = []
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
            labels["kubernetes.io/metadata.name"] = meta["name"]
    elif storage == "secrets":
        _prepare_secret(obj)
        errs += _validate_secret(obj)
    elif storage == "events":
        if res.is_view:
            errs += _validate_events_v1(res.to_view(obj))
        else:
            errs += _validate_core_event(obj)
        _prepare_event(obj)
    elif storage == "leases":
        _prepare_lease(obj)
        errs += _validate_lease(obj)
    return _validate_meta(res, obj) + errs


def admit_update(res: Resource, cand: JSON, existing: JSON) -> list[FieldError]:
    """Default the new state ``cand`` of ``existing`` in place and return its errors.

    The registry has restored the server-owned metadata and, for resources with a
    status subresource, the stored status.
    """
    meta = cand["metadata"]
    errs: list[FieldError] = []
    storage = res.storage
    if storage == "pods":
        _default_pod(cand)
        errs += _validate_pod(cand) or _validate_pod_update(cand, existing)
    elif storage == "namespaces":
        cand["spec"] = copy.deepcopy(existing.get("spec", {}))
        labels = meta.setdefault("labels", {})
        if isinstance(labels, dict):
            labels["kubernetes.io/metadata.name"] = meta["name"]
    elif storage == "secrets":
        _prepare_secret(cand)
        errs += _validate_secret(cand)
        if cand.get("type") != existing.get("type"):
            errs.append(FieldError("Invalid", "type", "field is immutable", cand.get("type")))
    elif storage == "events":
        _prepare_event(cand)
    elif storage == "leases":
        _prepare_lease(cand)
        errs += _validate_lease(cand)
    return _validate_meta(res, cand) + errs + _validate_finalizers_update(cand, existing)


def next_generation(res: Resource, cand: JSON, existing: JSON) -> None:
    """A custom resource's ``metadata.generation`` goes up when anything but metadata/status
    changes (built-in kinds here carry no generation)."""
    if not res.custom:
        return
    strip = ("metadata", "status", "apiVersion", "kind")
    before = {k: v for k, v in existing.items() if k not in strip}
    after = {k: v for k, v in cand.items() if k not in strip}
    if before != after:
        cand["metadata"]["generation"] = int(existing["metadata"].get("generation", 1)) + 1
