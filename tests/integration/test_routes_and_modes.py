"""Proxying, /host/token, managed mode, readiness and bad input."""

import asyncio
import json
import socket

import aiohttp
import jwt

from nmi.config import OperationMode
from nmi_sandbox.world import LoopbackWorld


def appid(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["appid"])


async def test_other_metadata_paths_are_proxied_cleanly(running: LoopbackWorld) -> None:
    pod = running.add_pod("meta")
    await running.pod_visible(pod)
    ip = running.pod_ip(pod)
    reply = await running.request(
        ip,
        "/metadata/instance?api-version=2021-02-01",
        headers={"Metadata": "true", "Connection": "keep-alive, X-Custom", "X-Custom": "drop-me"},
    )
    assert reply.status == 200, reply.body
    assert "compute" in reply.body
    last = running.imds.requests[-1]
    sent = {k.lower() for k in last.headers}
    assert "x-forwarded-for" not in sent and "x-custom" not in sent
    # the IMDS rejects X-Forwarded-For; nmi never adds one, so a plain request succeeds
    reply = await running.request(ip, "/metadata/versions", headers={"Metadata": "true"})
    assert reply.status == 200
    # other identity paths are never proxied to the node's IMDS
    before = running.imds.http_requests_total
    for path in (
        "/metadata/identity/issuecredential",
        "/metadata/identity/getplatformmetadata",
        "/metadata/identity\\oauth2\\token",
        "/metadata/instance/../identity/oauth2/token",
        # forwarded with the pod's Metadata header and query before the allow-list
        "/metadata/identity%20/oauth2/token?api-version=2018-02-01&resource=x",
        "/metadata/identity;x/oauth2/token?api-version=2018-02-01&resource=x",
        "/metadata%252fidentity/oauth2/token?api-version=2018-02-01&resource=x",
        "/metadata/instance/%252e%252e/identity/oauth2/token?api-version=2018-02-01&resource=x",
        "/metadata/anything-else?api-version=2021-02-01",
    ):
        reply = await running.request(ip, path, headers={"Metadata": "true"})
        assert reply.status == 404, path
        assert reply.body["error"] == "not_found"
    assert running.imds.http_requests_total == before


async def test_block_instance_metadata(world: LoopbackWorld) -> None:
    await world.start_daemon(block_instance_metadata=True)
    pod = world.add_pod("blocked")
    await world.pod_visible(pod)
    reply = await world.request(
        world.pod_ip(pod),
        "/metadata/instance/compute?api-version=2021-02-01",
        headers={"Metadata": "true"},
    )
    assert reply.status == 403 and reply.body["error"] == "forbidden"
    assert "unreachable" not in str(reply.body)


async def test_proxy_upstream_down_is_json_502(running: LoopbackWorld) -> None:
    pod = running.add_pod("down")
    await running.pod_visible(pod)
    await running.imds.stop()
    reply = await running.request(
        running.pod_ip(pod),
        "/metadata/instance?api-version=2021-02-01",
        headers={"Metadata": "true"},
    )
    assert reply.status == 502 and reply.body["error"] == "bad_gateway"


async def test_token_path_method_and_api_version_errors(running: LoopbackWorld) -> None:
    ip = "127.0.0.200"
    reply = await running.request(
        ip,
        "/metadata/identity/oauth2/token?resource=x",
        method="POST",
        headers={"Metadata": "true"},
    )
    assert reply.status == 405 and reply.body["error"] == "method_not_allowed"
    reply = await running.request(
        ip, "/metadata/identity/oauth2/token?resource=x", headers={"Metadata": "true"}
    )
    assert reply.status == 400 and reply.body["newest-versions"] == ["2018-02-01"]
    reply = await running.request(
        ip, "/metadata/identity/oauth2/token?api-version=2018-02-01", headers={"Metadata": "true"}
    )
    assert reply.status == 400 and "resource" in reply.body["error_description"]


async def test_host_token(running: LoopbackWorld) -> None:
    ident = running.add_user_assigned_identity("host-id")
    pod = running.add_pod("csi-client", selector=ident.selector)
    running.assign(pod, ident)
    await running.pod_visible(pod)
    await running.synced(lambda idx: bool(idx.assignments("default", "csi-client")))
    target = "/host/token/?resource=https://vault.azure.net"
    reply = await running.request(
        "127.0.0.1", target, headers={"podns": "default", "podname": "csi-client"}
    )
    assert reply.status == 200, reply.body
    assert reply.body["clientid"] == ident.client_id
    assert appid(reply.body["token"]["access_token"]) == ident.client_id
    reply = await running.request("127.0.0.1", target)
    assert reply.status == 400
    reply = await running.request(
        running.pod_ip(pod), target, headers={"podns": "default", "podname": "csi-client"}
    )
    assert reply.status == 403


async def test_managed_mode(world: LoopbackWorld) -> None:
    await world.start_daemon(operation_mode=OperationMode.MANAGED)
    ident = world.add_user_assigned_identity("managed-id", namespace="team-a", selector="web")
    other = world.add_user_assigned_identity("other-ns-id", namespace="team-b", selector="web")
    pod = world.add_pod("web", namespace="team-a", selector="web")
    await world.pod_visible(pod)
    await world.synced(lambda idx: len(idx.bindings_with_selector("web")) == 2)
    reply = await world.get_token(world.pod_ip(pod))
    assert reply.status == 200, reply.body
    assert appid(reply.token) == ident.client_id
    reply = await world.get_token(world.pod_ip(pod), client_id=other.client_id)
    assert reply.status == 400 and reply.body["error_description"] == "Identity not found"


async def test_not_ready_until_first_sync(world: LoopbackWorld) -> None:
    await world.kube.stop()
    from nmi.app import Daemon

    daemon = Daemon(world.settings())
    starting = asyncio.create_task(daemon.start())
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.wait_for(daemon.probes.listening.wait(), 10)
            url = f"http://127.0.0.1:{daemon.probes.port}"
            async with session.get(f"{url}/healthz") as resp:
                assert resp.status == 200
            async with session.get(f"{url}/readyz") as resp:
                assert resp.status == 503
                assert "watches" in (await resp.json())["failing"]
            assert not starting.done()
            await world.kube.start()
            await asyncio.wait_for(asyncio.shield(starting), 30)
            async with session.get(f"{url}/readyz") as resp:
                assert resp.status == 200
    finally:
        if not starting.done():
            starting.cancel()
        await daemon.stop()


async def test_garbage_requests_get_json_and_service_continues(running: LoopbackWorld) -> None:
    ident = running.add_user_assigned_identity("steady-id")
    pod = running.add_pod("steady", selector=ident.selector)
    running.assign(pod, ident)
    await running.pod_visible(pod)
    await running.synced(lambda idx: bool(idx.assignments("default", "steady")))
    assert running.daemon is not None
    port = running.daemon.port
    garbage = [
        b"GET /metadata/identity/oauth2/token?resource=%zz&api-version=2018-02-01 HTTP/1.1\r\n"
        b"Host: x\r\nMetadata: true\r\n\r\n",
        b"GET /metadata/identity/oauth2/token?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"BREW /x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for raw in garbage:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, family=socket.AF_INET)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split(b" ")[1].startswith(b"4"), (raw[:40], data[:80])
        assert b"application/json" in head
        assert json.loads(body)["error"] in ("invalid_request", "not_found", "method_not_allowed")
    reply = await running.get_token(running.pod_ip(pod))
    assert reply.status == 200


async def test_metadata_header_not_required(world: LoopbackWorld) -> None:
    """--metadata-header-required=false: the header is no longer needed (and the start-up
    path probe does not depend on it)."""
    await world.start_daemon(metadata_header_required=False)
    ident = world.add_user_assigned_identity("no-header-id")
    pod = world.add_pod("no-header", selector=ident.selector)
    world.assign(pod, ident)
    await world.pod_visible(pod)
    await world.synced(lambda idx: bool(idx.assignments("default", "no-header")))
    reply = await world.get_token(world.pod_ip(pod), metadata=False)
    assert reply.status == 200, reply.body
    # The other checks keep their order and answers.
    reply = await world.request(
        world.pod_ip(pod), "/metadata/identity/oauth2/token?resource=x", method="POST"
    )
    assert reply.status == 405


async def test_secret_label_closes_the_confused_deputy(world: LoopbackWorld) -> None:
    """--secret-label: whoever may create an AzureIdentity in a namespace can otherwise make
    nmi use every service-principal Secret there; with it, only labelled Secrets count."""
    await world.start_daemon(secret_label="aadpodidentity.k8s.io/credential=true")
    ident = world.add_service_principal("labelled-id")
    pod = world.add_pod("labelled", selector=ident.selector)
    world.assign(pod, ident)
    await world.pod_visible(pod)
    await world.synced(lambda idx: bool(idx.assignments("default", "labelled")))
    reply = await world.get_token(world.pod_ip(pod))
    assert reply.status == 400, reply.body
    assert "--secret-label" in reply.body["error_description"]
    world.kube.patch(
        "v1",
        "Secret",
        "labelled-id-credential",
        "default",
        {"metadata": {"labels": {"aadpodidentity.k8s.io/credential": "true"}}},
    )
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # the Secret's watch delivers the label; the next request uses it
        reply = await world.get_token(world.pod_ip(pod))
        if reply.status == 200 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert reply.status == 200, reply.body
