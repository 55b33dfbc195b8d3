"""The Azure AD and IMDS emulators against the real clients.

The daemon's integration tests trust these emulators to speak the real wire
protocols, so here the emulators are driven by unmodified MSAL (and
azure-identity) and by raw HTTP for the error matrix.  MSAL is synchronous:
it runs in a worker thread while the emulator serves on the test's loop.
Nothing here talks to 169.254.169.254: managed-identity clients are pointed at
the emulator with ``AZURE_POD_IDENTITY_AUTHORITY_HOST``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import msal
import pytest
import requests
from yarl import URL

from nmi_sandbox.aad import CLIENT_ASSERTION_TYPE_JWT, AzureAdServer, TokenSigner
from nmi_sandbox.imds import ImdsServer
from nmi_sandbox.tls import CertificateAuthority, ClientCertificate, make_client_certificate

TENANT = "0b1c2d3e-4f50-4a61-8b72-93a4b5c6d7e8"
OTHER_TENANT = "9e8d7c6b-5a49-4837-a625-14f3e2d1c0b9"
CLIENT = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d"
OBJECT_ID = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9"
SECRET = "s3cr3t~value.for-the-emulator"
ARM = "https://management.azure.com"
VAULT = "https://vault.azure.net"

UA1 = (
    "11111111-aaaa-4bbb-8ccc-000000000001",
    "22222222-aaaa-4bbb-8ccc-000000000001",
    "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/"
    "userAssignedIdentities/ua1",
)
UA2 = (
    "11111111-aaaa-4bbb-8ccc-000000000002",
    "22222222-aaaa-4bbb-8ccc-000000000002",
    "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/"
    "userAssignedIdentities/ua2",
)
TOKEN_KEYS = {
    "access_token",
    "client_id",
    "expires_in",
    "expires_on",
    "ext_expires_in",
    "not_before",
    "resource",
    "token_type",
}
AADSTS_KEYS = {
    "error",
    "error_description",
    "error_codes",
    "timestamp",
    "trace_id",
    "correlation_id",
    "error_uri",
}

CcaFactory = Callable[..., Awaitable[Any]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_url(aad: AzureAdServer, tenant: str = TENANT) -> str:
    return f"{aad.url}/{tenant}/oauth2/v2.0/token"


def make_assertion(
    cert: ClientCertificate,
    *,
    aud: str,
    iss: str = CLIENT,
    exp_in: float = 600,
    nbf_in: float = 0,
    jti: str | None = "random",
    sign_with: ClientCertificate | None = None,
    algorithm: str = "RS256",
) -> str:
    now = time.time()
    claims: dict[str, Any] = {
        "aud": aud,
        "iss": iss,
        "sub": iss,
        "exp": now + exp_in,
        "iat": now + nbf_in,
        "nbf": now + nbf_in,
    }
    if jti is not None:
        claims["jti"] = str(uuid.uuid4()) if jti == "random" else jti
    headers = (
        {"x5t#S256": b64url(cert.thumbprint_sha256)}
        if algorithm == "PS256"
        else {"x5t": b64url(cert.thumbprint_sha1)}
    )
    return jwt.encode(claims, (sign_with or cert).key_pem, algorithm=algorithm, headers=headers)


# ----------------------------------------------------------------- fixtures


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
def sp_cert() -> ClientCertificate:
    return make_client_certificate("nmi-test-sp")


@pytest.fixture(scope="module")
def rogue_cert() -> ClientCertificate:
    return make_client_certificate("not-registered")


@pytest.fixture
async def aad(
    ca: CertificateAuthority, sp_cert: ClientCertificate, signer: TokenSigner
) -> AsyncIterator[AzureAdServer]:
    server = AzureAdServer(ca=ca, signer=signer)
    server.add_tenant(TENANT)
    server.add_tenant(OTHER_TENANT)
    server.add_app(
        tenant_id=TENANT,
        client_id=CLIENT,
        secrets=[SECRET],
        certificates=[sp_cert.cert_pem],
        object_id=OBJECT_ID,
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def cca(aad: AzureAdServer, ca_bundle: Path) -> Iterator[CcaFactory]:
    """Build a real ConfidentialClientApplication (in a thread: it does discovery)."""
    sessions: list[requests.Session] = []

    async def factory(
        credential: Any, *, client_id: str = CLIENT, tenant: str = TENANT, **kwargs: Any
    ) -> Any:
        session = requests.Session()
        session.verify = str(ca_bundle)
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override session.verify
        sessions.append(session)
        kwargs.setdefault("instance_discovery", False)
        build = functools.partial(
            msal.ConfidentialClientApplication,
            client_id,
            authority=f"{aad.url}/{tenant}",
            client_credential=credential,
            http_client=session,
            **kwargs,
        )
        return await asyncio.to_thread(build)

    yield factory
    for session in sessions:
        session.close()


async def acquire(app: Any, resource: str) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(
        app.acquire_token_for_client, scopes=[f"{resource}/.default"]
    )
    return result


@pytest.fixture
async def https(ca: CertificateAuthority) -> AsyncIterator[aiohttp.ClientSession]:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def post_token(
    https: aiohttp.ClientSession,
    aad: AzureAdServer,
    data: dict[str, str],
    *,
    tenant: str = TENANT,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    async with https.post(token_url(aad, tenant), data=data, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


def secret_form(**overrides: str) -> dict[str, str]:
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "scope": f"{ARM}/.default",
        "client_secret": SECRET,
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v != ""}


def assert_aadsts(
    status: int, body: dict[str, Any], expected_status: int, error: str, code: int
) -> None:
    assert (status, body["error"], body["error_codes"]) == (expected_status, error, [code]), body
    assert set(body) == AADSTS_KEYS
    assert re.match(
        rf"AADSTS{code}: .+\r\nTrace ID: [0-9a-f-]{{36}}\r\nCorrelation ID: "
        r"[0-9a-f-]{36}\r\nTimestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$",
        body["error_description"],
        re.S,
    ), body["error_description"]
    assert body["error_uri"].endswith(f"/error?code={code}")


# ------------------------------------------------------------------ Azure AD


async def test_secret_grant_issues_a_verifiable_v1_app_token(
    aad: AzureAdServer, cca: CcaFactory, https: aiohttp.ClientSession
) -> None:
    app = await cca(SECRET)
    result = await acquire(app, ARM)
    assert result["token_type"] == "Bearer"
    assert result["expires_in"] == 3599
    assert result["token_source"] == "identity_provider"

    async with https.get(f"{aad.url}/{TENANT}/v2.0/.well-known/openid-configuration") as resp:
        config = await resp.json()
    assert config["token_endpoint"] == token_url(aad)
    assert config["issuer"] == f"{aad.url}/{TENANT}/v2.0"
    assert config["authorization_endpoint"] == f"{aad.url}/{TENANT}/oauth2/v2.0/authorize"
    assert config["device_authorization_endpoint"].endswith("/oauth2/v2.0/devicecode")
    async with https.get(config["jwks_uri"]) as resp:
        jwks = jwt.PyJWKSet.from_dict(await resp.json())
    kid = jwt.get_unverified_header(result["access_token"])["kid"]
    claims = jwt.decode(
        result["access_token"],
        jwks[kid].key,
        algorithms=["RS256"],
        audience=ARM,
        issuer=f"https://sts.windows.net/{TENANT}/",
    )
    assert {
        k: claims[k] for k in ("appid", "azp", "oid", "sub", "tid", "idtyp", "ver", "appidacr")
    } == {
        "appid": CLIENT,
        "azp": CLIENT,
        "oid": OBJECT_ID,
        "sub": OBJECT_ID,
        "tid": TENANT,
        "idtyp": "app",
        "ver": "1.0",
        "appidacr": "1",
    }
    assert claims["uti"] and abs(claims["exp"] - time.time() - 3599) < 30
    assert claims["nbf"] <= time.time()

    again = await acquire(app, ARM)  # served from MSAL's cache
    assert again["token_source"] == "cache"
    slash = await acquire(app, "https://vault.azure.net/")  # scope ".../ /.default"
    assert jwt.decode(slash["access_token"], options={"verify_signature": False})["aud"] == (
        "https://vault.azure.net/"
    )
    assert aad.token_requests == {(CLIENT, ARM): 1, (CLIENT, "https://vault.azure.net/"): 1}
    assert aad.issued == aad.token_requests
    assert aad.requests_total == 2


async def test_wrong_secret_is_invalid_client_7000215(
    aad: AzureAdServer, cca: CcaFactory, https: aiohttp.ClientSession
) -> None:
    result = await acquire(await cca("not-the-secret"), ARM)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret")
    assert SECRET not in result["error_description"]

    request_id = str(uuid.uuid4())
    status, body, headers = await post_token(
        https, aad, secret_form(client_secret="wrong"), headers={"client-request-id": request_id}
    )
    assert_aadsts(status, body, 401, "invalid_client", 7000215)
    assert body["correlation_id"] == request_id == headers["client-request-id"]
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert "Retry-After" not in headers
    assert aad.issued == {}
    assert aad.token_requests == {(CLIENT, ARM): 2}


async def test_client_secret_in_http_basic_auth(
    aad: AzureAdServer, https: aiohttp.ClientSession
) -> None:
    def basic(user: str, password: str) -> dict[str, str]:
        return {
            "Authorization": "Basic "
            + base64.b64encode(f"{quote_plus(user)}:{quote_plus(password)}".encode()).decode()
        }

    form = {"grant_type": "client_credentials", "scope": f"{VAULT}/.default"}
    async with https.post(token_url(aad), data=form, headers=basic(CLIENT, SECRET)) as resp:
        assert resp.status == 200
        assert set(await resp.json()) == {
            "token_type",
            "expires_in",
            "ext_expires_in",
            "access_token",
        }
    async with https.post(token_url(aad), data=form, headers=basic(CLIENT, "wr:ng")) as resp:
        assert_aadsts(resp.status, await resp.json(), 401, "invalid_client", 7000215)


@pytest.mark.parametrize("form", ["thumbprint", "public_certificate"])
async def test_certificate_assertion_is_verified_and_accepted(
    aad: AzureAdServer, cca: CcaFactory, sp_cert: ClientCertificate, form: str
) -> None:
    credential: dict[str, str] = {"private_key": sp_cert.key_pem.decode()}
    if form == "thumbprint":
        credential["thumbprint"] = sp_cert.thumbprint_sha1.hex()
    else:
        credential["public_certificate"] = sp_cert.cert_pem.decode()
    result = await acquire(await cca(credential), VAULT)
    assert "access_token" in result, result
    claims = jwt.decode(
        result["access_token"], aad.signer.public_key, algorithms=["RS256"], audience=VAULT
    )
    assert claims["appidacr"] == "2"
    assert aad.last_assertion_claims is not None and aad.last_assertion_header is not None
    assert aad.last_assertion_claims["aud"] == token_url(aad)
    assert aad.last_assertion_claims["iss"] == aad.last_assertion_claims["sub"] == CLIENT
    if form == "thumbprint":
        assert aad.last_assertion_header["alg"] == "RS256"
        assert "x5t" in aad.last_assertion_header
    else:
        assert aad.last_assertion_header["alg"] == "PS256"
        assert "x5t#S256" in aad.last_assertion_header
        assert "x5c" in aad.last_assertion_header


async def test_assertion_from_unregistered_or_spoofed_certificate_is_rejected(
    aad: AzureAdServer,
    cca: CcaFactory,
    https: aiohttp.ClientSession,
    sp_cert: ClientCertificate,
    rogue_cert: ClientCertificate,
) -> None:
    rogue = {
        "private_key": rogue_cert.key_pem.decode(),
        "thumbprint": rogue_cert.thumbprint_sha1.hex(),
    }
    result = await acquire(await cca(rogue), VAULT)
    assert (result["error"], result["error_codes"]) == ("invalid_client", [700027])
    assert "not registered on application" in result["error_description"]

    # The registered thumbprint in the header, but signed by another key.
    spoofed = make_assertion(sp_cert, aud=token_url(aad), sign_with=rogue_cert)
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "scope": f"{ARM}/.default",
        "client_assertion_type": CLIENT_ASSERTION_TYPE_JWT,
        "client_assertion": spoofed,
    }
    status, body, _ = await post_token(https, aad, form)
    assert_aadsts(status, body, 401, "invalid_client", 700027)
    assert "invalid signature" in body["error_description"]
    assert aad.issued == {}


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({}, 200, None),
        ({"algorithm": "PS256"}, 200, None),
        ({"aud": "v1"}, 200, None),
        ({"exp_in": -900}, 401, 700024),
        ({"nbf_in": 900}, 401, 700024),
        ({"aud": "other-tenant"}, 401, 700023),
        ({"iss": "someone-else"}, 401, 700021),
        ({"jti": None}, 401, 50027),
    ],
    ids=[
        "ok",
        "ps256",
        "v1-audience",
        "expired",
        "not-yet-valid",
        "wrong-audience",
        "wrong-issuer",
        "no-jti",
    ],
)
async def test_assertion_claims_are_checked(
    aad: AzureAdServer,
    https: aiohttp.ClientSession,
    sp_cert: ClientCertificate,
    kwargs: dict[str, Any],
    status: int,
    code: int | None,
) -> None:
    audiences = {
        "v1": f"{aad.url}/{TENANT}/oauth2/token",
        "other-tenant": token_url(aad, OTHER_TENANT),
    }
    kwargs = dict(kwargs)
    kwargs["aud"] = audiences.get(kwargs.get("aud", ""), token_url(aad))
    assertion = make_assertion(sp_cert, **kwargs)
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "scope": f"{ARM}/.default",
        "client_assertion_type": CLIENT_ASSERTION_TYPE_JWT,
        "client_assertion": assertion,
    }
    got_status, body, _ = await post_token(https, aad, form)
    if code is None:
        assert got_status == 200, body
    else:
        assert_aadsts(got_status, body, status, "invalid_client", code)


async def test_assertion_reuse_follows_entra_and_replay_rejection_is_a_knob(
    aad: AzureAdServer,
    cca: CcaFactory,
    https: aiohttp.ClientSession,
    sp_cert: ClientCertificate,
) -> None:
    # MSAL reuses one assertion for ~9 minutes across resources; Entra ID accepts that.
    app = await cca(
        {"private_key": sp_cert.key_pem.decode(), "thumbprint": sp_cert.thumbprint_sha1.hex()}
    )
    assert "access_token" in await acquire(app, ARM)
    assert aad.last_assertion_claims is not None
    first_jti = aad.last_assertion_claims["jti"]
    assert "access_token" in await acquire(app, VAULT)
    assert aad.last_assertion_claims["jti"] == first_jti

    aad.reject_replayed_assertions = True
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "scope": f"{ARM}/.default",
        "client_assertion_type": CLIENT_ASSERTION_TYPE_JWT,
        "client_assertion": make_assertion(sp_cert, aud=token_url(aad)),
    }
    status, body, _ = await post_token(https, aad, form)
    assert status == 200, body
    status, body, _ = await post_token(https, aad, form)
    assert_aadsts(status, body, 401, "invalid_client", 700024)
    assert "already used" in body["error_description"]


async def test_unknown_tenant(
    aad: AzureAdServer, cca: CcaFactory, https: aiohttp.ClientSession
) -> None:
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        await cca(SECRET, tenant="no-such-tenant")
    async with https.get(f"{aad.url}/no-such-tenant/v2.0/.well-known/openid-configuration") as r:
        assert_aadsts(r.status, await r.json(), 400, "invalid_tenant", 90002)
    status, body, _ = await post_token(https, aad, secret_form(), tenant="no-such-tenant")
    assert_aadsts(status, body, 400, "invalid_request", 90002)


async def test_unknown_resource_through_msal(aad: AzureAdServer, cca: CcaFactory) -> None:
    result = await acquire(await cca(SECRET), "https://nothing.example.com")
    assert (result["error"], result["error_codes"]) == ("invalid_resource", [500011])
    aad.add_resource("https://nothing.example.com")
    assert "access_token" in await acquire(await cca(SECRET), "https://nothing.example.com")


@pytest.mark.parametrize(
    ("form", "status", "error", "code"),
    [
        (
            secret_form(scope="https://nothing.example.com/.default"),
            400,
            "invalid_resource",
            500011,
        ),
        (secret_form(scope=f"{ARM}/user_impersonation"), 400, "invalid_scope", 70011),
        (secret_form(scope=f"{ARM}/.default {VAULT}/.default"), 400, "invalid_scope", 70011),
        (secret_form(grant_type="password"), 400, "unsupported_grant_type", 70003),
        (secret_form(grant_type=""), 400, "invalid_request", 900144),
        (secret_form(scope=""), 400, "invalid_request", 900144),
        (secret_form(client_id=""), 400, "invalid_request", 900144),
        (
            secret_form(client_id="00000000-0000-0000-0000-000000000000"),
            400,
            "unauthorized_client",
            700016,
        ),
        (secret_form(client_secret=""), 401, "invalid_client", 7000218),
        (secret_form(scope=f"api://{CLIENT}/.default"), 200, None, None),
        (secret_form(scope=f"{ARM}//.default"), 200, None, None),
    ],
    ids=[
        "unknown-resource",
        "not-default-scope",
        "two-scopes",
        "password-grant",
        "no-grant-type",
        "no-scope",
        "no-client-id",
        "unknown-client",
        "no-credential",
        "app-id-uri-resource",
        "trailing-slash-resource",
    ],
)
async def test_token_request_validation(
    aad: AzureAdServer,
    https: aiohttp.ClientSession,
    form: dict[str, str],
    status: int,
    error: str | None,
    code: int | None,
) -> None:
    got_status, body, headers = await post_token(https, aad, form)
    if code is None:
        assert got_status == 200, body
    else:
        assert error is not None
        assert_aadsts(got_status, body, status, error, code)
        assert "Retry-After" not in headers


async def test_token_endpoint_edge_cases(aad: AzureAdServer, https: aiohttp.ClientSession) -> None:
    async with https.get(token_url(aad)) as resp:
        assert_aadsts(resp.status, await resp.json(), 400, "invalid_request", 900561)
    status, body, _ = await post_token(https, aad, secret_form(), tenant="common")
    assert_aadsts(status, body, 400, "invalid_request", 50059)
    # An app of one tenant is unknown in another.
    status, body, _ = await post_token(https, aad, secret_form(), tenant=OTHER_TENANT)
    assert_aadsts(status, body, 400, "unauthorized_client", 700016)


async def test_secret_rotation(aad: AzureAdServer, cca: CcaFactory) -> None:
    assert "access_token" in await acquire(await cca(SECRET), ARM)
    aad.set_secrets(CLIENT, ["rotated-secret"])
    old = await acquire(await cca(SECRET), ARM)
    assert old["error_codes"] == [7000215]
    assert "access_token" in await acquire(await cca("rotated-secret"), ARM)
    aad.set_certificates(CLIENT, [])
    assert aad.issued[(CLIENT, ARM)] == 2


async def test_latency_is_applied_without_blocking_the_loop(
    aad: AzureAdServer, cca: CcaFactory
) -> None:
    app = await cca(SECRET)
    aad.latency = 0.4
    loop = asyncio.get_running_loop()
    started = loop.time()
    pending = asyncio.ensure_future(acquire(app, ARM))
    await aad.wait_for_requests(1)
    assert aad.issued == {}  # the request is in, the answer is held back
    result = await pending
    assert "access_token" in result
    assert loop.time() - started >= 0.4
    await aad.wait_for(lambda: aad.issued[(CLIENT, ARM)] == 1, timeout=1)


async def test_fail_next_and_throttle_next(
    aad: AzureAdServer, cca: CcaFactory, https: aiohttp.ClientSession
) -> None:
    aad.fail_next(1)
    status, body, headers = await post_token(https, aad, secret_form())
    assert_aadsts(status, body, 500, "server_error", 50000)
    assert "Retry-After" not in headers

    aad.fail_next(1, status=503, retry_after=7)
    status, body, headers = await post_token(https, aad, secret_form())
    assert (status, headers["Retry-After"], body["error"]) == (503, "7", "temporarily_unavailable")

    aad.throttle_next(2, retry_after=2)
    for _ in range(2):
        status, body, headers = await post_token(https, aad, secret_form())
        assert (status, headers["Retry-After"]) == (429, "2")
        assert set(body) == AADSTS_KEYS
    status, body, _ = await post_token(https, aad, secret_form())
    assert status == 200

    aad.throttle_next(1)
    result = await acquire(await cca(SECRET), VAULT)
    assert result["error"] == "temporarily_unavailable"
    assert aad.requests_total == 6
    assert aad.issued == {(CLIENT, ARM): 1}


async def test_outage(aad: AzureAdServer, cca: CcaFactory, https: aiohttp.ClientSession) -> None:
    aad.outage = True
    status, body, headers = await post_token(https, aad, secret_form())
    assert_aadsts(status, body, 503, "temporarily_unavailable", 90033)
    assert headers["Retry-After"] == "5"
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):  # MSAL raises on 5xx
        await acquire(await cca(SECRET), ARM)
    aad.outage = False
    # A new app: MSAL replays a 503 from its own throttle cache for Retry-After seconds.
    assert "access_token" in await acquire(await cca(SECRET), ARM)


async def test_instance_discovery(
    aad: AzureAdServer, cca: CcaFactory, https: aiohttp.ClientSession
) -> None:
    app = await cca(SECRET, instance_discovery=f"{aad.url}/common/discovery/instance")
    assert "access_token" in await acquire(app, ARM)

    query = {
        "api-version": "1.1",
        "authorization_endpoint": f"{aad.url}/{TENANT}/oauth2/v2.0/authorize",
    }
    async with https.get(f"{aad.url}/common/discovery/instance", params=query) as resp:
        payload = await resp.json()
    assert payload["tenant_discovery_endpoint"] == (
        f"{aad.url}/{TENANT}/v2.0/.well-known/openid-configuration"
    )
    assert payload["api-version"] == "1.1"
    (metadata,) = payload["metadata"]
    assert set(metadata) == {"preferred_network", "preferred_cache", "aliases"}

    query["authorization_endpoint"] = "https://login.example.org/t/oauth2/v2.0/authorize"
    async with https.get(f"{aad.url}/common/discovery/instance", params=query) as resp:
        assert_aadsts(resp.status, await resp.json(), 400, "invalid_instance", 50049)


# ---------------------------------------------------------------------- IMDS


@pytest.fixture
async def imds(signer: TokenSigner) -> AsyncIterator[ImdsServer]:
    server = ImdsServer(signer=signer)
    server.add_user_assigned(client_id=UA1[0], object_id=UA1[1], resource_id=UA1[2])
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def mi_env(monkeypatch: pytest.MonkeyPatch, imds: ImdsServer) -> None:
    """Point managed-identity clients at the emulator, never at 169.254.169.254."""
    for name in (
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "IDENTITY_SERVER_THUMBPRINT",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_AUTHORITY_HOST",
        "AZURE_TOKEN_CREDENTIALS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def imds_get(
    http: aiohttp.ClientSession,
    imds: ImdsServer,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, Any, Any]:
    url = URL(f"{imds.url}{target}", encoded=True)
    async with http.request(
        method, url, headers={"Metadata": "true"} if headers is None else headers
    ) as resp:
        text = await resp.text()
        body: Any = text if resp.content_type == "text/plain" else await resp.json()
        return resp.status, body, resp.headers


def token_target(resource: str = ARM, **params: str) -> str:
    query = "&".join(
        f"{k}={v}" for k, v in {"api-version": "2018-02-01", "resource": resource, **params}.items()
    )
    return f"/metadata/identity/oauth2/token?{query}"


async def test_msal_managed_identity_client_gets_a_token(imds: ImdsServer, mi_env: None) -> None:
    session = requests.Session()
    session.trust_env = False
    client = msal.ManagedIdentityClient(
        msal.UserAssignedManagedIdentity(client_id=UA1[0]), http_client=session
    )
    result = await asyncio.to_thread(client.acquire_token_for_client, resource=ARM)
    assert result["token_type"] == "Bearer"
    claims = jwt.decode(
        result["access_token"], imds.signer.public_key, algorithms=["RS256"], audience=ARM
    )
    assert (claims["appid"], claims["oid"], claims["xms_mirid"]) == UA1
    assert claims["iss"] == f"https://sts.windows.net/{imds.tenant_id}/"
    assert 86000 < result["expires_in"] <= 86399

    method, path_qs, headers = imds.requests[-1]
    assert method == "GET"
    assert path_qs.startswith("/metadata/identity/oauth2/token?api-version=2018-02-01")
    assert f"client_id={UA1[0]}" in path_qs
    assert headers["metadata"] == "true" and headers["x-client-SKU"] == "MSAL.Python"
    assert "X-Forwarded-For" not in headers
    assert imds.token_requests == {(UA1[0], ARM): 1}

    again = await asyncio.to_thread(client.acquire_token_for_client, resource=ARM)
    assert again["token_source"] == "cache"
    assert imds.requests_total == 1

    imds.fail_next(1, status=500)
    failed = await asyncio.to_thread(client.acquire_token_for_client, resource=VAULT)
    assert failed["error"] == "unknown"

    unknown = msal.ManagedIdentityClient(
        msal.UserAssignedManagedIdentity(client_id=UA2[0]), http_client=session
    )
    missing = await asyncio.to_thread(unknown.acquire_token_for_client, resource=ARM)
    assert missing == {"error": "invalid_request", "error_description": "Identity not found"}
    session.close()


async def test_azure_identity_managed_identity_credential(imds: ImdsServer, mi_env: None) -> None:
    from azure.identity import ManagedIdentityCredential

    imds.add_user_assigned(client_id=UA2[0], object_id=UA2[1], resource_id=UA2[2])
    credential = ManagedIdentityCredential(client_id=UA2[0])
    token = await asyncio.to_thread(credential.get_token, f"{VAULT}/.default")
    assert jwt.decode(token.token, options={"verify_signature": False})["oid"] == UA2[1]
    assert abs(token.expires_on - time.time() - 86399) < 30
    assert imds.token_requests == {(UA2[0], VAULT): 1}
    credential.close()


async def test_success_body_is_all_strings_and_tokens_are_cached(
    imds: ImdsServer, http: aiohttp.ClientSession
) -> None:
    status, first, headers = await imds_get(http, imds, token_target(f"{ARM}/"))
    assert status == 200
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Server"] == "IMDS/150.870.65.1325"
    assert set(first) == TOKEN_KEYS and all(isinstance(v, str) for v in first.values())
    assert first["resource"] == f"{ARM}/" and first["client_id"] == UA1[0]
    assert first["token_type"] == "Bearer"
    now = time.time()
    assert abs(int(first["expires_on"]) - now - int(first["expires_in"])) < 5
    assert int(first["not_before"]) <= now

    _, second, _ = await imds_get(http, imds, token_target(f"{ARM}/"))
    assert second["access_token"] == first["access_token"]
    assert second["expires_on"] == first["expires_on"]
    assert int(second["expires_in"]) <= int(first["expires_in"])
    assert (imds.minted[(UA1[0], f"{ARM}/")], imds.issued[(UA1[0], f"{ARM}/")]) == (1, 2)

    imds.cache_tokens = False
    _, third, _ = await imds_get(http, imds, token_target(f"{ARM}/"))
    assert third["access_token"] != first["access_token"]

    imds.cache_tokens = True
    imds.token_lifetime = 240  # under the 5-minute margin: never reused
    _, a, _ = await imds_get(http, imds, token_target(VAULT))
    _, b, _ = await imds_get(http, imds, token_target(VAULT))
    assert a["access_token"] != b["access_token"] and b["expires_in"] == "240"


async def test_identity_selection(imds: ImdsServer, http: aiohttp.ClientSession) -> None:
    async def pick(**params: str) -> tuple[int, dict[str, Any]]:
        status, body, _ = await imds_get(http, imds, token_target(**params))
        return status, body

    status, body = await pick()  # exactly one user-assigned identity: that one
    assert (status, body["client_id"]) == (200, UA1[0])

    imds.add_user_assigned(client_id=UA2[0], object_id=UA2[1], resource_id=UA2[2])
    assert await pick() == (
        400,
        {
            "error": "invalid_request",
            "error_description": "Multiple user assigned identities exist, please specify the "
            "clientId / resourceId of the identity in the token request",
        },
    )
    assert (await pick(client_id=UA2[0].upper()))[1]["client_id"] == UA2[0]
    assert (await pick(object_id=UA2[1]))[1]["client_id"] == UA2[0]
    assert (await pick(msi_res_id=UA2[2]))[1]["client_id"] == UA2[0]
    assert (await pick(mi_res_id=UA1[2].upper()))[1]["client_id"] == UA1[0]
    not_found = (400, {"error": "invalid_request", "error_description": "Identity not found"})
    assert await pick(client_id="33333333-0000-0000-0000-000000000000") == not_found
    status, body = await pick(client_id=UA1[0], msi_res_id=UA1[2])
    assert (status, body["error"]) == (400, "invalid_request")

    imds.set_system_assigned(
        client_id="44444444-0000-0000-0000-000000000000",
        object_id="55555555-0000-0000-0000-000000000000",
    )
    status, body = await pick()
    assert body["client_id"] == "44444444-0000-0000-0000-000000000000"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["xms_mirid"].endswith("/virtualMachineScaleSets/aks-nodepool1-12345678-vmss")

    imds.remove_user_assigned(UA2[0])
    assert await pick(client_id=UA2[0]) == not_found
    assert imds.token_requests[(UA2[0], ARM)] == 3


async def test_token_request_errors(imds: ImdsServer, http: aiohttp.ClientSession) -> None:
    no_metadata = {
        "error": "invalid_request",
        "error_description": "Required metadata header not specified",
    }
    for target in (token_target(), "/metadata/identity/oauth2/token"):
        status, body, headers = await imds_get(http, imds, target, headers={})
        assert (status, body) == (400, no_metadata)
        assert "Retry-After" not in headers
    assert (await imds_get(http, imds, token_target(), headers={"Metadata": "false"}))[:2] == (
        400,
        no_metadata,
    )

    status, body, _ = await imds_get(http, imds, f"/metadata/identity/oauth2/token?resource={ARM}")
    assert (status, body) == (
        400,
        {
            "error": "Bad request. api-version was not specified in the request. For more "
            "information refer to aka.ms/azureimds",
            "newest-versions": ["2018-02-01"],
        },
    )
    status, body, _ = await imds_get(http, imds, "/metadata/identity/oauth2/token?api-version=x")
    assert status == 400 and "newest-versions" in body
    status, body, _ = await imds_get(
        http, imds, "/metadata/identity/oauth2/token?api-version=2018-02-01"
    )
    assert (status, body["error"]) == (400, "invalid_request")

    status, body, _ = await imds_get(
        http, imds, token_target(), headers={"Metadata": "true", "X-Forwarded-For": "10.0.0.9"}
    )
    assert (status, body["error"]) == (400, "invalid_request")
    assert "X-Forwarded-For" in body["error_description"]

    status, body, headers = await imds_get(http, imds, token_target("https://nope.example.com"))
    assert (status, body["error"], body["error_codes"]) == (400, "invalid_resource", [500011])
    assert body["error_description"].startswith(
        "AADSTS500011: The resource principal named https://nope.example.com was not found"
    )
    assert "Retry-After" not in headers

    assert (await imds_get(http, imds, token_target(), method="POST"))[0] == 405
    for target in (
        "/metadata/identity/getplatformmetadata",
        "/metadata/identity/info",
        "/metadata/attested/document",
        "/somewhere/else",
    ):
        status, body, _ = await imds_get(http, imds, target)
        assert (status, body["error"]) == (404, "not_found"), target
    # msal-node's trailing slash and double leading slash are the token path too.
    for target in (
        "/metadata/identity/oauth2/token/?api-version=2018-02-01&resource=" + ARM,
        "//metadata/identity/oauth2/token/?api-version=2018-02-01&resource=" + ARM,
    ):
        assert (await imds_get(http, imds, target))[0] == 200, target
    assert imds.issued[(UA1[0], ARM)] == 2
    assert not any("X-Forwarded-For" in r.headers for r in imds.requests[-3:])


async def test_concurrency_limit_and_max_in_flight(
    imds: ImdsServer, http: aiohttp.ClientSession
) -> None:
    imds.latency = 0.5
    results = await asyncio.gather(*(imds_get(http, imds, token_target()) for _ in range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [429] * 3
    for status, body, headers in results:
        if status == 429:
            assert body == {"error": "too_many_requests", "error_description": "Too many requests"}
            assert int(headers["Retry-After"]) >= 1
    assert imds.max_in_flight == 6  # the sixth arrival saw five in flight

    imds.enforce_limits = False
    imds.max_in_flight = 0
    results = await asyncio.gather(*(imds_get(http, imds, token_target()) for _ in range(8)))
    assert [status for status, _, _ in results] == [200] * 8
    assert imds.max_in_flight == 8


async def test_rate_limit(imds: ImdsServer, http: aiohttp.ClientSession) -> None:
    statuses = [(await imds_get(http, imds, token_target()))[0] for _ in range(24)]
    assert statuses[:20] == [200] * 20
    assert 429 in statuses[20:]


async def test_imds_fail_next(imds: ImdsServer, http: aiohttp.ClientSession) -> None:
    imds.fail_next(2, status=500)
    for _ in range(2):
        status, body, headers = await imds_get(http, imds, token_target())
        assert (status, body["error"]) == (500, "unknown")
        assert "Retry-After" not in headers
    imds.fail_next(1, status=429, retry_after=3)
    status, body, headers = await imds_get(http, imds, token_target())
    assert (status, body["error"], headers["Retry-After"]) == (429, "too_many_requests", "3")
    assert (await imds_get(http, imds, token_target()))[0] == 200
    await imds.wait_for_requests(4, timeout=1)
    with pytest.raises(TimeoutError):
        await imds.wait_for_requests(5, timeout=0.05)


async def test_instance_metadata_paths(imds: ImdsServer, http: aiohttp.ClientSession) -> None:
    status, body, headers = await imds_get(http, imds, "/metadata/instance?api-version=2021-02-01")
    assert status == 200 and headers["Server"].startswith("IMDS/")
    assert body["compute"]["vmScaleSetName"] == "aks-nodepool1-12345678-vmss"
    assert body["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"]

    status, body, _ = await imds_get(
        http, imds, "/metadata/instance/compute?api-version=2021-02-01&format=json"
    )
    assert status == 200 and body["osType"] == "Linux"
    status, text, _ = await imds_get(
        http, imds, "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text"
    )
    assert (status, text) == (200, imds.instance_metadata["compute"]["vmId"])
    status, body, _ = await imds_get(http, imds, "/metadata/instance")
    assert status == 400 and body["newest-versions"]
    status, body, _ = await imds_get(
        http, imds, "/metadata/instance?api-version=2021-02-01", headers={}
    )
    assert status == 400 and "metadata header" in body["error"]

    status, body, _ = await imds_get(http, imds, "/metadata/versions")
    assert status == 200 and "2021-02-01" in body["apiVersions"]
    status, body, _ = await imds_get(http, imds, "/metadata/scheduledevents?api-version=2020-07-01")
    assert (status, body) == (200, {"DocumentIncarnation": 0, "Events": []})
    assert imds.requests_total == 0  # none of these is a token request
    assert imds.http_requests_total == 7
