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

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest

from nmi_sandbox.nodeworld import NodeWorld

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
