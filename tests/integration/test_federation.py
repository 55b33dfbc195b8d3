"""Federated identities (spec.type 3) against the emulators, end to end on loopback.

The real daemon asks the emulated API server for the calling pod's own
service-account token (TokenRequest, RS256, bound to the pod) and presents
it through real MSAL to the emulated Azure AD, which fetches the issuer's
discovery document and JWKS from the API server and checks the signature,
issuer, subject, audience and time range against the federated credentials
it holds.  Counters on the emulators prove what was (not) done: no Secret
read, no ARM call, one TokenRequest per pod per token lifetime, one Azure AD
call per service account·identity·resource per token lifetime.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import Any

import jwt

from nmi.config import OperationMode
from nmi.explain.model import daemon_explanation
from nmi.explain.render import render_text
from nmi.identity.decide import IdentitySelector
from nmi.tokens.shadow import FEDERATION_NOT_READY, FEDERATION_READY
from nmi_sandbox import manifests as m
from nmi_sandbox.world import TENANT, LoopbackWorld

GV = "aadpodidentity.k8s.io/v1"
VAULT = "https://vault.azure.net"
ARM_RESOURCE = "https://management.azure.com"


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def subject_of_token(w: LoopbackWorld, access_token: str) -> str:
    """The service-account subject whose assertion obtained this Azure AD token."""
    uti = claims(access_token)["uti"]
    found = [subject for _, subject, u in w.aad.federated_issued if u == uti]
    assert len(found) == 1, found
    return found[0]


def secret_reads(w: LoopbackWorld) -> int:
    return sum(n for key, n in w.kube.requests.items() if key.split(" ")[-1] == "secrets")


def token_requests(w: LoopbackWorld) -> int:
    return w.kube.requests["POST serviceaccounts/token"]


def events_of(w: LoopbackWorld, pod: dict[str, Any], reason: str) -> list[dict[str, Any]]:
    uid = pod["metadata"]["uid"]
    return [
        e
        for e in w.kube.list("v1", "Event", pod["metadata"]["namespace"])
        if e.get("reason") == reason and e["involvedObject"].get("uid") == uid
    ]


async def visible(w: LoopbackWorld, pod: dict[str, Any]) -> None:
    await w.pod_visible(pod)


async def explain_text(w: LoopbackWorld, pod: dict[str, Any], resource: str = "") -> str:
    """The daemon's explanation as ``nmi explain`` prints it (the admin endpoint first
    reads the issuer from the API server's discovery document when no token told it)."""
    assert w.daemon is not None and w.daemon.federation is not None
    await w.daemon.federation.learn_issuer()
    doc = daemon_explanation(
        w.daemon,
        namespace=pod["metadata"]["namespace"],
        pod=pod["metadata"]["name"],
        selector=IdentitySelector(),
        resource=resource,
    )
    report = {"explanation": doc["explanation"], "daemon": {**doc, "available": True}}
    report["daemon"]["socket"] = "-"
    return render_text(report, 0)


# ------------------------------------------------------------------ the whole chain


async def test_a_federated_pod_gets_its_token_with_no_secret_and_no_arm_call(
    world: LoopbackWorld,
) -> None:
    w = world
    await w.start_daemon()
    mic = await w.start_mic()
    ident = w.add_federated_identity("fed", selector="app", service_accounts=("web",))
    pod = w.add_pod("web-1", selector="app", service_account="web")

    # The controller assigns it at once: nothing to put on a VM.
    async def assigned() -> None:
        def done() -> bool:
            found = w.kube.get(GV, "AzureAssignedIdentity", "web-1-default-fed", "default")
            return bool(found and (found.get("status") or {}).get("status") == "Assigned")

        await until(done, what="the assignment Assigned")

    await assigned()
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status == 200, reply.body
    assert reply.body["client_id"] == ident.client_id
    token = reply.body["access_token"]
    assert claims(token)["aud"] == VAULT
    assert claims(token)["appid"] == ident.client_id
    assert subject_of_token(w, token) == "system:serviceaccount:default:web"
    # The assertion Azure AD saw: the pod's own token, bound to it.
    issued = w.kube.issued_tokens[-1]
    assert issued["sub"] == "system:serviceaccount:default:web"
    assert issued["aud"] == ["api://AzureADTokenExchange"]
    assert issued["kubernetes.io"]["pod"]["uid"] == pod["metadata"]["uid"]
    assert issued["exp"] - issued["iat"] == 600
    # Nothing stored, nothing assigned: no Secret read, no ARM request at all.
    assert secret_reads(w) == 0
    assert sum(w.arm.requests.values()) == 0
    assert mic is not None
    # The second request is a cache hit: no TokenRequest, no Azure AD call.
    before = (token_requests(w), sum(w.aad.federated_exchanges.values()))
    again = await w.get_token(w.pod_ip(pod), VAULT)
    assert again.body["access_token"] == token
    assert (token_requests(w), sum(w.aad.federated_exchanges.values())) == before


async def test_any_concurrency_one_token_request_and_one_azure_ad_call(
    running: LoopbackWorld,
) -> None:
    w = running
    w.add_federated_identity("fed", selector="app", service_accounts=("web",))
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, w.identities["fed"])
    await visible(w, pod)
    w.aad.latency = 0.3  # every request arrives while the first call is in flight
    replies = await asyncio.gather(*(w.get_token(w.pod_ip(pod), VAULT) for _ in range(40)))
    assert {r.status for r in replies} == {200}
    assert len({r.body["access_token"] for r in replies}) == 1
    assert token_requests(w) == 1
    assert sum(w.aad.federated_exchanges.values()) == 1
    # Another resource: one more Azure AD call, presenting the same service-account token.
    replies = await asyncio.gather(*(w.get_token(w.pod_ip(pod), ARM_RESOURCE) for _ in range(20)))
    assert {r.status for r in replies} == {200}
    assert token_requests(w) == 1
    assert sum(w.aad.federated_exchanges.values()) == 2


async def test_two_service_accounts_on_one_identity_each_with_its_own_assertion(
    running: LoopbackWorld,
) -> None:
    w = running
    ident = w.add_federated_identity("shared", selector="app", service_accounts=("one",))
    a = w.add_pod("a", selector="app", service_account="one")
    b = w.add_pod("b", selector="app", service_account="two")
    c = w.add_pod("c", selector="app", service_account="one")
    for pod in (a, b, c):
        w.assign(pod, ident)
        await visible(w, pod)
    got_a = await w.get_token(w.pod_ip(a), VAULT)
    assert got_a.status == 200, got_a.body
    assert subject_of_token(w, got_a.body["access_token"]) == "system:serviceaccount:default:one"
    # b's service account is not federated: Azure AD's own refusal, never a's token.
    refused = await w.get_token(w.pod_ip(b), VAULT)
    assert refused.status == 400, refused.body
    assert refused.body["error"] == "invalid_request"
    description = refused.body["error_description"]
    assert description.startswith("AADSTS70021")
    assert "system:serviceaccount:default:two" in description
    assert w.kube.issuer in description
    # The Warning Event on b names what Azure AD was shown.
    warning = await until(lambda: events_of(w, b, "TokenRequestFailed"), what="b's Event")
    message = warning[0]["message"]
    assert "AADSTS70021" in message
    assert "system:serviceaccount:default:two" in message and w.kube.issuer in message
    # c shares a's service account: a's token, with no new exchange.
    exchanges = sum(w.aad.federated_exchanges.values())
    got_c = await w.get_token(w.pod_ip(c), VAULT)
    assert got_c.body["access_token"] == got_a.body["access_token"]
    assert sum(w.aad.federated_exchanges.values()) == exchanges
    # Once "two" is federated too, b gets a token obtained with its own assertion.
    w.federate(ident.client_id, "default", "two")
    got_b = await w.get_token(w.pod_ip(b), VAULT)
    assert got_b.status == 200, got_b.body
    assert got_b.body["access_token"] != got_a.body["access_token"]
    assert subject_of_token(w, got_b.body["access_token"]) == "system:serviceaccount:default:two"


async def test_a_managed_identity_federated_is_on_no_vm(running: LoopbackWorld) -> None:
    w = running
    ident = w.add_federated_identity(
        "mi", selector="app", service_accounts=("web",), managed_identity=True
    )
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, ident)
    await visible(w, pod)
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status == 200, reply.body
    assert claims(reply.body["access_token"])["oid"] == ident.object_id
    assert not w.arm.identities_on(w.vmss_id)
    assert sum(w.imds.token_requests.values()) == 0  # never the node's IMDS


async def test_managed_mode_selection_and_namespaced_rules_as_for_every_kind(
    world: LoopbackWorld,
) -> None:
    w = world
    await w.start_daemon(operation_mode=OperationMode.MANAGED)
    msi = w.add_user_assigned_identity("msi", selector="app")
    fed = w.add_federated_identity("fed", selector="app", service_accounts=("web",))
    pod = w.add_pod("web-1", selector="app", service_account="web")
    await visible(w, pod)
    await until(
        lambda: w.daemon is not None and len(w.daemon.index.bindings_with_selector("app")) == 2,
        what="both bindings seen",
    )
    several = await w.get_token(w.pod_ip(pod), VAULT)
    assert several.status == 400 and "Multiple" in several.body["error_description"]
    chosen = await w.get_token(w.pod_ip(pod), VAULT, client_id=fed.client_id.upper())
    assert chosen.status == 200, chosen.body
    assert chosen.body["client_id"] == fed.client_id
    assert subject_of_token(w, chosen.body["access_token"]) == "system:serviceaccount:default:web"
    other = await w.get_token(w.pod_ip(pod), VAULT, client_id=msi.client_id)
    assert other.status == 200 and other.body["client_id"] == msi.client_id
    # A pod of another namespace bound to it: managed mode's namespaced rules refuse it.
    w.ensure_namespace("other")
    w.kube.create(
        {
            "apiVersion": GV,
            "kind": "AzureIdentityBinding",
            "metadata": {"name": "cross", "namespace": "default"},
            "spec": {"azureIdentity": "fed", "selector": "cross"},
        }
    )
    stranger = w.add_pod("s", namespace="other", selector="cross", service_account="web")
    await visible(w, stranger)
    refused = await w.get_token(w.pod_ip(stranger), VAULT)
    assert refused.status in (400, 404), refused.body
    assert not any(s.endswith(":other:web") for _, s, _ in w.aad.federated_issued)


# ------------------------------------------------------------------ errors users can act on


async def test_azure_ad_refusals_reach_the_pod_with_their_codes(running: LoopbackWorld) -> None:
    w = running
    # AADSTS700016: the application does not exist in the tenant.
    ghost = w.add_federated_identity("ghost", selector="ghost", in_azure_ad=False)
    pod = w.add_pod("g", selector="ghost", service_account="web")
    w.assign(pod, ghost)
    await visible(w, pod)
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status == 400, reply.body
    assert reply.body["error"] == "unauthorized_client"
    assert reply.body["error_description"].startswith("AADSTS700016")
    event = await until(lambda: events_of(w, pod, "TokenRequestFailed"), what="Event")
    assert "system:serviceaccount:default:web" in event[0]["message"]

    # AADSTS700024: the assertion is outside its time range (the API server's clock is
    # ten minutes ahead, so the token is not valid yet when Azure AD sees it).
    ahead = w.add_federated_identity("ahead", selector="ahead", service_accounts=("late",))
    late = w.add_pod("l", selector="ahead", service_account="late")
    w.assign(late, ahead)
    await visible(w, late)
    w.kube.token_clock_offset = 900.0
    reply = await w.get_token(w.pod_ip(late), VAULT)
    w.kube.token_clock_offset = 0.0
    assert reply.status == 400, reply.body
    assert reply.body["error_description"].startswith("AADSTS700024")

    # The audience annotation: Azure AD holds a credential for another audience.
    odd = w.add_federated_identity(
        "odd", selector="odd", service_accounts=("aud",), audience="api://custom"
    )
    patched = dict(odd.manifest["metadata"].get("annotations") or {})
    patched["aadpodidentity.k8s.io/federated-token-audience"] = "api://other"
    w.kube.patch(GV, "AzureIdentity", "odd", "default", {"metadata": {"annotations": patched}})
    aud_pod = w.add_pod("o", selector="odd", service_account="aud")
    w.assign(aud_pod, odd)
    await visible(w, aud_pod)
    await until(
        lambda: (
            w.daemon is not None
            and (found := w.daemon.index.identity("default", "odd")) is not None
            and found.federated_audience == "api://other"
        ),
        what="the annotation seen",
    )
    reply = await w.get_token(w.pod_ip(aud_pod), VAULT)
    assert reply.status == 400
    assert "AADSTS70021" in reply.body["error_description"]
    assert "api://other" in reply.body["error_description"]
    assert w.kube.issued_tokens[-1]["aud"] == ["api://other"]


async def test_explain_prints_the_federated_credential_to_create(running: LoopbackWorld) -> None:
    w = running
    ident = w.add_federated_identity("fed", selector="app", service_accounts=())
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, ident)
    await visible(w, pod)
    text = await explain_text(w, pod)
    assert f"issuer:   {w.kube.issuer}" in text
    assert "subject:  system:serviceaccount:default:web" in text
    assert "audience: api://AzureADTokenExchange" in text
    assert ident.client_id not in text  # redacted, as everywhere
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status == 400
    text = await explain_text(w, pod)
    assert "AADSTS70021" in text  # the last upstream error
    assert "service-account token held" in text


async def test_the_explain_command_reads_the_issuer_from_the_api_server(
    running: LoopbackWorld,
) -> None:
    """`nmi explain` from a workstation (no admin socket): the issuer comes from the API
    server's discovery document, the subject from the pod's service account."""
    from nmi.explain.command import run as explain

    w = running
    ident = w.add_federated_identity("fed", selector="app", service_accounts=())
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, ident)
    out, err = io.StringIO(), io.StringIO()
    argv = ["default/web-1", "--kubeconfig", str(w.kubeconfig)]
    argv += ["--admin-socket", str(w.workdir / "no-such.sock")]
    code = await explain(argv, out=out, err=err, environ={})
    text = out.getvalue()
    assert code == 0, err.getvalue()
    assert f"issuer:   {w.kube.issuer}" in text
    assert "subject:  system:serviceaccount:default:web" in text
    assert "audience: api://AzureADTokenExchange" in text
    assert "federated (the pod's service-account token)" in text


async def test_missing_service_account_is_a_clear_refusal(running: LoopbackWorld) -> None:
    w = running
    ident = w.add_federated_identity("fed", selector="app", service_accounts=("ghost",))
    manifest = m.pod(
        name="web-1",
        node=w.node,
        ip=w.new_pod_ip(),
        labels={"aadpodidbinding": "app"},
        service_account="ghost",  # a service account that does not exist
    )
    status = manifest.pop("status")
    w.kube.create(manifest)
    pod = w.kube.patch("v1", "Pod", "web-1", "default", {"status": status}, subresource="status")
    w.assign(pod, ident)
    await until(
        lambda: (
            w.daemon is not None
            and (p := w.daemon.index.pod("default", "web-1")) is not None
            and p.service_account == "ghost"
        ),
        what="the pod's service account seen",
    )
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status == 400, reply.body
    assert "ghost" in reply.body["error_description"]
    # Asked again and again: the refusal is remembered, the API server asked once.
    for _ in range(10):
        again = await w.get_token(w.pod_ip(pod), VAULT)
        assert again.status == 400
    assert token_requests(w) == 1


# ------------------------------------------------------------------ lifetimes


async def test_the_service_account_token_is_renewed_before_it_is_presented_near_expiry(
    running: LoopbackWorld,
) -> None:
    w = running
    w.kube.max_token_expiration = 125  # 125 s tokens: presented only while over 120 s left
    ident = w.add_federated_identity("fed", selector="app", service_accounts=("web",))
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, ident)
    await visible(w, pod)
    assert (await w.get_token(w.pod_ip(pod), VAULT)).status == 200
    assert token_requests(w) == 1
    federation = w.daemon.federation if w.daemon else None
    assert federation is not None
    held = federation.assertions.peek(pod["metadata"]["uid"], "api://AzureADTokenExchange")
    assert held is not None
    await until(lambda: not federation.assertions.usable(held), timeout=10, what="near expiry")
    # The next exchange (another resource) asks for a fresh token first.
    assert (await w.get_token(w.pod_ip(pod), ARM_RESOURCE)).status == 200
    assert token_requests(w) == 2
    fresh = federation.assertions.peek(pod["metadata"]["uid"], "api://AzureADTokenExchange")
    assert fresh is not None and fresh.token != held.token


async def test_a_deleted_pod_stops_at_once(running: LoopbackWorld) -> None:
    w = running
    ident = w.add_federated_identity("fed", selector="app", service_accounts=("web",))
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, ident)
    await visible(w, pod)
    assert (await w.get_token(w.pod_ip(pod), VAULT)).status == 200
    daemon = w.daemon
    assert daemon is not None and daemon.federation is not None
    uid = pod["metadata"]["uid"]
    assert daemon.federation.assertions.peek(uid, "api://AzureADTokenExchange") is not None
    assert any(e.key.subject == "default/web" for e in daemon.cache.snapshot())
    w.kube.delete("v1", "Pod", "web-1", "default")
    await until(lambda: daemon.index.pod("default", "web-1") is None, what="deletion seen")
    # Its service-account token and the tokens obtained with it are gone with it.
    assert daemon.federation.assertions.peek(uid, "api://AzureADTokenExchange") is None
    assert not any(e.key.subject == "default/web" for e in daemon.cache.snapshot())
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status != 200
    assert token_requests(w) == 1


# ------------------------------------------------------------------ shadow migration


async def test_shadow_trial_not_ready_then_ready_then_switched(world: LoopbackWorld) -> None:
    w = world
    await w.start_daemon(federation_shadow_interval=10.0)
    ident = w.add_user_assigned_identity("msi", selector="app", ad_endpoint=f"{w.aad.url}/")
    w.aad.add_managed_identity(tenant_id=TENANT, client_id=ident.client_id)
    w.kube.patch(
        GV,
        "AzureIdentity",
        "msi",
        "default",
        {"metadata": {"annotations": {"aadpodidentity.k8s.io/federation": "shadow"}}},
    )
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, ident)
    await visible(w, pod)
    daemon = w.daemon
    assert daemon is not None and daemon.federation is not None
    await until(
        lambda: (i := daemon.index.identity("default", "msi")) is not None and i.shadow,
        what="the shadow annotation seen",
    )
    imds_before = sum(w.imds.token_requests.values())

    # Not ready: the managed identity has no federated credential yet. The pod is served
    # by the node IMDS all along; the trial runs beside it.
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status == 200, reply.body
    assert sum(w.imds.token_requests.values()) == imds_before + 1
    shadow = daemon.federation.shadow
    assert shadow is not None
    await until(lambda: shadow.results, what="a trial result")
    result = next(iter(shadow.results.values()))
    assert not result.ready and result.code == "AADSTS70021"
    warning = await until(lambda: events_of(w, pod, FEDERATION_NOT_READY), what="Event")
    assert "system:serviceaccount:default:web" in warning[0]["message"]
    assert w.kube.issuer in warning[0]["message"]
    assert "federation not ready (AADSTS70021)" in await explain_text(w, pod)
    # Bounded: many more requests in the interval, no more trials.
    for _ in range(20):
        assert (await w.get_token(w.pod_ip(pod), VAULT)).status == 200
    assert shadow.trials == 1

    # Ready: the operator creates the federated credential; the next trial proves it.
    w.federate(ident.client_id, "default", "web")

    async def ready() -> bool:
        await w.get_token(w.pod_ip(pod), VAULT)
        found = shadow.result_for(
            daemon.index.identity("default", "msi"), daemon.index.pod("default", "web-1")
        )  # type: ignore[arg-type]
        return found is not None and found.ready

    deadline = time.monotonic() + 30
    while not await ready():
        assert time.monotonic() < deadline, "the trial never became ready"
        await asyncio.sleep(0.2)
    await until(lambda: events_of(w, pod, FEDERATION_READY), what="FederationReady")
    assert "federation ready" in await explain_text(w, pod)
    metrics = _scrape(daemon)
    assert 'nmi_federation_shadow_ready{code="",identity="default/msi"' in metrics

    # Switched: spec.type 3 with the tenant; the very next request is federated, no restart.
    w.kube.patch(GV, "AzureIdentity", "msi", "default", {"spec": {"type": 3, "tenantID": TENANT}})
    await until(
        lambda: (i := daemon.index.identity("default", "msi")) is not None and i.type == 3,
        what="the switch seen",
    )
    imds_before = sum(w.imds.token_requests.values())
    switched = await w.get_token(w.pod_ip(pod), VAULT)
    assert switched.status == 200, switched.body
    assert subject_of_token(w, switched.body["access_token"]) == "system:serviceaccount:default:web"
    assert sum(w.imds.token_requests.values()) == imds_before


async def test_shadow_of_a_service_principal_tries_the_named_federated_application(
    running: LoopbackWorld,
) -> None:
    """``federation-client-id``: the secret-based identity is served from its Secret while the
    trial exchanges the pod's token for another application, which trusts it."""
    w = running
    sp = w.add_service_principal("sp", selector="app")
    target = w.add_federated_identity("target", bind=False, service_accounts=("web",))
    w.kube.patch(
        GV,
        "AzureIdentity",
        "sp",
        "default",
        {
            "metadata": {
                "annotations": {
                    "aadpodidentity.k8s.io/federation": "shadow",
                    "aadpodidentity.k8s.io/federation-client-id": target.client_id,
                }
            }
        },
    )
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, sp)
    await visible(w, pod)
    daemon = w.daemon
    assert daemon is not None and daemon.federation is not None
    await until(
        lambda: (i := daemon.index.identity("default", "sp")) is not None and i.shadow,
        what="the annotations seen",
    )
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status == 200 and reply.body["client_id"] == sp.client_id
    assert claims(reply.body["access_token"])["appidacr"] == "1"  # from the Secret
    shadow = daemon.federation.shadow
    assert shadow is not None
    await until(lambda: shadow.results, what="a trial result")
    result = next(iter(shadow.results.values()))
    assert result.ready, result
    assert [c for c, s, _ in w.aad.federated_issued] == [target.client_id]
    await until(lambda: events_of(w, pod, FEDERATION_READY), what="FederationReady")


def _scrape(daemon: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(daemon.metrics.registry).decode()


async def test_the_audience_flag(world: LoopbackWorld) -> None:
    w = world
    flag = "api://from-flag"
    await w.start_daemon(federated_token_audience=flag)
    ident = w.add_federated_identity("fed", selector="app", service_accounts=("web",), audience="")
    w.aad.remove_federated_credential(
        ident.client_id, w.aad.federated_credentials(ident.client_id)[0].name
    )
    w.federate(ident.client_id, "default", "web", audience=flag)
    pod = w.add_pod("web-1", selector="app", service_account="web")
    w.assign(pod, ident)
    await visible(w, pod)
    reply = await w.get_token(w.pod_ip(pod), VAULT)
    assert reply.status == 200, reply.body
    assert w.kube.issued_tokens[-1]["aud"] == [flag]
