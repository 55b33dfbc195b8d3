"""Federated identities (spec.type 3): the service-account token cache, cache-key
separation between service accounts, the objects, and how refusals are mapped."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import pytest

from nmi.config import Settings
from nmi.identity.decide import Grant
from nmi.imds import failures
from nmi.kube.objects import AzureIdentity, IdentityType, Pod
from nmi.kube.token_request import TokenRequestError, request_token
from nmi.tokens.assertions import FAILURE_HOLD, AssertionCache, renew_before
from nmi.tokens.cache import CacheKey, TokenCache
from nmi.tokens.model import Token, UpstreamError
from nmi.tokens.service import TokenService
from nmi.tokens.upstream import Upstream

# -- fakes ---------------------------------------------------------------------------------


def _jwt(claims: dict[str, Any]) -> str:
    def enc(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'RS256', 'kid': 'k'})}.{enc(claims)}.c2ln"


class _Content:
    """A stream that hands out its body in small chunks, as a socket may."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self, n: int = -1) -> bytes:
        size = 100 if n < 0 else min(n, 100)
        chunk, self._body = self._body[:size], self._body[size:]
        return chunk


class _Response:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.content = _Content(json.dumps(body).encode())

    def release(self) -> None:
        pass


class FakeTokenApi:
    """The API server's TokenRequest, counting requests; ``gate`` holds answers back."""

    def __init__(self, *, lifetime: int = 600, status: int = 201) -> None:
        self.lifetime = lifetime
        self.status = status
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()  # set when a TokenRequest reaches the "API server"
        self.now = time.time

    async def post(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> _Response:
        self.requests.append((path, body))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 201:
            return _Response(
                self.status,
                {
                    "kind": "Status",
                    "reason": "NotFound",
                    "message": 'serviceaccounts "x" not found',
                },
            )
        now = int(self.now())
        ns, sa = path.split("/")[4], path.split("/")[6]
        claims = {
            "iss": "https://issuer.example",
            "sub": f"system:serviceaccount:{ns}:{sa}",
            "aud": body["spec"]["audiences"],
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime,
        }
        return _Response(201, {"status": {"token": _jwt(claims)}})


def _pod(name: str = "p1", *, sa: str = "app", uid: str = "", ns: str = "default") -> Pod:
    return Pod.parse(
        {
            "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}"},
            "spec": {"nodeName": "n1", "serviceAccountName": sa},
            "status": {"phase": "Running", "podIP": "10.0.0.5"},
        }
    )


def _federated(**annotations: str) -> AzureIdentity:
    return AzureIdentity.parse(
        {
            "metadata": {
                "name": "fed",
                "namespace": "default",
                "uid": "id-uid",
                "annotations": annotations,
            },
            "spec": {"type": 3, "clientID": "c1", "tenantID": "t1"},
        }
    )


# -- the objects ---------------------------------------------------------------------------


def test_federated_identity_and_annotations_are_read() -> None:
    ident = _federated(**{"aadpodidentity.k8s.io/federated-token-audience": "api://custom"})
    assert ident.type == IdentityType.FEDERATED
    assert ident.federated_audience == "api://custom"
    assert not ident.shadow  # shadow is for types 0-2 only
    assert ident.fingerprint != _federated().fingerprint  # the audience is in the key


def test_shadow_annotation_only_on_types_0_to_2() -> None:
    raw = {
        "metadata": {
            "name": "msi",
            "namespace": "default",
            "annotations": {
                "aadpodidentity.k8s.io/federation": "Shadow",
                "aadpodidentity.k8s.io/federation-client-id": "app-2",
            },
        },
        "spec": {"type": 0, "clientID": "c0", "resourceID": "/x"},
    }
    ident = AzureIdentity.parse(raw)
    assert ident.shadow and ident.federation_client_id == "app-2"
    raw["spec"]["type"] = "3"
    raw["spec"]["tenantID"] = "t"
    assert not AzureIdentity.parse(raw).shadow


def test_pod_service_account_defaults_to_default() -> None:
    assert _pod(sa="").service_account == "default"
    assert _pod(sa="builder").service_account == "builder"


# -- the TokenRequest ----------------------------------------------------------------------


async def test_token_request_is_bound_to_the_pod_with_a_short_expiry() -> None:
    api = FakeTokenApi()
    token = await request_token(api, _pod(), audience="api://AzureADTokenExchange")
    path, body = api.requests[0]
    assert path == "/api/v1/namespaces/default/serviceaccounts/app/token"
    spec = body["spec"]
    assert spec["audiences"] == ["api://AzureADTokenExchange"]
    assert spec["expirationSeconds"] == 600
    assert spec["boundObjectRef"] == {
        "kind": "Pod",
        "apiVersion": "v1",
        "name": "p1",
        "uid": "uid-p1",
    }
    assert token.subject == "system:serviceaccount:default:app"
    assert token.issuer == "https://issuer.example"
    assert 590 <= token.lifetime <= 600
    assert "token" not in repr(token).replace("ServiceAccountToken", "")


async def test_token_request_refusals_name_the_service_account() -> None:
    api = FakeTokenApi(status=404)
    with pytest.raises(TokenRequestError) as caught:
        await request_token(api, _pod(), audience="a")
    assert caught.value.status == 404 and not caught.value.retryable
    assert "default/app" in str(caught.value)
    api.status = 403
    with pytest.raises(TokenRequestError) as caught:
        await request_token(api, _pod(), audience="a")
    assert "serviceaccounts/token" in str(caught.value)
    api.status = 503
    with pytest.raises(TokenRequestError) as caught:
        await request_token(api, _pod(), audience="a")
    assert caught.value.retryable


# -- the assertion cache -------------------------------------------------------------------


async def test_concurrent_callers_share_one_token_request() -> None:
    api = FakeTokenApi()
    api.gate = asyncio.Event()
    cache = AssertionCache(api=api)
    pod = _pod()
    calls = [asyncio.ensure_future(cache.get(pod, "aud")) for _ in range(50)]
    await api.arrived.wait()  # the one TokenRequest is held at the API server
    api.gate.set()
    tokens = await asyncio.gather(*calls)
    assert len(api.requests) == 1
    assert len({t.token for t in tokens}) == 1
    await cache.get(pod, "aud")
    assert len(api.requests) == 1  # reused while it has life left


async def test_renewed_ahead_of_expiry_never_presented_near_it() -> None:
    clock = [1_000_000.0]
    api = FakeTokenApi(lifetime=600)
    api.now = lambda: clock[0]
    cache = AssertionCache(api=api, clock=lambda: clock[0])
    pod = _pod()
    first = await cache.get(pod, "aud")
    assert renew_before(first.lifetime) == 120
    clock[0] += 600 - 121  # 121 s left: still presented
    assert (await cache.get(pod, "aud")).token == first.token
    clock[0] += 2  # 119 s left: a new one
    second = await cache.get(pod, "aud")
    assert second.token != first.token
    assert len(api.requests) == 2  # one TokenRequest per lifetime


async def test_each_pod_and_audience_has_its_own_token() -> None:
    api = FakeTokenApi()
    cache = AssertionCache(api=api)
    a, b = _pod("a", sa="one"), _pod("b", sa="two")
    ta, tb = await cache.get(a, "aud"), await cache.get(b, "aud")
    assert ta.subject.endswith(":one") and tb.subject.endswith(":two")
    await cache.get(a, "other")
    assert len(api.requests) == 3


async def test_refusals_are_held_briefly_transient_failures_are_not() -> None:
    clock = [1000.0]
    api = FakeTokenApi(status=404)
    cache = AssertionCache(api=api, clock=lambda: clock[0])
    for _ in range(20):
        with pytest.raises(TokenRequestError):
            await cache.get(_pod(), "aud")
    assert len(api.requests) == 1
    clock[0] += FAILURE_HOLD + 0.1
    with pytest.raises(TokenRequestError):
        await cache.get(_pod(), "aud")
    assert len(api.requests) == 2
    api.status = 503
    clock[0] += FAILURE_HOLD + 0.1
    for _ in range(3):
        with pytest.raises(TokenRequestError):
            await cache.get(_pod(), "aud")
    assert len(api.requests) == 5


async def test_a_gone_pod_keeps_nothing() -> None:
    api = FakeTokenApi()
    alive = {"uid-p1": True}
    cache = AssertionCache(api=api, alive=lambda p: alive.get(p.meta.uid, False))
    pod = _pod()
    await cache.get(pod, "aud")
    assert cache.peek("uid-p1", "aud") is not None
    assert cache.forget("uid-p1") == 1
    assert cache.peek("uid-p1", "aud") is None
    alive["uid-p1"] = False  # a request that completes after the pod went is not kept
    await cache.get(pod, "aud")
    assert cache.peek("uid-p1", "aud") is None


async def test_the_cache_is_bounded() -> None:
    cache = AssertionCache(api=FakeTokenApi(), max_entries=10)
    for i in range(30):
        await cache.get(_pod(f"p{i}"), "aud")
    assert len(cache) == 10


# -- cache keys: never across service accounts ---------------------------------------------


def _service(cache: TokenCache) -> TokenService:
    settings = Settings(node_name="n1")
    return TokenService(
        settings=settings,
        secrets=None,  # type: ignore[arg-type]  # federated identities read no Secret
        upstream=Upstream(settings=settings),
        cache=cache,
    )


async def test_tokens_are_keyed_by_service_account_never_crossing() -> None:
    cache = TokenCache()
    service = _service(cache)
    ident = _federated()
    one_a, one_b, two = _pod("a", sa="one"), _pod("b", sa="one"), _pod("c", sa="two")
    key_one = await service.cache_key(ident, "https://vault.azure.net", one_a)
    assert key_one == await service.cache_key(ident, "https://vault.azure.net", one_b)
    key_two = await service.cache_key(ident, "https://vault.azure.net", two)
    assert key_one != key_two and key_one.subject == "default/one"
    other_ns = _pod("d", sa="one", ns="other")
    assert (await service.cache_key(ident, "https://vault.azure.net", other_ns)) != key_one

    token = Token(
        access_token="t-one", expires_on=int(time.time()) + 3600, not_before=0, client_id="c1"
    )

    async def fetch(_: Any) -> Token:
        return token

    await cache.get(key_one, fetch)
    assert service.cached(ident, "https://vault.azure.net", one_b) is token
    assert service.cached(ident, "https://vault.azure.net", two) is None
    assert service.cached(ident, "https://vault.azure.net", other_ns) is None
    assert cache.drop_where(lambda k: k.subject == "default/one") == 1
    assert service.cached(ident, "https://vault.azure.net", one_a) is None
    service.upstream.close()


async def test_a_federated_identity_needs_a_calling_pod() -> None:
    from nmi.tokens.credentials import CredentialError

    service = _service(TokenCache())
    with pytest.raises(CredentialError):
        await service.cache_key(_federated(), "r", None)
    service.upstream.close()


def test_cache_key_subject_defaults_empty_for_other_kinds() -> None:
    assert CacheKey("o", "c", "r").subject == ""


# -- what the pod and the operator are told ------------------------------------------------


def test_azure_ad_refusal_reaches_the_pod_and_the_event_names_what_was_shown() -> None:
    exc = UpstreamError(
        error="invalid_request",
        description="AADSTS70021: No matching federated identity record found for presented "
        "assertion. Assertion Issuer: 'https://issuer.example'.",
        status=400,
        retryable=False,
    )
    exc.shown = "issuer 'https://issuer.example', subject 'system:serviceaccount:default:app'"
    failure = failures.upstream(exc, Grant(_federated()), "https://vault.azure.net")
    assert failure.reply.status == 400
    body = json.loads(failure.reply.body)
    assert body["error"] == "invalid_request"
    assert body["error_description"].startswith("AADSTS70021")
    assert failure.event is not None
    assert "system:serviceaccount:default:app" in failure.event[1]
    assert "https://issuer.example" in failure.event[1]


def test_token_request_refusals_map_to_design_time_or_transient() -> None:
    missing = TokenRequestError("no sa", status=404, reason="NotFound", retryable=False)
    failure = failures.from_exception(missing, Grant(_federated()), "r")
    assert failure is not None and failure.reply.status == 400
    for status, retryable in ((403, False), (409, False), (None, True), (503, True)):
        exc = TokenRequestError("x", status=status, reason="r", retryable=retryable)
        mapped = failures.from_exception(exc, Grant(_federated()), "r")
        assert mapped is not None and mapped.reply.status == 503, status


# -- the shadow queue and the node's pods -----------------------------------------------------


def _shadow_identity() -> AzureIdentity:
    return AzureIdentity.parse(
        {
            "metadata": {
                "name": "msi",
                "namespace": "default",
                "uid": "msi-uid",
                "annotations": {"aadpodidentity.k8s.io/federation": "shadow"},
            },
            "spec": {"type": 0, "clientID": "c0", "resourceID": "/x"},
        }
    )


async def test_shadow_trials_are_noted_once_per_interval_and_the_queue_is_bounded() -> None:
    from nmi.tokens.shadow import ShadowTrials

    clock = [0.0]
    service = _service(TokenCache())
    shadow = ShadowTrials(
        settings=Settings(node_name="n1", federation_shadow_interval=60.0),
        tokens=service,
        clock=lambda: clock[0],
        max_pending=3,
    )
    ident = _shadow_identity()
    token = Token(access_token="x", expires_on=0, not_before=0, client_id="c0")
    for _ in range(100):  # one service account asking in a loop: one trial noted
        shadow.consider(ident, _pod("a", sa="one"), "r", token)
    assert shadow.pending == 1
    for i in range(10):  # ten service accounts: the queue holds 3, the rest are dropped
        shadow.consider(ident, _pod(f"p{i}", sa=f"sa{i}"), "r", token)
    assert shadow.pending == 3 and shadow.dropped == 8
    clock[0] += 61  # the next interval: the first one may be noted again (room permitting)
    shadow.consider(ident, _pod("a", sa="one"), "r", token)
    assert shadow.dropped == 9
    service.upstream.close()


async def test_another_pod_presents_and_the_last_pod_takes_the_tokens() -> None:
    from nmi.kube.index import ClusterIndex
    from nmi.tokens.federation import Federation

    index = ClusterIndex(node_name="n1")
    cache = TokenCache()
    federation = Federation(index=index, cache=cache, api=FakeTokenApi())  # type: ignore[arg-type]
    index.pod_gone.append(federation.pod_gone)
    a, b, other = _pod("a", sa="one"), _pod("b", sa="one"), _pod("c", sa="two")
    for pod in (a, b, other):
        index.on_pod("ADDED", None, pod)
    key = CacheKey("id", "fp", "r", "default/one")
    token = Token(access_token="t", expires_on=int(time.time()) + 3600, not_before=0, client_id="")

    async def fetch(_: Any) -> Token:
        return token

    await cache.get(key, fetch)
    assert federation.presenter("default", "one", a) is a
    index.on_pod("DELETED", a, None)
    assert federation.presenter("default", "one", a) is b  # a is gone: b presents
    assert federation.in_use(key) and cache.peek(key) is token
    index.on_pod("DELETED", b, None)  # the service account's last pod on the node
    assert federation.presenter("default", "one", b) is None
    assert not federation.in_use(key) and cache.peek(key) is None
