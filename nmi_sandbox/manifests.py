"""Builders for the Kubernetes objects of the local world, as the real writers write them.

Pods as the kubelet reports them, the aadpodidentity CRDs as users and MIC
(``AzureAssignedIdentity``, with the embedded identity and binding and the
``nodename`` label) write them.  Tests, the sandbox and benchmarks use these
so that every object has one faithful shape.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

GROUP_VERSION = "aadpodidentity.k8s.io/v1"


def pod(
    *,
    name: str,
    namespace: str = "default",
    node: str,
    ip: str,
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    host_network: bool = False,
    uid: str | None = None,
    service_account: str = "",
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels or {}),
            **({"uid": uid} if uid else {}),
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [{"name": "app", "image": "example.com/app:1"}],
            **({"serviceAccountName": service_account} if service_account else {}),
        },
        "status": {
            "phase": phase,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "10.240.0.4",
        },
    }


def azure_identity(
    *,
    name: str,
    namespace: str = "default",
    type: int = 0,
    client_id: str,
    resource_id: str = "",
    tenant_id: str = "",
    secret_name: str = "",
    secret_namespace: str = "",
    ad_endpoint: str = "",
    namespaced: bool = False,
    legacy_keys: bool = False,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An AzureIdentity; ``legacy_keys`` writes the pre-1.6 capitalised keys."""
    spec: dict[str, Any] = {"type": type}
    keys = (
        ("ClientID", "ResourceID", "TenantID", "ClientPassword")
        if legacy_keys
        else ("clientID", "resourceID", "tenantID", "clientPassword")
    )
    spec[keys[0]] = client_id
    if resource_id:
        spec[keys[1]] = resource_id
    if tenant_id:
        spec[keys[2]] = tenant_id
    if secret_name:
        spec[keys[3]] = {"name": secret_name, "namespace": secret_namespace or namespace}
    if ad_endpoint:
        spec["adEndpoint"] = ad_endpoint
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    notes = dict(annotations or {})
    if namespaced:
        notes["aadpodidentity.k8s.io/Behavior"] = "namespaced"
    if notes:
        meta["annotations"] = notes
    return {"apiVersion": GROUP_VERSION, "kind": "AzureIdentity", "metadata": meta, "spec": spec}


def service_account(*, name: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    }


def binding(
    *,
    name: str,
    namespace: str = "default",
    identity: str,
    selector: str,
    legacy_keys: bool = False,
) -> dict[str, Any]:
    spec = (
        {"AzureIdentity": identity, "Selector": selector}
        if legacy_keys
        else {"azureIdentity": identity, "selector": selector}
    )
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzureIdentityBinding",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def assigned_identity(
    *,
    pod_name: str,
    pod_namespace: str,
    node: str,
    identity: dict[str, Any],
    binding_obj: dict[str, Any] | None = None,
    state: str = "Assigned",
    namespace: str = "default",
) -> dict[str, Any]:
    """What MIC writes: name ``<pod>-<ns>-<identity>``, label ``nodename``, embedded refs."""
    ident_name = identity["metadata"]["name"]
    obj: dict[str, Any] = {
        "apiVersion": GROUP_VERSION,
        "kind": "AzureAssignedIdentity",
        "metadata": {
            "name": f"{pod_name}-{pod_namespace}-{ident_name}",
            "namespace": namespace,
            "labels": {"nodename": node},
            "finalizers": ["azureassignedidentity.finalizers.aadpodidentity.k8s.io"],
        },
        "spec": {
            "azureIdentityRef": identity,
            "pod": pod_name,
            "podNamespace": pod_namespace,
            "nodename": node,
            "replicas": None,
        },
        "status": {"status": state, "availableReplicas": 1},
    }
    if binding_obj is not None:
        obj["spec"]["azureBindingRef"] = binding_obj
    return obj


def exception(*, name: str, namespace: str = "default", labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "AzurePodIdentityException",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podLabels": dict(labels)},
    }


def secret(*, name: str, namespace: str = "default", data: dict[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def new_guid() -> str:
    return str(uuid.uuid4())
