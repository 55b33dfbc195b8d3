"""Standard mode on a real node with nothing but nmi and nmi's controller.

The node namespace runs nmi (rules installed by itself) and ``nmi mic`` (the
Deployment's flags) as processes; the node's IMDS serves a user-assigned
identity only once ARM shows it on the node's scale set.  The test creates an
AzureIdentity, a binding and a pod - nothing else: every
AzureAssignedIdentity is the controller's - and the pod's real client
(azure-identity's ManagedIdentityCredential, curl) gets its token through
169.254.169.254.  Deleting the pod takes the assignment and the identity
away again.
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

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("iptables") is None,
        reason="iproute2 and iptables are installed by ./dev",
    ),
]

CLIENT = Path(__file__).parents[1] / "integration" / "clients" / "get_token.py"
ARM = "https://management.azure.com"
GV = "aadpodidentity.k8s.io/v1"


@pytest.fixture
async def node() -> AsyncIterator[NodeWorld]:
    async with NodeWorld() as world:
        yield world


async def until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return value


async def test_only_the_controller_assigns_and_the_pods_client_gets_its_token(
    node: NodeWorld,
) -> None:
    w = node.w
    await node.start_nmi()
    await node.start_mic()
    ident = w.add_user_assigned_identity("app-id", selector="app")
    app = node.add_pod("app", selector="app")
    other = node.add_pod("other")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_"))}
    code, out, err = await node.net.run(
        app.ns,
        [sys.executable, str(CLIENT), "azure-identity", "-", f"{ARM}/.default"],
        env=env,
        timeout=90,
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], result
    token = jwt.decode(result["token"], options={"verify_signature": False})
    assert token["appid"] == ident.client_id

    found = w.kube.list(GV, "AzureAssignedIdentity")
    assert [a["metadata"]["name"] for a in found] == ["app-default-app-id"]
    assert found[0]["status"]["status"] == "Assigned"
    assert ident.resource_id.lower() in {i.lower() for i in w.arm.identities_on(w.vmss_id)}
    assert w.arm.requests["PATCH vmss"] == 1

    refused = await node.token(other)
    assert refused.status == 400 and refused.body["error_description"] == "Identity not found"

    # The pod goes: the controller deletes its assignment and takes the identity off the
    # scale set; the node's IMDS then no longer serves it to anyone.
    w.kube.delete("v1", "Pod", "app", "default")
    await until(lambda: not w.kube.list(GV, "AzureAssignedIdentity"), what="assignment gone")
    await until(lambda: not w.arm.identities_on(w.vmss_id), what="identity removed")
    assert ident.client_id not in w.arm.client_ids_on_node(w.provider_id)
    assert await node.stop_mic() == 0  # SIGTERM: a clean stop, the lease released
    lease = w.kube.get("coordination.k8s.io/v1", "Lease", "nmi-mic", "kube-system")
    assert lease is not None and lease["spec"]["holderIdentity"] == ""
