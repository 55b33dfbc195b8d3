"""nmi on a real node made of network namespaces: rules, real clients, drills.

Every test builds its own node namespace (no uplink) with pod namespaces on
veth pairs; nmi runs there with its normal flags and installs its own rules.
"""

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import jwt
import pytest

from iptables import RuleManager, RuleSpec
from nmi_sandbox.nodeworld import METADATA_IP, NODE_IP, NodeWorld

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


def appid(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["appid"])


@pytest.fixture
async def node():  # type: ignore[no-untyped-def]
    async with NodeWorld() as world:
        yield world


async def bound(node: NodeWorld, name: str):  # type: ignore[no-untyped-def]
    ident = node.w.add_user_assigned_identity(f"{name}-id", selector=name)
    pod = node.add_pod(name, selector=name)
    node.w.assign(pod.manifest, ident)
    return pod, ident


async def test_real_clients_get_their_own_identity(node: NodeWorld) -> None:
    alice, alice_id = await bound(node, "alice")
    bob, bob_id = await bound(node, "bob")
    nobody = node.add_pod("nobody")
    seconds = await node.start_nmi()
    print(f"nmi start -> rules installed and path verified: {seconds:.2f} s")

    reply = await node.token(alice)
    assert reply.status == 200, reply.raw
    assert appid(reply.body["access_token"]) == alice_id.client_id
    reply = await node.token(bob)
    assert appid(reply.body["access_token"]) == bob_id.client_id
    reply = await node.token(bob, client_id=alice_id.client_id)
    assert reply.status == 400 and reply.body["error_description"] == "Identity not found"
    reply = await node.token(nobody)
    assert reply.status == 400 and reply.body["error_description"] == "Identity not found"
    reply = await node.curl(
        alice, "/metadata/identity/oauth2/token?api-version=2018-02-01", metadata=False
    )
    assert reply.status == 400 and "metadata header" in reply.body["error_description"]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_"))}
    for client, target in (("azure-identity", f"{ARM}/.default"), ("msal", ARM)):
        code, out, err = await node.net.run(
            alice.ns, [sys.executable, str(CLIENT), client, "-", target], env=env, timeout=90
        )
        assert code == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["ok"], result
        assert appid(result["token"]) == alice_id.client_id
    code, out, err = await node.net.run(
        nobody.ns,
        [sys.executable, str(CLIENT), "azure-identity", "-", f"{ARM}/.default"],
        env=env,
        timeout=90,
    )
    assert json.loads(out.strip().splitlines()[-1])["ok"] is False
    # host-network traffic (the node's own) is not intercepted: it reaches the node IMDS
    served = node.w.imds.http_requests_total
    code, out, err = await node.net.run(
        node.net.node,
        [
            "curl",
            "-sS",
            "-m",
            "5",
            "-H",
            "Metadata: true",
            f"http://{METADATA_IP}/metadata/instance?api-version=2021-02-01",
        ],
    )
    assert code == 0 and "compute" in out, err
    assert node.w.imds.http_requests_total == served + 1


async def test_kill_9_leaves_pods_refused_and_restart_adopts_rules(node: NodeWorld) -> None:
    alice, _ = await bound(node, "alice")
    await node.start_nmi()
    assert (await node.token(alice)).status == 200
    imds_requests = node.w.imds.http_requests_total
    assert node.nmi is not None
    await node.net.kill(node.nmi)
    reply = await node.token(alice)
    # refused (connection refused), never answered by the node's own IMDS
    assert reply.exit_code != 0 and reply.status == 0, await node.diagnose()
    assert node.w.imds.http_requests_total == imds_requests
    manager = RuleManager(
        RuleSpec(metadata_ip=METADATA_IP, metadata_port=80, target_ip=NODE_IP, target_port=2579),
        command_prefix=("ip", "netns", "exec", node.net.node),
    )
    assert await manager.check() == []  # the rules survived the crash
    await node.start_nmi()
    assert (await node.token(alice)).status == 200


async def test_sigterm_exits_zero_and_stays_fail_closed(node: NodeWorld) -> None:
    alice, _ = await bound(node, "alice")
    await node.start_nmi()
    assert node.nmi is not None
    node.nmi.send_signal(15)
    code, _ = await node.wait_exit()
    assert code == 0
    reply = await node.token(alice)
    assert reply.exit_code != 0 and reply.status == 0


async def test_attacker_taking_another_pods_ip_gets_nothing(node: NodeWorld) -> None:
    victim, _ = await bound(node, "victim")
    attacker = node.add_pod("attacker")
    await node.start_nmi()
    assert (await node.token(victim)).status == 200
    node.net.set_pod_ip("attacker", victim.ip)
    reply = await node.token(attacker)
    assert reply.status != 200 and "access_token" not in reply.body
    assert (await node.token(victim)).status == 200


async def test_flushed_chain_is_restored(node: NodeWorld) -> None:
    alice, _ = await bound(node, "alice")
    await node.start_nmi("--ipt-update-interval-sec=1")
    assert (await node.token(alice)).status == 200
    code, _, err = await node.net.run(
        node.net.node, ["iptables", "-w", "-t", "nat", "-F", "NMI-METADATA"]
    )
    assert code == 0, err + await node.diagnose()
    manager = RuleManager(
        RuleSpec(metadata_ip=METADATA_IP, metadata_port=80, target_ip=NODE_IP, target_port=2579),
        command_prefix=("ip", "netns", "exec", node.net.node),
    )
    deadline = asyncio.get_running_loop().time() + 10
    while await manager.check():
        assert asyncio.get_running_loop().time() < deadline, "the chain was not restored"
        await asyncio.sleep(0.1)
    assert (await node.token(alice)).status == 200


async def test_bridge_node_needs_explicit_permission() -> None:
    async with NodeWorld(style="bridge") as node:
        alice, _ = await bound(node, "alice")
        await node.spawn_nmi()
        code, err = await node.wait_exit()
        assert code != 0 and "allow-network-plugin-kubenet" in err
        await node.start_nmi("--allow-network-plugin-kubenet")
        assert (await node.token(alice)).status == 200


async def test_uninstall_is_the_only_way_out(node: NodeWorld) -> None:
    alice, _ = await bound(node, "alice")
    await node.start_nmi()
    assert node.nmi is not None
    await node.net.kill(node.nmi)
    code, out, err = await node.net.run(node.net.node, [sys.executable, "-m", "nmi", "uninstall"])
    assert code == 0 and "removed" in out, err
    code, save, _ = await node.net.run(node.net.node, ["iptables-save"])
    assert "NMI-" not in save
    # with nmi gone for good, pods reach the node's IMDS again (as before nmi was installed)
    reply = await node.curl(alice, "/metadata/instance?api-version=2021-02-01")
    assert reply.status == 200
    code, out, _ = await node.net.run(node.net.node, [sys.executable, "-m", "nmi", "uninstall"])
    assert code == 0 and "no interception rules" in out


async def _keepalive(node: NodeWorld, pod):  # type: ignore[no-untyped-def]
    proc = await node.net.spawn(
        pod.ns,
        [sys.executable, str(Path(__file__).parent / "clients" / "keepalive.py")],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"connected"
    return proc


async def _ask(proc) -> str:  # type: ignore[no-untyped-def]
    proc.stdin.write(b"\n")
    await proc.stdin.drain()
    return (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()


async def test_flows_opened_before_the_rules_are_cut(node: NodeWorld) -> None:
    """A pod's keep-alive connection to the node IMDS opened before nmi's rules never
    gets another answer from it: its packets meet the filter guard, and its conntrack
    entry is deleted so the client reconnects through nmi (with or without
    --enable-conntrack-deletion, which also deletes the DNATed flows at start-up)."""
    pod = node.add_pod("early")
    for flags in ((), ("--enable-conntrack-deletion",)):
        early = await _keepalive(node, pod)
        assert await _ask(early) == "200"  # straight to the node's own IMDS
        served = node.w.imds.http_requests_total
        await node.start_nmi(*flags)
        answer = await _ask(early)
        if not answer.startswith("error"):
            await node.net.kill(node.nmi)
            _, log = await node.wait_exit()
            raise AssertionError(f"the early flow still reached the node IMDS: {answer}\n{log}")
        assert node.w.imds.http_requests_total == served
        await node.net.kill(early)
        assert node.nmi is not None
        await node.net.kill(node.nmi)
        code, _, err = await node.net.run(node.net.node, [sys.executable, "-m", "nmi", "uninstall"])
        assert code == 0, err


async def test_node_facts_from_netlink(node: NodeWorld) -> None:
    node.add_pod("a")
    node.add_pod("b")
    script = (
        "from nmi.node.netfacts import node_address, network_plugin;"
        "print(node_address(configured='', metadata_ip='169.254.169.254'));"
        "print(network_plugin(['10.244.0.2', '10.244.0.3']).style)"
    )
    code, out, err = await node.net.run(node.net.node, [sys.executable, "-c", script])
    assert code == 0, err
    assert out.split() == [NODE_IP, "per-pod"]


async def test_an_ip_taken_over_before_the_api_knows_gets_nothing(node: NodeWorld) -> None:
    """The network plugin frees a pod's IP before the API server shows the pod gone; a
    new sandbox that gets the IP must not get the old pod's identity (issue 10 #16)."""
    from nmi_sandbox.nodeworld import PodHandle

    alice, alice_id = await bound(node, "alice")
    await node.start_nmi()
    reply = await node.token(alice)
    assert reply.status == 200, reply.raw
    ip = alice.ip
    # The sandbox goes, and another one with the same IP arrives on a new veth; the API
    # server still shows alice Running.
    node.net.remove_pod("alice")
    mallory = PodHandle(net=node.net.add_pod("mallory", ip=ip), manifest=alice.manifest)
    for _ in range(3):
        reply = await node.token(mallory)
        assert reply.status in (404, 503), reply.raw
        assert "access_token" not in reply.body
    assert "arrives through interface" in node.nmi_log_text()
    # The API catches up: alice is gone, the IP's new owner (unbound) is a pod of its own.
    node.w.kube.delete("v1", "Pod", "alice", "default")
    node.w.add_pod("mallory", ip=ip)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        reply = await node.token(mallory)
        if reply.status == 400:
            break
        assert asyncio.get_running_loop().time() < deadline, reply.raw
        await asyncio.sleep(0.1)  # a separate process's watch: no signal to wait on
    assert reply.body["error_description"] == "Identity not found"
    assert alice_id.client_id not in reply.raw
