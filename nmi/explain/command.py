"""``nmi explain``: why does this pod get (or not get) a token?

Why: a refused pod's SDK only says "Identity not found"; the answer is spread
over five kinds of objects (the pod's label, bindings, identities, MIC's
assignments, exceptions), two modes and the namespaced rules.  This command
walks that chain for one pod and prints every link, ending with the daemon's
exact decision and the exact IMDS reply the pod would get.

It runs the daemon's own code (``model``): the node's view is built as the
daemon builds it (one LIST per informer, no watch), and the decision is
``decide``'s.  Token cache state and the last upstream error exist only
inside the running daemon: they come from its admin socket (``admin``) when
there is one.

Exit status: 0 the pod would get a token (Grant, or the node's identity for an
exception pod); 1 it would not (refused, waiting for MIC, pod unknown, not
on a node, not running) or nmi could not find out; 2 usage error.  When the
admin socket answers for the pod, the running daemon's decision sets it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp

from ..config import ConfigError, OperationMode, Settings
from ..flags import parse_bool
from ..identity.caller import CallerProblem, Callers
from ..identity.decide import IdentitySelector
from ..imds.query import QueryError, parse_token_query
from ..kube.cluster import ClusterWatch
from ..kube.index import ClusterIndex
from ..kube.informer import ApiError, RawApi
from ..kube.objects import Pod
from ..kube.token_request import service_account_issuer
from .admin import DEFAULT_ADMIN_SOCKET, query_admin
from .model import explain_missing, explain_pod, pod_doc
from .render import EXIT_REFUSED, EXIT_TOKEN, EXIT_USAGE, render_text

JSONDict = dict[str, Any]


async def load_view(api: RawApi, settings: Settings) -> ClusterIndex:
    """The node's view as the daemon builds it, from one consistent LIST of each kind
    (the daemon's first sync, without the watches that follow)."""
    index = ClusterIndex(node_name=settings.node_name)
    watch = ClusterWatch(api=api, index=index, mode=settings.operation_mode)
    await asyncio.gather(*(informer.list_once() for informer in watch.informers))
    return index


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


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
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
        from ..kube.client import KubeApi

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
    index = await load_view(api, settings)
    pod: Pod | None
    if request.ip:
        caller = Callers(index=index, settings=settings).now(request.ip)
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
    )
    federation = doc.get("federation")
    if isinstance(federation, dict) and not federation.get("issuer") and hasattr(api, "get"):
        # The issuer Azure AD must trust: the API server's discovery document says it.
        federation["issuer"] = await service_account_issuer(api) or None
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
