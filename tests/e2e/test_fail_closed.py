"""Fail closed against every rule change, not only nmi's own (issue 10, items 6-10, 17).

Each test builds a node in network namespaces, starts the real nmi there with its normal
flags (the default 60 s reconcile interval: what repairs faster is the change watch), and
then does to the node's rules what another tool or an operator would do.  Whether the
node's IMDS was reached is counted by the IMDS emulator itself.
"""

import asyncio
import os
import shutil
from collections.abc import AsyncIterator

import pytest

from nmi_sandbox.nodeworld import NODE_IP, NodeWorld, PodHandle

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("iptables") is None,
        reason="iproute2 and iptables are installed by ./dev",
    ),
]


@pytest.fixture
async def node() -> AsyncIterator[NodeWorld]:
    async with NodeWorld() as world:
        yield world


async def bound(node: NodeWorld, name: str) -> PodHandle:
    ident = node.w.add_user_assigned_identity(f"{name}-id", selector=name)
    pod = node.add_pod(name, selector=name)
    node.w.assign(pod.manifest, ident)
    return pod


async def iptables(node: NodeWorld, *args: str) -> str:
    code, out, err = await node.net.run(node.net.node, ["iptables", "-w", "5", *args])
    assert code == 0, err
    return out


async def until(predicate, timeout: float = 5.0, step: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``predicate()`` (awaited) holds; nmi is another process: polled."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await predicate():
        assert loop.time() - started < timeout, "condition not reached"
        await asyncio.sleep(step)
    return loop.time() - started


async def test_a_flushed_nat_table_opens_nothing_and_is_restored_within_a_second(
    node: NodeWorld,
) -> None:
    alice = await bound(node, "alice")
    mallory = node.add_pod("mallory")  # no identity of its own
    await node.start_nmi()
    assert (await node.token(alice)).status == 200
    served = node.w.imds.http_requests_total
    await iptables(node, "-t", "nat", "-F")  # every chain of the nat table, kube's too

    async def restored() -> bool:
        out = await iptables(node, "-t", "nat", "-S", "PREROUTING")
        return "NMI-METADATA" in out

    # The window before the repair: pods reach neither nmi nor the node's own IMDS.
    attempts = [node.token(mallory, timeout=1.0) for _ in range(3)]
    seconds = await until(restored, timeout=5.0)
    for reply in await asyncio.gather(*attempts):
        assert reply.status != 200, reply.raw
    assert node.w.imds.http_requests_total == served, "a pod reached the node IMDS"
    assert seconds < 1.5, seconds
    assert (await node.token(alice)).status == 200  # served again after the repair
    refused = await node.token(mallory)
    assert refused.status == 400 and refused.body["error_description"] == "Identity not found"
    assert "interception rules drifted and were restored" in node.nmi_log_text()


async def test_a_notrack_rule_for_the_pod_range_is_reported_and_leaks_nothing(
    node: NodeWorld,
) -> None:
    alice = await bound(node, "alice")
    await node.start_nmi()
    served = node.w.imds.http_requests_total
    # What Calico's doNotTrack policies and Cilium's no-conntrack mode install.
    await iptables(
        node, "-t", "raw", "-A", "PREROUTING", "-s", node.net.pod_cidr, "-j", "CT", "--notrack"
    )

    async def not_ready() -> bool:
        return await node.probe("/readyz") == 503

    await until(not_ready, timeout=5.0)
    reply = await node.token(alice, timeout=1.0)
    assert reply.status != 200 and node.w.imds.http_requests_total == served
    log = node.nmi_log_text()
    assert "take pods' metadata traffic around nmi" in log and "--notrack" in log
    events = [
        e
        for e in node.w.kube.list("v1", "Event", "default")
        if e["involvedObject"]["kind"] == "Node" and e["reason"] == "InterceptionBypassed"
    ]
    assert events and "--notrack" in events[0]["message"]
    metrics = await node.metrics()
    assert "nmi_interception_bypasses 1.0" in metrics
    await iptables(
        node, "-t", "raw", "-D", "PREROUTING", "-s", node.net.pod_cidr, "-j", "CT", "--notrack"
    )

    async def ready() -> bool:
        return await node.probe("/readyz") == 200

    await until(ready, timeout=5.0)
    assert (await node.token(alice)).status == 200


async def test_an_accept_ahead_of_the_jump_is_repaired_and_leaks_nothing(node: NodeWorld) -> None:
    alice = await bound(node, "alice")
    await node.start_nmi()
    assert (await node.token(alice)).status == 200  # cached in nmi from now on
    served = node.w.imds.http_requests_total
    await iptables(
        node, "-t", "nat", "-I", "PREROUTING", "1", "-s", node.net.pod_cidr, "-j", "ACCEPT"
    )
    during = asyncio.ensure_future(node.token(alice, timeout=1.0))  # in the window

    async def jump_first() -> bool:
        out = (await iptables(node, "-t", "nat", "-S", "PREROUTING")).splitlines()
        rules = [line for line in out if line.startswith("-A ")]
        return bool(rules) and "NMI-METADATA" in rules[0]

    seconds = await until(jump_first, timeout=5.0)
    assert seconds < 1.5, seconds
    await during  # dropped by the guard, or answered by nmi after the repair
    assert (await node.token(alice)).status == 200
    assert node.w.imds.http_requests_total == served, "a pod reached the node IMDS"
    log = node.nmi_log_text()
    assert "ahead of nmi's jump" in log or "is not first" in log


async def test_probes_are_on_loopback_and_metrics_only_for_allowed_sources(
    node: NodeWorld,
) -> None:
    pod = node.add_pod("curious")
    await node.start_nmi("--metrics-allowed-sources=10.240.0.4/32")
    # The probe port answers on the node's loopback only.
    reply = await node.curl(pod, "/", timeout=1.0, url=f"http://{NODE_IP}:{node.probe_port}/readyz")
    assert reply.status == 0
    assert await node.probe("/readyz") == 200
    # The metrics port: closed to pods, open to the allowed source (and loopback).
    reply = await node.curl(
        pod, "/", timeout=1.0, url=f"http://{NODE_IP}:{node.metrics_port}/metrics"
    )
    assert reply.status == 0
    assert "nmi_requests_in_flight" in await node.metrics()
    assert "nmi_requests_in_flight" in await node.metrics(host=NODE_IP)


async def test_metadata_header_not_required_starts_and_serves(node: NodeWorld) -> None:
    alice = await bound(node, "alice")
    await node.start_nmi("--metadata-header-required=false")
    reply = await node.curl(
        alice,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com",
        metadata=False,
    )
    assert reply.status == 200, reply.raw


async def test_the_startup_taint_is_removed_once_the_rules_are_verified(node: NodeWorld) -> None:
    key = "nmi.aadpodidentity.k8s.io/agent-not-ready"
    node.w.kube.patch(  # the world's Node object, as the kubelet registered it with the taint
        "v1",
        "Node",
        node.w.node,
        None,
        {
            "spec": {
                "taints": [
                    {"key": key, "value": "true", "effect": "NoSchedule"},
                    {"key": "other", "value": "x", "effect": "NoSchedule"},
                ]
            }
        },
    )
    await node.start_nmi(f"--startup-taint={key}")

    async def untainted() -> bool:
        found = node.w.kube.get("v1", "Node", node.w.node)
        assert found is not None
        return [t["key"] for t in found["spec"].get("taints", [])] == ["other"]

    await until(untainted, timeout=5.0)


async def test_a_cilium_node_runs_without_the_rpfilter_rule_and_says_why(node: NodeWorld) -> None:
    """Pods routed through cilium_host used to be classed as a shared bridge (refused)."""
    alice = await bound(node, "alice")
    code, _, err = await node.net.run(
        node.net.node,
        ["ip", "link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net"],
    )
    assert code == 0, err
    await node.start_nmi()
    assert "network plugin: cilium (interface cilium_host" in node.nmi_log_text()
    assert "legacy host routing" in node.nmi_log_text()
    raw = await iptables(node, "-t", "raw", "-S", "NMI-METADATA")
    assert "rpfilter" not in raw
    assert (await node.token(alice)).status == 200


async def test_a_bridge_node_is_refused_in_one_line(node: NodeWorld) -> None:
    code, _, err = await node.net.run(
        node.net.node, ["ip", "link", "add", "cbr0", "type", "bridge"]
    )
    assert code == 0, err
    for line in (
        ["ip", "addr", "add", "10.244.77.1/24", "dev", "cbr0"],
        ["ip", "link", "set", "cbr0", "up"],
    ):
        code, _, err = await node.net.run(node.net.node, line)
        assert code == 0, err
    await node.spawn_nmi()
    code, log = await node.wait_exit()
    assert code == 1
    assert "network plugin kubenet (bridge cbr0 carries 10.244.77.1/24)" in log
    assert "--allow-network-plugin-kubenet" in log
