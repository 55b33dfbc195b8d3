"""Workload identity federation for the Azure AD emulator (:mod:`nmi_sandbox.aad`).

Entra ID lets an application or a user-assigned managed identity trust tokens
of an external OpenID Connect issuer (a Kubernetes service-account issuer,
GitHub Actions, ...) through *federated identity credentials* (FICs): an
issuer URL, a subject and a list of audiences.  A client then presents the
external token as its ``client_assertion`` (``jwt-bearer``) in an ordinary
client-credentials request, and Entra ID, in this order:

1. looks for a FIC of the client whose ``issuer`` equals the token's ``iss``
   and whose ``subject`` equals its ``sub`` (both exact, case-sensitive string
   comparisons) and whose ``audiences`` hold one of its ``aud`` values -
   otherwise ``AADSTS70021`` (400 ``invalid_request``);
2. fetches ``<iss>/.well-known/openid-configuration`` (the document's
   ``issuer`` must be ``iss``) and then its ``jwks_uri``, both cached per
   issuer; a token signed with an unknown ``kid`` makes it refetch the JWKS
   (key rotation), at most once per :attr:`OidcIssuers.refetch_interval`
   seconds per issuer - a failed fetch or a bad document is ``AADSTS50166``
   (400 ``invalid_request``);
3. verifies the RS256 signature with the key named by ``kid`` - otherwise
   ``AADSTS700027`` (401 ``invalid_client``);
4. checks ``exp`` (no tolerance) and ``nbf`` / ``iat`` (five minutes of clock
   skew) - otherwise ``AADSTS700024`` (400 ``invalid_client``).

This module holds those steps and the issuer cache; the token endpoint, the
registry and the counters live in :class:`nmi_sandbox.aad.AzureAdServer`.
Deliberate limits: FIC flexible expressions (``claimsMatchingExpression``),
issuer/JWKS cache expiry (entries live until the server stops, except for the
unknown-``kid`` refetch), the 600-character limits on FIC fields and the
AADSTS700211/700212/7002131 refinements of ``AADSTS70021`` are not emulated.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard
from urllib.parse import urlsplit

import aiohttp
import jwt
from jwt.types import Options

#: PyJWT options that check the signature only: the time range, audience and issuer are
#: checked afterwards, one by one, for Entra ID's own error for each.
SIGNATURE_ONLY: Final[Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}

__all__ = [
    "CERTIFICATE_CREDENTIALS_DOCS",
    "MAX_FEDERATED_CREDENTIALS",
    "SIGNATURE_ONLY",
    "TOKEN_EXCHANGE_AUDIENCE",
    "FederatedCredential",
    "FederationError",
    "OidcIssuers",
    "iso_time",
    "unverified_assertion",
    "verify_federated_assertion",
]

logger = logging.getLogger("nmi_sandbox.federation")

TOKEN_EXCHANGE_AUDIENCE: Final = "api://AzureADTokenExchange"
"""The audience Entra ID recommends (and defaults to) for federated credentials."""

MAX_FEDERATED_CREDENTIALS: Final = 20
"""Entra ID's limit of federated identity credentials per application or identity."""

CERTIFICATE_CREDENTIALS_DOCS: Final = (
    "Review the documentation at "
    "https://docs.microsoft.com/azure/active-directory/develop/"
    "active-directory-certificate-credentials ."
)
_FEDERATION_DOCS: Final = (
    "https://docs.microsoft.com/en-us/azure/active-directory/develop/workload-identity-federation"
)
_NBF_SKEW: Final = 300
_MAX_DOCUMENT_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class FederatedCredential:
    """One federated identity credential of an application or managed identity."""

    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...] = (TOKEN_EXCHANGE_AUDIENCE,)

    def matches(self, issuer: str, subject: object, audiences: Iterable[str]) -> bool:
        """Whether an assertion with these claims is accepted by this credential."""
        return (
            self.issuer == issuer
            and self.subject == subject
            and any(a in self.audiences for a in audiences)
        )


@dataclass(eq=False)
class FederationError(Exception):
    """A rejection of a federated assertion, in Entra ID's terms."""

    status: int
    error: str
    code: int
    message: str


def iso_time(epoch: float) -> str:
    """Entra ID's rendering of an instant in error descriptions (7 fractional digits)."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def unverified_assertion(assertion: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The JOSE header and claims of ``assertion`` without any verification, or None."""
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    if not isinstance(claims, dict):  # pragma: no cover - PyJWT only returns objects
        return None
    return dict(header), claims


def _audiences(aud: object) -> list[str]:
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list):
        return [a for a in aud if isinstance(a, str)]
    return []


def _malformed() -> FederationError:
    return FederationError(401, "invalid_client", 50027, "JWT token is invalid or malformed.")


def _oidc_failure() -> FederationError:
    return FederationError(
        400, "invalid_request", 50166, "Request to External OIDC endpoint failed."
    )


def _signature_failure(reason: str) -> FederationError:
    return FederationError(
        401,
        "invalid_client",
        700027,
        f"Client assertion failed signature validation. [Reason - {reason}]",
    )


def _https_url(url: object) -> TypeGuard[str]:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme == "https" and bool(parts.hostname) and not parts.fragment


@dataclass
class _KeySet:
    jwks_uri: str
    keys: dict[str, jwt.PyJWK]
    refetched_at: float | None = None


@dataclass
class OidcIssuers:
    """External OIDC issuers as Entra ID sees them: discovery and JWKS, cached per issuer.

    Fetches go over HTTPS trusting only ``ca_pem`` (the world's private CA)
    and are counted in ``fetches`` by URL.  The client session is opened on
    first use and closed by :meth:`close`.
    """

    ca_pem: bytes
    fetches: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Seconds a discovery or JWKS fetch may take before it counts as failed.
    timeout: float = 5.0
    #: Minimum seconds between two unknown-``kid`` JWKS refetches of one issuer.
    refetch_interval: float = 10.0
    #: Makes the sockets of the fetches (``aiohttp``'s ``socket_factory``): a world whose
    #: issuer listens in another network namespace creates them there.
    socket_factory: Callable[[Any], socket.socket] | None = None

    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _jwks_uris: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _keysets: dict[str, _KeySet] = field(default_factory=dict, init=False, repr=False)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)

    async def close(self) -> None:
        """Close the client session (the caches are kept)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def forget(self) -> None:
        """Drop every cached discovery document and key set."""
        self._jwks_uris.clear()
        self._keysets.clear()

    async def signing_key(self, issuer: str, kid: str) -> jwt.PyJWK | None:
        """The issuer's key ``kid``, fetching or refetching as Entra ID does.

        Raises :class:`FederationError` (AADSTS50166) when the issuer cannot be
        fetched; returns None when the key is not published.
        """
        lock = self._locks.setdefault(issuer, asyncio.Lock())
        async with lock:  # concurrent exchanges for one issuer fetch once
            keyset = self._keysets.get(issuer)
            fresh = keyset is None
            if keyset is None:
                jwks_uri = await self._jwks_uri(issuer)
                keyset = _KeySet(jwks_uri, await self._fetch_keys(jwks_uri))
                self._keysets[issuer] = keyset
            key = keyset.keys.get(kid)
            now = time.monotonic()
            if (
                key is None
                and kid
                and not fresh
                and (
                    keyset.refetched_at is None
                    or now - keyset.refetched_at >= self.refetch_interval
                )
            ):
                keyset.refetched_at = now
                logger.info("AAD refetching JWKS of %s for unknown kid %r", issuer, kid)
                keyset.keys = await self._fetch_keys(keyset.jwks_uri)
                key = keyset.keys.get(kid)
            return key

    async def _jwks_uri(self, issuer: str) -> str:
        cached = self._jwks_uris.get(issuer)
        if cached is not None:
            return cached
        if not _https_url(issuer):
            logger.info("AAD refuses federated issuer %r: not an https URL", issuer)
            raise _oidc_failure()
        document = await self._fetch_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        jwks_uri = document.get("jwks_uri")
        if document.get("issuer") != issuer or not _https_url(jwks_uri):
            logger.info(
                "AAD bad discovery document for %r: issuer=%r jwks_uri=%r",
                issuer,
                document.get("issuer"),
                jwks_uri,
            )
            raise _oidc_failure()
        self._jwks_uris[issuer] = jwks_uri
        return jwks_uri

    async def _fetch_keys(self, jwks_uri: str) -> dict[str, jwt.PyJWK]:
        document = await self._fetch_json(jwks_uri)
        entries = document.get("keys")
        if not isinstance(entries, list):
            logger.info("AAD bad JWKS at %s: no 'keys' list", jwks_uri)
            raise _oidc_failure()
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid:
                continue
            try:
                keys[kid] = jwt.PyJWK(entry)
            except jwt.PyJWTError:  # unsupported or broken entry: skipped, like other keys
                continue
        return keys

    async def _fetch_json(self, url: str) -> dict[str, Any]:
        self.fetches[url] += 1
        if self._session is None:
            context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, socket_factory=self.socket_factory),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        try:
            async with self._session.get(
                url, allow_redirects=False, headers={"Accept": "application/json"}
            ) as response:
                if response.status != 200:
                    logger.info("AAD fetch of %s answered %d", url, response.status)
                    raise _oidc_failure()
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > _MAX_DOCUMENT_BYTES:
                        raise _oidc_failure()
            document = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            logger.info("AAD fetch of %s failed: %r", url, exc)
            raise _oidc_failure() from None
        if not isinstance(document, dict):
            raise _oidc_failure()
        return document


async def verify_federated_assertion(
    assertion: str,
    header: Mapping[str, Any],
    claims: Mapping[str, Any],
    credentials: Iterable[FederatedCredential],
    issuers: OidcIssuers,
) -> dict[str, Any]:
    """Check a federated assertion as Entra ID does; return its verified claims.

    ``header`` and ``claims`` are the unverified parse of ``assertion`` (whose
    ``iss`` must be a string).  Raises :class:`FederationError`.
    """
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise _malformed()
    subject = claims.get("sub")
    audiences = _audiences(claims.get("aud"))
    if not any(c.matches(issuer, subject, audiences) for c in credentials):
        shown_subject = subject if isinstance(subject, str) else ""
        raise FederationError(
            400,
            "invalid_request",
            70021,
            "No matching federated identity record found for presented assertion. "
            f"Assertion Issuer: '{issuer}'. Assertion Subject: '{shown_subject}'. "
            f"Assertion Audience: '{','.join(audiences)}'. {_FEDERATION_DOCS}",
        )

    kid = header.get("kid")
    kid = kid if isinstance(kid, str) else ""
    key = await issuers.signing_key(issuer, kid)
    algorithm = header.get("alg")
    if algorithm != "RS256":
        raise _signature_failure(f"The signing algorithm '{algorithm}' is not supported.")
    if key is None:
        raise _signature_failure(
            f"The key was not found., Thumbprint of key used by client: '{kid}'"
        )
    try:
        verified: dict[str, Any] = jwt.decode(
            assertion,
            key.key,
            algorithms=["RS256"],
            options=SIGNATURE_ONLY,
        )
    except (jwt.PyJWTError, TypeError, ValueError):  # TypeError: the JWK is not an RSA key
        raise _signature_failure(
            "The provided signature value did not match the expected signature value., "
            f"Thumbprint of key used by client: '{kid}'"
        ) from None

    now = time.time()
    exp, nbf, iat = verified.get("exp"), verified.get("nbf"), verified.get("iat")
    numbers = (int, float)
    if not isinstance(exp, numbers) or any(
        v is not None and not isinstance(v, numbers) for v in (nbf, iat)
    ):
        raise _malformed()
    starts = [float(v) for v in (nbf, iat) if isinstance(v, numbers)]
    if exp <= now or any(s - _NBF_SKEW > now for s in starts):
        raise FederationError(
            400,
            "invalid_client",
            700024,
            "Client assertion is not within its valid time range. Current time: "
            f"{iso_time(now)}, assertion valid from {iso_time(min(starts, default=now))}, "
            f"expiry time of assertion {iso_time(float(exp))}. {CERTIFICATE_CREDENTIALS_DOCS}",
        )
    return verified
