"""Real clients against the running daemon: curl, azure-identity, msal (separate processes)."""

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import jwt
import pytest

from nmi_sandbox.world import LoopbackWorld

CLIENT = Path(__file__).parent / "clients" / "get_token.py"


def appid(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["appid"])


async def run(*argv: str, env: dict[str, str] | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def sdk(world: LoopbackWorld, client: str, source: str, target: str, *selector: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "IDENTITY_ENDPOINT",
            "IDENTITY_HEADER",
            "MSI_ENDPOINT",
            "MSI_SECRET",
            "IMDS_ENDPOINT",
            "AZURE_CLIENT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
        )
    }
    env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = world.token_url
    out = await run(sys.executable, str(CLIENT), client, source, target, *selector, env=env)
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
async def bound(running: LoopbackWorld):  # type: ignore[no-untyped-def]
    a = running.add_user_assigned_identity("client-a", selector="clients")
    b = running.add_service_principal("client-b", selector="clients")
    pod = running.add_pod("sdk-app", selector="clients")
    running.assign(pod, a)
    running.assign(pod, b)
    lonely = running.add_pod("sdk-lonely")
    await running.pod_visible(pod)
    await running.pod_visible(lonely)
    await running.synced(lambda idx: len(idx.assignments("default", "sdk-app")) == 2)
    return running, pod, lonely, a, b


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by the setup script")
async def test_curl(bound) -> None:  # type: ignore[no-untyped-def]
    world, pod, lonely, a, _ = bound
    url = (
        f"{world.token_url}/metadata/identity/oauth2/token?api-version=2018-02-01"
        f"&resource=https%3A%2F%2Fmanagement.azure.com&client_id={a.client_id}"
    )
    out = await run("curl", "-sS", "--interface", world.pod_ip(pod), "-H", "Metadata: true", url)
    body = json.loads(out)
    assert appid(body["access_token"]) == a.client_id
    out = await run("curl", "-sS", "--interface", world.pod_ip(lonely), "-H", "Metadata: true", url)
    assert json.loads(out)["error_description"] == "Identity not found"


async def test_azure_identity_managed_identity_credential(bound) -> None:  # type: ignore[no-untyped-def]
    world, pod, lonely, a, b = bound
    ip = world.pod_ip(pod)
    res = await sdk(
        world, "azure-identity", ip, "https://vault.azure.net/.default", f"client_id={b.client_id}"
    )
    assert res["ok"], res
    assert appid(res["token"]) == b.client_id and res["same_second"]
    res = await sdk(
        world,
        "azure-identity",
        ip,
        "https://management.azure.com/.default",
        f"resource_id={a.resource_id}",
    )
    assert res["ok"], res
    assert appid(res["token"]) == a.client_id
    # two identities and no selector: the SDK gets the IMDS error, as on a VM
    res = await sdk(world, "azure-identity", ip, "https://management.azure.com/.default")
    assert not res["ok"] and "Multiple user assigned identities" in res["error_description"]
    res = await sdk(
        world, "azure-identity", world.pod_ip(lonely), "https://management.azure.com/.default"
    )
    assert not res["ok"] and res["error"] == "CredentialUnavailableError"


async def test_msal_managed_identity_client(bound) -> None:  # type: ignore[no-untyped-def]
    world, pod, _, a, _ = bound
    res = await sdk(
        world, "msal", world.pod_ip(pod), "https://storage.azure.com", f"client_id={a.client_id}"
    )
    assert res["ok"], res
    assert appid(res["token"]) == a.client_id and int(res["expires_in"]) > 300
