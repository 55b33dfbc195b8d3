"""What the node's own network says, read through rtnetlink (``netlink.py``).

Two questions decide whether source-IP attribution can be trusted and where
pods' metadata traffic should be sent:

* **The node address** that the DNAT targets and nmi listens on: the
  ``--node-ip`` given (from the DaemonSet's ``status.hostIP``), else the
  preferred source of the default route, else the first global IPv4 address
  that is not the metadata address.  nmi DNATs to this address rather than to
  127.0.0.1: a loopback target needs ``route_localnet=1`` on pod-facing
  interfaces, which also exposes every 127.0.0.0/8 service of the node to its
  neighbours (CVE-2020-8558).
* **Which network plugin attaches the pods, and how** (:func:`network_plugin`),
  read from the interfaces and routes themselves, not from a file:

  - Azure CNI (``azv*`` veths), Calico (``cali*`` veths) or any plugin with a
    veth and a /32 host route per pod: a strict reverse-path check proves that
    a packet's source IP belongs to the interface it came from, and each pod is
    pinned to its own interface.  nmi runs.
  - Cilium (``cilium_host``): pod IPs are routed through one device, so the
    reverse-path rule would drop every pod's traffic; Cilium verifies each
    endpoint's source address itself, and nmi pins pods to their ``lxc*``
    interface.  nmi runs without the rpfilter rule — its iptables interception
    needs Cilium's legacy host routing (``bpf.hostLegacyRouting=true``).
  - kubenet (``cbr0``), Azure CNI's bridge mode (``azure0``) or any bridge
    carrying the pods: every pod sits behind the same interface and ARP
    spoofing defeats IP checks; nmi refuses to start unless
    ``--allow-network-plugin-kubenet``.

Netlink reads are synchronous; callers run these functions in a thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .netlink import NetlinkError, RtNetlink


@dataclass(frozen=True, slots=True)
class NetworkPlugin:
    """How the pods of this node are connected to it, and by which plugin."""

    name: str  # "azure-cni", "calico", "cilium", "kubenet", "azure-cni-bridge", "veth", ...
    style: str  # "per-pod" | "shared-bridge" | "cilium" | "unknown"
    detail: str

    @property
    def spoofable(self) -> bool:
        return self.style == "shared-bridge"

    @property
    def anti_spoofing(self) -> bool:
        """Whether nmi's strict reverse-path rule can hold (not where one device routes
        every pod's IP and the plugin verifies sources itself)."""
        return self.style != "cilium"


def node_address(*, configured: str, metadata_ip: str) -> str:
    """The node's IPv4 address for the DNAT target (see module docstring)."""
    if configured:
        return configured
    with RtNetlink() as nl:
        routes = nl.routes()
        for route in routes:
            if route.dst_len == 0 and route.prefsrc:
                return route.prefsrc
        for route in routes:
            if route.dst_len == 0 and route.oif:
                try:  # a lookup in the routing table; nothing is sent
                    found = nl.route_get(route.gateway or "8.8.8.8")
                except NetlinkError:
                    continue
                if found is not None and found.prefsrc:
                    return found.prefsrc
        for addr in nl.addresses():
            if addr.address == metadata_ip:
                continue
            parsed = ipaddress.ip_address(addr.address)
            if parsed.is_loopback or parsed.is_link_local:
                continue
            return addr.address
    raise LookupError("no node address found: pass --node-ip (the DaemonSet sets HOST_IP)")


def network_plugin(pod_ips: Iterable[str]) -> NetworkPlugin:
    """The network plugin of this node and how it attaches pods (see module docstring)."""
    with RtNetlink() as nl:
        links = {link.index: (link.name, link.kind) for link in nl.links()}
        names = {name for name, _ in links.values()}
        ips = [ip for ip in pod_ips if ipaddress.ip_address(ip).version == 4]
        by_oif: dict[int, list[str]] = {}
        for ip in ips:
            try:
                found = nl.route_get(ip)
            except NetlinkError:  # an unroutable pod IP says nothing either way
                continue
            if found is None:
                continue
            by_oif.setdefault(found.oif, []).append(ip)
        if "cilium_host" in names:
            return NetworkPlugin(
                "cilium",
                "cilium",
                "interface cilium_host: pod IPs are routed through it and Cilium verifies "
                "endpoint source addresses",
            )
        for oif, routed in by_oif.items():
            name, kind = links.get(oif, ("?", ""))
            if kind == "bridge":
                plugin = {"cbr0": "kubenet", "azure0": "azure-cni-bridge"}.get(name, "bridge")
                return NetworkPlugin(
                    plugin,
                    "shared-bridge",
                    f"pod IPs {routed[:3]} are routed through bridge {name}",
                )
            if len(routed) > 1 and name != "lo":
                return NetworkPlugin(
                    "unknown", "shared-bridge", f"pod IPs {routed[:3]} share interface {name}"
                )
        # No pod routed yet: kubenet's bridge is always cbr0 (Azure CNI's bridge mode:
        # azure0), carrying the node's pod subnet.  Other bridges (docker0) say nothing.
        for addr in nl.addresses():
            name, kind = links.get(addr.index, ("?", ""))
            if kind == "bridge" and name in ("cbr0", "azure0") and addr.prefixlen < 32:
                return NetworkPlugin(
                    "kubenet" if name == "cbr0" else "azure-cni-bridge",
                    "shared-bridge",
                    f"bridge {name} carries {addr.address}/{addr.prefixlen}",
                )
        veths = [n for n, k in links.values() if k == "veth"]
        plugin = (
            "azure-cni"
            if any(n.startswith("azv") for n in veths)
            else "calico"
            if any(n.startswith("cali") for n in veths)
            else "veth"
        )
        if by_oif:
            return NetworkPlugin(
                plugin, "per-pod", f"{len(ips)} pod IPs on {len(by_oif)} interfaces"
            )
        if plugin != "veth":
            return NetworkPlugin(plugin, "per-pod", f"{len(veths)} pod interfaces, no pod yet")
        return NetworkPlugin("unknown", "unknown", "no pod IPs routed and no bridge of pods")


def host_route_interfaces() -> dict[str, int]:
    """IPv4 /32 routes of the main table without a gateway: pod IP -> its interface.

    Per-pod interfaces (Azure CNI, Calico, a veth per pod) have one each; the
    interface is what a pod is pinned to before it first calls (see
    ``identity/caller.py``).  Bridges and Cilium's ``cilium_host`` routes are not
    per pod and give nothing here.
    """
    with RtNetlink() as nl:
        return {
            r.dst: r.oif
            for r in nl.routes()
            if r.dst_len == 32 and r.oif > 0 and not r.gateway and r.dst
        }
