"""``nmi explain``: why does this pod get (or not get) a token?

Why: a refused pod's SDK only says "Identity not found"; the answer is spread
over five kinds of objects (the pod's label, bindings, identities, MIC's
assignments, exceptions), two modes and the namespaced rules.  This command
walks that chain for one pod and prints every link, ending with the daemon's
exact decision and the exact IMDS reply the pod would get.

It is trustworthy because it runs the daemon's own code, not a re-implementation:
a :class:`~nmi.kube.cluster.ClusterWatch` for the pod's node feeds a
:class:`~nmi.kube.index.ClusterIndex` through one LIST per informer (no
watch), and :func:`~nmi.identity.decide.decide` makes the decision; the
per-link annotations mirror ``decide``'s filters and the final verdict is
always ``decide``'s.

Token cache state and the last upstream error exist only inside the running
daemon.  It can expose them, read-only, on a Unix socket
(:class:`AdminServer`, default ``/run/nmi/admin.sock``, mode 0600): never on
a TCP port, so no debug endpoint is reachable from the network, and the file
permissions decide who may ask.  The socket answers ``GET /explain`` with the
same chain computed on the daemon's live view, plus cache entries (presence,
remaining lifetime, refresh due; never a token) and the last upstream error.
``nmi explain`` uses the socket when it exists and says so when it does not.

Exit status: 0 the pod would get a token (Grant, or the node's identity for an
exception pod); 1 it would not (refused, waiting for MIC, pod unknown, not
on a node, not running) or nmi could not find out; 2 usage error.  When the
admin socket answers for the pod, the running daemon's decision sets it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from .config import ConfigError, OperationMode, Settings
from .identity.decide import (
    Decision,
    Grant,
    IdentitySelector,
    ObjectIdOf,
    UseNodeIdentity,
    Wait,
    bound_identities,
    decide,
    exception_for,
    namespace_allows,
    usable_assignments,
)
from .identity.resolver import CallerProblem, Resolver
from .imds import replies
from .imds.messages import Reply
from .imds.target import QueryError, parse_token_query
from .kube.cluster import ClusterWatch
from .kube.index import ClusterIndex
from .kube.informer import ApiError, Informer, RawApi
from .kube.objects import (
    NAMESPACED_ANNOTATION,
    AssignedState,
    AzureIdentity,
    AzureIdentityBinding,
    Pod,
)
from .ops.logs import redact_id as redact
from .tokens.cache import SERVE_FLOOR, TokenCache
from .tokens.service import TokenService, identity_key

log = logging.getLogger(__name__)

DEFAULT_ADMIN_SOCKET = "/run/nmi/admin.sock"
NODE_IDENTITY_KEY = "node"
EXIT_TOKEN = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

# The handler's wording for a request whose assignment never became ready.
NOT_ASSIGNED_DESCRIPTION = "The pod's identity is not yet assigned on this node"
UNKNOWN_CALLER_DESCRIPTION = "No pod identity could be determined for this caller"

TYPE_NAMES: Mapping[int | None, str] = {
    0: "user-assigned managed identity",
    1: "service principal (secret)",
    2: "service principal (certificate)",
    None: "invalid spec.type",
}

JSONDict = dict[str, Any]


# ----------------------------------------------------------------------------- last errors


@dataclass(frozen=True, slots=True)
class LastError:
    summary: str
    at: float  # epoch seconds


class LastErrors:
    """The last upstream error per identity, for ``nmi explain`` (bounded, newest kept).

    The request path calls :meth:`record` when getting a token fails; keys are
    :func:`error_key` of the decision.  Summaries are shown to operators: they
    must not contain credential material (``UpstreamError`` descriptions never do).
    """

    def __init__(self, *, max_entries: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self._entries: collections.OrderedDict[str, LastError] = collections.OrderedDict()
        self._max = max_entries
        self._clock = clock

    def record(self, identity_key: str, error_summary: str) -> None:
        self._entries.pop(identity_key, None)
        self._entries[identity_key] = LastError(error_summary[:500], self._clock())
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def get(self, identity_key: str) -> LastError | None:
        return self._entries.get(identity_key)

    def clear(self, identity_key: str) -> None:
        self._entries.pop(identity_key, None)

    def __len__(self) -> int:
        return len(self._entries)


def error_key(decision: Decision) -> str | None:
    """The :class:`LastErrors` key of the identity a decision uses (None if it uses none)."""
    if isinstance(decision, Grant):
        return identity_key(decision.identity)
    if isinstance(decision, UseNodeIdentity):
        return NODE_IDENTITY_KEY
    return None


# ----------------------------------------------------------------------------- the chain


def _no_object_ids(_: AzureIdentity) -> str | None:
    return None


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


def pod_doc(pod: Pod) -> JSONDict:
    return {
        "namespace": pod.meta.namespace,
        "name": pod.meta.name,
        "uid": pod.meta.uid,
        "node": pod.node_name,
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


def _reply_doc(response: Reply) -> JSONDict:
    parsed: Any = json.loads(response.body) if response.body else {}
    return {"status": response.status, "body": parsed}


def _namespaced_why(settings: Settings) -> str:
    if settings.operation_mode is OperationMode.MANAGED:
        return "managed mode"
    if settings.force_namespaced:
        return "--forceNamespaced / FORCENAMESPACED=true"
    return ""


def caller_problem(index: ClusterIndex, settings: Settings, pod: Pod) -> str | None:
    """Why traffic from this pod would not be attributed to it (None: it would be)."""
    if pod.phase not in ("Pending", "Running"):
        return f"the pod is {pod.phase or 'in no phase'}, not Pending/Running"
    if pod.host_network:
        return "the pod uses the host network: its traffic is the node's, not the pod's"
    if not pod.ips:
        return "the pod has no IP address yet"
    resolver = Resolver(index=index, settings=settings, object_id_of=_no_object_ids)
    for ip in pod.ips:
        found = resolver.caller_now(ip)
        if isinstance(found, CallerProblem):
            return found.reason
        if found.meta.uid != pod.meta.uid:
            return f"IP {ip} is attributed to {found.meta.key}"
    return None


def _bindings(
    index: ClusterIndex, settings: Settings, pod: Pod, all_bindings: Iterable[AzureIdentityBinding]
) -> tuple[list[JSONDict], list[JSONDict]]:
    """(bindings whose selector is the pod's label, other bindings of the pod's namespace)."""
    label = pod.binding_label
    matching: list[JSONDict] = []
    if label:
        for binding in sorted(index.bindings_with_selector(label), key=lambda b: b.meta.key):
            ns = binding.meta.namespace
            identity = index.identity(ns, binding.azure_identity)
            why = ""
            if settings.namespaced_everywhere and ns != pod.meta.namespace:
                why = (
                    f"namespaced rules ({_namespaced_why(settings)}) use only bindings of the "
                    f"pod's namespace {pod.meta.namespace!r}; this binding is in {ns!r}"
                )
            elif identity is None:
                why = f"AzureIdentity {ns}/{binding.azure_identity} does not exist"
            elif not namespace_allows(identity, pod, settings):
                why = (
                    f"AzureIdentity {identity.meta.key} is namespaced ("
                    + (
                        f"annotation {NAMESPACED_ANNOTATION}: namespaced"
                        if identity.namespaced
                        else _namespaced_why(settings)
                    )
                    + f") and the pod is in namespace {pod.meta.namespace!r}"
                )
            matching.append(
                {
                    "namespace": ns,
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
        for b in sorted(all_bindings, key=lambda b: b.meta.key)
        if b.meta.namespace == pod.meta.namespace and b.selector != label
    ]
    return matching, others


def _assignments(index: ClusterIndex, settings: Settings, pod: Pod) -> list[JSONDict]:
    out: list[JSONDict] = []
    for a in sorted(index.assignments(pod.meta.namespace, pod.meta.name), key=lambda a: a.meta.key):
        why = ""
        status = "ignored"
        if a.meta.deleting:
            why = "being deleted"
        elif a.state == AssignedState.UNASSIGNED:
            why = "state Unassigned"
        elif a.node_name and a.node_name != index.node_name:
            why = f"it is for node {a.node_name}"
        elif not namespace_allows(a.identity, pod, settings):
            why = (
                f"identity {a.identity.meta.key} is outside the pod's namespace and namespaced "
                "rules apply"
            )
        elif a.state in (AssignedState.ASSIGNED, AssignedState.LEGACY):
            status = "usable"
        elif a.state == AssignedState.CREATED:
            status = "pending"
            why = "MIC has created it but not finished assigning the identity to the node"
        else:
            why = f"unknown state {a.state!r}"
        out.append(
            {
                "namespace": a.meta.namespace,
                "name": a.meta.name,
                "identity": f"{a.identity.meta.namespace}/{a.identity.meta.name}",
                "binding": a.binding.meta.key if a.binding is not None else "",
                "state": a.state or "(legacy, empty)",
                "node": a.node_name,
                "status": status,
                "why": why or None,
            }
        )
    return out


def decision_doc(
    decision: Decision, *, settings: Settings, selector: IdentitySelector
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
            "imds": _reply_doc(
                replies.not_ready(
                    NOT_ASSIGNED_DESCRIPTION, retry_after_header=settings.set_retry_after_header
                )
            ),
        }, False
    reply = (
        replies.multiple_identities()
        if decision.kind == "multiple"
        else replies.identity_not_found()
    )
    return {
        "kind": "deny",
        "deny_kind": decision.kind,
        "reason": decision.reason,
        "summary": f"refused: {decision.reason}",
        "imds": _reply_doc(reply),
    }, False


def _no_pod_decision(problem: str, settings: Settings, kind: str = "unknown") -> JSONDict:
    return {
        "kind": "no_pod",
        "reason": problem,
        "summary": f"refused before any identity lookup: {problem}",
        "imds": _reply_doc(
            replies.not_ready(
                f"{UNKNOWN_CALLER_DESCRIPTION} ({kind})",
                retry_after_header=settings.set_retry_after_header,
            )
        ),
    }


def explain_pod(
    *,
    index: ClusterIndex,
    settings: Settings,
    pod: Pod,
    selector: IdentitySelector,
    resource: str = "",
    object_id_of: ObjectIdOf = _no_object_ids,
    all_bindings: Iterable[AzureIdentityBinding] = (),
) -> tuple[JSONDict, Decision | None]:
    """The whole decision chain for ``pod`` on ``index``'s node, and the decision itself.

    The decision is ``decide()``'s (None when the pod could not call at all).
    """
    doc: JSONDict = {
        "node": index.node_name,
        "mode": settings.operation_mode.value,
        "namespaced": settings.namespaced_everywhere,
        "namespaced_why": _namespaced_why(settings) or None,
        "pod": pod_doc(pod),
        "label": pod.binding_label,
        "resource": resource or None,
        "selector": selector_doc(selector),
        "notes": [],
    }
    problem = caller_problem(index, settings, pod)
    doc["can_call"] = problem is None
    doc["caller_problem"] = problem
    matching, others = _bindings(index, settings, pod, all_bindings)
    doc["bindings"] = matching
    doc["other_bindings_in_namespace"] = others
    doc["bound_identities"] = [i.meta.key for i in bound_identities(index, pod, settings)]
    if settings.operation_mode is OperationMode.STANDARD:
        doc["assignments"] = _assignments(index, settings, pod)
        usable, pending = usable_assignments(index, pod, settings)
        doc["usable_assignments"] = [a.meta.key for a in usable]
        doc["pending_assignments"] = [a.meta.key for a in pending]
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
        doc["decision"] = _no_pod_decision(problem, settings)
        doc["would_get_token"] = False
        return doc, None
    decision = decide(
        index=index, settings=settings, pod=pod, selector=selector, object_id_of=object_id_of
    )
    doc["decision"], doc["would_get_token"] = decision_doc(
        decision, settings=settings, selector=selector
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
        "decision": _no_pod_decision(problem, settings, kind),
        "would_get_token": False,
        "notes": [],
    }


# ----------------------------------------------------------------------------- cache state


def _cache_entries(cache: TokenCache) -> Mapping[Hashable, Any]:
    # TokenCache offers no enumeration; this read-only view is the admin endpoint's only use.
    entries = getattr(cache, "_entries", None)
    return entries if isinstance(entries, Mapping) else {}


def _in_flight(cache: TokenCache) -> Mapping[Hashable, Any]:
    flights = getattr(cache, "_flights", None)
    return flights if isinstance(flights, Mapping) else {}


def cache_state(
    cache: TokenCache,
    decision: Decision,
    *,
    selector: IdentitySelector,
    resource: str = "",
    now: float | None = None,
) -> JSONDict | None:
    """Cache entries of the decision's identity (for ``resource`` if given); never a token."""
    now = time.time() if now is None else now
    if isinstance(decision, Grant):
        ident = decision.identity
        owner = identity_key(ident)

        def relevant(key: tuple[Any, ...]) -> bool:
            return len(key) >= 3 and key[0] in ("mi", "sp") and key[1] == owner

        label = ident.meta.key
    elif isinstance(decision, UseNodeIdentity):
        wanted = (
            selector.client_id.lower(),
            selector.object_id.lower(),
            selector.resource_id.lower(),
        )

        def relevant(key: tuple[Any, ...]) -> bool:
            return len(key) == 5 and key[0] == "node" and tuple(key[1:4]) == wanted

        label = "node identity"
    else:
        return None
    flights = _in_flight(cache)
    entries: list[JSONDict] = []
    stale = 0
    for key, entry in _cache_entries(cache).items():
        if not isinstance(key, tuple) or not relevant(key):
            continue
        if resource and key[-1] != resource:
            continue
        if isinstance(decision, Grant) and key[2] != decision.identity.fingerprint:
            stale += 1  # made from an older spec of the identity: never served again
            continue
        token = getattr(entry, "token", None)
        expires_on = float(getattr(token, "expires_on", 0))
        refresh_at = float(getattr(entry, "refresh_at", 0.0))
        last_used = float(getattr(entry, "last_used", 0.0))
        remaining = expires_on - now
        doc: JSONDict = {
            "resource": key[-1],
            "present": True,
            "remaining_seconds": int(remaining),
            "servable": remaining > SERVE_FLOOR,
            "refresh_due": now >= refresh_at,
            "refresh_in_seconds": max(int(refresh_at - now), 0),
            "last_used_seconds_ago": int(now - last_used) if last_used else None,
            "refreshing": key in flights,
        }
        if key[0] == "sp" and len(key) >= 6:
            doc["secret_resource_version"] = str(key[4])
        entries.append(doc)
    entries.sort(key=lambda e: (str(e["resource"]), -int(e["remaining_seconds"])))
    if resource and not entries:
        entries.append({"resource": resource, "present": False})
    return {"identity": label, "entries": entries, "stale_entries": stale}


# ----------------------------------------------------------------------------- admin socket


class DaemonView(Protocol):
    """What the admin endpoint reads of a running :class:`~nmi.app.Daemon`."""

    @property
    def settings(self) -> Settings: ...

    @property
    def index(self) -> ClusterIndex: ...

    @property
    def cache(self) -> TokenCache: ...

    @property
    def tokens(self) -> TokenService | None: ...

    @property
    def watch(self) -> ClusterWatch | None: ...


def _bindings_of(watch: ClusterWatch | None) -> list[AzureIdentityBinding]:
    if watch is None:
        return []
    for informer in watch.informers:
        if informer.name == "azureidentitybindings":
            return [b for b in informer.store.values() if isinstance(b, AzureIdentityBinding)]
    return []


def _selector_from(query: Mapping[str, str]) -> IdentitySelector:
    return IdentitySelector(
        client_id=query.get("client_id", ""),
        object_id=query.get("object_id", ""),
        resource_id=query.get("msi_res_id", "") or query.get("mi_res_id", ""),
    )


def _error_doc(error: LastError | None, now: float) -> JSONDict | None:
    if error is None:
        return None
    return {"summary": error.summary, "age_seconds": int(now - error.at)}


def daemon_explanation(
    daemon: DaemonView,
    *,
    namespace: str,
    pod: str,
    selector: IdentitySelector,
    resource: str = "",
    last_errors: LastErrors | None = None,
) -> JSONDict:
    """What the running daemon knows about one pod: its live decision, cache, last error."""
    settings = daemon.settings
    watch = daemon.watch
    now = time.time()
    out: JSONDict = {
        "node": settings.node_name,
        "mode": settings.operation_mode.value,
        "synced": bool(watch is not None and watch.synced),
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
    doc, decision = explain_pod(
        index=daemon.index,
        settings=settings,
        pod=found,
        selector=selector,
        resource=resource,
        object_id_of=object_id_of,
        all_bindings=_bindings_of(watch),
    )
    out["explanation"] = doc
    if decision is None:
        return out
    out["cache"] = cache_state(daemon.cache, decision, selector=selector, resource=resource)
    key = error_key(decision)
    if key is not None and last_errors is not None:
        out["last_error"] = _error_doc(last_errors.get(key), now)
    return out


def admin_handler(
    daemon: DaemonView, *, last_errors: LastErrors | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The read-only admin endpoint: ``GET /explain?namespace=&pod=&resource=&client_id=...``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path != "/explain":
            return web.json_response({"error": "not_found"}, status=404)
        if request.method != "GET":
            return web.json_response({"error": "method_not_allowed"}, status=405)
        q = request.query
        namespace, pod = q.get("namespace", ""), q.get("pod", "")
        if not namespace or not pod:
            return web.json_response(
                {"error": "invalid_request", "error_description": "namespace and pod are required"},
                status=400,
            )
        doc = daemon_explanation(
            daemon,
            namespace=namespace,
            pod=pod,
            selector=_selector_from(q),
            resource=q.get("resource", ""),
            last_errors=last_errors,
        )
        return web.json_response(doc)

    return handle


def _prepare_socket_path(path: Path) -> bool:
    """Make room for the socket; True if its directory had to be created."""
    created = not path.parent.exists()
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return created
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left behind by a previous process
        return created
    finally:
        probe.close()
    raise RuntimeError(f"another process serves {path}; not taking it over")


class AdminServer:
    """Serves :func:`admin_handler` on a Unix socket (mode 0600), never on the network."""

    def __init__(
        self,
        *,
        daemon: DaemonView,
        path: str | os.PathLike[str] = DEFAULT_ADMIN_SOCKET,
        last_errors: LastErrors | None = None,
        mode: int = 0o600,
    ) -> None:
        self.path = Path(path)
        self.mode = mode
        self.last_errors = last_errors
        self._handler = admin_handler(daemon, last_errors=last_errors)
        self._runner: web.AppRunner | None = None
        self._created_dir = False

    async def start(self) -> None:
        self._created_dir = await asyncio.to_thread(_prepare_socket_path, self.path)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.UnixSite(runner, str(self.path))
            await site.start()
            await asyncio.to_thread(os.chmod, self.path, self.mode)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("admin endpoint on unix socket", extra={"fields": {"path": str(self.path)}})

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self.path.unlink)
            if self._created_dir:
                with contextlib.suppress(OSError):  # not empty: someone else uses it
                    await asyncio.to_thread(self.path.parent.rmdir)


async def query_admin(
    path: str | os.PathLike[str],
    *,
    namespace: str,
    pod: str,
    resource: str = "",
    client_id: str = "",
    msi_res_id: str = "",
    object_id: str = "",
    timeout: float = 5.0,
) -> JSONDict:
    """Ask a daemon's admin socket about one pod."""
    params = {"namespace": namespace, "pod": pod}
    for key, value in (
        ("resource", resource),
        ("client_id", client_id),
        ("msi_res_id", msi_res_id),
        ("object_id", object_id),
    ):
        if value:
            params[key] = value
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session,
        session.get(f"http://nmi-admin/explain?{urlencode(params)}") as resp,
    ):
        doc = await resp.json(content_type=None)
        if resp.status != 200 or not isinstance(doc, dict):
            raise RuntimeError(f"admin socket answered HTTP {resp.status}: {doc}")
        return doc


# ----------------------------------------------------------------------------- cluster view


async def list_once(watch: ClusterWatch) -> None:
    """One LIST per informer (the daemon's first sync, without the watch that follows)."""
    informers: list[Informer[object]] = watch.informers
    # Informer has no public "list once"; _list is exactly the first step of run().
    await asyncio.gather(*(informer._list() for informer in informers))


async def load_view(api: RawApi, settings: Settings) -> tuple[ClusterIndex, ClusterWatch]:
    """The node's view as the daemon builds it, from one consistent LIST of each kind."""
    index = ClusterIndex(node_name=settings.node_name)
    watch = ClusterWatch(api=api, index=index, mode=settings.operation_mode)
    await list_once(watch)
    return index, watch


async def get_pod(api: RawApi, namespace: str, name: str) -> Pod | None:
    resp = await api.get(
        f"/api/v1/namespaces/{namespace}/pods/{name}", [], timeout=aiohttp.ClientTimeout(total=30)
    )
    async with resp:
        body = await resp.read()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise ApiError(resp.status, body[:200].decode("utf-8", "replace"))
    return Pod.parse(json.loads(body))


# ----------------------------------------------------------------------------- command line


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    from .cli import parse_bool

    p = argparse.ArgumentParser(
        prog="nmi explain",
        description=(
            "Explain why a pod gets (or does not get) an Azure identity token from nmi: "
            "the pod, its aadpodidbinding label, bindings, assignments, exceptions and the "
            "daemon's decision. Exit 0: token; 1: no token; 2: usage error."
        ),
    )
    p.add_argument("target", nargs="?", help="NAMESPACE/POD")
    p.add_argument("--ip", help="explain the pod of this IP on --node (or env NODE_NAME)")
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig (else $KUBECONFIG, else in-cluster)"
    )
    p.add_argument("--node", default=None, help="node to explain for (default: the pod's node)")
    p.add_argument(
        "--operation-mode", default="standard", type=str.lower, choices=["standard", "managed"]
    )
    p.add_argument(
        "--forceNamespaced", nargs="?", const=True, default=False, type=parse_bool, metavar="BOOL"
    )
    p.add_argument("--resource", default="", help="the resource the pod asks a token for")
    p.add_argument("--client-id", default="", help="the client_id the pod sends")
    p.add_argument("--msi-res-id", "--mi-res-id", dest="msi_res_id", default="")
    p.add_argument("--object-id", default="", help="the object_id the pod sends")
    p.add_argument(
        "--admin-socket",
        default=DEFAULT_ADMIN_SOCKET,
        help=f"the daemon's admin socket for cache state (default {DEFAULT_ADMIN_SOCKET})",
    )
    p.add_argument("-o", "--output", default="text", choices=["text", "json"])
    return p


@dataclass(frozen=True, slots=True)
class _Request:
    namespace: str
    name: str
    ip: str
    node: str
    selector: IdentitySelector
    resource: str


def _request_from(args: argparse.Namespace, environ: Mapping[str, str]) -> _Request:
    if bool(args.target) == bool(args.ip):
        raise UsageError("give either NAMESPACE/POD or --ip IP")
    namespace = name = ""
    if args.target:
        namespace, sep, name = str(args.target).partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise UsageError(f"{args.target!r} is not NAMESPACE/POD")
    node = args.node or ""
    if args.ip and not node:
        node = environ.get("NODE_NAME", "")
        if not node:
            raise UsageError("--ip needs --node (or env NODE_NAME): pod IPs are per node")
    given = [v for v in (args.client_id, args.msi_res_id, args.object_id) if v]
    if len(given) > 1:
        raise UsageError(
            "give at most one of --client-id, --msi-res-id, --object-id "
            "(nmi answers 400 to a request naming several)"
        )
    selector = IdentitySelector(
        client_id=args.client_id, object_id=args.object_id, resource_id=args.msi_res_id
    )
    if args.resource:
        query = {"api-version": "2018-02-01", "resource": args.resource}
        if args.client_id:
            query["client_id"] = args.client_id
        if args.msi_res_id:
            query["msi_res_id"] = args.msi_res_id
        if args.object_id:
            query["object_id"] = args.object_id
        try:
            selector = parse_token_query(urlencode(query)).selector  # the daemon's own parsing
        except QueryError as exc:
            raise UsageError(f"nmi would refuse this request: {exc.description}") from None
    return _Request(namespace, name, args.ip or "", node, selector, args.resource)


def _settings_for(args: argparse.Namespace, node: str, environ: Mapping[str, str]) -> Settings:
    force = bool(args.forceNamespaced) or environ.get("FORCENAMESPACED", "").strip().lower() == (
        "true"
    )
    return Settings(
        node_name=node,
        operation_mode=OperationMode(args.operation_mode),
        force_namespaced=force,
        kubeconfig=args.kubeconfig,
    )


async def _daemon_section(
    args: argparse.Namespace, request: _Request, pod: Pod, node: str
) -> JSONDict:
    path = Path(args.admin_socket)
    section: JSONDict = {"socket": str(path), "available": False}
    try:
        exists = await asyncio.to_thread(path.exists)
    except OSError:
        exists = False
    if not exists:
        section["why"] = f"no admin socket at {path}: cache state unavailable"
        return section
    try:
        doc = await query_admin(
            path,
            namespace=pod.meta.namespace,
            pod=pod.meta.name,
            resource=request.resource,
            client_id=request.selector.client_id,
            msi_res_id=request.selector.resource_id,
            object_id=request.selector.object_id,
        )
    except (OSError, aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as exc:
        section["why"] = f"admin socket {path} did not answer ({exc}): cache state unavailable"
        return section
    if doc.get("node") != node:
        section["why"] = (
            f"the daemon on {path} serves node {doc.get('node')!r}, the pod is explained for "
            f"node {node!r}: cache state unavailable"
        )
        return section
    section.update(doc)
    section["available"] = True
    return section


async def explain(
    args: argparse.Namespace, *, environ: Mapping[str, str], api: RawApi | None = None
) -> tuple[JSONDict, int]:
    """The full report for parsed arguments, and the exit status."""
    request = _request_from(args, environ)
    own_api = None
    if api is None:
        from .kube.client import KubeApi

        own_api = api = await KubeApi.connect(args.kubeconfig)
    try:
        return await _explain(args, request, environ, api)
    finally:
        if own_api is not None:
            await own_api.close()


async def _explain(
    args: argparse.Namespace, request: _Request, environ: Mapping[str, str], api: RawApi
) -> tuple[JSONDict, int]:
    node = request.node
    report: JSONDict = {
        "query": {
            "namespace": request.namespace or None,
            "pod": request.name or None,
            "ip": request.ip or None,
        }
    }
    if request.name:
        found = await get_pod(api, request.namespace, request.name)
        if found is None:
            settings = _settings_for(args, node or "-", environ)
            report["explanation"] = explain_missing(
                settings=settings,
                problem=f"pod {request.namespace}/{request.name} does not exist",
            )
            return report, EXIT_REFUSED
        node = node or found.node_name
        if not node:
            settings = _settings_for(args, "-", environ)
            doc = explain_missing(
                settings=settings,
                problem=f"pod {found.meta.key} is not scheduled on a node yet",
            )
            doc["pod"] = pod_doc(found)
            report["explanation"] = doc
            return report, EXIT_REFUSED
    settings = _settings_for(args, node, environ)
    index, watch = await load_view(api, settings)
    pod: Pod | None
    if request.ip:
        resolver = Resolver(index=index, settings=settings, object_id_of=_no_object_ids)
        caller = resolver.caller_now(request.ip)
        if isinstance(caller, CallerProblem):
            doc = explain_missing(settings=settings, problem=caller.reason, kind=caller.kind)
            doc["pods_with_ip"] = [
                {**pod_doc(p), "can_call": p.can_call} for p in index.pods() if request.ip in p.ips
            ]
            report["explanation"] = doc
            return report, EXIT_REFUSED
        pod = caller
    else:
        pod = index.pod(request.namespace, request.name)
        if pod is None:
            report["explanation"] = explain_missing(
                settings=settings,
                problem=f"pod {request.namespace}/{request.name} is not on node {node}",
            )
            return report, EXIT_REFUSED
    doc, _ = explain_pod(
        index=index,
        settings=settings,
        pod=pod,
        selector=request.selector,
        resource=request.resource,
        all_bindings=_bindings_of(watch),
    )
    report["explanation"] = doc
    daemon = await _daemon_section(args, request, pod, node)
    report["daemon"] = daemon
    would = bool(doc["would_get_token"])
    live = daemon.get("explanation") if daemon.get("available") else None
    if isinstance(live, dict):
        # The running daemon's own decision is what the pod gets (it also knows learned
        # object ids); the API server view above explains it.
        would = bool(live.get("would_get_token"))
    return report, EXIT_TOKEN if would else EXIT_REFUSED


# ----------------------------------------------------------------------------- text output


def render_text(report: JSONDict, exit_code: int) -> str:
    lines: list[str] = []
    add = lines.append
    doc: JSONDict = report.get("explanation") or {}
    pod = doc.get("pod")
    add(
        f"node {doc.get('node')}, {doc.get('mode')} mode, namespaced rules: "
        + (f"on ({doc.get('namespaced_why')})" if doc.get("namespaced") else "off")
    )
    if pod:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(pod["labels"].items())) or "(none)"
        add(f"pod {pod['namespace']}/{pod['name']}")
        add(f"  uid:    {pod['uid']}")
        add(f"  node:   {pod['node'] or '(not scheduled)'}")
        add(
            f"  phase:  {pod['phase'] or '(none)'}    IPs: {', '.join(pod['ips']) or '(none)'}"
            + ("    hostNetwork" if pod["host_network"] else "")
        )
        add(f"  labels: {labels}")
    for other in doc.get("pods_with_ip") or ():
        add(
            f"pod {other['namespace']}/{other['name']} has this IP but cannot call "
            f"(phase {other['phase'] or '-'}{', hostNetwork' if other['host_network'] else ''})"
        )
    if doc.get("caller_problem"):
        add(f"caller: NOT attributable: {doc['caller_problem']}")
    elif pod:
        add("caller: traffic from the pod's IP is attributed to this pod")
    if pod is not None and "bindings" in doc:
        label = doc.get("label")
        add(f"label aadpodidbinding: {label!r}" if label else "label aadpodidbinding: (not set)")
        bindings: list[JSONDict] = doc.get("bindings") or []
        if label:
            add(f"bindings with selector {label!r}:" + ("" if bindings else " none"))
        for b in bindings:
            ident = b.get("identity_detail")
            what = (
                f"{ident['type_name']}, client id {ident['client_id'] or '-'}"
                if ident
                else "identity missing"
            )
            verdict = "used" if b["used"] else f"DROPPED: {b['dropped_because']}"
            add(
                f"  {b['namespace']}/{b['name']} -> AzureIdentity {b['namespace']}/"
                f"{b['identity']} ({what}): {verdict}"
            )
        others: list[JSONDict] = doc.get("other_bindings_in_namespace") or []
        if others and not any(b["used"] for b in bindings):
            add(
                f"  other bindings in namespace {pod['namespace']}: "
                + ", ".join(f"{o['name']} (selector {o['selector']!r})" for o in others)
            )
        assignments = doc.get("assignments")
        if assignments is None:
            add("AzureAssignedIdentities: not used in managed mode")
        else:
            add("AzureAssignedIdentities of the pod:" + ("" if assignments else " none"))
            for a in assignments:
                why = f" ({a['why']})" if a.get("why") else ""
                add(
                    f"  {a['namespace']}/{a['name']}: identity {a['identity']}, state "
                    f"{a['state']}, node {a['node'] or '-'}: {a['status']}{why}"
                )
        exceptions: list[JSONDict] = doc.get("exceptions_in_namespace") or []
        if exceptions:
            add("AzurePodIdentityExceptions in the namespace:")
            for e in exceptions:
                add(
                    f"  {e['namespace']}/{e['name']} podLabels {e['pod_labels']}: "
                    + ("MATCHES" if e["matches"] else "no match")
                )
        else:
            add("AzurePodIdentityExceptions in the namespace: none")
        sel = doc.get("selector") or {}
        add(
            f"request: {sel.get('describe', 'no identity selector')}"
            + (f", resource {doc['resource']}" if doc.get("resource") else "")
        )
    for note in doc.get("notes") or ():
        add(f"note: {note}")
    decision: JSONDict = doc.get("decision") or {}
    kind = decision.get("kind", "?")
    add("")
    if kind == "grant":
        ident = decision["identity"]
        add(
            f"DECISION: grant AzureIdentity {ident['namespace']}/{ident['name']} "
            f"({ident['type_name']}, client id {ident['client_id'] or '-'}"
            + (f", resource id {ident['resource_id']}" if ident.get("resource_id") else "")
            + ")"
        )
    elif kind == "node_identity":
        add(f"DECISION: the node's own identity: {decision['summary']}")
    else:
        add(f"DECISION: {kind}: {decision.get('summary', '')}")
    imds = decision.get("imds") or {}
    body = imds.get("body")
    add(
        f"IMDS reply: HTTP {imds.get('status')} "
        + (json.dumps(body, separators=(",", ":")) if isinstance(body, dict) else str(body))
    )
    daemon: JSONDict | None = report.get("daemon")
    if daemon is not None:
        add("")
        if not daemon.get("available"):
            add(f"daemon: {daemon.get('why', 'cache state unavailable')}")
        else:
            add(
                f"daemon (admin socket {daemon['socket']}, node {daemon['node']}, "
                f"{'synced' if daemon.get('synced') else 'NOT synced'}):"
            )
            live: JSONDict = daemon.get("explanation") or {}
            if not daemon.get("found"):
                add("  the daemon does not see this pod (yet)")
            else:
                live_decision: JSONDict = live.get("decision") or {}
                add(
                    f"  its decision: {live_decision.get('kind')}: "
                    f"{live_decision.get('summary', '')}"
                )
                if live_decision.get("kind") != kind:
                    add(
                        "  (differs from the API server's view above: the daemon's watch may "
                        "lag, or its flags differ)"
                    )
            cache = daemon.get("cache")
            if cache is None:
                add("  token cache: no identity chosen, nothing cached")
            else:
                entries: list[JSONDict] = cache.get("entries") or []
                add(
                    f"  token cache for {cache['identity']}: "
                    + (
                        f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
                        if entries
                        else "empty"
                    )
                )
                for e in entries:
                    if not e.get("present"):
                        add(f"    {e['resource']}: not cached (the next request asks upstream)")
                        continue
                    add(
                        f"    {e['resource']}: {e['remaining_seconds']}s left"
                        + ("" if e["servable"] else " (too close to expiry to serve)")
                        + ", refresh "
                        + ("due" if e["refresh_due"] else f"in {e['refresh_in_seconds']}s")
                        + (" (refreshing now)" if e.get("refreshing") else "")
                    )
                if cache.get("stale_entries"):
                    add(f"    {cache['stale_entries']} entries from an older spec (not served)")
            error = daemon.get("last_error")
            if error:
                add(f"  last upstream error ({error['age_seconds']}s ago): {error['summary']}")
            else:
                add("  last upstream error: none recorded")
    add("")
    add(
        "result: "
        + (
            "the pod gets a token (exit 0)"
            if exit_code == EXIT_TOKEN
            else "the pod gets NO token (exit 1)"
        )
    )
    return "\n".join(lines) + "\n"


async def run(
    argv: Sequence[str],
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``nmi explain`` inside a running event loop (tests call this; ``main`` wraps it)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    env = os.environ if environ is None else environ
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        report, code = await explain(args, environ=env)
    except UsageError as exc:
        err.write(f"nmi explain: error: {exc}\n")
        return EXIT_USAGE
    except ConfigError as exc:
        err.write(f"nmi explain: error: {exc}\n")
        return EXIT_USAGE
    except Exception as exc:
        err.write(f"nmi explain: cannot explain: {type(exc).__name__}: {exc}\n")
        return EXIT_REFUSED
    if args.output == "json":
        out.write(json.dumps({**report, "exit_code": code}, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render_text(report, code))
    return code


def main(argv: Sequence[str]) -> int:
    """Entry point of ``nmi explain ...`` (``argv`` without the word ``explain``)."""
    return asyncio.run(run(argv))


__all__ = [
    "DEFAULT_ADMIN_SOCKET",
    "AdminServer",
    "DaemonView",
    "LastError",
    "LastErrors",
    "admin_handler",
    "cache_state",
    "daemon_explanation",
    "error_key",
    "explain_pod",
    "list_once",
    "load_view",
    "main",
    "query_admin",
    "render_text",
    "run",
]
