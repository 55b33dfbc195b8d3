"""Tokens for a decided identity: cache key, credential, upstream call.

This is where an AzureIdentity becomes a token.  The cache key is computed
from memory only (identity UID + spec fingerprint + Secret resourceVersion +
resource, and for a federated identity the calling pod's service account), so
a cache hit costs no I/O; the Secret is parsed (or, for a federated identity,
the pod's service-account token obtained) and the authority validated only on
a miss, inside the single upstream flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..config import Settings
from ..identity.decide import NODE_IDENTITY
from ..kube.objects import AzureIdentity, IdentityType, Pod, Secret
from ..kube.secrets import SecretStore
from ..kube.token_request import ServiceAccountToken
from ..ops.metrics import Metrics
from .assertions import AssertionCache
from .cache import CacheKey, TokenCache
from .credentials import (
    CredentialError,
    authority_for,
    client_certificate_from,
    client_secret_from,
)
from .lanes import Ticket
from .model import Token, UpstreamError
from .upstream import FEDERATED, Upstream

# A live pod of (namespace, service account), preferring the given one: who presents
# its token when a federated identity's token is renewed in the background.
PodOfServiceAccount = Callable[[str, str, Pod], Pod | None]

log = logging.getLogger(__name__)


class TokenService:
    def __init__(
        self,
        *,
        settings: Settings,
        secrets: SecretStore,
        upstream: Upstream,
        cache: TokenCache,
        metrics: Metrics | None = None,
        assertions: AssertionCache | None = None,
        pod_of_service_account: PodOfServiceAccount | None = None,
    ) -> None:
        self.metrics = metrics
        self.settings = settings
        self.secrets = secrets
        self.upstream = upstream
        self.cache = cache
        self.assertions = assertions
        self._pod_of = pod_of_service_account
        self._object_ids: dict[str, str] = {}

    def object_id_of(self, identity: AzureIdentity) -> str | None:
        return self._object_ids.get(f"{identity.meta.uid_or_key}:{identity.fingerprint}")

    def _learn(self, identity: AzureIdentity, token: Token) -> None:
        oid = token.claim("oid")
        if oid:
            self._object_ids[f"{identity.meta.uid_or_key}:{identity.fingerprint}"] = oid

    def audience_of(self, identity: AzureIdentity) -> str:
        """The audience of the service-account token a federated exchange presents."""
        return identity.federated_audience or self.settings.federated_token_audience

    async def cache_key(
        self, identity: AzureIdentity, resource: str, pod: Pod | None = None
    ) -> CacheKey:
        """The key of this identity's token for ``resource`` (reads the Secret on a first use)."""
        if identity.type == IdentityType.FEDERATED:
            if pod is None:
                raise CredentialError(
                    f"identity {identity.meta.key} is federated: only a pod's request can use it"
                )
            return _federated_key(identity, resource, pod)
        if identity.type in (
            IdentityType.SERVICE_PRINCIPAL,
            IdentityType.SERVICE_PRINCIPAL_CERTIFICATE,
        ):
            ns, name = self._secret_location(identity)
            secret = await self.secrets.get(ns, name)
            if secret is None:
                raise CredentialError(
                    f"secret {ns}/{name} of identity {identity.meta.key} not found"
                )
            self._check_label(secret)
            return _key(identity, resource, secret)
        if identity.type == IdentityType.USER_ASSIGNED_MSI:
            return _key(identity, resource, None)
        raise CredentialError(f"identity {identity.meta.key} has an unsupported spec.type")

    def cached(self, identity: AzureIdentity, resource: str, pod: Pod) -> Token | None:
        """The cached token if there is a servable one — no I/O, no waiting, no coroutine.

        None sends the caller to the full path (:meth:`for_identity`), which also
        reports misconfigurations.
        """
        secret: Secret | None = None
        if identity.type == IdentityType.FEDERATED:
            return self.cache.hit(_federated_key(identity, resource, pod))
        if identity.type in (
            IdentityType.SERVICE_PRINCIPAL,
            IdentityType.SERVICE_PRINCIPAL_CERTIFICATE,
        ):
            try:
                namespace, name = self._secret_location(identity)
            except CredentialError:
                return None
            secret = self.secrets.peek(namespace, name)
            if secret is None or not self._labelled(secret):
                return None
        elif identity.type != IdentityType.USER_ASSIGNED_MSI:
            return None
        return self.cache.hit(_key(identity, resource, secret))

    def cached_node(
        self, *, resource: str, client_id: str, object_id: str, resource_id: str
    ) -> Token | None:
        return self.cache.hit(_node_key(resource, client_id, object_id, resource_id))

    def _labelled(self, secret: Secret) -> bool:
        """Whether ``--secret-label`` (if any) lets this Secret hold a credential."""
        wanted = self.settings.secret_label
        if not wanted:
            return True
        key, sep, value = wanted.partition("=")
        have = secret.meta.labels.get(key)
        return have is not None and (not sep or have == value)

    def _check_label(self, secret: Secret) -> None:
        if not self._labelled(secret):
            raise CredentialError(
                f"secret {secret.meta.key} does not carry the label {self.settings.secret_label} "
                "that --secret-label requires of credential Secrets"
            )

    def _secret_location(self, identity: AzureIdentity) -> tuple[str, str]:
        ref = identity.secret_ref
        if ref is None:
            raise CredentialError(f"identity {identity.meta.key} has no spec.clientPassword")
        namespace = ref.namespace or identity.meta.namespace
        if namespace != identity.meta.namespace and not self.settings.allow_cross_namespace_secrets:
            raise CredentialError(
                f"identity {identity.meta.key} refers to a Secret in namespace {namespace!r}; "
                "only its own namespace is allowed (see --allow-cross-namespace-secrets)"
            )
        return namespace, ref.name

    async def for_identity(
        self,
        identity: AzureIdentity,
        resource: str,
        *,
        requester: str = "",
        upstream: bool = True,
        pod: Pod | None = None,
    ) -> tuple[Token, bool]:
        """The identity's token for ``resource``: cached, or one upstream call queued
        as ``requester``'s (the pod) and shared by every request that joins it.
        ``pod`` is the caller (required for a federated identity)."""
        key = await self.cache_key(identity, resource, pod)

        async def fetch(ticket: Ticket) -> Token:
            token = await self._timed(
                str(identity.type), self._fetch(identity, resource, ticket, pod)
            )
            self._learn(identity, token)
            return token

        return await self.cache.get(key, fetch, requester=requester, upstream=upstream)

    async def federated(
        self,
        identity: AzureIdentity,
        resource: str,
        ticket: Ticket,
        pod: Pod,
        *,
        client_id: str = "",
        tenant_id: str = "",
    ) -> tuple[Token, ServiceAccountToken]:
        """Exchange the pod's service-account token with Azure AD (no cache): the token
        of a federated identity, or of the shadow trial of another kind
        (``client_id``/``tenant_id`` then name the federated application)."""
        if self.assertions is None:
            raise CredentialError("federated identities need the Kubernetes TokenRequest API")
        client_id = client_id or identity.client_id
        if not client_id:
            raise CredentialError(f"identity {identity.meta.key} has no spec.clientID")
        authority = authority_for(identity, self.settings, tenant_id=tenant_id)
        presenter = (
            self._pod_of(pod.meta.namespace, pod.service_account, pod) if self._pod_of else pod
        )
        if presenter is None:
            raise CredentialError(
                f"no pod of service account {pod.meta.namespace}/{pod.service_account} is "
                "left on this node to present its token"
            )
        audience = self.audience_of(identity)
        assertion = await self.assertions.get(presenter, audience)
        try:
            token = await self.upstream.from_aad(
                ticket=ticket,
                client_id=client_id,
                authority=authority,
                credential=FEDERATED,
                credential_key=f"sa:{presenter.meta.namespace}/{presenter.service_account}"
                f":{audience}",
                resource=resource,
                assertion=assertion.token,
            )
        except UpstreamError as exc:
            exc.shown = (
                f"issuer {assertion.issuer!r}, subject {assertion.subject!r}, "
                f"audience {assertion.audience!r}"
            )
            raise
        return token, assertion

    async def _fetch(
        self, identity: AzureIdentity, resource: str, ticket: Ticket, pod: Pod | None
    ) -> Token:
        if identity.type == IdentityType.FEDERATED:
            assert pod is not None  # cache_key refused federated identities without a pod
            token, _ = await self.federated(identity, resource, ticket, pod)
            return token
        if identity.type == IdentityType.USER_ASSIGNED_MSI:
            if identity.client_id:
                return await self.upstream.from_imds(
                    ticket=ticket, resource=resource, client_id=identity.client_id
                )
            if identity.resource_id:
                return await self.upstream.from_imds(
                    ticket=ticket, resource=resource, resource_id=identity.resource_id
                )
            raise CredentialError(
                f"identity {identity.meta.key} has neither clientID nor resourceID"
            )
        if not identity.client_id:
            raise CredentialError(f"identity {identity.meta.key} has no spec.clientID")
        authority = authority_for(identity, self.settings)
        ns, name = self._secret_location(identity)
        secret = await self.secrets.get(ns, name)
        if secret is None:
            raise CredentialError(f"secret {ns}/{name} of identity {identity.meta.key} not found")
        self._check_label(secret)
        if identity.type == IdentityType.SERVICE_PRINCIPAL:
            credential: object = client_secret_from(secret)
        else:
            credential = await asyncio.to_thread(client_certificate_from, secret)
        assert not isinstance(credential, type(None))
        return await self.upstream.from_aad(
            ticket=ticket,
            client_id=identity.client_id,
            authority=authority,
            credential=credential,  # type: ignore[arg-type]
            credential_key=f"{secret.meta.uid}:{secret.meta.resource_version}",
            resource=resource,
        )

    async def _timed(self, identity_type: str, call: Awaitable[Token]) -> Token:
        started = time.perf_counter()
        error: UpstreamError | None = None
        try:
            return await call
        except UpstreamError as exc:
            error = exc
            raise
        finally:
            if self.metrics is not None:
                source = "imds" if identity_type in ("0", "node") else "aad"
                self.metrics.observe_upstream(
                    source=source,
                    identity_type=identity_type,
                    seconds=time.perf_counter() - started,
                    error=error is not None,
                    retryable=bool(error and error.retryable),
                )

    async def for_node(
        self,
        *,
        resource: str,
        client_id: str = "",
        object_id: str = "",
        resource_id: str = "",
        requester: str = "",
        upstream: bool = True,
    ) -> tuple[Token, bool]:
        """The node's own identity (exception pods), through the node IMDS."""
        key = _node_key(resource, client_id, object_id, resource_id)

        async def fetch(ticket: Ticket) -> Token:
            return await self._timed(
                "node",
                self.upstream.from_imds(
                    ticket=ticket,
                    resource=resource,
                    client_id=client_id,
                    object_id=object_id,
                    resource_id=resource_id,
                ),
            )

        return await self.cache.get(key, fetch, requester=requester, upstream=upstream)


def _key(identity: AzureIdentity, resource: str, secret: Secret | None) -> CacheKey:
    """identity UID + spec fingerprint (+ the Secret's UID and resourceVersion) + resource."""
    credential = identity.fingerprint
    if secret is not None:
        credential += f":{secret.meta.uid}:{secret.meta.resource_version}"
    return CacheKey(identity.meta.uid_or_key, credential, resource)


def _federated_key(identity: AzureIdentity, resource: str, pod: Pod) -> CacheKey:
    """identity UID + spec fingerprint (audience included) + the pod's service account +
    resource: a token obtained with one service account's token is never another's."""
    return CacheKey(
        identity.meta.uid_or_key,
        identity.fingerprint,
        resource,
        pod.service_account_key,
    )


def node_selector_key(client_id: str, object_id: str, resource_id: str) -> str:
    """The ``credential`` part of the node identity's keys: the selector sent to IMDS."""
    return f"{client_id.lower()}|{object_id.lower()}|{resource_id.lower()}"


def _node_key(resource: str, client_id: str, object_id: str, resource_id: str) -> CacheKey:
    return CacheKey(NODE_IDENTITY, node_selector_key(client_id, object_id, resource_id), resource)
