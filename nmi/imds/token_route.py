"""``GET /metadata/identity/oauth2/token``: from a pod's request to its own token.

The path of one request, top to bottom:

1. :func:`checks.token_request` — method, ``Metadata`` header, query;
2. the caller — the one pod of this node with the source IP
   (:class:`~nmi.identity.caller.Callers`);
3. the decision — which identity this pod may use for this query
   (:func:`~nmi.identity.decide.decide`, waited for by
   :class:`~nmi.identity.wait.Resolver` while the controller catches up);
4. the token — the cache, or one upstream call shared by every waiter
   (:class:`~nmi.tokens.service.TokenService`);
5. the reply — the IMDS success body, or :mod:`failures`' reply.

:meth:`TokenRoute.fast` runs steps 1-4 synchronously for what nearly every
request is — a known pod whose identity's token is cached — and answers with
the complete reply bytes; it declines (None) whatever needs a wait or an
upstream call, and :meth:`TokenRoute.serve` answers that.  Both call the same
``checks``, ``Callers.now``, decision and :meth:`TokenRoute.hit`, so they
cannot disagree.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from ..config import OperationMode, Settings
from ..identity.caller import CallerProblem, Callers
from ..identity.decide import (
    Decision,
    Deny,
    Grant,
    UseNodeIdentity,
    Wait,
    bound_identities,
    usable_assignments,
)
from ..identity.wait import Resolver
from ..kube.objects import AzureIdentity, Pod
from ..kube.secrets import SecretUnavailable
from ..kube.token_request import TokenRequestError
from ..ratelimit import Buckets
from ..tokens.cache import UpstreamNotAllowed
from ..tokens.credentials import CredentialError
from ..tokens.model import Token, UpstreamError
from ..tokens.service import TokenService
from ..tokens.shadow import ShadowTrials
from . import checks, failures, replies
from .bookkeeping import Access, Bookkeeping
from .messages import CLOCK, Reply, Request, encode
from .query import TokenQuery

MAX_OBJECT_ID_PROBES = 8  # identities whose object id one request may learn


@dataclass(frozen=True, slots=True)
class Served:
    """A token and how to report it: the client id in the reply, the identity in the log."""

    token: Token
    client_id: str
    identity: str
    granted: AzureIdentity | None = None  # the AzureIdentity (None: the node's identity)


class TokenRoute:
    def __init__(
        self,
        *,
        settings: Settings,
        callers: Callers,
        resolver: Resolver,
        tokens: TokenService,
        books: Bookkeeping,
        shadow: ShadowTrials | None = None,
    ) -> None:
        self.settings = settings
        self.shadow = shadow
        self.callers = callers
        self.resolver = resolver
        self.tokens = tokens
        self.books = books
        self.bodies = replies.TokenBodies()
        self.pod_limits = (
            Buckets(rate=settings.per_pod_rate, burst=settings.per_pod_burst)
            if settings.per_pod_rate > 0
            else None
        )

    # -- shared by both paths ---------------------------------------------------

    def hit(self, pod: Pod, query: TokenQuery) -> Served | None:
        """The current decision, and its cached token: dictionary reads, no waiting."""
        decision = self.resolver.decide_now(pod, query.selector)
        if isinstance(decision, Grant):
            identity = decision.identity
            token = self.tokens.cached(identity, query.resource, pod)
            if token is None:
                return None
            return Served(token, identity.client_id or token.client_id, identity.meta.key, identity)
        if isinstance(decision, UseNodeIdentity):
            sel = query.selector
            token = self.tokens.cached_node(
                resource=query.resource,
                client_id=sel.client_id,
                object_id=sel.object_id,
                resource_id=sel.resource_id,
            )
            if token is None:
                return None
            label = f"node (exception {decision.exception})"
            return Served(token, token.client_id or sel.client_id, label)
        return None

    # -- the synchronous cache-hit path ---------------------------------------------

    def fast(self, request: Request, raw_query: str) -> bytes | None:
        """The whole reply when it needs no waiting and no upstream call, else None."""
        started = time.perf_counter()
        admitted = checks.token_request(request, raw_query, self.settings)
        if isinstance(admitted, Reply):
            access = Access(route="token", ip=request.peer_ip)
            self.books.finished(request, access, admitted.status, time.perf_counter() - started)
            return encode(admitted, close=False, head_only=request.method == "HEAD")
        pod = self.callers.now(request.peer_ip, request.ifindex)
        if isinstance(pod, CallerProblem):
            return None
        served = self.hit(pod, admitted)
        if served is None:
            return None
        second, _ = CLOCK.now()
        token = served.token
        data = self.bodies.response(
            access_token=token.access_token,
            client_id=served.client_id,
            expires_on=token.expires_on,
            not_before=token.not_before,
            now=second,
            resource=admitted.resource,
            token_type=token.token_type,
        )
        self.books.hit(
            request, pod, served.identity, admitted.resource, time.perf_counter() - started
        )
        if served.granted is not None and served.granted.shadow:
            self.note_shadow(served, pod, admitted.resource)
        return data

    def note_shadow(self, served: Served, pod: Pod, resource: str) -> None:
        """An identity on trial for federation was served: a background trial may be due."""
        if self.shadow is not None and served.granted is not None:
            self.shadow.consider(served.granted, pod, resource, served.token)

    # -- the full path --------------------------------------------------------------

    async def serve(self, request: Request, raw_query: str, access: Access) -> Reply:
        admitted = checks.token_request(request, raw_query, self.settings)
        if isinstance(admitted, Reply):
            return admitted
        access.resource = admitted.resource
        pod = await self.callers.wait(access.ip, request.ifindex)  # new pods: a moment late
        if isinstance(pod, CallerProblem):
            failure = failures.unknown_caller(pod, self.settings)
            self.books.failed(None, failure, access)
            return failure.reply
        access.namespace, access.pod = pod.meta.namespace, pod.meta.name
        served = await self.obtain(pod, admitted, access)
        if isinstance(served, Reply):
            return served
        if served.granted is not None and served.granted.shadow:
            self.note_shadow(served, pod, admitted.resource)
        return replies.json_bytes(200, self.render(served, admitted.resource))

    def render(self, served: Served, resource: str) -> bytes:
        token = served.token
        return self.bodies.render(
            access_token=token.access_token,
            client_id=served.client_id,
            expires_on=token.expires_on,
            not_before=token.not_before,
            now=int(time.time()),
            resource=resource,
            token_type=token.token_type,
        )

    async def obtain(self, pod: Pod, query: TokenQuery, access: Access) -> Served | Reply:
        """The pod's token for ``query``, or the reply that refuses it (also /host/token).

        A cache hit first; then joining an upstream call already in flight for the
        same key (free); then, within the pod's budget, the decision waited for and
        an upstream call.
        """
        served = self.hit(pod, query)
        if served is not None:
            access.identity, access.cache = served.identity, "hit"
            return served
        selector = query.selector
        requester = pod.meta.uid_or_key
        decision = self.resolver.decide_now(pod, selector)
        try:
            if isinstance(decision, Grant | UseNodeIdentity):
                with contextlib.suppress(UpstreamNotAllowed):
                    joined = await self._token_for(decision, query, access, pod=pod, upstream=False)
                    if joined is not None:
                        return joined
            if self.pod_limits is not None and (
                not isinstance(decision, Deny) or selector.object_id
            ):
                # Upstream calls or a wait lie ahead: they are what the per-pod budget limits.
                over = self.pod_limits.take(requester)
                if over is not None:
                    return self._failed(pod, failures.over_budget(over), access)
            decision, waited = await self.resolver.resolve(pod, selector)
            access.waited_ms = waited * 1000
            self.books.waited(waited, decision)
            if (
                selector.object_id
                and isinstance(decision, Deny)
                and decision.kind == "not_found"
                and await self._learn_object_ids(pod, query.resource)
            ):
                decision = self.resolver.decide_now(pod, selector)
            served = await self._token_for(decision, query, access, pod=pod, upstream=True)
        except (UpstreamError, CredentialError, SecretUnavailable, TokenRequestError) as exc:
            failure = failures.from_exception(exc, decision, query.resource)
            assert failure is not None
            return self._failed(pod, failure, access)
        if served is not None:
            return served
        assert isinstance(decision, Deny | Wait)  # granting decisions returned above
        self.books.denied(decision.kind if isinstance(decision, Deny) else "not_assigned")
        return self._failed(
            pod,
            failures.refused(
                decision, resource=query.resource, selector=selector, settings=self.settings
            ),
            access,
        )

    def _failed(self, pod: Pod, failure: failures.Failure, access: Access) -> Reply:
        self.books.failed(pod, failure, access)
        return failure.reply

    async def _token_for(
        self,
        decision: Decision,
        query: TokenQuery,
        access: Access,
        *,
        pod: Pod,
        upstream: bool,
    ) -> Served | None:
        """The token a granting decision leads to (None for other decisions)."""
        requester = pod.meta.uid_or_key
        if isinstance(decision, Grant):
            identity = decision.identity
            access.identity = identity.meta.key
            token, hit = await self.tokens.for_identity(
                identity, query.resource, requester=requester, upstream=upstream, pod=pod
            )
            access.cache = "hit" if hit else "miss"
            access.upstream_request_id = "" if hit else token.request_id
            return Served(token, identity.client_id or token.client_id, identity.meta.key, identity)
        if isinstance(decision, UseNodeIdentity):
            sel = query.selector
            access.identity = f"node (exception {decision.exception})"
            token, hit = await self.tokens.for_node(
                resource=query.resource,
                client_id=sel.client_id,
                object_id=sel.object_id,
                resource_id=sel.resource_id,
                requester=requester,
                upstream=upstream,
            )
            access.cache = "hit" if hit else "miss"
            return Served(token, token.client_id or sel.client_id, access.identity)
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
            candidates, _ = usable_assignments(self.resolver.index, pod, self.settings)
        learned = False
        for identity in candidates[:MAX_OBJECT_ID_PROBES]:
            if self.tokens.object_id_of(identity) is not None:
                continue
            try:
                await self.tokens.for_identity(
                    identity, resource, requester=pod.meta.uid_or_key, pod=pod
                )
            except (UpstreamError, CredentialError, SecretUnavailable, TokenRequestError):
                continue
            learned = learned or self.tokens.object_id_of(identity) is not None
        return learned
