"""The request path: from an HTTP request to an IMDS-shaped answer.

Two entry points with the same rules.  ``fast`` is synchronous and answers
what nearly every request is — a token request from a known pod whose
decision grants an identity with a token in the cache — with the complete
reply bytes (rendered at most once a second), or declines.  ``__call__`` is
one coroutine per request for everything else, in the order ``CONTRACT.md``
fixes: route, method, ``Metadata`` header (before any lookup, so SDK probes
are answered at once), query, caller, identity decision, token.  Every
outcome, including an unexpected exception, becomes a JSON reply, and every
request leaves one access-log line.  Nothing here blocks: lookups are
dictionary reads, waits are on the cluster view's change signal, upstream
calls run on threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..config import OperationMode, Settings
from ..explain import LastErrors, error_key
from ..identity.decide import (
    Decision,
    Deny,
    Grant,
    IdentitySelector,
    UseNodeIdentity,
    Wait,
    bound_identities,
    usable_assignments,
)
from ..identity.resolver import CallerProblem, Resolver
from ..kube.objects import AzureIdentity, Pod
from ..kube.secrets import SecretUnavailable
from ..ops import events as kube_events
from ..ops.accesslog import AccessLog
from ..ops.metrics import Metrics
from ..ratelimit import Buckets
from ..tokens.cache import UpstreamNotAllowed
from ..tokens.credentials import CredentialError
from ..tokens.model import Token, UpstreamError
from ..tokens.service import TokenService
from . import replies
from .messages import CLOCK, Reply, Request
from .proxy import MetadataProxy
from .target import TOKEN_PATH, QueryError, Route, TokenQuery, classify, parse_token_query

log = logging.getLogger(__name__)

LOOPBACK = frozenset({"127.0.0.1", "::1"})
_TOKEN_PREFIX = TOKEN_PATH + "?"
_MAX_LINE_PREFIXES = 4096


@dataclass(slots=True)
class Access:
    """What one request did, for the access log (never a token or a secret)."""

    route: str = "-"
    ip: str = ""
    pod: str = ""
    namespace: str = ""
    identity: str = ""
    resource: str = ""
    cache: str = "-"
    upstream_request_id: str = ""
    waited_ms: float = 0.0
    reason: str = ""


class ImdsHandler:
    def __init__(
        self,
        *,
        settings: Settings,
        resolver: Resolver,
        tokens: TokenService,
        proxy: MetadataProxy,
        metrics: Metrics | None = None,
        events: kube_events.EventRecorder | None = None,
        last_errors: LastErrors | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.access_log = AccessLog(fmt=settings.log_format)
        self.bodies = replies.TokenBodies()
        self.pod_limits = (
            Buckets(rate=settings.per_pod_rate, burst=settings.per_pod_burst)
            if settings.per_pod_rate > 0
            else None
        )
        self.events = events
        self.last_errors = last_errors
        self.resolver = resolver
        self.tokens = tokens
        self.proxy = proxy
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._line_prefixes: dict[tuple[str, str, str, str, str], str] = {}

    # -- the cache-hit path ---------------------------------------------------

    def fast(self, request: Request) -> bytes | None:
        """The whole reply to a cache hit, synchronously; None: take the full path.

        The same checks in the same order as the full path (route, method,
        ``Metadata``, query, caller, decision), but every one is a dictionary
        read; whatever is not a plain hit (an error, a miss, a wait, a
        refusal) is declined and answered by ``__call__``.
        """
        target = request.target
        if request.method != "GET" or not target.startswith(_TOKEN_PREFIX):
            return None
        started = time.perf_counter()
        try:
            return self._fast(request, target, started)
        except Exception:  # never worse than the full path, which answers instead
            log.exception("unexpected error on the cache-hit path")
            return None

    def _fast(self, request: Request, target: str, started: float) -> bytes | None:
        if (
            self.settings.metadata_header_required
            and request.header("metadata").strip().lower() != "true"
        ):
            return None
        try:
            query = parse_token_query(target[len(_TOKEN_PREFIX) :])
        except QueryError:
            return None
        pod = self.resolver.caller_now(request.peer_ip)
        if isinstance(pod, CallerProblem):
            return None
        hit = self._hit(pod, query)
        if hit is None:
            return None
        token, client_id, label = hit
        second, _ = CLOCK.now()
        data = self.bodies.response(
            access_token=token.access_token,
            client_id=client_id,
            expires_on=token.expires_on,
            not_before=token.not_before,
            now=second,
            resource=query.resource,
            token_type=token.token_type,
        )
        elapsed = time.perf_counter() - started
        namespace = pod.meta.namespace
        if self.metrics is not None:
            self.metrics.observe_request(
                route="token",
                status=200,
                seconds=elapsed,
                namespace=namespace,
                resource=query.resource,
            )
        if self.access_log.enabled:
            key = (request.peer_ip, namespace, pod.meta.name, label, query.resource)
            prefix = self._line_prefixes.get(key)
            if prefix is None:
                if len(self._line_prefixes) >= _MAX_LINE_PREFIXES:
                    self._line_prefixes.clear()
                prefix = self.access_log.prefix(
                    {
                        "route": "token",
                        "method": "GET",
                        "status": 200,
                        "ip": request.peer_ip,
                        "namespace": namespace,
                        "pod": pod.meta.name,
                        "identity": label,
                        "resource": query.resource,
                        "cache": "hit",
                    }
                )
                self._line_prefixes[key] = prefix
            self.access_log.write_prefixed(
                prefix,
                round(elapsed * 1000, 3),
                request.header("x-ms-client-request-id")[:64],
            )
        return data

    def protocol_error(self, peer_ip: str, status: int, reason: str) -> None:
        """A request the connection could not read (it answers with JSON and closes)."""
        log.debug("unreadable request from %s: %s", peer_ip, reason)
        if self.metrics is not None:
            self.metrics.observe_request(
                route=Route.INVALID.value, status=status, seconds=0.0, namespace="", resource=""
            )
        if self.access_log.enabled:
            self.access_log.write(
                {"route": Route.INVALID.value, "status": status, "ip": peer_ip, "reason": reason}
            )

    # -- the full path ----------------------------------------------------------

    async def __call__(self, request: Request) -> Reply:
        started = time.perf_counter()
        access = Access(ip=request.peer_ip)
        self.in_flight += 1
        self.idle.clear()
        try:
            response = await self._dispatch(request, access)
        except asyncio.CancelledError:
            # The client went away while waiting: account for it as nginx does (499).
            self._account(request, access, 499, time.perf_counter() - started)
            raise
        except Exception:
            log.exception("unexpected error on %s", access.route)
            response = replies.internal_error()
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        self._account(request, access, response.status, time.perf_counter() - started)
        return response

    def _account(self, request: Request, access: Access, status: int, elapsed: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(
                route=access.route,
                status=status,
                seconds=elapsed,
                namespace=access.namespace,
                resource=access.resource,
            )
        self._log(request, status, access, elapsed)

    def _log(self, request: Request, status: int, access: Access, elapsed: float) -> None:
        if not self.access_log.enabled:
            return
        fields: dict[str, Any] = {
            "route": access.route,
            "method": request.method,
            "status": status,
            "ip": access.ip,
            "namespace": access.namespace,
            "pod": access.pod,
            "identity": access.identity,
            "resource": access.resource,
            "cache": access.cache,
            "latency_ms": round(elapsed * 1000, 3),
        }
        if access.waited_ms:
            fields["waited_ms"] = round(access.waited_ms, 1)
        if access.upstream_request_id:
            fields["upstream_request_id"] = access.upstream_request_id
        client_request = request.header("x-ms-client-request-id")
        if client_request:
            fields["client_request_id"] = client_request[:64]
        if access.reason:
            fields["reason"] = access.reason
        self.access_log.write(fields)

    # -- routing ------------------------------------------------------------

    async def _dispatch(self, request: Request, access: Access) -> Reply:
        target = classify(request.target)
        access.route = target.route.value
        if target.route is Route.TOKEN:
            return await self._token(request, target.query, access)
        if target.route is Route.HOST_TOKEN:
            return await self._host_token(request, target.query, access)
        if target.route in (Route.IDENTITY_OTHER, Route.INVALID):
            return replies.not_found()
        if target.route is Route.INSTANCE and self.settings.block_instance_metadata:
            return replies.forbidden(
                "Instance metadata is blocked by the node managed identity service"
            )
        return await self.proxy.forward(request, target.proxy_target)

    async def _token(self, request: Request, query: str, access: Access) -> Reply:
        if request.method != "GET":
            return replies.method_not_allowed()
        if self.settings.metadata_header_required and (
            request.header("metadata").strip().lower() != "true"
        ):
            return replies.metadata_required()
        try:
            parsed = parse_token_query(query)
        except QueryError as exc:
            return _query_error(exc)
        access.resource = parsed.resource
        found = self.resolver.caller_now(access.ip)
        if isinstance(found, CallerProblem) and found.kind == "unknown":
            found = await self.resolver.caller(access.ip)  # a new pod: wait for the watch
        if isinstance(found, CallerProblem):
            access.reason = found.reason
            return replies.not_ready(
                f"No pod identity could be determined for this caller ({found.kind})",
                retry_after_header=self.settings.set_retry_after_header,
            )
        access.namespace, access.pod = found.meta.namespace, found.meta.name
        result = self._cache_hit(found, parsed, access) or await self._serve(found, parsed, access)
        if isinstance(result, Reply):
            return result
        token, identity_client_id = result
        return replies.json_bytes(200, self._render(token, identity_client_id, parsed.resource))

    async def _host_token(self, request: Request, query: str, access: Access) -> Reply:
        if request.method != "GET":
            return replies.method_not_allowed()
        namespace = request.header("podns")
        name = request.header("podname")
        if not namespace or not name:
            return replies.bad_request("missing 'podname' and 'podns' from request header")
        if access.ip not in LOOPBACK:
            return replies.forbidden("/host/token is only served to the node itself")
        try:
            parsed = parse_token_query(query, require_api_version=False)
        except QueryError as exc:
            return _query_error(exc)
        access.resource = parsed.resource
        access.namespace, access.pod = namespace, name
        pod = self.resolver.index.pod(namespace, name)
        if pod is None or not pod.can_call:
            return replies.not_found(f"pod {namespace}/{name} is not running on this node")
        result = self._cache_hit(pod, parsed, access) or await self._serve(pod, parsed, access)
        if isinstance(result, Reply):
            return result
        token, identity_client_id = result
        body = self._render(token, identity_client_id, parsed.resource)
        clientid = json.dumps(identity_client_id).encode()
        return replies.json_bytes(200, b'{"token":' + body + b',"clientid":' + clientid + b"}")

    def _render(self, token: Token, client_id: str, resource: str) -> bytes:
        return self.bodies.render(
            access_token=token.access_token,
            client_id=client_id,
            expires_on=token.expires_on,
            not_before=token.not_before,
            now=int(time.time()),
            resource=resource,
            token_type=token.token_type,
        )

    # -- identity + token -----------------------------------------------------

    def _cache_hit(self, pod: Pod, query: TokenQuery, access: Access) -> tuple[Token, str] | None:
        """Nearly every request: decided and answered from the cache synchronously.

        The same decision as the full path (the current view, no waiting); None
        when anything else is needed (a miss, a wait, a refusal, an error).
        """
        hit = self._hit(pod, query)
        if hit is None:
            return None
        token, client_id, label = hit
        access.identity = label
        access.cache = "hit"
        return token, client_id

    def _hit(self, pod: Pod, query: TokenQuery) -> tuple[Token, str, str] | None:
        """(token, client id to report, identity for the log) of a cache hit, or None."""
        decision = self.resolver.decide_now(pod, query.selector)
        if isinstance(decision, Grant):
            identity = decision.identity
            token = self.tokens.cached(identity, query.resource)
            if token is None:
                return None
            return token, identity.client_id or token.client_id, identity.meta.key
        if isinstance(decision, UseNodeIdentity):
            selector = query.selector
            token = self.tokens.cached_node(
                resource=query.resource,
                client_id=selector.client_id,
                object_id=selector.object_id,
                resource_id=selector.resource_id,
            )
            if token is None:
                return None
            label = f"node (exception {decision.exception})"
            return token, token.client_id or selector.client_id, label
        return None

    async def _serve(
        self, pod: Pod, query: TokenQuery, access: Access
    ) -> Reply | tuple[Token, str]:
        selector = query.selector
        decision = self.resolver.decide_now(pod, selector)
        if isinstance(decision, Grant | UseNodeIdentity):
            # Cache hits were answered by _cache_hit; here a request can still join an
            # upstream call already in flight for its key, which spends no budget.  Anything
            # else (a miss, a misconfigured identity) takes the full path below.
            with contextlib.suppress(UpstreamNotAllowed, CredentialError, SecretUnavailable):
                served = await self._token_for(decision, query, access, upstream=False)
                if served is not None:
                    return served
        if self.pod_limits is not None and (not isinstance(decision, Deny) or selector.object_id):
            # Upstream calls or a wait lie ahead: they are what the per-pod budget limits.
            over = self.pod_limits.take(pod.meta.uid or pod.meta.key)
            if over is not None:
                access.reason = "per-pod rate limit"
                return replies.error(
                    429,
                    "too_many_requests",
                    "Too many requests from this pod",
                    retry_after=over.retry_after(),
                )
        decision, waited = await self.resolver.resolve(pod, selector)
        access.waited_ms = waited * 1000
        if (
            waited > 0.001
            and self.metrics is not None
            and not (isinstance(decision, Deny) and decision.kind == "not_found")
        ):
            self.metrics.assignment_wait.observe(waited)  # not a new pod's grace that ran out
        if (
            selector.object_id
            and isinstance(decision, Deny)
            and decision.kind == "not_found"
            and await self._learn_object_ids(pod, query.resource)
        ):
            decision = self.resolver.decide_now(pod, selector)
        try:
            served = await self._token_for(decision, query, access, upstream=True)
            if served is not None:
                return served
        except UpstreamError as exc:
            access.reason = f"{exc.source} {exc.status or '-'} {exc.error}"
            self._failed(
                pod,
                decision,
                kube_events.upstream_event(
                    source=exc.source,
                    status=exc.status,
                    error=exc.error,
                    description=exc.description,
                    identity=_identity_of(decision),
                    resource=query.resource,
                ),
                f"{access.reason}: {exc.description}",
            )
            return _upstream_error(exc)
        except CredentialError as exc:
            access.reason = str(exc)
            self._failed(
                pod,
                decision,
                kube_events.misconfigured_event(
                    detail=str(exc), identity=_identity_of(decision), resource=query.resource
                ),
                f"identity misconfigured: {exc}",
            )
            return replies.bad_request(f"The identity cannot be used: {exc}")
        except SecretUnavailable as exc:
            access.reason = str(exc)
            self._failed(
                pod,
                decision,
                kube_events.credential_unavailable_event(
                    identity=_identity_of(decision), resource=query.resource
                ),
                f"credential unavailable: {exc}",
            )
            return replies.error(
                503, "server_error", "The identity's credential cannot be read now"
            )
        assert isinstance(decision, Deny | Wait)  # granting decisions returned above
        if self.metrics is not None:
            kind = decision.kind if isinstance(decision, Deny) else "not_assigned"
            self.metrics.denials.labels(kind).inc()
        if self.events is not None:
            reason, message = kube_events.refusal_event(
                decision, resource=query.resource, selector=selector
            )
            self.events.record(pod, reason=reason, message=message)
        if isinstance(decision, Deny):
            access.reason = decision.reason
            if decision.kind == "multiple":
                return replies.multiple_identities()
            return replies.identity_not_found()
        assert isinstance(decision, Wait)
        access.reason = decision.reason
        return replies.not_ready(
            "The pod's identity is not yet assigned on this node",
            retry_after_header=self.settings.set_retry_after_header,
        )

    def _failed(self, pod: Pod, decision: Decision, event: tuple[str, str], summary: str) -> None:
        """A token request failed after the decision: an Event on the pod, the last error."""
        if self.events is not None:
            reason, message = event
            self.events.record(pod, reason=reason, message=message)
        key = error_key(decision)
        if self.last_errors is not None and key is not None:
            self.last_errors.record(key, summary)

    async def _token_for(
        self, decision: Decision, query: TokenQuery, access: Access, *, upstream: bool
    ) -> tuple[Token, str] | None:
        """The token a granting decision leads to (None for other decisions)."""
        if isinstance(decision, Grant):
            identity = decision.identity
            access.identity = identity.meta.key
            token, hit = await self.tokens.for_identity(identity, query.resource, upstream=upstream)
            access.cache = "hit" if hit else "miss"
            access.upstream_request_id = "" if hit else token.request_id
            return token, identity.client_id or token.client_id
        if isinstance(decision, UseNodeIdentity):
            selector = query.selector
            access.identity = f"node (exception {decision.exception})"
            token, hit = await self.tokens.for_node(
                resource=query.resource,
                client_id=selector.client_id,
                object_id=selector.object_id,
                resource_id=selector.resource_id,
                upstream=upstream,
            )
            access.cache = "hit" if hit else "miss"
            return token, token.client_id or selector.client_id
        return None

    async def _learn_object_ids(self, pod: Pod, resource: str) -> bool:
        """``object_id`` selects by the identity's service-principal object id, which
        AzureIdentity does not record: it is learned from the ``oid`` claim of the
        identity's tokens.  Fetch tokens for the pod's identities whose object id is
        not known yet (a bounded, cached cost) and report whether anything was learned."""
        candidates: list[AzureIdentity]
        if self.settings.operation_mode is OperationMode.MANAGED:
            candidates = bound_identities(self.resolver.index, pod, self.settings)
        else:
            usable, _ = usable_assignments(self.resolver.index, pod, self.settings)
            candidates = [a.identity for a in usable]
        learned = False
        for identity in candidates[:8]:
            if self.tokens.object_id_of(identity) is not None:
                continue
            try:
                await self.tokens.for_identity(identity, resource)
            except (UpstreamError, CredentialError, SecretUnavailable):
                continue
            learned = learned or self.tokens.object_id_of(identity) is not None
        return learned


def _identity_of(decision: Decision) -> AzureIdentity | None:
    return decision.identity if isinstance(decision, Grant) else None


def _query_error(exc: QueryError) -> Reply:
    if exc.kind == "api_version_missing":
        return replies.api_version_missing()
    if exc.kind == "api_version_invalid":
        return replies.api_version_missing(invalid=True)
    return replies.bad_request(exc.description)


def _upstream_error(exc: UpstreamError) -> Reply:
    if exc.retryable:
        if exc.status == 429:
            return replies.error(
                429,
                "too_many_requests",
                "The token service is throttling requests",
                retry_after=exc.retry_after or 1,
            )
        return replies.error(
            503,
            "server_error",
            f"The token service failed temporarily ({exc.error})",
            retry_after=exc.retry_after or 5,
        )
    return replies.json_reply(
        400, {"error": exc.error or "invalid_request", "error_description": exc.description}
    )


__all__ = ["IdentitySelector", "ImdsHandler"]
