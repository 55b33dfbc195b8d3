"""Workload identity federation in the Azure AD emulator, against real MSAL.

A small HTTPS OIDC issuer runs inside each test (a certificate from the same
private CA the emulator trusts) and mints Kubernetes-service-account-like
tokens; MSAL presents them as ``client_assertion`` and the emulator checks
them as Entra ID does: matching federated credential, issuer discovery and
JWKS (cached, one refetch for an unknown ``kid``), signature, time range.
MSAL is synchronous: it runs in a worker thread while the servers serve on
the test's loop.  Nothing here sleeps: every step is awaited to completion.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import msal
import pytest
import requests
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from nmi_sandbox.aad import (
    CLIENT_ASSERTION_TYPE_JWT,
    TOKEN_EXCHANGE_AUDIENCE,
    AzureAdServer,
    FederatedCredential,
    TokenSigner,
)
from nmi_sandbox.tls import CertificateAuthority, ClientCertificate, make_client_certificate

TENANT = "3c4d5e6f-7081-4923-a4b5-c6d7e8f90a1b"
APP = "6e7f8091-a2b3-4c4d-8e5f-60718293a4b5"
APP_OID = "7f8091a2-b3c4-4d5e-8f60-718293a4b5c6"
MI = "8091a2b3-c4d5-4e6f-8071-8293a4b5c6d7"
MI_OID = "91a2b3c4-d5e6-4f70-8182-93a4b5c6d7e8"
ARM = "https://management.azure.com"
VAULT = "https://vault.azure.net"
SA = "system:serviceaccount:payments:api"
SA_OTHER = "system:serviceaccount:payments:worker"
AADSTS_KEYS = {
    "error",
    "error_description",
    "error_codes",
    "timestamp",
    "trace_id",
    "correlation_id",
    "error_uri",
}
FEDERATION_DOCS = (
    "https://docs.microsoft.com/en-us/azure/active-directory/develop/workload-identity-federation"
)

CcaFactory = Callable[..., Awaitable[Any]]


# ------------------------------------------------------------------ the issuer


class OidcIssuer:
    """A Kubernetes-like service-account token issuer over HTTPS.

    Serves ``/.well-known/openid-configuration`` and ``/openid/v1/jwks`` (the
    paths the API server uses) and mints RS256 tokens with a ``kid``.  Knobs
    break it in the ways Entra ID must notice.
    """

    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.keys: dict[str, rsa.RSAPrivateKey] = {}  # kid -> key, all published
        self.signing_kid = ""
        #: Replaces the discovery document's ``issuer`` when set.
        self.document_issuer: str | None = None
        self.discovery_status = 200
        self.jwks_status = 200
        self.jwks_body: str | None = None  # served verbatim when set
        self.requests: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        tls = self._ca.issue_server(["localhost"], ["127.0.0.1"]).ssl_context()
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/openid/v1/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=tls)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.rotate()

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/openid/v1/jwks"

    def rotate(self, *, keep_old: bool = False) -> str:
        """Sign with a new key from now on; publish only it unless ``keep_old``."""
        kid = f"key-{uuid.uuid4().hex[:12]}"
        if not keep_old:
            self.keys.clear()
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.signing_kid = kid
        return kid

    def mint(
        self,
        subject: str = SA,
        *,
        issuer: str | None = None,
        audiences: list[str] | None = None,
        exp_in: float = 3600,
        nbf_in: float = 0,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        algorithm: str = "RS256",
    ) -> str:
        now = time.time()
        namespace, name = subject.rsplit(":", 2)[-2:]
        claims = {
            "iss": issuer or self.url,
            "sub": subject,
            "aud": audiences if audiences is not None else [TOKEN_EXCHANGE_AUDIENCE],
            "iat": int(now + nbf_in),
            "nbf": int(now + nbf_in),
            "exp": int(now + exp_in),
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
            },
        }
        kid = kid if kid is not None else self.signing_kid
        signing_key: Any = key or self.keys[self.signing_kid]
        if algorithm.startswith("HS"):
            signing_key = "a-shared-secret-that-is-long-enough-for-hmac-sha256"
        return jwt.encode(claims, signing_key, algorithm=algorithm, headers={"kid": kid})

    async def _discovery(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        if self.discovery_status != 200:
            return web.json_response({"error": "nope"}, status=self.discovery_status)
        return web.json_response(
            {
                "issuer": self.document_issuer or self.url,
                "jwks_uri": self.jwks_url,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        if self.jwks_body is not None:
            return web.Response(text=self.jwks_body, content_type="application/json")
        if self.jwks_status != 200:
            return web.json_response({"error": "nope"}, status=self.jwks_status)
        keys = []
        for kid, key in self.keys.items():
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return web.json_response({"keys": keys})


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def ca_bundle(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca.write_bundle(tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.fixture(scope="module")
def signer() -> TokenSigner:
    return TokenSigner()


@pytest.fixture(scope="module")
def app_cert() -> ClientCertificate:
    return make_client_certificate("nmi-federation-app")


@pytest.fixture
async def issuer(ca: CertificateAuthority) -> AsyncIterator[OidcIssuer]:
    server = OidcIssuer(ca)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def aad(
    ca: CertificateAuthority, signer: TokenSigner, app_cert: ClientCertificate
) -> AsyncIterator[AzureAdServer]:
    server = AzureAdServer(ca=ca, signer=signer)
    server.add_app(
        tenant_id=TENANT, client_id=APP, object_id=APP_OID, certificates=[app_cert.cert_pem]
    )
    assert server.add_managed_identity(tenant_id=TENANT, client_id=MI, object_id=MI_OID) == MI_OID
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def cca(aad: AzureAdServer, ca_bundle: Path) -> Iterator[CcaFactory]:
    """A real ConfidentialClientApplication presenting ``assertion()`` as its credential."""
    sessions: list[requests.Session] = []

    async def factory(assertion: Callable[[], str], *, client_id: str = APP) -> Any:
        session = requests.Session()
        session.verify = str(ca_bundle)
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override session.verify
        sessions.append(session)
        build = functools.partial(
            msal.ConfidentialClientApplication,
            client_id,
            client_credential={"client_assertion": assertion},
            authority=f"{aad.url}/{TENANT}",
            instance_discovery=False,
            http_client=session,
        )
        return await asyncio.to_thread(build)

    yield factory
    for session in sessions:
        session.close()


@pytest.fixture
async def https(ca: CertificateAuthority) -> AsyncIterator[aiohttp.ClientSession]:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def acquire(app: Any, resource: str) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(
        app.acquire_token_for_client, scopes=[f"{resource}/.default"]
    )
    return result


async def exchange(
    https: aiohttp.ClientSession,
    aad: AzureAdServer,
    assertion: str,
    *,
    client_id: str = APP,
    resource: str = ARM,
) -> tuple[int, dict[str, Any]]:
    """The token request MSAL sends for a federated credential, as raw HTTP."""
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "scope": f"{resource}/.default",
        "client_assertion_type": CLIENT_ASSERTION_TYPE_JWT,
        "client_assertion": assertion,
    }
    async with https.post(f"{aad.url}/{TENANT}/oauth2/v2.0/token", data=form) as resp:
        return resp.status, await resp.json()


def assert_aadsts(
    status: int, body: dict[str, Any], expected_status: int, error: str, code: int
) -> str:
    """Check the AADSTS shape; return the message (the first line without its code)."""
    assert (status, body["error"], body["error_codes"]) == (expected_status, error, [code]), body
    assert set(body) == AADSTS_KEYS
    match = re.match(
        rf"AADSTS{code}: (.+)\r\nTrace ID: [0-9a-f-]{{36}}\r\nCorrelation ID: "
        r"[0-9a-f-]{36}\r\nTimestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$",
        body["error_description"],
        re.S,
    )
    assert match, body["error_description"]
    return match.group(1)


def token_claims(aad: AzureAdServer, token: str, resource: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token,
        aad.signer.public_key,
        algorithms=["RS256"],
        audience=resource,
        issuer=f"https://sts.windows.net/{TENANT}/",
    )
    return claims


def no_match(issuer: str, subject: str, audience: str) -> str:
    return (
        "No matching federated identity record found for presented assertion. "
        f"Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. "
        f"Assertion Audience: '{audience}'. {FEDERATION_DOCS}"
    )


# ------------------------------------------------------------------ success


async def test_app_exchanges_a_service_account_token_through_msal(
    aad: AzureAdServer, issuer: OidcIssuer, cca: CcaFactory
) -> None:
    name = aad.add_federated_credential(APP, issuer=issuer.url, subject=SA)
    assert aad.federated_credentials(APP) == [
        FederatedCredential(
            name=name, issuer=issuer.url, subject=SA, audiences=(TOKEN_EXCHANGE_AUDIENCE,)
        )
    ]
    app = await cca(lambda: issuer.mint(SA))

    result = await acquire(app, ARM)
    assert result.get("token_type") == "Bearer", result
    claims = token_claims(aad, result["access_token"], ARM)
    assert {k: claims[k] for k in ("appid", "azp", "appidacr", "idtyp", "oid", "sub", "tid")} == {
        "appid": APP,
        "azp": APP,
        "appidacr": "2",
        "idtyp": "app",
        "oid": APP_OID,
        "sub": APP_OID,
        "tid": TENANT,
    }
    assert aad.federated_issued == [(APP, SA, claims["uti"])]
    assert aad.federated_exchanges == {(APP, SA): 1}
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 1}
    assert aad.last_assertion_claims is not None
    assert aad.last_assertion_claims["sub"] == SA
    assert aad.last_assertion_header == {
        "alg": "RS256",
        "typ": "JWT",
        "kid": issuer.signing_kid,
    }

    # A second exchange (another resource: MSAL's cache does not answer it) fetches nothing.
    vault = await acquire(app, VAULT)
    vault_claims = token_claims(aad, vault["access_token"], VAULT)
    assert vault_claims["uti"] != claims["uti"]
    assert aad.federated_issued[1] == (APP, SA, vault_claims["uti"])
    assert aad.federated_exchanges == {(APP, SA): 2}
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 1}
    assert issuer.requests == {"/.well-known/openid-configuration": 1, "/openid/v1/jwks": 1}
    assert aad.issued == {(APP, ARM): 1, (APP, VAULT): 1}


async def test_managed_identity_tokens_map_back_to_service_accounts(
    aad: AzureAdServer, issuer: OidcIssuer, cca: CcaFactory, https: aiohttp.ClientSession
) -> None:
    aad.add_federated_credential(MI, issuer=issuer.url, subject=SA, name="api")
    aad.add_federated_credential(MI, issuer=issuer.url, subject=SA_OTHER, name="worker")
    tokens = {}
    for subject in (SA, SA_OTHER):
        app = await cca(functools.partial(issuer.mint, subject), client_id=MI)
        result = await acquire(app, VAULT)
        assert "access_token" in result, result
        tokens[subject] = result["access_token"]

    by_uti = {uti: subject for client_id, subject, uti in aad.federated_issued if client_id == MI}
    for subject, token in tokens.items():
        claims = token_claims(aad, token, VAULT)
        assert by_uti[claims["uti"]] == subject
        assert (claims["appid"], claims["oid"], claims["idtyp"], claims["appidacr"]) == (
            MI,
            MI_OID,
            "app",
            "2",
        )
    assert aad.federated_exchanges == {(MI, SA): 1, (MI, SA_OTHER): 1}
    # One issuer, fetched once for both identities' exchanges.
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 1}

    # A managed identity has no secret, and is no resource.
    async with https.post(
        f"{aad.url}/{TENANT}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": MI,
            "scope": f"{ARM}/.default",
            "client_secret": "anything",
        },
    ) as resp:
        assert_aadsts(resp.status, await resp.json(), 401, "invalid_client", 7000215)
    status, body = await exchange(https, aad, issuer.mint(SA), client_id=MI, resource=MI)
    assert_aadsts(status, body, 400, "invalid_resource", 500011)


async def test_concurrent_first_exchanges_fetch_the_issuer_once(
    aad: AzureAdServer, issuer: OidcIssuer, https: aiohttp.ClientSession
) -> None:
    aad.add_federated_credential(APP, issuer=issuer.url, subject=SA)
    aad.add_federated_credential(MI, issuer=issuer.url, subject=SA)
    results = await asyncio.gather(
        *(exchange(https, aad, issuer.mint(SA), client_id=c) for c in [APP, MI] * 4)
    )
    assert [status for status, _ in results] == [200] * 8, results
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 1}
    assert aad.federated_exchanges == {(APP, SA): 4, (MI, SA): 4}
    assert len({uti for _, _, uti in aad.federated_issued}) == 8


# ------------------------------------------------------------------ rejections


@pytest.mark.parametrize(
    "case",
    [
        "other-issuer",
        "issuer-trailing-slash",
        "subject-case",
        "other-subject",
        "audience",
        "no-audience",
    ],
)
async def test_no_matching_federated_credential_is_aadsts70021(
    aad: AzureAdServer, issuer: OidcIssuer, https: aiohttp.ClientSession, case: str
) -> None:
    aad.add_federated_credential(APP, issuer=issuer.url, subject=SA)
    iss, sub, aud = issuer.url, SA, [TOKEN_EXCHANGE_AUDIENCE]
    if case == "other-issuer":
        iss = "https://oidc.prod-aks.azure.com/some-other-cluster/"
    elif case == "issuer-trailing-slash":
        iss = issuer.url + "/"
    elif case == "subject-case":
        sub = SA.upper()
    elif case == "other-subject":
        sub = SA_OTHER
    elif case == "audience":
        aud = ["api://SomethingElse", "https://kubernetes.default.svc"]
    else:
        aud = []
    status, body = await exchange(https, aad, issuer.mint(sub, issuer=iss, audiences=aud))
    message = assert_aadsts(status, body, 400, "invalid_request", 70021)
    assert message == no_match(iss, sub, ",".join(aud))
    assert aad.federated_exchanges == {(APP, sub): 1}
    assert aad.issuer_fetches == {}  # nothing is fetched for an assertion no FIC accepts
    assert aad.issued == {}


async def test_unknown_client_is_aadsts700016_before_anything_else(
    aad: AzureAdServer, issuer: OidcIssuer, https: aiohttp.ClientSession
) -> None:
    stranger = "00000000-1111-4222-8333-444444444444"
    status, body = await exchange(https, aad, issuer.mint(SA), client_id=stranger)
    message = assert_aadsts(status, body, 400, "unauthorized_client", 700016)
    assert message.startswith(
        f"Application with identifier '{stranger}' was not found in the directory '{TENANT}'."
    )
    assert aad.federated_exchanges == {(stranger, SA): 1}
    assert aad.issuer_fetches == {}


@pytest.mark.parametrize(
    ("case", "status", "error", "code"),
    [
        ("ok", 200, None, None),
        ("nbf-within-skew", 200, None, None),
        ("wrong-key", 401, "invalid_client", 700027),
        ("unknown-kid", 401, "invalid_client", 700027),
        ("hs256", 401, "invalid_client", 700027),
        ("none-alg", 401, "invalid_client", 700027),
        ("expired", 400, "invalid_client", 700024),
        ("not-yet-valid", 400, "invalid_client", 700024),
    ],
)
async def test_signature_and_time_range_are_checked(
    aad: AzureAdServer,
    issuer: OidcIssuer,
    https: aiohttp.ClientSession,
    case: str,
    status: int,
    error: str | None,
    code: int | None,
) -> None:
    aad.add_federated_credential(APP, issuer=issuer.url, subject=SA)
    kid = issuer.signing_kid
    if case == "ok":
        assertion = issuer.mint()
    elif case == "nbf-within-skew":
        assertion = issuer.mint(nbf_in=240)
    elif case == "wrong-key":  # a published kid, another key's signature
        rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        assertion = issuer.mint(key=rogue)
    elif case == "unknown-kid":
        assertion = issuer.mint(kid="not-published")
    elif case == "hs256":
        assertion = issuer.mint(algorithm="HS256")
    elif case == "none-alg":
        assertion = jwt.encode(
            jwt.decode(issuer.mint(), options={"verify_signature": False}),
            None,
            algorithm="none",
            headers={"kid": kid},
        )
    elif case == "expired":
        assertion = issuer.mint(exp_in=-1)
    else:
        assertion = issuer.mint(nbf_in=600)

    got_status, body = await exchange(https, aad, assertion)
    assert aad.federated_exchanges == {(APP, SA): 1}
    # The issuer is fetched (once) before the signature can be checked.
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 1}
    if code is None:
        assert got_status == 200, body
        assert len(aad.federated_issued) == 1
        return
    assert error is not None
    message = assert_aadsts(got_status, body, status, error, code)
    assert aad.issued == {} and aad.federated_issued == []
    if case == "wrong-key":
        assert message == (
            "Client assertion failed signature validation. [Reason - The provided signature "
            "value did not match the expected signature value., Thumbprint of key used by "
            f"client: '{kid}']"
        )
    elif case == "unknown-kid":
        assert message == (
            "Client assertion failed signature validation. [Reason - The key was not found., "
            "Thumbprint of key used by client: 'not-published']"
        )
    elif case in ("hs256", "none-alg"):
        alg = "HS256" if case == "hs256" else "none"
        assert message == (
            "Client assertion failed signature validation. [Reason - The signing algorithm "
            f"'{alg}' is not supported.]"
        )
    else:
        assert re.fullmatch(
            r"Client assertion is not within its valid time range\. Current time: "
            r"(\S+), assertion valid from (\S+), expiry time of assertion (\S+)\. Review the "
            r"documentation at https://docs\.microsoft\.com/azure/active-directory/develop/"
            r"active-directory-certificate-credentials \.",
            message,
        ), message
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", message)


@pytest.mark.parametrize(
    "case",
    [
        "issuer-down",
        "untrusted-certificate",
        "http-issuer",
        "discovery-404",
        "document-issuer-mismatch",
        "jwks-500",
        "jwks-not-json",
        "jwks-without-keys",
    ],
)
async def test_issuer_fetch_failures_are_aadsts50166_and_not_cached(
    aad: AzureAdServer,
    issuer: OidcIssuer,
    https: aiohttp.ClientSession,
    case: str,
) -> None:
    iss = issuer.url
    other: OidcIssuer | None = None
    if case == "issuer-down":
        other = OidcIssuer(CertificateAuthority())
        await other.start()
        await other.stop()
        iss = other.url
    elif case == "untrusted-certificate":
        other = OidcIssuer(CertificateAuthority("some other CA"))
        await other.start()
        iss = other.url
    elif case == "http-issuer":
        iss = f"http://127.0.0.1:{issuer.port}"
    elif case == "discovery-404":
        issuer.discovery_status = 404
    elif case == "document-issuer-mismatch":
        issuer.document_issuer = issuer.url + "/"
    elif case == "jwks-500":
        issuer.jwks_status = 500
    elif case == "jwks-not-json":
        issuer.jwks_body = "<html>not a key set</html>"
    else:
        issuer.jwks_body = '{"issuer": "no keys here"}'
    aad.add_federated_credential(APP, issuer=iss, subject=SA)
    try:
        status, body = await exchange(https, aad, issuer.mint(issuer=iss))
    finally:
        if other is not None:
            await other.stop()
    message = assert_aadsts(status, body, 400, "invalid_request", 50166)
    assert message == "Request to External OIDC endpoint failed."
    assert aad.issued == {}
    if case == "http-issuer":
        assert aad.issuer_fetches == {}  # never fetched over plain HTTP
        return

    # Once the issuer is repaired, the next exchange fetches again and succeeds.
    if case in ("issuer-down", "untrusted-certificate"):
        aad.add_federated_credential(APP, issuer=issuer.url, subject=SA_OTHER)
        iss = issuer.url
        assertion = issuer.mint(SA_OTHER)
    else:
        issuer.discovery_status = issuer.jwks_status = 200
        issuer.document_issuer = issuer.jwks_body = None
        assertion = issuer.mint()
    status, body = await exchange(https, aad, assertion)
    assert status == 200, body
    assert aad.issuer_fetches[f"{iss}/.well-known/openid-configuration"] >= 1


async def test_unknown_kid_refetches_the_jwks_once_per_interval(
    aad: AzureAdServer, issuer: OidcIssuer, https: aiohttp.ClientSession
) -> None:
    aad.add_federated_credential(APP, issuer=issuer.url, subject=SA)
    status, body = await exchange(https, aad, issuer.mint())
    assert status == 200, body
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 1}

    # The API server rotates its service-account key: the cached JWKS lacks the new kid,
    # so Entra ID refetches it (not the discovery document) once and accepts the token.
    old_kid = issuer.signing_kid
    new_kid = issuer.rotate()
    status, body = await exchange(https, aad, issuer.mint())
    assert status == 200, body
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 2}
    status, body = await exchange(https, aad, issuer.mint())  # now cached
    assert status == 200, body
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 2}

    # Another unknown kid within 10 s of that refetch: no new fetch, AADSTS700027.
    status, body = await exchange(https, aad, issuer.mint(kid=old_kid, key=None))
    message = assert_aadsts(status, body, 401, "invalid_client", 700027)
    assert "The key was not found." in message and old_kid in message
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 2}

    # Once the interval has passed (here: set to zero), an unknown kid refetches again.
    aad.jwks_refetch_interval = 0
    status, body = await exchange(https, aad, issuer.mint(kid="never-published"))
    assert_aadsts(status, body, 401, "invalid_client", 700027)
    assert aad.issuer_fetches == {issuer.discovery_url: 1, issuer.jwks_url: 3}
    assert issuer.signing_kid == new_kid


async def test_removing_a_federated_credential_takes_effect_on_the_next_request(
    aad: AzureAdServer, issuer: OidcIssuer, cca: CcaFactory
) -> None:
    name = aad.add_federated_credential(APP, issuer=issuer.url, subject=SA, name="payments-api")
    assert name == "payments-api"
    app = await cca(lambda: issuer.mint(SA))
    assert "access_token" in await acquire(app, ARM)

    aad.remove_federated_credential(APP, "Payments-API")  # names are case-insensitive
    assert aad.federated_credentials(APP) == []
    result = await acquire(app, VAULT)
    assert (result.get("error"), result.get("error_codes")) == ("invalid_request", [70021])
    assert result["error_description"].startswith(
        "AADSTS70021: " + no_match(issuer.url, SA, TOKEN_EXCHANGE_AUDIENCE) + "\r\n"
    )

    aad.add_federated_credential(APP, issuer=issuer.url, subject=SA)
    assert "access_token" in await acquire(app, VAULT)
    assert aad.federated_exchanges == {(APP, SA): 3}
    assert [s for _, s, _ in aad.federated_issued] == [SA, SA]


async def test_certificate_assertions_keep_their_own_path(
    aad: AzureAdServer,
    issuer: OidcIssuer,
    app_cert: ClientCertificate,
    ca_bundle: Path,
    https: aiohttp.ClientSession,
) -> None:
    aad.add_federated_credential(APP, issuer=issuer.url, subject=SA)
    session = requests.Session()
    session.verify = str(ca_bundle)
    session.trust_env = False
    try:
        app = await asyncio.to_thread(
            msal.ConfidentialClientApplication,
            APP,
            client_credential={
                "private_key": app_cert.key_pem.decode(),
                "thumbprint": app_cert.thumbprint_sha1.hex(),
            },
            authority=f"{aad.url}/{TENANT}",
            instance_discovery=False,
            http_client=session,
        )
        result = await acquire(app, ARM)
    finally:
        session.close()
    assert token_claims(aad, result["access_token"], ARM)["appidacr"] == "2"

    # A certificate assertion (registered x5t) with a foreign iss is still judged as one.
    now = time.time()
    foreign = jwt.encode(
        {
            "iss": issuer.url,
            "sub": SA,
            "aud": f"{aad.url}/{TENANT}/oauth2/v2.0/token",
            "exp": now + 600,
            "nbf": now,
            "jti": str(uuid.uuid4()),
        },
        app_cert.key_pem,
        algorithm="RS256",
        headers={"x5t": jwt.utils.base64url_encode(app_cert.thumbprint_sha1).decode()},
    )
    status, body = await exchange(https, aad, foreign)
    assert_aadsts(status, body, 401, "invalid_client", 700021)
    assert aad.federated_exchanges == {}
    assert aad.issuer_fetches == {}


# ------------------------------------------------------------------ registry


async def test_federated_credential_registry_follows_entra_limits(
    aad: AzureAdServer, issuer: OidcIssuer
) -> None:
    names = [
        aad.add_federated_credential(APP, issuer=issuer.url, subject=f"{SA}-{i}") for i in range(20)
    ]
    assert names[:2] == ["fic-1", "fic-2"] and len(set(names)) == 20
    with pytest.raises(ValueError, match="20 federated identity credentials"):
        aad.add_federated_credential(APP, issuer=issuer.url, subject="one-too-many")
    aad.remove_federated_credential(APP, "fic-3")
    assert aad.add_federated_credential(APP, issuer=issuer.url, subject="fits-again") != "fic-3"
    assert len(aad.federated_credentials(APP)) == 20

    aad.add_federated_credential(MI, issuer=issuer.url, subject=SA, name="x")
    with pytest.raises(ValueError, match="named"):
        aad.add_federated_credential(MI, issuer=issuer.url, subject=SA_OTHER, name="X")
    with pytest.raises(ValueError, match="issuer"):
        aad.add_federated_credential(MI, issuer=issuer.url, subject=SA)
    with pytest.raises(ValueError, match="audience"):
        aad.add_federated_credential(MI, issuer=issuer.url, subject="s", audiences=())
    # Same subject under another issuer is a different credential.
    aad.add_federated_credential(MI, issuer=issuer.url + "/", subject=SA, audiences=["a", "b"])
    assert [c.audiences for c in aad.federated_credentials(MI)] == [
        (TOKEN_EXCHANGE_AUDIENCE,),
        ("a", "b"),
    ]
    with pytest.raises(KeyError):
        aad.remove_federated_credential(MI, "no-such-name")
    with pytest.raises(KeyError):
        aad.add_federated_credential("nobody", issuer=issuer.url, subject=SA)
    with pytest.raises(ValueError, match="managed identity"):
        aad.set_secrets(MI, ["s3cret"])
    assert aad.object_id(MI) == MI_OID
