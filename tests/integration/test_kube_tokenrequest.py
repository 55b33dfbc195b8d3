"""The emulator's TokenRequest API and service-account issuer discovery, over real HTTPS.

Tokens are checked as Azure AD checks them: with the JWKS found through the
issuer's discovery document, both fetched without credentials.
"""

from __future__ import annotations

import datetime
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from kubernetes_asyncio import client, config

from nmi_sandbox.kube import KubeApiError, KubeApiServer
from nmi_sandbox.tls import CertificateAuthority

AUDIENCE = "api://AzureADTokenExchange"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
async def kube(ca: CertificateAuthority) -> AsyncIterator[KubeApiServer]:
    server = KubeApiServer(ca=ca)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Http:
    """Raw HTTPS to the emulator, trusting its CA; with or without the bearer token."""

    def __init__(self, kube: KubeApiServer, session: aiohttp.ClientSession) -> None:
        self.kube = kube
        self.session = session
        self.ssl = ssl.create_default_context(cadata=kube.ca_pem.decode())

    async def call(
        self, method: str, path: str, body: Any = None, *, auth: bool = True
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = {"Authorization": f"Bearer {self.kube.token}"} if auth else {}
        async with self.session.request(
            method, self.kube.url + path, json=body, headers=headers, ssl=self.ssl
        ) as resp:
            return resp.status, await resp.json(content_type=None), resp

    async def token_request(
        self, sa: str, spec: dict[str, Any], *, ns: str = "default", auth: bool = True
    ) -> tuple[int, Any]:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
        status, answer, _ = await self.call("POST", path, body, auth=auth)
        return status, answer


@pytest.fixture
async def http(kube: KubeApiServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(kube, session)


def pod(name: str, *, ns: str = "default", node: str = "n1", sa: str | None = None) -> Any:
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": [{"name": "app", "image": "busybox:1.36"}],
    }
    if sa is not None:
        spec["serviceAccountName"] = sa
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def node(name: str) -> Any:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def pod_ref(p: Any, **override: str) -> dict[str, str]:
    ref = {"kind": "Pod", "apiVersion": "v1", "name": p["metadata"]["name"]}
    ref["uid"] = p["metadata"]["uid"]
    ref.update(override)
    return ref


def uid_of(kube: KubeApiServer, kind: str, name: str, ns: str | None = "default") -> str:
    obj = kube.get("v1", kind, name, ns)
    assert obj is not None
    return str(obj["metadata"]["uid"])


async def discovered_key(http: Http) -> tuple[dict[str, Any], jwt.PyJWK]:
    """The issuer's discovery document and its signing key, both fetched without a token."""
    status, discovery, resp = await http.call(
        "GET", "/.well-known/openid-configuration", auth=False
    )
    assert status == 200 and resp.content_type == "application/json"
    jwks_path = discovery["jwks_uri"].removeprefix(http.kube.url)
    status, jwks, resp = await http.call("GET", jwks_path, auth=False)
    assert status == 200 and resp.content_type == "application/jwk-set+json"
    assert resp.headers["Cache-Control"] == "public, max-age=3600"
    [key] = jwks["keys"]
    return discovery, jwt.PyJWK(key)


def verify(token: str, key: jwt.PyJWK, audience: str, issuer: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["RS256"], audience=audience, issuer=issuer
    )
    return claims


# --------------------------------------------------------------------------- issuing


async def test_token_request_is_verified_with_the_discovered_jwks(
    kube: KubeApiServer, http: Http
) -> None:
    kube.create(node("n1"))
    app = kube.create(pod("app"))
    status, answer = await http.token_request(
        "default",
        {"audiences": [AUDIENCE], "expirationSeconds": 3600, "boundObjectRef": pod_ref(app)},
    )
    assert status == 201, answer
    assert answer["kind"] == "TokenRequest"
    assert answer["apiVersion"] == "authentication.k8s.io/v1"
    assert answer["metadata"]["name"] == "default"
    assert answer["metadata"]["namespace"] == "default"
    assert answer["metadata"]["creationTimestamp"].endswith("Z")
    assert answer["spec"] == {
        "audiences": [AUDIENCE],
        "expirationSeconds": 3600,
        "boundObjectRef": pod_ref(app),
    }
    token = answer["status"]["token"]

    discovery, key = await discovered_key(http)
    assert discovery == {
        "issuer": kube.issuer,
        "jwks_uri": f"{kube.issuer}/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    assert kube.issuer == kube.url
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "kid": key.key_id}
    assert key.key_id == kube.signing_key_id

    claims = verify(token, key, AUDIENCE, kube.issuer)
    assert sorted(claims) == sorted(
        ["aud", "exp", "iat", "iss", "jti", "kubernetes.io", "nbf", "sub"]
    )
    assert claims["aud"] == [AUDIENCE]
    assert claims["sub"] == "system:serviceaccount:default:default"
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]
    assert abs(claims["iat"] - time.time()) < 60
    uuid.UUID(claims["jti"])
    assert claims["kubernetes.io"] == {
        "namespace": "default",
        "serviceaccount": {"name": "default", "uid": uid_of(kube, "ServiceAccount", "default")},
        "pod": {"name": "app", "uid": app["metadata"]["uid"]},
        "node": {"name": "n1", "uid": uid_of(kube, "Node", "n1", None)},
    }
    expires = datetime.datetime.fromisoformat(answer["status"]["expirationTimestamp"])
    assert int(expires.timestamp()) == claims["exp"]

    assert kube.requests["POST serviceaccounts/token"] == 1
    assert kube.requests["GET /.well-known/openid-configuration"] == 1
    assert kube.requests["GET /openid/v1/jwks"] == 1
    assert kube.token_requests == {("default", "default", "app"): 1}
    assert kube.issued_tokens == [claims]


async def test_pod_on_an_unknown_node_and_unbound_tokens(kube: KubeApiServer, http: Http) -> None:
    ghost = kube.create(pod("ghost", node="nowhere"))
    status, answer = await http.token_request(
        "default", {"audiences": [AUDIENCE], "boundObjectRef": pod_ref(ghost)}
    )
    assert status == 201, answer
    claims = jwt.decode(answer["status"]["token"], options={"verify_signature": False})
    assert "node" not in claims["kubernetes.io"]  # kube proceeds without the node
    assert claims["kubernetes.io"]["pod"]["name"] == "ghost"

    status, answer = await http.token_request("default", {"audiences": [AUDIENCE]})
    assert status == 201, answer
    assert answer["spec"]["boundObjectRef"] is None
    claims = jwt.decode(answer["status"]["token"], options={"verify_signature": False})
    assert set(claims["kubernetes.io"]) == {"namespace", "serviceaccount"}
    assert kube.token_requests == {
        ("default", "default", "ghost"): 1,
        ("default", "default", ""): 1,
    }


async def test_secret_and_node_bound_tokens(kube: KubeApiServer, http: Http) -> None:
    kube.create(node("n7"))
    sec = kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {}})
    ref = {"kind": "Secret", "apiVersion": "v1", "name": "s", "uid": sec["metadata"]["uid"]}
    status, answer = await http.token_request(
        "default", {"audiences": [AUDIENCE], "boundObjectRef": ref}
    )
    assert status == 201, answer
    claims = jwt.decode(answer["status"]["token"], options={"verify_signature": False})
    assert claims["kubernetes.io"]["secret"] == {"name": "s", "uid": sec["metadata"]["uid"]}

    ref = {"kind": "Node", "apiVersion": "v1", "name": "n7"}
    status, answer = await http.token_request(
        "default", {"audiences": [AUDIENCE], "boundObjectRef": ref}
    )
    assert status == 201, answer
    claims = jwt.decode(answer["status"]["token"], options={"verify_signature": False})
    assert claims["kubernetes.io"]["node"] == {
        "name": "n7",
        "uid": uid_of(kube, "Node", "n7", None),
    }
    assert "pod" not in claims["kubernetes.io"]


async def test_default_audiences_and_expiration(kube: KubeApiServer, http: Http) -> None:
    app = kube.create(pod("app"))
    status, answer = await http.token_request(
        "default", {"audiences": [], "boundObjectRef": pod_ref(app)}
    )
    assert status == 201, answer
    # no audiences: the API server's own; no expirationSeconds: an hour
    assert answer["spec"]["audiences"] == [kube.issuer]
    assert answer["spec"]["expirationSeconds"] == 3600
    _, key = await discovered_key(http)
    claims = verify(answer["status"]["token"], key, kube.issuer, kube.issuer)
    assert claims["aud"] == [kube.issuer] and claims["exp"] - claims["iat"] == 3600

    # longer than the maximum (48 h by default): shortened silently
    status, answer = await http.token_request(
        "default", {"audiences": [AUDIENCE], "expirationSeconds": 7 * 86400}
    )
    assert status == 201, answer
    assert answer["spec"]["expirationSeconds"] == 48 * 3600
    claims = verify(answer["status"]["token"], key, AUDIENCE, kube.issuer)
    assert claims["exp"] - claims["iat"] == 48 * 3600

    kube.max_token_expiration = 7200
    status, answer = await http.token_request(
        "default", {"audiences": [AUDIENCE], "expirationSeconds": 86400}
    )
    assert status == 201 and answer["spec"]["expirationSeconds"] == 7200

    status, answer = await http.token_request(
        "default", {"audiences": [AUDIENCE], "expirationSeconds": 600}
    )
    assert status == 201 and answer["spec"]["expirationSeconds"] == 600

    status, answer = await http.token_request(
        "default", {"audiences": [AUDIENCE], "expirationSeconds": 599}
    )
    assert status == 422
    assert answer == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: '
        "Invalid value: 599: may not specify a duration less than 10 minutes",
        "reason": "Invalid",
        "details": {
            "group": "authentication.k8s.io",
            "kind": "TokenRequest",
            "causes": [
                {
                    "reason": "FieldValueInvalid",
                    "message": "Invalid value: 599: may not specify a duration less than 10 "
                    "minutes",
                    "field": "spec.expirationSeconds",
                }
            ],
        },
        "code": 422,
    }
    assert kube.requests["POST serviceaccounts/token"] == 5
    assert sum(kube.token_requests.values()) == 4 == len(kube.issued_tokens)


async def test_max_token_expiration_constructor(ca: CertificateAuthority) -> None:
    server = KubeApiServer(ca=ca, max_token_expiration=1200)
    await server.start()
    try:
        assert server.max_token_expiration == 1200
        token = server.issue_service_account_token(
            "default", "default", audiences=[AUDIENCE], expiration_seconds=86400
        )
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 1200
    finally:
        await server.stop()


# --------------------------------------------------------------------------- refusals


async def test_refusals_are_kube_statuses(kube: KubeApiServer, http: Http) -> None:
    app = kube.create(pod("app"))
    spec = {"audiences": [AUDIENCE], "boundObjectRef": pod_ref(app)}

    status, answer = await http.token_request("nobody", spec)
    assert status == 404
    assert answer["reason"] == "NotFound"
    assert answer["message"] == 'serviceaccounts "nobody" not found'
    assert answer["details"] == {"name": "nobody", "kind": "serviceaccounts"}

    status, answer = await http.token_request(
        "default", {**spec, "boundObjectRef": pod_ref(app, name="gone")}
    )
    assert status == 404 and answer["reason"] == "NotFound"
    assert answer["message"] == 'pods "gone" not found'

    status, answer = await http.token_request(
        "default", {**spec, "boundObjectRef": pod_ref(app, uid="0000-stale")}
    )
    assert status == 409 and answer["reason"] == "Conflict"
    assert answer["message"] == (
        'Operation cannot be fulfilled on Pod "app": the UID in the bound object reference '
        "(0000-stale) does not match the UID in record. The object might have been deleted "
        "and then recreated"
    )
    assert answer["details"] == {"name": "app", "kind": "Pod"}

    kube.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "other"}})
    status, answer = await http.token_request("other", spec)
    assert status == 400 and answer["reason"] == "BadRequest"
    assert answer["message"] == (
        'cannot bind token for serviceaccount "other" to pod running with different '
        "serviceaccount name."
    )

    ref = {"kind": "Deployment", "apiVersion": "apps/v1", "name": "d"}
    status, answer = await http.token_request("default", {**spec, "boundObjectRef": ref})
    assert status == 400 and answer["reason"] == "BadRequest"
    assert answer["message"] == (
        'cannot bind token for serviceaccount "default" to object of kind '
        '"apps/v1, Kind=Deployment"'
    )

    path = "/api/v1/namespaces/default/serviceaccounts/default/token"
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        status, answer, _ = await http.call(method, path, {} if method != "GET" else None)
        assert status == 405 and answer["reason"] == "MethodNotAllowed", method

    status, answer, _ = await http.call(
        "POST", path, {"apiVersion": "v1", "kind": "TokenRequest", "spec": {}}
    )
    assert status == 400 and answer["reason"] == "BadRequest"

    status, answer = await http.token_request("default", spec, auth=False)
    assert status == 401 and answer["reason"] == "Unauthorized"

    assert kube.token_requests == {} and kube.issued_tokens == []
    assert kube.requests["POST serviceaccounts/token"] == 6


async def test_discovery_needs_no_token_but_everything_else_does(
    kube: KubeApiServer, http: Http
) -> None:
    for path in ("/.well-known/openid-configuration", "/openid/v1/jwks"):
        status, _, _ = await http.call("GET", path, auth=False)
        assert status == 200, path
    for path in ("/api/v1", "/api/v1/namespaces/default/serviceaccounts", "/version", "/"):
        status, answer, _ = await http.call("GET", path, auth=False)
        assert status == 401 and answer["reason"] == "Unauthorized", path
    status, answer, _ = await http.call("GET", "/")
    assert "/.well-known/openid-configuration" in answer["paths"]
    assert "/openid/v1/jwks" in answer["paths"]


async def test_discovery_lists_the_token_subresource(kube: KubeApiServer, tmp_path: Path) -> None:
    cfg = client.Configuration()
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    await config.load_kube_config(config_file=str(path), client_configuration=cfg)
    async with client.ApiClient(cfg) as api:
        core = client.CoreV1Api(api)
        raw = await core.get_api_resources(_preload_content=False)
        resources = {r["name"]: r for r in (await raw.json())["resources"]}
        assert resources["serviceaccounts/token"] == {
            "name": "serviceaccounts/token",
            "singularName": "",
            "namespaced": True,
            "group": "authentication.k8s.io",
            "version": "v1",
            "kind": "TokenRequest",
            "verbs": ["create"],
        }
        assert resources["pods/binding"]["kind"] == "Binding"

        # the typed client's TokenRequest round-trips through the emulator
        kube.create(pod("app"))
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=1800)
        )
        answer = await core.create_namespaced_service_account_token("default", "default", body)
        assert answer.spec.expiration_seconds == 1800
        assert answer.status.token.count(".") == 2
        assert answer.status.expiration_timestamp.tzinfo is not None


# ---------------------------------------------------------------- the ServiceAccount controller


async def test_every_namespace_gets_a_default_service_account(
    kube: KubeApiServer, http: Http
) -> None:
    for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
        assert uid_of(kube, "ServiceAccount", "default", ns)

    status, _, _ = await http.call(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}},
    )
    assert status == 201
    status, sa, _ = await http.call("GET", "/api/v1/namespaces/team-a/serviceaccounts/default")
    assert status == 200
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["namespace"] == "team-a"
    assert sa["metadata"]["uid"] and sa["metadata"]["resourceVersion"]

    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-b"}})
    assert [s["metadata"]["name"] for s in kube.list("v1", "ServiceAccount", "team-b")] == [
        "default"
    ]

    # pods need no existing service account (the ServiceAccount admission check is not
    # emulated), but a token for a missing one is still refused
    kube.create(pod("builder-pod", ns="team-b", sa="builder"))
    status, answer = await http.token_request("builder", {"audiences": [AUDIENCE]}, ns="team-b")
    assert status == 404 and answer["message"] == 'serviceaccounts "builder" not found'
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "builder", "namespace": "team-b"},
        }
    )
    built = kube.get("v1", "Pod", "builder-pod", "team-b")
    assert built is not None
    status, answer = await http.token_request(
        "builder", {"audiences": [AUDIENCE], "boundObjectRef": pod_ref(built)}, ns="team-b"
    )
    assert status == 201, answer
    assert kube.token_requests == {("team-b", "builder", "builder-pod"): 1}

    # deleting the namespace removes its service accounts with everything else
    kube.delete("v1", "Namespace", "team-b")
    assert kube.list("v1", "ServiceAccount", "team-b") == []


# --------------------------------------------------------------------------- direct minting


async def test_issue_service_account_token_at_any_time(kube: KubeApiServer, http: Http) -> None:
    kube.create(pod("app"))
    _, key = await discovered_key(http)

    fresh = kube.issue_service_account_token("default", "default", audiences=[AUDIENCE], pod="app")
    claims = verify(fresh, key, AUDIENCE, kube.issuer)
    assert claims["kubernetes.io"]["pod"]["name"] == "app"

    expired = kube.issue_service_account_token(
        "default", "default", audiences=[AUDIENCE], pod="app", now=time.time() - 7200
    )
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(expired, key, AUDIENCE, kube.issuer)

    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    future = kube.issue_service_account_token("default", "default", audiences=[AUDIENCE], now=later)
    with pytest.raises(jwt.ImmatureSignatureError):
        verify(future, key, AUDIENCE, kube.issuer)

    short = kube.issue_service_account_token(
        "default", "default", audiences=[], expiration_seconds=60
    )
    claims = verify(short, key, kube.issuer, kube.issuer)
    assert claims["exp"] - claims["iat"] == 60

    with pytest.raises(KubeApiError) as err:
        kube.issue_service_account_token("default", "nobody", audiences=[AUDIENCE])
    assert err.value.code == 404
    with pytest.raises(KubeApiError) as err:
        kube.issue_service_account_token("default", "default", audiences=[AUDIENCE], pod="nope")
    assert err.value.code == 404 and str(err.value) == 'pods "nope" not found'

    assert kube.token_requests == {("default", "default", "app"): 2, ("default", "default", ""): 2}
    assert len(kube.issued_tokens) == 4


async def test_signing_key_survives_restart(kube: KubeApiServer, http: Http) -> None:
    kid = kube.signing_key_id
    before = kube.issue_service_account_token("default", "default", audiences=[AUDIENCE])
    await kube.restart()
    assert kube.signing_key_id == kid
    _, key = await discovered_key(http)
    assert key.key_id == kid
    assert verify(before, key, AUDIENCE, kube.issuer)["sub"] == (
        "system:serviceaccount:default:default"
    )


async def test_custom_issuer_and_bounded_record(ca: CertificateAuthority) -> None:
    issuer = "https://oidc.example.test/cluster-1"
    server = KubeApiServer(ca=ca, service_account_issuer=issuer, issued_tokens_limit=3)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            http = Http(server, session)
            status, discovery, _ = await http.call(
                "GET", "/.well-known/openid-configuration", auth=False
            )
            assert status == 200
            assert discovery["issuer"] == issuer
            assert discovery["jwks_uri"] == f"{issuer}/openid/v1/jwks"
            status, jwks, _ = await http.call("GET", "/openid/v1/jwks", auth=False)
            key = jwt.PyJWK(jwks["keys"][0])
        for _ in range(5):
            token = server.issue_service_account_token("default", "default", audiences=[])
        assert verify(token, key, issuer, issuer)["iss"] == issuer
        assert len(server.issued_tokens) == 3
        assert server.issued_tokens[-1] == jwt.decode(token, options={"verify_signature": False})
        assert server.token_requests[("default", "default", "")] == 5
    finally:
        await server.stop()
