"""The controller's credential for Azure Resource Manager, always the current one.

Why: MIC calls ARM as the cluster's identity - a service principal with a
secret (``azure.identity.aio.ClientSecretCredential`` against the cloud's
Azure AD host) or the node's managed identity
(``azure.identity.aio.ManagedIdentityCredential``, user-assigned by client id
or system-assigned).  AKS rotates the secret by rewriting azure.json, so a
credential is tied to one :class:`~nmi.azure.cloud.CloudConfig`: a
:class:`CredentialSource` hands out the :class:`Generation` (config,
credential, and whatever clients were built on it) of the *current*
configuration, builds a new one the first time it is used after the
configuration changed, and closes the old one as soon as no call is still
running on it.

TLS trust is the daemon's rule: ``REQUESTS_CA_BUNDLE``, else
``SSL_CERT_FILE``, else the system store.  It is applied once, to one aiohttp
session (:class:`HttpPool`) that the credential and every ARM client share
through ``AioHttpTransport(session=..., session_owner=False)``.  Passing
``connection_verify=<path>`` instead would make azure-core build a new
``SSLContext`` from the file for every request - and aiohttp keys its
connection pool by that object, so every request would open a new TCP and TLS
connection (measured: one connection per request instead of one in all).

A failure to get a token is raised as :class:`CredentialError` (not azure-core's
``ClientAuthenticationError``, which ARM's own 401 also raises), so the
caller can tell "Azure AD refused us" from "ARM refused the token".
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace, TracebackType
from typing import Any, Protocol

import aiohttp
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError, ClientAuthenticationError
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import ClientSecretCredential, ManagedIdentityCredential

from ..config import ConfigError
from ..ops.logs import redact_id
from .cloud import CloudConfig, CloudConfigSource

__all__ = [
    "ArmCredential",
    "CredentialError",
    "CredentialSource",
    "Generation",
    "HttpPool",
    "ca_bundle",
    "make_credential",
    "tls_context",
]

logger = logging.getLogger(__name__)


def ca_bundle(environ: Mapping[str, str]) -> str | None:
    """The CA bundle nmi trusts: ``REQUESTS_CA_BUNDLE``, else ``SSL_CERT_FILE``, else None."""
    return environ.get("REQUESTS_CA_BUNDLE") or environ.get("SSL_CERT_FILE") or None


def tls_context(environ: Mapping[str, str]) -> ssl.SSLContext:
    """A client TLS context trusting :func:`ca_bundle`, or the system store without one."""
    bundle = ca_bundle(environ)
    try:
        return ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS trust bundle {bundle}: cannot load it: {exc}") from None


class HttpPool:
    """One aiohttp session - one TLS context, one connection pool - for Azure AD and ARM.

    :meth:`transport` gives an azure-core transport on the shared session for
    each credential or client; closing those leaves the session open (they
    do not own it); :meth:`close` closes it.  :attr:`connections` counts the
    TCP connections opened, for tests and benchmarks.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        limit: int = 64,
    ) -> None:
        # Loaded now: a bad bundle stops the controller at start, not at its first call.
        self._tls = (
            tls if tls is not None else tls_context(os.environ if environ is None else environ)
        )
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        #: TCP connections opened so far.
        self.connections = 0

    def transport(self) -> AioHttpTransport:
        """An azure-core transport on the shared session (call on the event loop)."""
        if self._closed:
            raise RuntimeError("the HTTP pool is closed")
        if self._session is None:
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(self._count)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=self._limit),
                # What azure-core's own AioHttpTransport session uses: it decompresses
                # bodies itself and needs no cookies; proxies from the environment.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=True,
                trace_configs=[trace],
            )
        return AioHttpTransport(session=self._session, session_owner=False)

    async def _count(
        self, _session: aiohttp.ClientSession, _ctx: SimpleNamespace, _params: Any
    ) -> None:
        self.connections += 1

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class CredentialError(Exception):
    """No token: Azure AD or the managed-identity endpoint refused or could not be reached."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.message = message
        #: ``service_principal``, ``user_assigned`` or ``system_assigned``.
        self.kind = kind


def make_credential(config: CloudConfig, *, transport: AioHttpTransport) -> AsyncTokenCredential:
    """The azure-identity credential ``config`` describes, on ``transport``."""
    if config.credential_kind == "service_principal":
        return ClientSecretCredential(
            config.tenant_id,
            config.client_id,
            config.client_secret.reveal(),
            authority=config.authority_host,
            transport=transport,
        )
    if config.credential_kind == "user_assigned":
        return ManagedIdentityCredential(
            client_id=config.user_assigned_identity_id, transport=transport
        )
    return ManagedIdentityCredential(transport=transport)


class ArmCredential:
    """An azure-identity credential whose failures are :class:`CredentialError`.

    It is what the ARM clients hold (an ``AsyncTokenCredential``); it also
    counts the tokens it fetched (:attr:`tokens`).  Tokens are never logged.
    """

    def __init__(
        self, inner: AsyncTokenCredential, *, kind: str, label: str, client_id: str = ""
    ) -> None:
        self._inner = inner
        self.kind = kind
        self.label = label
        self._client_id = client_id
        #: Tokens obtained (the ARM clients cache them until shortly before expiry).
        self.tokens = 0

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        try:
            token = await self._inner.get_token(
                *scopes, claims=claims, tenant_id=tenant_id, enable_cae=enable_cae, **kwargs
            )
        except AzureError as exc:
            raise self._failure(exc) from exc
        self.tokens += 1
        return token

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        get_info = getattr(self._inner, "get_token_info", None)
        try:
            if get_info is not None:
                info: AccessTokenInfo = await get_info(*scopes, options=options)
            else:  # pragma: no cover - every azure-identity credential has get_token_info
                token = await self._inner.get_token(*scopes)
                info = AccessTokenInfo(token.token, token.expires_on)
        except AzureError as exc:
            raise self._failure(exc) from exc
        self.tokens += 1
        return info

    def _failure(self, exc: AzureError) -> CredentialError:
        reason = " ".join(str(exc.message or exc).split())
        if self._client_id:
            # Azure AD names the application ("... for a secret added to app '<id>'"):
            # client ids are redacted in nmi's logs and errors, as aad-pod-identity did.
            reason = re.sub(
                re.escape(self._client_id), redact_id(self._client_id), reason, flags=re.I
            )
        if not isinstance(exc, ClientAuthenticationError):
            reason = f"{type(exc).__name__}: {reason}"
        logger.warning("no ARM token for %s: %s", self.label, reason)
        return CredentialError(f"no ARM token for {self.label}: {reason}", kind=self.kind)

    async def close(self) -> None:
        await self._inner.close()

    async def __aenter__(self) -> ArmCredential:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.close()


class Closeable(Protocol):
    async def close(self) -> None: ...


@dataclass(eq=False)
class Generation:
    """One configuration's credential and the clients built on it, closed together."""

    number: int
    config: CloudConfig
    credential: ArmCredential
    #: Clients made with :attr:`credential` (keyed by their owner), closed with it.
    resources: dict[str, Closeable] = field(default_factory=dict)
    in_use: int = 0
    retired: bool = False
    closed: bool = False

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        for name, resource in list(self.resources.items()):
            try:
                await resource.close()
            except Exception:  # pragma: no cover - closing must go on
                logger.exception("closing %s of credential generation %d", name, self.number)
        self.resources.clear()
        try:
            await self.credential.close()
        except Exception:  # pragma: no cover
            logger.exception("closing credential generation %d", self.number)


def _label(config: CloudConfig) -> str:
    if config.credential_kind == "service_principal":
        return f"service principal {redact_id(config.client_id)}"
    if config.credential_kind == "user_assigned":
        return f"managed identity {redact_id(config.user_assigned_identity_id)}"
    return "the system-assigned managed identity"


class CredentialSource:
    """The credential of the current cloud configuration.

    ``async with source.use() as generation:`` gives the :class:`Generation`
    for one call.  When the configuration has changed since the last call (a
    rotated ``aadClientSecret``, another identity, another cloud), a new
    credential is made first; the old generation - credential and the
    clients registered in its :attr:`Generation.resources` - is closed as soon
    as the calls still running on it are done.
    """

    def __init__(
        self,
        configs: CloudConfigSource | CloudConfig,
        *,
        pool: HttpPool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._configs = configs
        self._own_pool = pool is None
        self.pool = pool if pool is not None else HttpPool(environ)
        self._current: Generation | None = None
        self._numbers = 0
        self._closed = False

    @property
    def config(self) -> CloudConfig:
        """The configuration in force now (the next :meth:`use` builds on it)."""
        if isinstance(self._configs, CloudConfig):
            return self._configs
        return self._configs.config

    @property
    def generation(self) -> Generation | None:
        """The generation in use (None before the first call)."""
        return self._current

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Generation]:
        generation = await self._generation()
        generation.in_use += 1
        try:
            yield generation
        finally:
            generation.in_use -= 1
            if generation.retired and generation.in_use == 0:
                await generation.aclose()

    async def _generation(self) -> Generation:
        if self._closed:
            raise RuntimeError("the credential source is closed")
        config = self.config
        current = self._current
        if current is not None and current.config is config:
            return current
        self._numbers += 1
        label = _label(config)
        credential = make_credential(config, transport=self.pool.transport())
        fresh = Generation(
            self._numbers,
            config,
            ArmCredential(
                credential,
                kind=config.credential_kind,
                label=label,
                client_id=config.client_id or config.user_assigned_identity_id,
            ),
        )
        self._current = fresh
        if current is None:
            logger.info("ARM credential: %s", label)
        else:
            logger.info(
                "cloud config changed (%s): new ARM credential %s",
                ", ".join(config.changed_fields(current.config)),
                label,
            )
            current.retired = True
            if current.in_use == 0:
                await current.aclose()
        return fresh

    async def close(self) -> None:
        self._closed = True
        if self._current is not None:
            current, self._current = self._current, None
            await current.aclose()
        if self._own_pool:
            await self.pool.close()
