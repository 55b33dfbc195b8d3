"""The daemon's request path end to end on loopback: standard mode, all identity types."""

import asyncio
import time
from datetime import datetime

import jwt
import pytest

from nmi_sandbox.world import LoopbackWorld

ARM = "https://management.azure.com"
VAULT = "https://vault.azure.net"


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


async def bound_pod(world: LoopbackWorld, name: str = "app", kind: str = "mi", **kw):  # type: ignore[no-untyped-def]
    if kind == "mi":
        ident = world.add_user_assigned_identity(f"{name}-id", **kw)
    elif kind == "sp":
        ident = world.add_service_principal(f"{name}-id", **kw)
    else:
        ident = world.add_service_principal(
            f"{name}-id", certificate=True, pkcs12_password="pw", **kw
        )
    pod = world.add_pod(name, namespace=ident.namespace, selector=ident.selector)
    world.assign(pod, ident)
    await world.pod_visible(pod)
    await world.synced(
        lambda idx: any(a.state == "Assigned" for a in idx.assignments(ident.namespace, name))
    )
    return pod, ident


def assert_imds_shape(body: dict, resource: str) -> None:
    assert set(body) == {
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    }
    assert all(isinstance(v, str) for v in body.values())
    assert body["resource"] == resource
    assert body["token_type"] == "Bearer"
    now = time.time()
    assert abs(int(body["expires_on"]) - (now + int(body["expires_in"]))) <= 2
    assert int(body["expires_in"]) > 300


async def test_user_assigned_identity_token(running: LoopbackWorld) -> None:
    pod, ident = await bound_pod(running)
    reply = await running.get_token(running.pod_ip(pod), ARM)
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    assert_imds_shape(reply.body, ARM)
    c = claims(reply.token)
    assert c["appid"] == ident.client_id and c["aud"] == ARM
    assert reply.body["client_id"] == ident.client_id
    # nmi asked the node IMDS for exactly that identity, without X-Forwarded-For
    assert running.imds.token_requests[(ident.client_id, ARM)] == 1
    assert all(
        "x-forwarded-for" not in {k.lower() for k in r.headers} for r in running.imds.requests
    )


async def test_service_principal_secret_and_certificate(running: LoopbackWorld) -> None:
    pod, ident = await bound_pod(running, "sp-app", kind="sp")
    reply = await running.get_token(running.pod_ip(pod), VAULT)
    assert reply.status == 200, reply.body
    assert_imds_shape(reply.body, VAULT)
    assert claims(reply.token)["appid"] == ident.client_id
    assert running.aad.issued[(ident.client_id, VAULT)] == 1

    pod2, ident2 = await bound_pod(running, "cert-app", kind="cert")
    reply = await running.get_token(running.pod_ip(pod2), ARM)
    assert reply.status == 200, reply.body
    assert claims(reply.token)["appid"] == ident2.client_id
    assert running.aad.last_assertion_claims is not None
    assert running.aad.last_assertion_claims["iss"] == ident2.client_id


async def test_trailing_slash_resource_and_msal_node_paths(running: LoopbackWorld) -> None:
    pod, _ = await bound_pod(running)
    ip = running.pod_ip(pod)
    for target in (
        "/metadata/identity/oauth2/token/?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F",
        "//metadata/identity/oauth2/token/?api-version=2018-02-01&resource=https://management.azure.com/",
    ):
        reply = await running.request(ip, target, headers={"Metadata": "true"})
        assert reply.status == 200, reply.body
        assert reply.body["resource"] == "https://management.azure.com/"


async def test_unbound_pod_is_refused_at_once(world: LoopbackWorld) -> None:
    # A pod older than the new-pod grace (here: no grace) gets its refusal at once.
    await world.start_daemon(new_pod_grace=0)
    pod = world.add_pod("lonely")
    await world.pod_visible(pod)
    started = time.monotonic()
    reply = await world.get_token(world.pod_ip(pod))
    assert time.monotonic() - started < 1.0
    assert reply.status == 400
    assert reply.body == {"error": "invalid_request", "error_description": "Identity not found"}
    assert "Retry-After" not in reply.headers


async def test_new_pod_waits_for_a_binding_seen_after_it(world: LoopbackWorld) -> None:
    """Pods and bindings come on separate watches: a new pod may be seen first."""
    daemon = await world.start_daemon(new_pod_grace=30)
    pod = world.add_pod("early", selector="late-selector")
    await world.pod_visible(pod)
    asking = asyncio.create_task(world.get_token(world.pod_ip(pod)))
    assert daemon.handler is not None
    handler = daemon.handler
    deadline = time.monotonic() + 10
    # until the request is inside nmi (a counter with no event to wait on)
    while handler.in_flight == 0 and not asking.done() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert handler.in_flight == 1 and not asking.done()  # waiting, not refused
    ident = world.add_user_assigned_identity("late-id", selector="late-selector")
    world.assign(pod, ident)  # the binding, then MIC's assignment, arrive now
    reply = await asyncio.wait_for(asking, 10)
    assert reply.status == 200, reply.body


async def test_new_pod_without_identity_is_refused_when_its_grace_ends(
    world: LoopbackWorld,
) -> None:
    await world.start_daemon(new_pod_grace=2.0)
    pod = world.add_pod("newcomer")
    await world.pod_visible(pod)
    created = datetime.fromisoformat(pod["metadata"]["creationTimestamp"]).timestamp()
    at_least = created + 2.0 - time.time()  # the grace left (the timestamp has 1 s resolution)
    started = time.monotonic()
    reply = await world.get_token(world.pod_ip(pod))
    elapsed = time.monotonic() - started
    assert reply.status == 400 and reply.body["error_description"] == "Identity not found"
    assert at_least - 0.05 <= elapsed < 2.5  # it waited out the grace, and no longer


async def test_metadata_probe_answered_at_once_for_any_caller(running: LoopbackWorld) -> None:
    # an IP nmi does not know: the probe must still be answered without a lookup
    started = time.monotonic()
    reply = await running.request("127.0.0.250", "/metadata/identity/oauth2/token")
    assert time.monotonic() - started < 0.5
    assert reply.status == 400
    assert reply.body == {
        "error": "invalid_request",
        "error_description": "Required metadata header not specified",
    }
    assert "Identity not found" not in str(reply.body)


async def test_unknown_caller_gets_retryable_404(running: LoopbackWorld) -> None:
    reply = await running.get_token("127.0.0.251")
    assert reply.status == 404 and reply.body["error"] == "not_found"
    assert "Retry-After" not in reply.headers


async def test_wait_for_created_then_assigned_wakes_on_change(world: LoopbackWorld) -> None:
    # aad-pod-identity's default 5 s interval: a poller would answer seconds late
    running = world
    await world.start_daemon(find_identity_retry_interval=5.0)
    ident = running.add_user_assigned_identity("slow-id")
    pod = running.add_pod("slow", selector=ident.selector)
    await running.pod_visible(pod)
    await running.binding_visible(ident)
    request = asyncio.create_task(running.get_token(running.pod_ip(pod)))
    # nothing assigned yet: the request must be waiting, not refused
    await asyncio.sleep(0)
    running.assign(pod, ident, state="Created")
    await running.synced(lambda idx: bool(idx.assignments("default", "slow")))
    assert not request.done()
    flipped = time.monotonic()
    running.set_assignment_state(pod, ident, "Assigned")
    reply = await request
    answered = time.monotonic() - flipped
    assert reply.status == 200, reply.body
    assert answered < 2.0  # woken by the watch, not by a poll interval


async def test_wait_bound_gives_404_or_503_with_flag(world: LoopbackWorld) -> None:
    await world.start_daemon(
        retry_attempts_for_created=1,
        retry_attempts_for_assigned=1,
        find_identity_retry_interval=0.2,
    )
    ident = world.add_user_assigned_identity("never-id")
    pod = world.add_pod("never", selector=ident.selector)
    world.assign(pod, ident, state="Created")
    await world.pod_visible(pod)
    await world.binding_visible(ident)
    reply = await world.get_token(world.pod_ip(pod))
    assert reply.status == 404 and reply.body["error"] == "not_found"
    await world.stop_daemon()
    await world.start_daemon(
        retry_attempts_for_created=1,
        retry_attempts_for_assigned=1,
        find_identity_retry_interval=0.2,
        set_retry_after_header=True,
    )
    await world.pod_visible(pod)
    await world.binding_visible(ident)
    reply = await world.get_token(world.pod_ip(pod))
    assert reply.status == 503 and reply.headers["Retry-After"] == "20"


async def test_multiple_identities_need_a_selector(running: LoopbackWorld) -> None:
    a = running.add_user_assigned_identity("multi-a", selector="multi")
    b = running.add_service_principal("multi-b", selector="multi")
    pod = running.add_pod("multi", selector="multi")
    running.assign(pod, a)
    running.assign(pod, b)
    await running.pod_visible(pod)
    await running.synced(lambda idx: len(idx.assignments("default", "multi")) == 2)
    ip = running.pod_ip(pod)
    reply = await running.get_token(ip)
    assert reply.status == 400
    assert reply.body["error_description"].startswith("Multiple user assigned identities exist")
    reply = await running.get_token(ip, client_id=b.client_id.upper())
    assert reply.status == 200 and claims(reply.token)["appid"] == b.client_id
    reply = await running.get_token(ip, msi_res_id=a.resource_id)
    assert reply.status == 200 and claims(reply.token)["appid"] == a.client_id
    reply = await running.get_token(ip, mi_res_id=a.resource_id)
    assert reply.status == 200 and claims(reply.token)["appid"] == a.client_id
    # object_id: learned from the identities' own tokens
    reply = await running.get_token(ip, object_id=a.object_id)
    assert reply.status == 200 and claims(reply.token)["appid"] == a.client_id
    reply = await running.get_token(ip, client_id=a.client_id, msi_res_id=a.resource_id)
    assert reply.status == 400


async def test_identity_of_another_pod_is_never_served(running: LoopbackWorld) -> None:
    _pod_a, ident_a = await bound_pod(running, "alice")
    pod_b, ident_b = await bound_pod(running, "bob")
    reply = await running.get_token(running.pod_ip(pod_b), client_id=ident_a.client_id)
    assert reply.status == 400 and reply.body["error_description"] == "Identity not found"
    reply = await running.get_token(running.pod_ip(pod_b), msi_res_id=ident_a.resource_id)
    assert reply.status == 400
    reply = await running.get_token(running.pod_ip(pod_b))
    assert claims(reply.token)["appid"] == ident_b.client_id


async def test_deleted_assignment_stops_service_on_next_request(running: LoopbackWorld) -> None:
    pod, ident = await bound_pod(running, "revoked")
    ip = running.pod_ip(pod)
    assert (await running.get_token(ip)).status == 200
    assert (await running.get_token(ip)).status == 200  # cached
    running.kube.delete(
        "aadpodidentity.k8s.io/v1", "AzureIdentityBinding", f"{ident.name}-binding", "default"
    )
    running.unassign(pod, ident)
    await running.synced(lambda idx: not idx.assignments("default", "revoked"))
    reply = await running.get_token(ip)
    assert reply.status == 400 and reply.body["error_description"] == "Identity not found"


@pytest.mark.parametrize("revoke", ["binding", "identity", "label"])
async def test_revocation_stops_service_while_the_assignment_stays(
    running: LoopbackWorld, revoke: str
) -> None:
    """Nothing removes the AzureAssignedIdentity (MIC down or behind): deleting the
    binding or the identity, or relabelling the pod, stops service on the next request."""
    pod, ident = await bound_pod(running, f"keep-{revoke}")
    ip = running.pod_ip(pod)
    assert (await running.get_token(ip)).status == 200
    assert (await running.get_token(ip)).status == 200  # cached
    group = "aadpodidentity.k8s.io/v1"
    if revoke == "binding":
        running.kube.delete(group, "AzureIdentityBinding", f"{ident.name}-binding", "default")
        await running.synced(lambda idx: idx.binding("default", f"{ident.name}-binding") is None)
    elif revoke == "identity":
        running.kube.delete(group, "AzureIdentity", ident.name, "default")
        await running.synced(lambda idx: idx.identity("default", ident.name) is None)
    else:
        name = pod["metadata"]["name"]
        running.kube.patch(
            "v1", "Pod", name, "default", {"metadata": {"labels": {"aadpodidbinding": "x"}}}
        )
        await running.synced(
            lambda idx: (p := idx.pod("default", name)) is not None and p.binding_label == "x"
        )
    assert running.daemon is not None
    assert running.daemon.index.assignments("default", pod["metadata"]["name"])  # still there
    for _ in range(3):
        reply = await running.get_token(ip)
        assert reply.status in (400, 404), reply.body
        assert "access_token" not in reply.body


async def test_cold_concurrency_makes_one_upstream_call(running: LoopbackWorld) -> None:
    pod, ident = await bound_pod(running, "busy", kind="sp")
    running.aad.latency = 0.2
    ip = running.pod_ip(pod)
    replies = await asyncio.gather(*(running.get_token(ip, VAULT) for _ in range(100)))
    assert all(r.status == 200 for r in replies)
    assert len({r.token for r in replies}) == 1
    assert running.aad.token_requests[(ident.client_id, VAULT)] == 1


async def test_rotated_secret_is_used_without_restart(running: LoopbackWorld) -> None:
    pod, ident = await bound_pod(running, "rotating", kind="sp")
    ip = running.pod_ip(pod)
    assert (await running.get_token(ip, VAULT)).status == 200
    secret_rv = running.kube.get("v1", "Secret", f"{ident.name}-credential", "default")["metadata"][
        "resourceVersion"
    ]
    running.rotate_secret(ident)
    assert running.daemon is not None
    secrets = running.daemon.secrets
    assert secrets is not None

    async def current_rv() -> str:
        found = await secrets.get("default", f"{ident.name}-credential")
        assert found is not None
        return found.meta.resource_version

    while await current_rv() == secret_rv:
        assert await secrets.changed.wait(5), "the rotated Secret never reached nmi"
    # the old secret no longer works in AAD: a success proves the new one was used
    reply = await running.get_token(ip, ARM)
    assert reply.status == 200, reply.body
    reply = await running.get_token(ip, VAULT)
    assert reply.status == 200, reply.body
    assert running.aad.token_requests[(ident.client_id, VAULT)] == 2


async def test_exception_pod_gets_node_identity(running: LoopbackWorld) -> None:
    node_client = "11111111-2222-3333-4444-555555555555"
    running.imds.set_system_assigned(
        client_id=node_client, object_id="66666666-2222-3333-4444-555555555555"
    )
    running.kube.create(
        {
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzurePodIdentityException",
            "metadata": {"name": "mic-exception", "namespace": "kube-system"},
            "spec": {"podLabels": {"app": "mic"}},
        }
    )
    pod = running.add_pod("mic-abc", namespace="kube-system", labels={"app": "MIC"})
    await running.pod_visible(pod)
    await running.synced(lambda idx: bool(idx.exceptions_in("kube-system")))
    reply = await running.get_token(running.pod_ip(pod))
    assert reply.status == 200, reply.body
    assert claims(reply.token)["appid"] == node_client


async def test_upstream_errors_map_to_contract(running: LoopbackWorld) -> None:
    pod, _ident = await bound_pod(running, "errs", kind="sp")
    ip = running.pod_ip(pod)
    reply = await running.get_token(ip, "https://unknown.example.com")
    assert reply.status == 400 and reply.body["error"] == "invalid_resource"
    assert "AADSTS500011" in reply.body["error_description"]
    assert "Retry-After" not in reply.headers
    running.aad.outage = True
    reply = await running.get_token(ip, ARM)
    assert reply.status == 503 and int(reply.headers["Retry-After"]) >= 1
    running.aad.outage = False
    reply = await running.get_token(ip, "https://storage.azure.com")
    assert reply.status == 200, reply.body

    mi_pod, _mi = await bound_pod(running, "imds-errs")
    running.imds.fail_next(1, status=429, retry_after=3)
    reply = await running.get_token(running.pod_ip(mi_pod), VAULT)
    assert reply.status == 429 and reply.headers["Retry-After"] == "3"
    # honoured: nothing goes upstream for that token before Retry-After
    reply = await running.get_token(running.pod_ip(mi_pod), VAULT)
    assert reply.status == 429 and int(reply.headers["Retry-After"]) <= 3
    running.imds.fail_next(1, status=500)
    reply = await running.get_token(running.pod_ip(mi_pod), "https://storage.azure.com")
    assert reply.status == 503 and "Retry-After" in reply.headers
    reply = await running.get_token(running.pod_ip(mi_pod), "https://storage.azure.com")
    assert reply.status == 200


async def test_authority_not_allowed_and_cross_namespace_secret(running: LoopbackWorld) -> None:
    ident = running.add_service_principal("cross", namespace="team-a", secret_namespace="team-b")
    pod = running.add_pod("cross", namespace="team-a", selector=ident.selector)
    running.assign(pod, ident)
    await running.pod_visible(pod)
    await running.synced(lambda idx: bool(idx.assignments("team-a", "cross")))
    reply = await running.get_token(running.pod_ip(pod))
    assert reply.status == 400 and "namespace" in reply.body["error_description"]
    assert running.aad.requests_total == 0

    evil = running.add_service_principal("evil", ad_endpoint="https://evil.example.com/")
    pod = running.add_pod("evil", selector=evil.selector)
    running.assign(pod, evil)
    await running.pod_visible(pod)
    await running.synced(lambda idx: bool(idx.assignments("default", "evil")))
    reply = await running.get_token(running.pod_ip(pod))
    assert reply.status == 400 and "adEndpoint" in reply.body["error_description"]


async def test_legacy_capitalised_objects(running: LoopbackWorld) -> None:
    ident = running.add_user_assigned_identity("legacy-id", legacy_keys=True)
    pod = running.add_pod("legacy", selector=ident.selector)
    running.assign(pod, ident)
    await running.pod_visible(pod)
    await running.synced(lambda idx: bool(idx.assignments("default", "legacy")))
    reply = await running.get_token(running.pod_ip(pod))
    assert reply.status == 200 and claims(reply.token)["appid"] == ident.client_id


async def test_pod_ip_reuse_never_serves_previous_owner(running: LoopbackWorld) -> None:
    pod, _ident = await bound_pod(running, "first")
    ip = running.pod_ip(pod)
    assert (await running.get_token(ip)).status == 200
    running.kube.delete("v1", "Pod", "first", "default")
    newcomer = running.add_pod("second", ip=ip)
    await running.synced(lambda idx: [p.meta.name for p in idx.pods_with_ip(ip)] == ["second"])
    reply = await running.get_token(ip)
    assert reply.status == 400 and reply.body["error_description"] == "Identity not found"
    assert newcomer["metadata"]["name"] == "second"
