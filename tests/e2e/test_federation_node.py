"""Federation on a real node: a pod's unchanged client, no Secret, nothing on the VM.

The node namespace runs nmi (its own rules) and ``nmi mic``; the pod's real
clients — azure-identity's ``ManagedIdentityCredential`` and curl — ask
169.254.169.254 as on any VM.  The identity is a user-assigned managed
identity known only to Azure AD (it is on no VM and the node's IMDS does not
know it) whose federated credential trusts the cluster's service-account
issuer for the pod's service account: nmi exchanges the pod's own
service-account token for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from nmi_sandbox.nodeworld import NodeWorld
from nmi_sandbox.world import TENANT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("iptables") is None,
        reason="iproute2 and iptables are installed by ./dev",
    ),
]

CLIENT = Path(__file__).parents[1] / "integration" / "clients" / "get_token.py"
VAULT = "https://vault.azure.net"
GV = "aadpodidentity.k8s.io/v1"


async def until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.05)
    return value


def events_of(w: Any, pod: dict[str, Any], reason: str) -> list[dict[str, Any]]:
    uid = pod["metadata"]["uid"]
    return [
        e
        for e in w.kube.list("v1", "Event", pod["metadata"]["namespace"])
        if e.get("reason") == reason and e["involvedObject"].get("uid") == uid
    ]


@pytest.fixture
async def node() -> AsyncIterator[NodeWorld]:
    async with NodeWorld() as world:
        yield world


async def test_a_federated_pod_gets_its_token_through_the_unchanged_imds_call(
    node: NodeWorld,
) -> None:
    w = node.w
    await node.start_nmi()
    await node.start_mic()
    ident = w.add_federated_identity(
        "fed", selector="app", service_accounts=("app",), managed_identity=True
    )
    app = node.add_pod("app", selector="app", service_account="app")
    stranger = node.add_pod("stranger", selector="app", service_account="other")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_"))}
    code, out, err = await node.net.run(
        app.ns,
        [sys.executable, str(CLIENT), "azure-identity", "-", f"{VAULT}/.default"],
        env=env,
        timeout=90,
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], result["error_description"]
    token = jwt.decode(result["token"], options={"verify_signature": False})
    assert token["appid"] == ident.client_id and token["oid"] == ident.object_id
    assert [s for c, s, _ in w.aad.federated_issued if c == ident.client_id] == [
        "system:serviceaccount:default:app"
    ]

    reply = await node.token(app, VAULT)
    assert reply.status == 200, reply.raw
    assert reply.body["access_token"] == result["token"]  # nmi's cache: no second exchange

    # The pod of another service account bound to the same identity gets Azure AD's refusal
    # for its own service account, never the first pod's token.
    refused = await node.token(stranger, VAULT)
    assert refused.status == 400, refused.raw
    assert refused.body["error_description"].startswith("AADSTS70021")
    assert "system:serviceaccount:default:other" in refused.body["error_description"]

    # No secret anywhere and no identity on the VM: nothing read, nothing written to ARM.
    assert not any(k.split(" ")[-1] == "secrets" for k in w.kube.requests)
    assert not any(k.startswith("PATCH") for k in w.arm.requests)
    assert not w.arm.identities_on(w.vmss_id)
    assert sum(w.imds.token_requests.values()) == 0
    assert w.kube.requests["POST serviceaccounts/token"] == 2  # one per pod


async def test_migration_from_a_vm_identity_to_federation_without_a_failed_request(
    node: NodeWorld,
) -> None:
    """The README's migration on a real node, with a client asking all along: a managed
    identity on the scale set (the controller put it there), the shadow trial not ready,
    the federated credential created, the trial ready, the switch to spec.type 3 - and the
    controller takes the identity off the scale set.  Not one request fails."""
    w = node.w
    await node.start_nmi("--federation-shadow-interval=10s")
    await node.start_mic()
    ident = w.add_user_assigned_identity("app-id", selector="app", ad_endpoint=f"{w.aad.url}/")
    w.aad.add_managed_identity(tenant_id=TENANT, client_id=ident.client_id)
    w.kube.patch(
        GV,
        "AzureIdentity",
        "app-id",
        "default",
        {"metadata": {"annotations": {"aadpodidentity.k8s.io/federation": "shadow"}}},
    )
    app = node.add_pod("app", selector="app", service_account="app")
    first = await node.token(app, VAULT, timeout=30)
    assert first.status == 200, first.raw
    assert ident.resource_id.lower() in {i.lower() for i in w.arm.identities_on(w.vmss_id)}

    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:  # the application, asking as it always did
        while not stop.is_set():
            statuses.append((await node.token(app, VAULT, timeout=10)).status)
            await asyncio.sleep(0.1)

    asking = asyncio.create_task(client())
    try:
        not_ready = await until(lambda: events_of(w, app.manifest, "FederationNotReady"))
        assert "AADSTS70021" in not_ready[0]["message"]
        assert "system:serviceaccount:default:app" in not_ready[0]["message"]

        w.federate(ident.client_id, "default", "app")
        await until(lambda: events_of(w, app.manifest, "FederationReady"), timeout=40)

        imds_calls = sum(w.imds.token_requests.values())
        exchanges = len(w.aad.federated_issued)
        w.kube.patch(
            GV, "AzureIdentity", "app-id", "default", {"spec": {"type": 3, "tenantID": TENANT}}
        )
        # The next requests are served by federation; the controller no longer needs the
        # identity on the scale set and takes it off.
        await until(lambda: len(w.aad.federated_issued) > exchanges, what="a federated token")
        await until(lambda: not w.arm.identities_on(w.vmss_id), what="identity off the VM")
        seen = len(statuses)
        await until(lambda: len(statuses) >= seen + 5, what="more requests after the switch")
    finally:
        stop.set()
        await asking
    assert statuses and set(statuses) == {200}, statuses
    assert sum(w.imds.token_requests.values()) == imds_calls  # no IMDS call after the switch

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_"))}
    code, out, err = await node.net.run(
        app.ns,
        [sys.executable, str(CLIENT), "azure-identity", "-", "https://storage.azure.com/.default"],
        env=env,
        timeout=90,
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], result.get("error_description")
    token = jwt.decode(result["token"], options={"verify_signature": False})
    assert token["appid"] == ident.client_id
