"""nmi's rtnetlink reader against the kernel, compared with ``ip -j``, in a throw-away namespace.

The namespace (``nmiipt-<random>-netlink``) gets a bridge carrying a pod
subnet, a veth with a /32 host route, a second address, a default route with
a preferred source and a route in another table; then nmi's ``netlink`` and
``netfacts`` run inside it (``ip netns exec``) and must say what iproute2
says.  The namespace is deleted afterwards, also when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
    ),
]

PREFIX = "nmiipt-"

SETUP = [
    "link set lo up",
    "link add cbr0 type bridge",
    "addr add 10.244.0.1/24 dev cbr0",
    "link set cbr0 up",
    "link add vethpod type veth peer name vethpeer",
    "link set vethpod up",
    "link set vethpeer up",
    "route add 10.240.7.9/32 dev vethpod",
    "link add uplink type veth peer name uplinkpeer",
    "link set uplinkpeer up",
    "addr add 10.240.0.4/16 dev uplink",
    "addr add 10.240.0.5/16 dev uplink",
    "link set uplink up",
    "route add default via 10.240.0.1 dev uplink src 10.240.0.4",
    "route add 10.99.0.0/16 dev uplink table 100",
]

PROBE = """
import json, socket
from nmi.node.netlink import RtNetlink
from nmi.node import netfacts
with RtNetlink() as nl:
    out = {
        "links": [[l.index, l.name, l.kind] for l in nl.links()],
        "addrs": [[a.index, a.address, a.prefixlen] for a in nl.addresses()],
        "routes": [[r.dst, r.dst_len, r.oif, r.gateway, r.prefsrc] for r in nl.routes()],
        "get": {ip: (lambda r: [r.oif, r.prefsrc])(nl.route_get(ip))
                for ip in ("10.240.7.9", "10.244.0.77", "10.240.3.3", "192.0.2.10", "10.99.1.1")},
    }
out["node"] = netfacts.node_address(configured="", metadata_ip="169.254.169.254")
out["attach_bridge"] = netfacts.network_plugin(["10.244.0.77", "10.244.0.78"]).style
print(json.dumps(out))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"{PREFIX}{secrets.token_hex(4)}-netlink"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for line in SETUP:
            subprocess.run(["ip", "-n", name, *line.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ip_json(ns: str, *args: str) -> list[dict]:  # type: ignore[type-arg]
    out = subprocess.run(
        ["ip", "-n", ns, "-j", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out) if out.strip() else []


def run_in(ns: str, code: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    ).stdout


def test_netlink_answers_what_iproute2_answers(netns: str) -> None:
    ours = json.loads(run_in(netns, PROBE))

    links = ip_json(netns, "-d", "link", "show")
    expected_links = sorted(
        [link["ifindex"], link["ifname"], link.get("linkinfo", {}).get("info_kind", "")]
        for link in links
    )
    assert sorted(ours["links"]) == expected_links
    index = {name: i for i, name, _ in ours["links"]}
    assert dict((name, kind) for _, name, kind in ours["links"])["cbr0"] == "bridge"

    expected_addrs = sorted(
        [entry["ifindex"], info["local"], info["prefixlen"]]
        for entry in ip_json(netns, "-4", "addr", "show")
        for info in entry.get("addr_info", [])
    )
    assert sorted(ours["addrs"]) == expected_addrs

    expected_routes = sorted(
        [
            "" if r["dst"] == "default" else r["dst"].split("/")[0],
            0 if r["dst"] == "default" else int((r["dst"] + "/32").split("/")[1]),
            index[r["dev"]],
            r.get("gateway", ""),
            r.get("prefsrc", ""),
        ]
        for r in ip_json(netns, "-4", "route", "show", "table", "main")
    )
    assert sorted(ours["routes"]) == expected_routes  # table 100's route is not in main

    for ip, (oif, prefsrc) in ours["get"].items():
        (kernel,) = ip_json(netns, "route", "get", ip)
        assert oif == index[kernel["dev"]], ip
        assert prefsrc == kernel.get("prefsrc", ""), ip

    assert ours["node"] == "10.240.0.4"  # the default route's preferred source
    assert ours["attach_bridge"] == "shared-bridge"
    subprocess.run(["ip", "-n", netns, "link", "del", "cbr0"], check=True)
    style = run_in(
        netns,
        "from nmi.node import netfacts;print(netfacts.network_plugin(['10.240.7.9']).style)",
    )
    assert style.strip() == "per-pod"  # a host route to its own interface, no bridge


PLUGINS = {
    # name: (links and routes that plugin leaves on a node, pod IPs, expected plugin, style)
    "azure-cni": (
        ["link add azv1a2b3c4 type veth peer name azvpeer1", "link set azv1a2b3c4 up",
         "route add 10.244.3.4/32 dev azv1a2b3c4"],
        ["10.244.3.4"], "azure-cni", "per-pod",
    ),
    "calico": (
        ["link add cali12345678 type veth peer name calipeer1", "link set cali12345678 up",
         "route add 10.244.3.5/32 dev cali12345678"],
        ["10.244.3.5"], "calico", "per-pod",
    ),
    "cilium": (
        ["link add cilium_host type veth peer name cilium_net", "link set cilium_host up",
         "link set cilium_net up", "addr add 10.244.9.1/32 dev cilium_host",
         "route add 10.244.9.0/24 via 10.244.9.1 dev cilium_host src 10.244.9.1"],
        ["10.244.9.7", "10.244.9.8"], "cilium", "cilium",
    ),
    "kubenet": (
        ["link add cbr0 type bridge", "addr add 10.244.5.1/24 dev cbr0", "link set cbr0 up"],
        ["10.244.5.7", "10.244.5.8"], "kubenet", "shared-bridge",
    ),
    "azure-cni-bridge": (
        ["link add azure0 type bridge", "addr add 10.244.6.1/24 dev azure0",
         "link set azure0 up"],
        [], "azure-cni-bridge", "shared-bridge",
    ),
}  # fmt: skip


@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_each_supported_network_plugin_is_recognised(plugin: str) -> None:
    setup, pod_ips, name, style = PLUGINS[plugin]
    ns = f"{PREFIX}{secrets.token_hex(4)}-plugin"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for line in ["link set lo up", *setup]:
            subprocess.run(["ip", "-n", ns, *line.split()], check=True)
        found = run_in(
            ns,
            "from nmi.node import netfacts;"
            f"p = netfacts.network_plugin({pod_ips!r});"
            "print(p.name, p.style, p.anti_spoofing)",
        ).split()
        assert found == [name, style, str(style != "cilium")]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
