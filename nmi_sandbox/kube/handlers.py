"""The HTTP side of the API: authentication, routing, and each verb on the wire.

Why this exists: the daemon talks to the emulator through ``kubernetes_asyncio`` and
its own raw watch reader, so requests must be answered as the real server answers
them -- bearer-token authentication (401 before anything else), the URL layout of
``/api/v1`` and ``/apis/<group>/<version>`` (namespaced and cluster-wide paths,
``watch`` paths, subresources, the legacy ``bindings``), discovery documents, status
codes and bodies of every verb, typed lists whose built-in items carry no TypeMeta,
and watches streamed as chunked JSON lines with bookmarks, ``timeoutSeconds`` and
410 as an ``ERROR`` event.  The semantics themselves are the registry's and the
store's; this module only translates.  It counts every request by verb and
resource in the server's ``requests`` counter (tests assert on it).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import yaml
from aiohttp import web

from .errors import (
    KubeApiError,
    bad_request,
    internal,
    method_not_allowed,
    resource_not_found,
    unauthorized,
)
from .meta import JSON
from .registry import Registry
from .resources import (
    BY_GVR,
    GROUPS,
    KUBE_VERSION,
    Resource,
    api_versions,
    group_document,
    group_list,
    resource_list,
    root_paths,
)
from .selectors import Filter, name_selector
from .store import TOO_LARGE_RV_WAIT, Store, parse_rv
from .tokens import DISCOVERY_PATH, JWKS_PATH, ServiceAccountTokens

__all__ = ["ApiHandler", "Endpoint"]

logger = logging.getLogger("nmi_sandbox.kube")

_BINDING_SUCCESS: JSON = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Success",
    "code": 201,
}


class Endpoint(Protocol):
    """What the handlers read from the server they answer for, at each request."""

    host: str
    port: int
    token: str
    bookmark_interval: float
    requests: collections.Counter[str]


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def _parse_int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"invalid {name}: {value!r}") from None


def _json(body: Any, status: int = 200, *, content_type: str = "application/json") -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type=content_type,
    )


async def _read_body(request: web.Request) -> Any:
    raw = await request.read()
    media = request.content_type.lower()
    try:
        if media in ("application/yaml", "application/x-yaml", "text/yaml"):
            return yaml.safe_load(raw)
        return json.loads(raw or b"null")
    except (ValueError, yaml.YAMLError) as e:
        raise bad_request(f"couldn't get version/kind; json parse error: {e}") from None


def _check_type(res: Resource, body: Any) -> JSON:
    if not isinstance(body, dict):
        raise bad_request(
            "the body of the request must be a JSON object, got " + type(body).__name__
        )
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if res.custom:
        if not kind:
            raise bad_request(f"Object 'Kind' is missing in '{json.dumps(body)}'")
        if not api_version:
            raise bad_request(f"Object 'apiVersion' is missing in '{json.dumps(body)}'")
    if api_version and api_version != res.api_version:
        raise bad_request(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({res.api_version})"
        )
    if kind and kind != res.kind:
        raise bad_request(
            f"the kind in the data ({kind}) does not match the expected kind ({res.kind})"
        )
    return body


def _list_kind(res: Resource) -> str:
    return f"{res.kind}List"


def _bookmark(res: Resource, rv: int, *, initial_end: bool = False) -> JSON:
    meta: JSON = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}


class ApiHandler:
    """The aiohttp handler of every path (``/{tail:.*}``) of one server."""

    def __init__(
        self,
        endpoint: Endpoint,
        store: Store,
        registry: Registry,
        tokens: ServiceAccountTokens,
    ) -> None:
        self._endpoint = endpoint
        self._store = store
        self._registry = registry
        self._tokens = tokens

    def _count(self, key: str) -> None:
        self._endpoint.requests[key] += 1

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            if request.method == "GET" and request.path in (DISCOVERY_PATH, JWKS_PATH):
                response = self._issuer_discovery(request.path)
            else:
                self._authenticate(request)
                response = await self._route(request)
        except KubeApiError as e:
            logger.debug("%s %s -> %d %s", request.method, request.path_qs, e.code, e)
            return _json(e.status, e.code)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("kube API emulator failed on %s %s", request.method, request.path_qs)
            err = internal(f"emulator error: {e!r}")
            return _json(err.status, 500)
        logger.debug("%s %s -> %d", request.method, request.path_qs, response.status)
        return response

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._endpoint.token.encode()
        ):
            logger.debug("unauthorized %s %s", request.method, request.path_qs)
            raise unauthorized()

    def _issuer_discovery(self, path: str) -> web.Response:
        """The two documents of service-account issuer discovery (no authentication)."""
        self._count(f"GET {path}")
        if path == DISCOVERY_PATH:
            response = _json(self._tokens.openid_configuration())
        else:
            response = _json(self._tokens.jwks(), content_type="application/jwk-set+json")
        response.headers["Cache-Control"] = "public, max-age=3600"
        return response

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts:
            return _json(root_paths())
        head = parts[0]
        if head in ("healthz", "livez", "readyz") and request.method in ("GET", "HEAD"):
            self._count(f"GET /{head}")
            return web.Response(text="ok", content_type="text/plain")
        if parts == ["version"] and request.method == "GET":
            self._count("GET /version")
            return _json(dict(KUBE_VERSION))
        if head == "api":
            if len(parts) == 1:
                self._count("GET /api")
                endpoint = self._endpoint
                return _json(api_versions(f"{endpoint.host}:{endpoint.port}"))
            if parts[1] != "v1":
                raise resource_not_found()
            if len(parts) == 2:
                self._count("GET /api/v1")
                return _json(resource_list("", "v1"))
            group, version, rest = "", "v1", parts[2:]
        elif head == "apis":
            if len(parts) == 1:
                self._count("GET /apis")
                return _json(group_list())
            group = parts[1]
            if group not in GROUPS:
                raise resource_not_found()
            if len(parts) == 2:
                self._count(f"GET /apis/{group}")
                return _json({"kind": "APIGroup", "apiVersion": "v1", **group_document(group)})
            version = parts[2]
            if version not in GROUPS[group]:
                raise resource_not_found()
            if len(parts) == 3:
                self._count(f"GET /apis/{group}/{version}")
                return _json(resource_list(group, version))
            rest = parts[3:]
        else:
            raise resource_not_found()
        return await self._resource_request(request, group, version, rest)

    async def _resource_request(
        self, request: web.Request, group: str, version: str, rest: list[str]
    ) -> web.StreamResponse:
        watch_path = False
        if rest and rest[0] == "watch":
            watch_path, rest = True, rest[1:]
        if not rest:
            raise resource_not_found()
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
            raise resource_not_found()
        if tail:
            name = tail[0]
        if len(tail) == 2:
            sub = tail[1]
        q = request.query
        registry = self._registry
        if (group, plural, name) == ("", "bindings", None) and namespace is not None:
            # the legacy "bindings" resource: POST a Binding named after the pod
            if request.method != "POST":
                raise method_not_allowed()
            self._count("POST bindings")
            body = await _read_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
                raise bad_request("the body of the request must be a Binding object")
            registry.bind_pod(namespace, str(body["metadata"].get("name", "")), body)
            return _json(_BINDING_SUCCESS, 201)
        res = BY_GVR.get((group, version, plural))
        if res is None or (namespace is not None and not res.namespaced):
            raise resource_not_found()
        if res.namespaced and namespace is None and name is not None:
            raise resource_not_found()
        if sub is not None and sub not in res.subresources:
            raise resource_not_found()
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
                body = _check_type(res, await _read_body(request))
                created = registry.create(res, namespace, body, dry_run=dry_run)
                return _json(res.to_view(created), 201)
            if method == "DELETE" and (namespace is not None or not res.namespaced):
                self._count(f"DELETECOLLECTION {counted}")
                return self._delete_collection(res, namespace, q, dry_run=dry_run)
            raise method_not_allowed()
        if watch_path:
            if method != "GET" or sub is not None:
                raise method_not_allowed()
            self._count(f"WATCH {counted}")
            return await self._watch(request, res, namespace, single=name)
        if sub == "token":
            if method != "POST":
                raise method_not_allowed()
            self._count(f"POST {counted}")
            assert namespace is not None
            body = await _read_body(request)
            return _json(self._tokens.create(namespace, name, body), 201)
        if sub == "binding":
            if method != "POST":
                raise method_not_allowed()
            self._count(f"POST {counted}")
            body = await _read_body(request)
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be a Binding object")
            assert namespace is not None
            registry.bind_pod(namespace, name, body)
            return _json(_BINDING_SUCCESS, 201)
        if method == "GET":
            if _flag(q.get("watch")):
                self._count(f"WATCH {counted}")
                return await self._watch(request, res, namespace, single=name)
            self._count(f"GET {counted}")
            found = self._store.get(res.storage, namespace, name)
            if found is None:
                raise res.not_found(name)
            return _json(res.to_view(found))
        if method == "PUT":
            self._count(f"PUT {counted}")
            body = _check_type(res, await _read_body(request))
            return _json(
                res.to_view(registry.update(res, namespace, name, body, sub, dry_run=dry_run))
            )
        if method == "PATCH":
            self._count(f"PATCH {counted}")
            media = request.content_type.lower()
            body = await _read_body(request)
            return _json(
                res.to_view(registry.patch(res, namespace, name, media, body, sub, dry_run=dry_run))
            )
        if method == "DELETE" and sub is None:
            self._count(f"DELETE {counted}")
            options = await _read_body(request) if request.can_read_body else None
            preconditions = options.get("preconditions") if isinstance(options, dict) else None
            obj, removed = registry.delete(res, namespace, name, preconditions, dry_run=dry_run)
            if removed and not res.returns_deleted_object:
                details = res.details(name)
                details["uid"] = obj["metadata"].get("uid", "")
                return _json(
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": details,
                    }
                )
            return _json(res.to_view(obj))
        raise method_not_allowed()

    async def _list_response(
        self, res: Resource, namespace: str | None, q: Mapping[str, str]
    ) -> web.Response:
        flt = Filter.build(res, namespace, q.get("labelSelector"), q.get("fieldSelector"))
        rv_param = q.get("resourceVersion") or None
        rv_match = q.get("resourceVersionMatch") or None
        if rv_match not in (None, "Exact", "NotOlderThan"):
            raise bad_request(f'invalid resourceVersionMatch: "{rv_match}"')
        if rv_param and rv_param != "0" and rv_match != "Exact" and not q.get("continue"):
            wanted = parse_rv(rv_param)
            if wanted > self._store.rv:
                await self._store.wait_rv(wanted, TOO_LARGE_RV_WAIT)
        page = self._store.list(
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
        return _json(
            {
                "kind": _list_kind(res),
                "apiVersion": res.api_version,
                "metadata": meta,
                "items": items,
            }
        )

    def _delete_collection(
        self, res: Resource, namespace: str | None, q: Mapping[str, str], *, dry_run: bool
    ) -> web.Response:
        flt = Filter.build(res, namespace, q.get("labelSelector"), q.get("fieldSelector"))
        page = self._store.list(flt, None, None, None, None)
        deleted: list[JSON] = []
        for obj in page.items:
            meta = obj["metadata"]
            if self._store.get(res.storage, meta.get("namespace"), meta["name"]) is None:
                continue
            try:
                result, _ = self._registry.delete(
                    res, meta.get("namespace"), meta["name"], dry_run=dry_run
                )
            except KubeApiError as e:
                if e.code != 404:
                    raise
                continue
            deleted.append(res.to_view(result))
        return _json(
            {
                "kind": _list_kind(res),
                "apiVersion": res.api_version,
                "metadata": {"resourceVersion": str(self._store.rv)},
                "items": deleted,
            }
        )

    # ----------------------------------------------------------------- WATCH

    async def _watch(
        self,
        request: web.Request,
        res: Resource,
        namespace: str | None,
        *,
        single: str | None = None,
    ) -> web.StreamResponse:
        q = request.query
        store = self._store
        field_selector = q.get("fieldSelector") or ""
        if single is not None:
            name_sel = name_selector(single)
            field_selector = f"{field_selector},{name_sel}" if field_selector else name_sel
        flt = Filter.build(res, namespace, q.get("labelSelector"), field_selector)
        rv_param = q.get("resourceVersion") or ""
        bookmarks = _flag(q.get("allowWatchBookmarks"))
        send_initial = _flag(q.get("sendInitialEvents"))
        timeout_s = _parse_int(q.get("timeoutSeconds"), "timeoutSeconds")
        start_rv: int | None = None
        if rv_param not in ("", "0"):
            start_rv = parse_rv(rv_param)
            if start_rv > store.rv:
                await store.wait_rv(start_rv, TOO_LARGE_RV_WAIT)
        loop = asyncio.get_running_loop()
        start = store.open_watch(flt, start_rv, send_initial, loop)
        watcher = start.watcher

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
            if start.error is not None:
                await send("ERROR", start.error)
                return response
            assert watcher is not None
            for etype, obj in start.initial:
                await send(etype, res.to_view(obj))
            if send_initial and bookmarks:
                await send("BOOKMARK", _bookmark(res, start.snapshot_rv, initial_end=True))
            endpoint = self._endpoint
            deadline = loop.time() + timeout_s if timeout_s and timeout_s > 0 else None
            next_bookmark = loop.time() + endpoint.bookmark_interval if bookmarks else None
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
                    await send("BOOKMARK", _bookmark(res, store.rv))
                    next_bookmark = now + endpoint.bookmark_interval
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
                store.close_watch(watcher)
        return response
