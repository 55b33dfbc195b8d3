"""An Azure AD (Entra ID) v2 emulator that real MSAL can talk to.

Why it exists: the daemon obtains tokens for service principals (identity
types 1 and 2) with ``msal.ConfidentialClientApplication``.  Entra ID cannot
be reached from this machine, and a mock of MSAL would test nothing but the
mock.  So the daemon keeps its production code path and this module stands in
for the other end of the wire: an HTTPS server (certificate from
:class:`nmi_sandbox.tls.CertificateAuthority`) that answers the requests MSAL
really sends, in the shape Entra ID really answers them:

* ``GET /common/discovery/instance`` - instance discovery (``api-version`` 1.1
  shape), for MSAL with instance discovery pointed at the emulator;
* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` - tenant discovery,
  with endpoints built from the ``Host`` the client used;
* ``GET /{tenant}/discovery/v2.0/keys`` - the JWKS of the token-signing key;
* ``POST /{tenant}/oauth2/v2.0/token`` - the client-credentials grant with a
  client secret (form body or HTTP Basic), a certificate-signed client
  assertion (RS256 / PS256, ``x5t`` / ``x5t#S256``), verified for real, or a
  *federated* assertion: workload identity federation, below.

Workload identity federation: applications (:meth:`AzureAdServer.add_app`) and
user-assigned managed identities (:meth:`AzureAdServer.add_managed_identity`,
service principals without secrets or certificates) may carry up to 20
federated identity credentials (:meth:`AzureAdServer.add_federated_credential`:
issuer, subject, audiences).  A ``jwt-bearer`` client assertion whose ``iss``
is not the client id (and whose ``x5t`` names no certificate of the client) is
a federated assertion - a Kubernetes service-account token, say - and is
checked as Entra ID checks it: matching credential (AADSTS70021), the issuer's
OIDC discovery document and JWKS fetched over HTTPS trusting the emulator's
CA and cached per issuer, with one JWKS refetch for an unknown ``kid`` at most
every 10 s (AADSTS50166), RS256 signature (AADSTS700027), ``exp`` / ``nbf``
(AADSTS700024).  The steps live in :mod:`nmi_sandbox.federation`.  Tokens
issued for it have ``appidacr`` "2"; ``federated_exchanges``,
``federated_issued`` (client, subject, ``uti``) and ``issuer_fetches`` let a
test tell which service account obtained which token.

Errors carry the real status codes and the real JSON shape
(``error``, ``error_description`` with ``AADSTSnnnn: ... Trace ID ...``,
``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``,
``error_uri``), because the daemon's error mapping (retryable or not, what it
tells the pod) is driven by exactly those fields.

Fault knobs (``latency``, ``outage``, :meth:`AzureAdServer.fail_next`,
:meth:`AzureAdServer.throttle_next`) and counters (``token_requests``,
``issued``; every issued token has a unique ``uti``) let tests drive and
observe the daemon's upstream behaviour: single-flight, refresh-ahead, retry
and back-off.

Deliberate limits: only the client-credentials grant is emulated; tokens are
always v1.0 access tokens (what ARM, Key Vault and Storage get); Subject
Name/Issuer (``x5c``) trust, certificate expiry, secret expiry, conditional
access, regional endpoints and v1 endpoints are not emulated; nor are, for
federation, flexible-expression claims matching (``claimsMatchingExpression``),
expiry of the issuer cache, the field-length limits of federated credentials,
the AADSTS700211/700212/7002131 variants of AADSTS70021, and managed identities
obtaining tokens any other way (that is the IMDS emulator's job).  Entra ID
accepts a client assertion more than once until it expires (MSAL reuses one
assertion for about nine minutes), so the emulator does too unless
``reject_replayed_assertions`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import datetime
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nmi_sandbox.federation import (
    CERTIFICATE_CREDENTIALS_DOCS,
    MAX_FEDERATED_CREDENTIALS,
    SIGNATURE_ONLY,
    TOKEN_EXCHANGE_AUDIENCE,
    FederatedCredential,
    FederationError,
    OidcIssuers,
    unverified_assertion,
    verify_federated_assertion,
)
from nmi_sandbox.federation import iso_time as _iso
from nmi_sandbox.tls import CertificateAuthority, make_client_certificate

__all__ = [
    "CLIENT_ASSERTION_TYPE_JWT",
    "DEFAULT_RESOURCES",
    "TOKEN_EXCHANGE_AUDIENCE",
    "AzureAdServer",
    "FederatedCredential",
    "TokenSigner",
    "resource_key",
]

logger = logging.getLogger("nmi_sandbox.aad")

CLIENT_ASSERTION_TYPE_JWT: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

DEFAULT_RESOURCES: Final[tuple[str, ...]] = (
    "https://management.azure.com",
    "https://management.core.windows.net",
    "https://vault.azure.net",
    "https://storage.azure.com",
    "https://graph.microsoft.com",
    "https://database.windows.net",
)
"""Application ID URIs of first-party resources that exist in every tenant."""

_CLOCK_SKEW: Final = 300
_JSON: Final = "application/json"
_GENERIC_TENANTS: Final = frozenset({"common", "organizations", "consumers"})
_CERT_DOCS: Final = CERTIFICATE_CREDENTIALS_DOCS


def resource_key(resource: str) -> str:
    """The form in which two resource identifiers are compared.

    Entra ID treats ``https://x`` and ``https://x/`` as the same resource
    (the token's ``aud`` still echoes what was asked for) and compares
    identifier URIs case-insensitively.
    """
    return resource.rstrip("/").casefold()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _json_response(
    body: Mapping[str, Any], *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type=_JSON,
        charset="utf-8",
        headers=dict(headers or {}),
    )


class TokenSigner:
    """An RSA key and self-signed certificate that sign access tokens.

    Like Entra ID's signing keys, the key id (``kid``) is the base64url SHA-1
    thumbprint of the certificate (also sent as ``x5t``), and the JWKS entry
    carries ``n``, ``e``, ``x5t`` and ``x5c``.  Shared with the IMDS emulator,
    whose tokens also come from "Entra ID".
    """

    def __init__(self, *, common_name: str = "nmi emulator token signing") -> None:
        material = make_client_certificate(common_name)
        key = serialization.load_pem_private_key(material.key_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):  # pragma: no cover - tls makes RSA keys
            raise TypeError("token signing key must be RSA")
        self._key = key
        self._cert = x509.load_pem_x509_certificate(material.cert_pem)
        self.kid: str = _b64url(material.thumbprint_sha1)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        """The public half, for verifying tokens in tests."""
        return self._key.public_key()

    def sign(self, claims: Mapping[str, Any]) -> str:
        """An RS256 JWT over ``claims`` with ``typ``, ``kid`` and ``x5t`` headers."""
        return jwt.encode(
            dict(claims),
            self._key,
            algorithm="RS256",
            headers={"typ": "JWT", "kid": self.kid, "x5t": self.kid},
        )

    def jwk(self, *, issuer: str | None = None) -> dict[str, Any]:
        """The public key as a JWK, in the shape of Entra ID's ``keys`` entries."""
        numbers = self.public_key.public_numbers()
        der = self._cert.public_bytes(serialization.Encoding.DER)
        entry: dict[str, Any] = {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "x5c": [base64.b64encode(der).decode("ascii")],
        }
        if issuer is not None:
            entry["issuer"] = issuer
        return entry

    def jwks(self, *, issuer: str | None = None) -> dict[str, Any]:
        """A JWKS document holding this key."""
        return {"keys": [self.jwk(issuer=issuer)]}


@dataclass(frozen=True)
class _Certificate:
    public_key: rsa.RSAPublicKey
    sha1: bytes
    sha256: bytes


@dataclass
class _App:
    tenant_id: str
    client_id: str
    object_id: str
    secrets: list[str] = field(default_factory=list)
    certificates: list[_Certificate] = field(default_factory=list)
    managed_identity: bool = False
    federated: dict[str, FederatedCredential] = field(default_factory=dict)  # casefolded name


@dataclass(frozen=True)
class _Federated:
    """A federated client assertion, parsed without verification."""

    assertion: str
    header: dict[str, Any]
    claims: dict[str, Any]
    subject: str


@dataclass(frozen=True)
class _Failure:
    status: int
    retry_after: int | None


@dataclass(eq=False)
class _AadError(Exception):
    """A token-endpoint rejection, raised inside validation and rendered once."""

    status: int
    error: str
    code: int
    message: str


def _parse_certificate(pem: bytes | str) -> _Certificate:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    cert = x509.load_pem_x509_certificate(data)
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("only RSA certificates can be registered as client credentials")
    return _Certificate(
        public_key=public_key,
        sha1=cert.fingerprint(hashes.SHA1()),  # noqa: S303 - x5t is SHA-1 by spec
        sha256=cert.fingerprint(hashes.SHA256()),
    )


def _certificate_for(app: _App, header: Mapping[str, Any]) -> _Certificate | None:
    """The registered certificate that an assertion header's ``x5t#S256`` / ``x5t`` names."""
    sha256 = _thumbprint_bytes(header.get("x5t#S256"))
    sha1 = _thumbprint_bytes(header.get("x5t"))
    for cert in app.certificates:
        if (sha256 is not None and cert.sha256 == sha256) or (
            sha1 is not None and cert.sha1 == sha1
        ):
            return cert
    return None


def _thumbprint_bytes(value: object) -> bytes | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return _b64url_decode(value.rstrip("="))
    except (binascii.Error, ValueError):
        return None


def _split_scope(scope: str) -> str | None:
    """The resource of a single ``<resource>/.default`` scope, else None."""
    parts = scope.split()
    if len(parts) != 1 or not parts[0].endswith("/.default"):
        return None
    resource = parts[0][: -len("/.default")]
    return resource or None


class AzureAdServer:
    """An HTTPS Entra ID v2 emulator on the running asyncio loop.

    Register tenants, applications (with secrets and/or PEM certificates) and
    resources, ``await start()``, and point MSAL at ``f"{server.url}/{tenant}"``
    with ``instance_discovery=False`` and a session trusting :attr:`ca_pem`.
    All knobs and counters are plain attributes, changed and read on the loop.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: CertificateAuthority | None = None,
        hostnames: Sequence[str] = ("localhost",),
        token_lifetime: int = 3599,
        signer: TokenSigner | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._ca = ca if ca is not None else CertificateAuthority()
        self._hostnames = list(hostnames)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._signer = signer or TokenSigner(common_name="nmi emulated Entra ID token signing")

        self._tenants: dict[str, str] = {}  # casefolded id or domain -> tenant id
        self._apps: dict[str, _App] = {}  # casefolded client id -> app
        self._resources: set[str] = {resource_key(r) for r in DEFAULT_RESOURCES}
        self._failures: collections.deque[_Failure] = collections.deque()
        self._seen_jti: dict[str, float] = {}
        self._changed = asyncio.Condition()

        #: Lifetime in seconds of newly issued access tokens.
        self.token_lifetime: int = token_lifetime
        #: Seconds to wait (without blocking the loop) before answering a token request.
        self.latency: float = 0.0
        #: When true, the token endpoint answers 503 ``temporarily_unavailable``.
        self.outage: bool = False
        #: Reject a client assertion whose ``jti`` was already accepted (Entra ID does not).
        self.reject_replayed_assertions: bool = False

        #: Every token request that reached the endpoint, by (client_id, resource).
        self.token_requests: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Successful token responses, by (client_id, resource).
        self.issued: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Number of token-endpoint requests (any outcome).
        self.requests_total: int = 0
        #: Number of HTTP requests of any kind (discovery included).
        self.http_requests_total: int = 0
        #: Claims of the last client assertion whose signature verified.
        self.last_assertion_claims: dict[str, Any] | None = None
        #: JOSE header of that assertion.
        self.last_assertion_header: dict[str, Any] | None = None
        #: Token requests that presented a federated assertion (any outcome),
        #: by (client_id, the assertion's unverified ``sub``).
        self.federated_exchanges: collections.Counter[tuple[str, str]] = collections.Counter()
        #: (client_id, assertion subject, ``uti``) of every token issued for a federated
        #: assertion: which service account obtained which access token.
        self.federated_issued: list[tuple[str, str, str]] = []
        #: HTTPS fetches of external OIDC discovery documents and JWKS, by URL.
        self.issuer_fetches: collections.Counter[str] = collections.Counter()
        self._issuers = OidcIssuers(self._ca.cert_pem, self.issuer_fetches)

    @property
    def issuers(self) -> OidcIssuers:
        """The external OIDC issuers' cache and fetcher (``socket_factory`` is settable)."""
        return self._issuers

    # ----------------------------------------------------------------- registry

    def add_tenant(self, tenant_id: str, *, domains: Iterable[str] = ()) -> None:
        """Create a tenant, reachable by its id and by any of ``domains``."""
        self._tenants[tenant_id.casefold()] = tenant_id
        for domain in domains:
            self._tenants[domain.casefold()] = tenant_id

    def add_app(
        self,
        *,
        tenant_id: str,
        client_id: str,
        secrets: Sequence[str] = (),
        certificates: Sequence[bytes | str] = (),
        object_id: str | None = None,
    ) -> str:
        """Register an application (single tenant) and return its object id.

        The tenant is created if needed.  ``certificates`` are PEM X.509
        certificates whose keys may sign client assertions.
        """
        if tenant_id.casefold() not in self._tenants:
            self.add_tenant(tenant_id)
        app = _App(
            tenant_id=self._tenants[tenant_id.casefold()],
            client_id=client_id,
            object_id=object_id or str(uuid.uuid4()),
            secrets=list(secrets),
            certificates=[_parse_certificate(c) for c in certificates],
        )
        self._apps[client_id.casefold()] = app
        return app.object_id

    def add_managed_identity(
        self, *, tenant_id: str, client_id: str, object_id: str | None = None
    ) -> str:
        """Register a user-assigned managed identity's service principal; return its object id.

        It has no secrets or certificates: here it obtains tokens only by
        presenting an assertion that one of its federated credentials accepts.
        The tenant is created if needed.
        """
        if tenant_id.casefold() not in self._tenants:
            self.add_tenant(tenant_id)
        identity = _App(
            tenant_id=self._tenants[tenant_id.casefold()],
            client_id=client_id,
            object_id=object_id or str(uuid.uuid4()),
            managed_identity=True,
        )
        self._apps[client_id.casefold()] = identity
        return identity.object_id

    def add_federated_credential(
        self,
        client_id: str,
        *,
        issuer: str,
        subject: str,
        audiences: Sequence[str] = (TOKEN_EXCHANGE_AUDIENCE,),
        name: str | None = None,
    ) -> str:
        """Add a federated identity credential to an app or managed identity; return its name.

        Like Entra ID: at most 20 per app, names unique (case-insensitively),
        one credential per (issuer, subject) pair, at least one audience.
        Raises ValueError otherwise and KeyError for an unknown client id.
        """
        app = self._app(client_id)
        if not issuer or not subject:
            raise ValueError("a federated credential needs an issuer and a subject")
        if isinstance(audiences, str):
            audiences = (audiences,)
        if not audiences or not all(audiences):
            raise ValueError("a federated credential needs at least one audience")
        if len(app.federated) >= MAX_FEDERATED_CREDENTIALS:
            raise ValueError(
                f"{app.client_id} already has {MAX_FEDERATED_CREDENTIALS} federated identity "
                "credentials (the most Entra ID allows)"
            )
        if name is None:
            n = len(app.federated) + 1
            while f"fic-{n}" in app.federated:
                n += 1
            name = f"fic-{n}"
        if not name:
            raise ValueError("a federated credential needs a name")
        if name.casefold() in app.federated:
            raise ValueError(f"{app.client_id} already has a federated credential named {name!r}")
        if any(c.issuer == issuer and c.subject == subject for c in app.federated.values()):
            raise ValueError(
                f"{app.client_id} already has a federated credential for issuer {issuer!r} and "
                f"subject {subject!r}"
            )
        app.federated[name.casefold()] = FederatedCredential(
            name=name, issuer=issuer, subject=subject, audiences=tuple(audiences)
        )
        return name

    def remove_federated_credential(self, client_id: str, name: str) -> None:
        """Delete a federated credential; the next token request no longer matches it."""
        app = self._app(client_id)
        try:
            del app.federated[name.casefold()]
        except KeyError:
            raise KeyError(f"{app.client_id} has no federated credential named {name!r}") from None

    def federated_credentials(self, client_id: str) -> list[FederatedCredential]:
        """The federated credentials of an app or managed identity, oldest first."""
        return list(self._app(client_id).federated.values())

    def set_secrets(self, client_id: str, secrets: Sequence[str]) -> None:
        """Replace the app's client secrets (rotation); old ones stop working at once."""
        self._app(client_id, credentials=True).secrets = list(secrets)

    def set_certificates(self, client_id: str, certificates: Sequence[bytes | str]) -> None:
        """Replace the app's certificate credentials (PEM)."""
        self._app(client_id, credentials=True).certificates = [
            _parse_certificate(c) for c in certificates
        ]

    def add_resource(self, resource_uri: str) -> None:
        """Make ``resource_uri`` a known resource (application ID URI) in every tenant."""
        self._resources.add(resource_key(resource_uri))

    def object_id(self, client_id: str) -> str:
        """The object id of a registered app or managed identity (the ``oid`` of its tokens)."""
        return self._app(client_id).object_id

    def _app(self, client_id: str, *, credentials: bool = False) -> _App:
        try:
            app = self._apps[client_id.casefold()]
        except KeyError:
            raise KeyError(f"no application with client id {client_id!r}") from None
        if credentials and app.managed_identity:
            raise ValueError(
                f"{client_id} is a managed identity: it has no secrets or certificates"
            )
        return app

    # -------------------------------------------------------------------- knobs

    def fail_next(self, n: int, *, status: int = 500, retry_after: int | None = None) -> None:
        """Make the next ``n`` token requests fail with ``status`` and an AADSTS body.

        ``Retry-After`` is sent only when ``retry_after`` is given.
        """
        self._failures.extend(_Failure(status, retry_after) for _ in range(n))

    def throttle_next(self, n: int, *, retry_after: int = 2) -> None:
        """Make the next ``n`` token requests answer 429 with ``Retry-After``."""
        self.fail_next(n, status=429, retry_after=retry_after)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen on ``host:port`` with TLS."""
        if self._runner is not None:
            raise RuntimeError("already started")
        ips: list[str] = []
        bind_all = False
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(self._host)
            bind_all = address.is_unspecified
            ips.append("127.0.0.1" if bind_all else self._host)
        tls = self._ca.issue_server(self._hostnames, ips).ssl_context()

        app = web.Application(middlewares=[self._count_middleware])
        app.router.add_get("/common/discovery/instance", self._instance_discovery)
        app.router.add_get(
            "/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration
        )
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self._keys)
        app.router.add_route("*", "/{tenant}/oauth2/v2.0/token", self._token)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port, ssl_context=tls)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        logger.info("Azure AD emulator listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening and close connections (the issuer client's too)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            logger.info("Azure AD emulator stopped")
        await self._issuers.close()

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def _url_host(self) -> str:
        host = self._host
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            if address.is_unspecified:
                return "127.0.0.1"
            if address.version == 6:
                return f"[{host}]"
        return host

    @property
    def authority_host(self) -> str:
        """``host:port`` (what MSAL calls the instance)."""
        return f"{self._url_host}:{self.port}"

    @property
    def url(self) -> str:
        """``https://host:port``; the authority is ``f"{url}/{tenant_id}"``."""
        return f"https://{self.authority_host}"

    @property
    def ca_pem(self) -> bytes:
        """The PEM certificate of the CA that signed the server certificate."""
        return self._ca.cert_pem

    @property
    def jwks_refetch_interval(self) -> float:
        """Minimum seconds between two unknown-``kid`` JWKS refetches of one issuer (10)."""
        return self._issuers.refetch_interval

    @jwks_refetch_interval.setter
    def jwks_refetch_interval(self, seconds: float) -> None:
        self._issuers.refetch_interval = seconds

    @property
    def signer(self) -> TokenSigner:
        """The token-signing key (for verifying issued tokens in tests)."""
        return self._signer

    # ----------------------------------------------------------------- waiting

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; it is re-checked after every request event."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout} s") from None

    async def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:
        """Wait until at least ``n`` token requests have reached the endpoint."""
        try:
            await self.wait_for(lambda: self.requests_total >= n, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(
                f"expected {n} token requests, saw {self.requests_total} within {timeout} s"
            ) from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ----------------------------------------------------------------- helpers

    def _aliases(self, request: web.Request) -> set[str]:
        """Every ``host[:port]`` under which clients may name this server."""
        names = {request.host.casefold(), self.authority_host.casefold()}
        for name in [*self._hostnames, "127.0.0.1", "localhost"]:
            names.add(f"{name}:{self.port}".casefold())
            if self.port == 443:
                names.add(name.casefold())
        return names

    def _resolve_tenant(self, tenant: str) -> str | None:
        return self._tenants.get(tenant.casefold())

    def _error(
        self,
        request: web.Request,
        *,
        status: int,
        error: str,
        code: int,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        now = _utcnow()
        timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id = str(uuid.uuid4())
        correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
        body = {
            "error": error,
            "error_description": (
                f"AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\n"
                f"Correlation ID: {correlation_id}\r\nTimestamp: {timestamp}"
            ),
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"https://{request.host}/error?code={code}",
        }
        all_headers = {
            "Cache-Control": "no-store, no-cache",
            "Pragma": "no-cache",
            "x-ms-request-id": trace_id,
            "client-request-id": correlation_id,
        }
        all_headers.update(headers or {})
        logger.info(
            "AAD %s %s -> %d %s AADSTS%d", request.method, request.path, status, error, code
        )
        return _json_response(body, status=status, headers=all_headers)

    def _render(self, request: web.Request, exc: _AadError) -> web.Response:
        return self._error(
            request, status=exc.status, error=exc.error, code=exc.code, message=exc.message
        )

    def _tenant_not_found(self, tenant: str, *, error: str = "invalid_request") -> _AadError:
        return _AadError(
            400,
            error,
            90002,
            f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
            "and are signing into the correct cloud. Check with your subscription "
            "administrator, this may happen if there are no active subscriptions for the tenant.",
        )

    # ----------------------------------------------------------------- handlers

    @web.middleware
    async def _count_middleware(
        self,
        request: web.Request,
        handler: Handler,
    ) -> web.StreamResponse:
        self.http_requests_total += 1
        return await handler(request)

    async def _instance_discovery(self, request: web.Request) -> web.Response:
        endpoint = request.query.get("authorization_endpoint")
        if not endpoint:
            return self._error(
                request,
                status=400,
                error="invalid_request",
                code=900144,
                message="The request body must contain the following parameter: "
                "'authorization_endpoint'.",
            )
        parts = urlsplit(endpoint)
        # MSAL sends the authority's host name without its port, so a bare
        # name of this server counts too; the discovery answer then names the
        # port the client actually reached.
        hostname = (parts.hostname or "").casefold()
        names = {n.casefold() for n in [*self._hostnames, "127.0.0.1", "localhost"]}
        names.add(self._url_host.strip("[]").casefold())
        names.add((urlsplit(f"https://{request.host}").hostname or "").casefold())
        try:
            port = parts.port
        except ValueError:
            port = -1
        known = parts.scheme == "https" and hostname in names and port in (None, self.port)
        if not known:
            return self._error(
                request,
                status=400,
                error="invalid_instance",
                code=50049,
                message="Unknown or invalid instance.",
            )
        segments = [s for s in parts.path.split("/") if s]
        tenant = segments[0] if segments else "common"
        if port is not None or self.port == 443:
            host = parts.netloc
        elif hostname == (urlsplit(f"https://{request.host}").hostname or "").casefold():
            host = request.host
        else:
            host = f"{parts.netloc}:{self.port}"
        return _json_response(
            {
                "tenant_discovery_endpoint": (
                    f"https://{host}/{tenant}/v2.0/.well-known/openid-configuration"
                ),
                "api-version": "1.1",
                "metadata": [
                    {
                        "preferred_network": host,
                        "preferred_cache": host,
                        "aliases": sorted({host, self.authority_host}),
                    }
                ],
            }
        )

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        segment = request.match_info["tenant"]
        if segment.casefold() in _GENERIC_TENANTS:
            tenant = "{tenantid}"
        else:
            resolved = self._resolve_tenant(segment)
            if resolved is None:
                return self._render(
                    request, self._tenant_not_found(segment, error="invalid_tenant")
                )
            tenant = resolved
            segment = resolved
        base = f"https://{request.host}/{segment}"
        issuer = f"https://{request.host}/{tenant}/v2.0"
        return _json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": issuer,
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub",
                    "iss",
                    "cloud_instance_name",
                    "cloud_instance_host_name",
                    "cloud_graph_host_name",
                    "msgraph_host",
                    "aud",
                    "exp",
                    "iat",
                    "auth_time",
                    "acr",
                    "nonce",
                    "preferred_username",
                    "name",
                    "tid",
                    "ver",
                    "at_hash",
                    "c_hash",
                    "email",
                ],
                "kerberos_endpoint": f"{base}/kerberos",
                "tenant_region_scope": "WW",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            }
        )

    async def _keys(self, request: web.Request) -> web.Response:
        segment = request.match_info["tenant"]
        if segment.casefold() in _GENERIC_TENANTS:
            issuer = f"https://{request.host}/{{tenantid}}/v2.0"
        else:
            tenant = self._resolve_tenant(segment)
            if tenant is None:
                return self._render(
                    request, self._tenant_not_found(segment, error="invalid_tenant")
                )
            issuer = f"https://{request.host}/{tenant}/v2.0"
        return _json_response(self._signer.jwks(issuer=issuer))

    async def _token(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return self._error(
                request,
                status=400,
                error="invalid_request",
                code=900561,
                message="The endpoint only accepts POST requests. "
                f"Received a {request.method} request.",
            )
        form = await self._read_form(request)
        basic = _parse_basic(request.headers.get("Authorization"))
        client_id = form.get("client_id") or (basic[0] if basic else "")
        scope = form.get("scope", "")
        resource = _split_scope(scope) or scope
        self.token_requests[(client_id, resource)] += 1
        self.requests_total += 1
        federated = self._federated_assertion(form, client_id)
        if federated is not None:
            self.federated_exchanges[(client_id, federated.subject)] += 1
        await self._notify()

        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if self.outage:
            return self._error(
                request,
                status=503,
                error="temporarily_unavailable",
                code=90033,
                message="A transient error has occurred. Please try again.",
                headers={"Retry-After": "5"},
            )
        if self._failures:
            return self._injected_failure(request, self._failures.popleft())

        try:
            response = await self._issue(request, form, basic, federated)
        except _AadError as exc:
            response = self._render(request, exc)
        await self._notify()
        return response

    def _injected_failure(self, request: web.Request, failure: _Failure) -> web.Response:
        headers = {} if failure.retry_after is None else {"Retry-After": str(failure.retry_after)}
        if failure.status == 429:
            error, code = "temporarily_unavailable", 90055
            message = "There are too many incoming requests. Please try again later."
        elif failure.status == 503:
            error, code = "temporarily_unavailable", 90033
            message = "A transient error has occurred. Please try again."
        elif failure.status >= 500:
            error, code = "server_error", 50000
            message = "There was an error issuing a token or an issue with our sign-in service."
        else:
            error, code = "invalid_request", 50000
            message = "The request could not be processed (injected failure)."
        return self._error(
            request,
            status=failure.status,
            error=error,
            code=code,
            message=message,
            headers=headers,
        )

    @staticmethod
    async def _read_form(request: web.Request) -> dict[str, str]:
        if request.content_type != "application/x-www-form-urlencoded":
            return {}
        body = await request.text()
        form: dict[str, str] = {}
        for key, value in parse_qsl(body, keep_blank_values=True):
            form.setdefault(key, value)
        return form

    async def _issue(
        self,
        request: web.Request,
        form: Mapping[str, str],
        basic: tuple[str, str] | None,
        federated: _Federated | None,
    ) -> web.Response:
        segment = request.match_info["tenant"]
        if segment.casefold() in _GENERIC_TENANTS:
            raise _AadError(
                400,
                "invalid_request",
                50059,
                "No tenant-identifying information found in either the request or implied "
                "by any provided credentials.",
            )
        tenant_id = self._resolve_tenant(segment)
        if tenant_id is None:
            raise self._tenant_not_found(segment)

        grant_type = form.get("grant_type")
        if not grant_type:
            raise _missing("grant_type")
        if grant_type != "client_credentials":
            raise _AadError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        client_id = form.get("client_id") or (basic[0] if basic else "")
        if not client_id:
            raise _missing("client_id")
        scope = form.get("scope")
        if not scope:
            raise _missing("scope")

        app = self._apps.get(client_id.casefold())
        if app is None or app.tenant_id != tenant_id:
            raise _AadError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant_id}'. This can happen if the application has not been installed by "
                "the administrator of the tenant or consented to by any user in the tenant. "
                "You may have sent your authentication request to the wrong tenant.",
            )

        appidacr = await self._authenticate(request, app, form, basic, segment, federated)

        resource = _split_scope(scope)
        if resource is None:
            raise _AadError(
                400,
                "invalid_scope",
                70011,
                "The provided request must include a 'scope' input parameter. The provided "
                f"value for the input parameter 'scope' is not valid. The scope {scope} is not "
                "valid.",
            )
        if not self._known_resource(resource, tenant_id):
            raise _AadError(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{tenant_id}. This can happen if the application has not been installed by "
                "the administrator of the tenant or consented to by any user in the tenant. "
                "You might have sent your authentication request to the wrong tenant.",
            )

        lifetime = int(self.token_lifetime)
        now = int(time.time())
        issuer = f"https://sts.windows.net/{tenant_id}/"
        uti = _b64url(uuid.uuid4().bytes)  # unique per token, like Entra ID's
        claims = {
            "aud": resource,
            "iss": issuer,
            "iat": now - _CLOCK_SKEW,
            "nbf": now - _CLOCK_SKEW,
            "exp": now + lifetime,
            "appid": app.client_id,
            "appidacr": appidacr,
            "azp": app.client_id,
            "idp": issuer,
            "idtyp": "app",
            "oid": app.object_id,
            "sub": app.object_id,
            "tid": tenant_id,
            "uti": uti,
            "ver": "1.0",
        }
        token = self._signer.sign(claims)
        self.issued[(client_id, resource)] += 1
        if federated is not None:
            self.federated_issued.append((client_id, federated.subject, uti))
        logger.info(
            "AAD issued token client_id=%s resource=%s tenant=%s lifetime=%d",
            app.client_id,
            resource,
            tenant_id,
            lifetime,
        )
        request_id = str(uuid.uuid4())
        return _json_response(
            {
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": token,
            },
            headers={
                "Cache-Control": "no-store, no-cache",
                "Pragma": "no-cache",
                "x-ms-request-id": request_id,
                "client-request-id": request.headers.get("client-request-id") or request_id,
            },
        )

    def _known_resource(self, resource: str, tenant_id: str) -> bool:
        key = resource_key(resource)
        if key in self._resources:
            return True
        # An app registered in the tenant is itself a resource: by client id or api://<id>.
        candidate = key.removeprefix("api://")
        app = self._apps.get(candidate)
        return app is not None and app.tenant_id == tenant_id and not app.managed_identity

    # ------------------------------------------------------------ client auth

    def _federated_assertion(self, form: Mapping[str, str], client_id: str) -> _Federated | None:
        """The request's client assertion if it is a federated one (unverified), else None.

        A ``jwt-bearer`` assertion is federated when its ``iss`` is not the
        client id and its ``x5t`` / ``x5t#S256`` names no certificate of the
        client (GitHub's tokens carry an ``x5t`` too; a certificate assertion
        with a foreign ``iss`` stays a certificate assertion, rejected with
        AADSTS700021).
        """
        assertion = form.get("client_assertion")
        if not assertion or form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE_JWT:
            return None
        parsed = unverified_assertion(assertion)
        if parsed is None:
            return None
        header, claims = parsed
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer.casefold() == client_id.casefold():
            return None
        app = self._apps.get(client_id.casefold())
        if app is not None and _certificate_for(app, header) is not None:
            return None
        subject = claims.get("sub")
        return _Federated(
            assertion=assertion,
            header=header,
            claims=claims,
            subject=subject if isinstance(subject, str) else "",
        )

    async def _verify_federated(self, app: _App, federated: _Federated) -> None:
        try:
            claims = await verify_federated_assertion(
                federated.assertion,
                federated.header,
                federated.claims,
                list(app.federated.values()),
                self._issuers,
            )
        except FederationError as exc:
            raise _AadError(exc.status, exc.error, exc.code, exc.message) from None
        self.last_assertion_claims = claims
        self.last_assertion_header = dict(federated.header)
        logger.info(
            "AAD accepted federated assertion client_id=%s iss=%s sub=%s",
            app.client_id,
            claims.get("iss"),
            federated.subject,
        )

    async def _authenticate(
        self,
        request: web.Request,
        app: _App,
        form: Mapping[str, str],
        basic: tuple[str, str] | None,
        tenant_segment: str,
        federated: _Federated | None,
    ) -> str:
        """Check the client credential; return ``appidacr`` ("1" secret, "2" assertion)."""
        secret = form.get("client_secret")
        if basic is not None:
            basic_id, basic_secret = basic
            if basic_id.casefold() != app.client_id.casefold():
                raise _invalid_secret(app.client_id)
            secret = secret or basic_secret
        assertion = form.get("client_assertion")
        if secret and assertion:
            raise _AadError(
                400,
                "invalid_request",
                90014,
                "Only one of 'client_secret' and 'client_assertion' may be presented.",
            )
        if secret:
            if not any(hmac.compare_digest(secret.encode(), s.encode()) for s in app.secrets):
                raise _invalid_secret(app.client_id)
            return "1"
        if assertion:
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE_JWT:
                raise _AadError(
                    400,
                    "invalid_request",
                    90014,
                    "The required field 'client_assertion_type' is missing from the "
                    "credential. Ensure that you have all the necessary parameters for the "
                    "login request.",
                )
            if federated is not None and federated.assertion == assertion:
                await self._verify_federated(app, federated)
            else:
                self._verify_assertion(request, app, assertion, tenant_segment)
            return "2"
        raise _AadError(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'.",
        )

    def _verify_assertion(
        self, request: web.Request, app: _App, assertion: str, tenant_segment: str
    ) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise _AadError(
                401, "invalid_client", 50027, "JWT token is invalid or malformed."
            ) from None
        algorithm = header.get("alg")
        if algorithm not in ("RS256", "PS256"):
            raise _AadError(
                401,
                "invalid_client",
                700027,
                "Client assertion contains an invalid signature. [Reason - The signing "
                f"algorithm '{algorithm}' is not supported.]",
            )
        certificate = _certificate_for(app, header)
        if certificate is None:
            sha256 = _thumbprint_bytes(header.get("x5t#S256"))
            sha1 = _thumbprint_bytes(header.get("x5t"))
            shown = (sha256 or sha1 or b"").hex().upper()
            raise _AadError(
                401,
                "invalid_client",
                700027,
                "The certificate with identifier used to sign the client assertion is not "
                "registered on application. [Reason - The key was not found., Thumbprint of "
                f"key used by client: '{shown}', Please visit the Azure Portal, Graph Explorer "
                "or directly use MS Graph to see configured keys for app Id "
                f"'{app.client_id}'.]",
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                certificate.public_key,
                algorithms=[str(algorithm)],
                options=SIGNATURE_ONLY,
            )
        except jwt.InvalidSignatureError:
            raise _AadError(
                401,
                "invalid_client",
                700027,
                "Client assertion contains an invalid signature. [Reason - The provided "
                "signature value did not match the expected signature value., Thumbprint of "
                f"key used by client: '{certificate.sha1.hex().upper()}']",
            ) from None
        except jwt.PyJWTError:
            raise _AadError(
                401, "invalid_client", 50027, "JWT token is invalid or malformed."
            ) from None
        self.last_assertion_claims = claims
        self.last_assertion_header = dict(header)

        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            raise _AadError(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' "
                f"parameter. {_CERT_DOCS}",
            )
        if not self._audience_ok(request, claims.get("aud"), tenant_segment, app.tenant_id):
            raise _AadError(
                401,
                "invalid_client",
                700023,
                f"Client assertion audience claim does not match Realm issuer. {_CERT_DOCS}",
            )
        now = time.time()
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if not isinstance(exp, int | float) or any(
            v is not None and not isinstance(v, int | float) for v in (nbf, iat)
        ):
            raise _AadError(401, "invalid_client", 50027, "JWT token is invalid or malformed.")
        starts = [float(v) for v in (nbf, iat) if isinstance(v, int | float)]
        if exp + _CLOCK_SKEW <= now or any(s - _CLOCK_SKEW > now for s in starts):
            raise _AadError(
                401,
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range. Current time: "
                f"{_iso(now)}, assertion valid from {_iso(min(starts, default=now))}, expiry "
                f"time of assertion {_iso(float(exp))}. {_CERT_DOCS}",
            )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _AadError(
                401,
                "invalid_client",
                50027,
                "JWT token is invalid or malformed. The 'jti' claim is missing.",
            )
        self._seen_jti = {k: v for k, v in self._seen_jti.items() if v + _CLOCK_SKEW > now}
        replay_key = f"{app.client_id.casefold()}|{jti}"
        if self.reject_replayed_assertions and replay_key in self._seen_jti:
            raise _AadError(
                401,
                "invalid_client",
                700024,
                "Client assertion is not within its valid time range: the assertion with "
                f"jti '{jti}' was already used. {_CERT_DOCS}",
            )
        self._seen_jti[replay_key] = float(exp)

    def _audience_ok(
        self, request: web.Request, aud: object, tenant_segment: str, tenant_id: str
    ) -> bool:
        if not isinstance(aud, str):
            return False
        parts = urlsplit(aud)
        if parts.scheme != "https" or parts.netloc.casefold() not in self._aliases(request):
            return False
        segments = parts.path.rstrip("/").split("/")
        if len(segments) == 4:  # "", tenant, "oauth2", "token"
            path_ok = segments[2:] == ["oauth2", "token"]
        elif len(segments) == 5:
            path_ok = segments[2:] == ["oauth2", "v2.0", "token"]
        else:
            return False
        tenant = segments[1]
        return path_ok and (
            tenant.casefold() == tenant_segment.casefold()
            or self._resolve_tenant(tenant) == tenant_id
        )


def _missing(name: str) -> _AadError:
    return _AadError(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def _invalid_secret(client_id: str) -> _AadError:
    return _AadError(
        401,
        "invalid_client",
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request is the "
        f"client secret value, not the client secret ID, for a secret added to app "
        f"'{client_id}'.",
    )


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    """``(client_id, client_secret)`` from ``Authorization: Basic``, form-decoded."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.casefold() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return unquote_plus(user), unquote_plus(password)
