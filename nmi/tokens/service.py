"""Tokens for a decided identity: cache key, credential, upstream call.

This is where an AzureIdentity becomes a token.  The cache key is computed
from memory only (identity UID + spec fingerprint + Secret resourceVersion +
resource), so a cache hit costs no I/O; the Secret is parsed and the
authority validated only on a miss, inside the single upstream flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from ..config import Settings
from ..identity.decide import NODE_IDENTITY
from ..kube.objects import AzureIdentity, IdentityType, Secret
from ..kube.secrets import SecretStore
from ..ops.metrics import Metrics
from .cache import CacheKey, TokenCache
from .credentials import (
    CredentialError,
    authority_for,
    client_certificate_from,
    client_secret_from,
)
from .lanes import Ticket
from .model import Token, UpstreamError
from .upstream import Upstream

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
    ) -> None:
        self.metrics = metrics
        self.settings = settings
        self.secrets = secrets
        self.upstream = upstream
        self.cache = cache
        self._object_ids: dict[str, str] = {}

    def object_id_of(self, identity: AzureIdentity) -> str | None:
        return self._object_ids.get(f"{identity.meta.uid_or_key}:{identity.fingerprint}")

    def _learn(self, identity: AzureIdentity, token: Token) -> None:
        oid = token.claim("oid")
        if oid:
            self._object_ids[f"{identity.meta.uid_or_key}:{identity.fingerprint}"] = oid

    async def cache_key(self, identity: AzureIdentity, resource: str) -> CacheKey:
        """The key of this identity's token for ``resource`` (reads the Secret on a first use)."""
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

    def cached(self, identity: AzureIdentity, resource: str) -> Token | None:
        """The cached token if there is a servable one — no I/O, no waiting, no coroutine.

        None sends the caller to the full path (:meth:`for_identity`), which also
        reports misconfigurations.
        """
        secret: Secret | None = None
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
    ) -> tuple[Token, bool]:
        """The identity's token for ``resource``: cached, or one upstream call queued
        as ``requester``'s (the pod) and shared by every request that joins it."""
        key = await self.cache_key(identity, resource)

        async def fetch(ticket: Ticket) -> Token:
            token = await self._timed(str(identity.type), self._fetch(identity, resource, ticket))
            self._learn(identity, token)
            return token

        return await self.cache.get(key, fetch, requester=requester, upstream=upstream)

    async def _fetch(self, identity: AzureIdentity, resource: str, ticket: Ticket) -> Token:
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


def node_selector_key(client_id: str, object_id: str, resource_id: str) -> str:
    """The ``credential`` part of the node identity's keys: the selector sent to IMDS."""
    return f"{client_id.lower()}|{object_id.lower()}|{resource_id.lower()}"


def _node_key(resource: str, client_id: str, object_id: str, resource_id: str) -> CacheKey:
    return CacheKey(NODE_IDENTITY, node_selector_key(client_id, object_id, resource_id), resource)
