"""The explanation of one pod's identity decision, as a plain JSON document.

Pure: built from read-only views — the node's cluster view
(:class:`~nmi.kube.index.ClusterIndex`), the settings, a snapshot of the token
cache and the last errors — with the daemon's own functions, never copies of
them: the caller is attributed by :class:`~nmi.identity.caller.Callers`, each
binding and assignment is judged by ``decide.binding_status`` and
``decide.assignment_status`` (the filters ``decide`` itself applies), the
decision is ``decide``'s, and the IMDS reply shown is the one
:mod:`nmi.imds.failures` builds for it.  So the explanation cannot drift from
what pods are served.

Never in a document: a token, a secret, a full client id (redacted as the logs
redact them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ..config import OperationMode, Settings
from ..identity.caller import CallerProblem, Callers
from ..identity.decide import (
    NODE_IDENTITY,
    USABLE,
    Decision,
    Grant,
    IdentitySelector,
    ObjectIdOf,
    UseNodeIdentity,
    Wait,
    assignment_status,
    binding_status,
    bound_identities,
    decide,
    exception_for,
    namespaced_why,
    owner_of,
    usable_assignments,
)
from ..imds import failures
from ..imds.messages import Reply
from ..kube.index import ClusterIndex
from ..kube.objects import (
    MIC_ERROR_ANNOTATION,
    MIC_STEP_ANNOTATION,
    AzureAssignedIdentity,
    AzureIdentity,
    IdentityType,
    Pod,
)
from ..kube.token_request import subject_of
from ..ops.last_errors import LastError, LastErrors
from ..ops.logs import redact_id as redact
from ..tokens.cache import CLIENT_MARGIN, CachedEntry, TokenCache
from ..tokens.federation import Federation
from ..tokens.service import TokenService, node_selector_key

JSONDict = dict[str, Any]

TYPE_NAMES: Mapping[int | None, str] = {
    0: "user-assigned managed identity",
    1: "service principal (secret)",
    2: "service principal (certificate)",
    3: "federated (the pod's service-account token)",
    None: "invalid spec.type",
}


def _no_object_ids(_: AzureIdentity) -> str | None:
    return None


# -- the parts ----------------------------------------------------------------------


def identity_doc(identity: AzureIdentity) -> JSONDict:
    """An identity as operators may see it: client id redacted as the logs do."""
    return {
        "namespace": identity.meta.namespace,
        "name": identity.meta.name,
        "type": identity.type,
        "type_name": TYPE_NAMES.get(identity.type, TYPE_NAMES[None]),
        "client_id": redact(identity.client_id) if identity.client_id else "",
        "resource_id": identity.resource_id.rsplit("/", 1)[-1] if identity.resource_id else "",
        "namespaced": identity.namespaced,
    }


DEFAULT_AUDIENCE = "api://AzureADTokenExchange"


def federation_doc(
    identity: AzureIdentity, pod: Pod, *, issuer: str = "", audience: str = ""
) -> JSONDict | None:
    """For a federated identity, or one on a shadow trial: the federated credential
    Azure AD must hold for this pod's service account (issuer, subject, audience)."""
    if identity.type != IdentityType.FEDERATED and not identity.shadow:
        return None
    client_id = identity.federation_client_id or identity.client_id
    return {
        "mode": "federated" if identity.type == IdentityType.FEDERATED else "shadow",
        "application": redact(client_id) if client_id else "",
        "tenant": identity.tenant_id or None,
        "service_account": f"{pod.meta.namespace}/{pod.service_account}",
        "issuer": issuer or None,
        "subject": subject_of(pod),
        "audience": identity.federated_audience or audience or DEFAULT_AUDIENCE,
    }


def pod_doc(pod: Pod) -> JSONDict:
    return {
        "namespace": pod.meta.namespace,
        "name": pod.meta.name,
        "uid": pod.meta.uid,
        "node": pod.node_name,
        "service_account": pod.service_account,
        "phase": pod.phase,
        "ips": list(pod.ips),
        "host_network": pod.host_network,
        "labels": dict(pod.meta.labels),
    }


def selector_doc(selector: IdentitySelector) -> JSONDict:
    return {
        "client_id": redact(selector.client_id) if selector.client_id else "",
        "msi_res_id": selector.resource_id,
        "object_id": redact(selector.object_id) if selector.object_id else "",
        "describe": selector.describe(),
    }


def reply_doc(reply: Reply) -> JSONDict:
    parsed: Any = json.loads(reply.body) if reply.body else {}
    return {"status": reply.status, "body": parsed}


def caller_problem(index: ClusterIndex, settings: Settings, pod: Pod) -> str | None:
    """Why traffic from this pod would not be attributed to it (None: it would be)."""
    if pod.phase not in ("Pending", "Running"):
        return f"the pod is {pod.phase or 'in no phase'}, not Pending/Running"
    if pod.host_network:
        return "the pod uses the host network: its traffic is the node's, not the pod's"
    if not pod.ips:
        return "the pod has no IP address yet"
    callers = Callers(index=index, settings=settings)
    for ip in pod.ips:
        found = callers.now(ip)
        if isinstance(found, CallerProblem):
            return found.reason
        if found.meta.uid != pod.meta.uid:
            return f"IP {ip} is attributed to {found.meta.key}"
    return None


def bindings_doc(
    index: ClusterIndex, settings: Settings, pod: Pod
) -> tuple[list[JSONDict], list[JSONDict]]:
    """(bindings whose selector is the pod's label, other bindings of the pod's namespace)."""
    label = pod.binding_label
    matching: list[JSONDict] = []
    if label:
        for binding in sorted(index.bindings_with_selector(label), key=lambda b: b.meta.key):
            _, why = binding_status(index, pod, binding, settings)
            identity = index.identity(binding.meta.namespace, binding.azure_identity)
            matching.append(
                {
                    "namespace": binding.meta.namespace,
                    "name": binding.meta.name,
                    "selector": binding.selector,
                    "identity": binding.azure_identity,
                    "identity_found": identity is not None,
                    "identity_detail": identity_doc(identity) if identity is not None else None,
                    "used": not why,
                    "dropped_because": why or None,
                }
            )
    others = [
        {"namespace": b.meta.namespace, "name": b.meta.name, "selector": b.selector}
        for b in sorted(index.bindings(), key=lambda b: b.meta.key)
        if b.meta.namespace == pod.meta.namespace and b.selector != label
    ]
    return matching, others


def assignments_doc(index: ClusterIndex, settings: Settings, pod: Pod) -> list[JSONDict]:
    out: list[JSONDict] = []
    for a in sorted(index.assignments(pod.meta.namespace, pod.meta.name), key=lambda a: a.meta.key):
        status, why, _ = assignment_status(index, pod, a, settings)
        out.append(
            {
                "namespace": a.meta.namespace,
                "name": a.meta.name,
                "identity": a.identity.meta.key,
                "binding": a.binding.meta.key if a.binding is not None else "",
                "state": a.state or "(legacy, empty)",
                "node": a.node_name,
                "status": status,
                "why": None if status == USABLE else why or None,
                "controller": controller_doc(a),
            }
        )
    return out


def controller_doc(a: AzureAssignedIdentity) -> JSONDict | None:
    """What the controller (``nmi mic``) wrote on the assignment: the step it waits on and
    the last error ARM gave; None when it wrote neither (done, or another controller)."""
    notes = {k.lower(): v for k, v in a.meta.annotations.items()}
    step = notes.get(MIC_STEP_ANNOTATION, "")
    error = notes.get(MIC_ERROR_ANNOTATION, "")
    if not step and not error:
        return None
    return {"step": step or None, "last_error": error or None}


def decision_doc(
    decision: Decision, *, settings: Settings, selector: IdentitySelector, resource: str
) -> tuple[JSONDict, bool]:
    """The decision, the IMDS reply it leads to, and whether a token would be served."""
    if isinstance(decision, Grant):
        return {
            "kind": "grant",
            "identity": identity_doc(decision.identity),
            "summary": f"token of AzureIdentity {decision.identity.meta.key}",
            "imds": {"status": 200, "body": "token (not shown)"},
        }, True
    if isinstance(decision, UseNodeIdentity):
        return {
            "kind": "node_identity",
            "exception": decision.exception,
            "summary": (
                f"the node's own identity (AzurePodIdentityException {decision.exception}), "
                f"asked of the node IMDS with {selector.describe()}"
            ),
            "imds": {"status": 200, "body": "token (not shown)"},
        }, True
    reply = failures.refused(
        decision, resource=resource or "-", selector=selector, settings=settings
    ).reply
    if isinstance(decision, Wait):
        bound = (
            settings.wait_for_created if decision.stage == "created" else settings.wait_for_assigned
        )
        return {
            "kind": "wait",
            "stage": decision.stage,
            "reason": decision.reason,
            "summary": (
                f"waiting for MIC ({decision.reason}); the request is held up to {bound:g}s "
                "for the change, then refused"
            ),
            "imds": reply_doc(reply),
        }, False
    return {
        "kind": "deny",
        "deny_kind": decision.kind,
        "reason": decision.reason,
        "summary": f"refused: {decision.reason}",
        "imds": reply_doc(reply),
    }, False


def no_pod_decision(problem: str, settings: Settings, kind: str = "unknown") -> JSONDict:
    reply = failures.unknown_caller(CallerProblem(kind, problem), settings).reply
    return {
        "kind": "no_pod",
        "reason": problem,
        "summary": f"refused before any identity lookup: {problem}",
        "imds": reply_doc(reply),
    }


# -- the whole chain ------------------------------------------------------------------


def explain_pod(
    *,
    index: ClusterIndex,
    settings: Settings,
    pod: Pod,
    selector: IdentitySelector,
    resource: str = "",
    object_id_of: ObjectIdOf = _no_object_ids,
    issuer: str = "",
) -> tuple[JSONDict, Decision | None]:
    """The whole decision chain for ``pod`` on ``index``'s node, and the decision itself
    (``decide``'s; None when the pod could not call at all)."""
    doc: JSONDict = {
        "node": index.node_name,
        "mode": settings.operation_mode.value,
        "namespaced": settings.namespaced_everywhere,
        "namespaced_why": namespaced_why(settings) or None,
        "pod": pod_doc(pod),
        "label": pod.binding_label,
        "resource": resource or None,
        "selector": selector_doc(selector),
        "notes": [],
    }
    problem = caller_problem(index, settings, pod)
    doc["can_call"] = problem is None
    doc["caller_problem"] = problem
    matching, others = bindings_doc(index, settings, pod)
    doc["bindings"] = matching
    doc["other_bindings_in_namespace"] = others
    doc["bound_identities"] = [i.meta.key for i in bound_identities(index, pod, settings)]
    if settings.operation_mode is OperationMode.STANDARD:
        doc["assignments"] = assignments_doc(index, settings, pod)
        usable, pending = usable_assignments(index, pod, settings)
        doc["usable_identities"] = [i.meta.key for i in usable]
        doc["pending_identities"] = [i.meta.key for i in pending]
        if matching:
            doc["notes"].append(
                "standard mode: bindings only say what MIC should assign; nmi serves the "
                "pod's AzureAssignedIdentities, and waits for MIC while a binding matches"
            )
    else:
        doc["assignments"] = None
    doc["exceptions_in_namespace"] = [
        {
            "namespace": e.meta.namespace,
            "name": e.meta.name,
            "pod_labels": dict(e.pod_labels),
            "matches": e.matches(pod),
        }
        for e in sorted(index.exceptions_in(pod.meta.namespace), key=lambda e: e.meta.key)
    ]
    doc["exception"] = exception_for(index, pod)
    if selector.object_id and object_id_of is _no_object_ids:
        doc["notes"].append(
            "object_id is matched against the oid the daemon learns from the identity's "
            "tokens; without the daemon's view it cannot match here (the daemon fetches "
            "tokens to learn it)"
        )
    if problem is not None:
        doc["decision"] = no_pod_decision(problem, settings)
        doc["would_get_token"] = False
        return doc, None
    decision = decide(
        index=index, settings=settings, pod=pod, selector=selector, object_id_of=object_id_of
    )
    doc["decision"], doc["would_get_token"] = decision_doc(
        decision, settings=settings, selector=selector, resource=resource
    )
    if isinstance(decision, Grant):
        doc["federation"] = federation_doc(
            decision.identity, pod, issuer=issuer, audience=settings.federated_token_audience
        )
    return doc, decision


def explain_missing(*, settings: Settings, problem: str, kind: str = "unknown") -> JSONDict:
    """The chain when there is no pod to explain (not found, not on the node, unknown IP)."""
    return {
        "node": settings.node_name,
        "mode": settings.operation_mode.value,
        "pod": None,
        "can_call": False,
        "caller_problem": problem,
        "decision": no_pod_decision(problem, settings, kind),
        "would_get_token": False,
        "notes": [],
    }


# -- the daemon's memory: cache and last error ----------------------------------------


def cache_doc(
    entries: Iterable[CachedEntry],
    decision: Decision,
    *,
    selector: IdentitySelector,
    resource: str = "",
    now: float | None = None,
    subject: str = "",
) -> JSONDict | None:
    """The cache entries of the decision's identity (for ``resource`` if given); for a
    federated identity only those of ``subject``, the pod's service account."""
    now = time.time() if now is None else now
    if isinstance(decision, Grant):
        fingerprint = decision.identity.fingerprint
        label = decision.identity.meta.key
        wanted_credential = None
    elif isinstance(decision, UseNodeIdentity):
        fingerprint = ""
        label = "node identity"
        wanted_credential = node_selector_key(
            selector.client_id, selector.object_id, selector.resource_id
        )
    else:
        return None
    docs: list[JSONDict] = []
    stale = 0
    for entry in entries:
        key = entry.key
        if resource and key.resource != resource:
            continue
        if key.subject and key.subject != subject:
            continue  # obtained with another service account's token: never this pod's
        if wanted_credential is not None and key.credential != wanted_credential:
            continue  # the node identity asked with another selector
        if fingerprint and key.credential.split(":", 1)[0] != fingerprint:
            stale += 1  # made from an older spec of the identity: never served again
            continue
        remaining = entry.expires_on - now
        doc: JSONDict = {
            "resource": key.resource,
            "present": True,
            "remaining_seconds": int(remaining),
            "servable": remaining > 0,
            "clients_refetch": remaining <= CLIENT_MARGIN,
            "refresh_due": now >= entry.refresh_at,
            "refresh_in_seconds": max(int(entry.refresh_at - now), 0),
            "last_used_seconds_ago": int(now - entry.last_used) if entry.last_used else None,
            "refreshing": entry.refreshing,
        }
        if ":" in key.credential and fingerprint:
            doc["secret_resource_version"] = key.credential.rsplit(":", 1)[-1]
        docs.append(doc)
    docs.sort(key=lambda e: (str(e["resource"]), -int(e["remaining_seconds"])))
    if resource and not docs:
        docs.append({"resource": resource, "present": False})
    return {"identity": label, "entries": docs, "stale_entries": stale}


def error_doc(error: LastError | None, now: float) -> JSONDict | None:
    if error is None:
        return None
    return {"summary": error.summary, "age_seconds": int(now - error.at)}


class DaemonView(Protocol):
    """What the admin endpoint reads of a running daemon (all read-only)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def index(self) -> ClusterIndex: ...

    @property
    def cache(self) -> TokenCache: ...

    @property
    def tokens(self) -> TokenService | None: ...

    @property
    def last_errors(self) -> LastErrors: ...

    @property
    def synced(self) -> bool: ...

    @property
    def federation(self) -> Federation | None: ...


def daemon_explanation(
    daemon: DaemonView,
    *,
    namespace: str,
    pod: str,
    selector: IdentitySelector,
    resource: str = "",
) -> JSONDict:
    """What the running daemon knows about one pod: its live decision, cache, last error."""
    settings = daemon.settings
    now = time.time()
    out: JSONDict = {
        "node": settings.node_name,
        "mode": settings.operation_mode.value,
        "synced": daemon.synced,
        "found": False,
        "explanation": None,
        "cache": None,
        "last_error": None,
    }
    found = daemon.index.pod(namespace, pod)
    if found is None:
        return out
    out["found"] = True
    tokens = daemon.tokens
    object_id_of: ObjectIdOf = tokens.object_id_of if tokens is not None else _no_object_ids
    federation = daemon.federation
    doc, decision = explain_pod(
        index=daemon.index,
        settings=settings,
        pod=found,
        selector=selector,
        resource=resource,
        object_id_of=object_id_of,
        issuer=federation.issuer if federation is not None else "",
    )
    out["explanation"] = doc
    if decision is None:
        return out
    owner = owner_of(decision)
    if owner is not None:
        entries = daemon.cache.snapshot(owner)
        out["cache"] = cache_doc(
            entries,
            decision,
            selector=selector,
            resource=resource,
            now=now,
            subject=f"{found.meta.namespace}/{found.service_account}",
        )
        out["last_error"] = error_doc(daemon.last_errors.get(owner), now)
    if isinstance(decision, Grant) and federation is not None and doc.get("federation"):
        out["federation"] = daemon_federation_doc(federation, decision.identity, found, now)
    return out


def daemon_federation_doc(
    federation: Federation, identity: AzureIdentity, pod: Pod, now: float
) -> JSONDict:
    """What the daemon holds for a federated (or shadow) identity and this pod: its
    service-account token (never the token itself) and the last shadow trial."""
    audience = identity.federated_audience or federation.default_audience
    held = federation.assertions.peek(pod.meta.uid_or_key, audience)
    trial = federation.shadow.result_for(identity, pod) if federation.shadow else None
    return {
        "issuer": federation.issuer or None,
        "audience": audience,
        "service_account_token": None
        if held is None
        else {
            "remaining_seconds": int(held.expires_at - now),
            "presented": federation.assertions.usable(held, now),
            "issuer": held.issuer,
            "subject": held.subject,
            "audience": held.audience,
        },
        "shadow": None
        if trial is None
        else {
            "ready": trial.ready,
            "code": trial.code or None,
            "summary": trial.describe(),
            "age_seconds": int(now - trial.at),
        },
    }


__all__ = ["NODE_IDENTITY", "DaemonView", "daemon_explanation", "explain_missing", "explain_pod"]
