"""What the node's own network says, read through netlink (pyroute2).

Two questions decide whether source-IP attribution can be trusted and where
pods' metadata traffic should be sent:

* **The node address** that the DNAT targets and nmi listens on: the
  ``--node-ip`` given (from the DaemonSet's ``status.hostIP``), else the
  preferred source of the default route, else the first global IPv4 address
  that is not the metadata address.  nmi DNATs to this address rather than to
  127.0.0.1: a loopback target needs ``route_localnet=1`` on pod-facing
  interfaces, which also exposes every 127.0.0.0/8 service of the node to its
  neighbours (CVE-2020-8558).
* **How pods are attached.**  With per-pod interfaces and /32 host routes
  (Azure CNI style), a strict reverse-path check proves that a packet's source
  IP belongs to the interface it came from.  With a shared bridge (kubenet
  style) every pod sits behind the same interface and ARP spoofing defeats IP
  checks; nmi then refuses to start unless ``--allow-network-plugin-kubenet``.
  This is decided from the interfaces and routes themselves, not from a file.

pyroute2 is synchronous; callers run these functions in a thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

AF_INET = 2
RT_TABLE_MAIN = 254


@dataclass(frozen=True, slots=True)
class Attachment:
    """How the pods of this node are connected to it."""

    style: str  # "per-pod" | "shared-bridge" | "unknown"
    detail: str

    @property
    def spoofable(self) -> bool:
        return self.style == "shared-bridge"


def _attr(msg: Any, name: str) -> Any:
    return msg.get(name)


def _links(ipr: IPRoute) -> dict[int, tuple[str, str]]:
    """index -> (name, kind)"""
    out: dict[int, tuple[str, str]] = {}
    for link in ipr.get_links():
        info = _attr(link, "IFLA_LINKINFO")
        kind = str(info.get("IFLA_INFO_KIND") or "") if info else ""
        out[int(link["index"])] = (str(_attr(link, "IFLA_IFNAME") or ""), kind)
    return out


def node_address(*, configured: str, metadata_ip: str) -> str:
    """The node's IPv4 address for the DNAT target (see module docstring)."""
    if configured:
        return configured
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=AF_INET, table=RT_TABLE_MAIN):
            if route["dst_len"] == 0 and _attr(route, "RTA_PREFSRC"):
                return str(_attr(route, "RTA_PREFSRC"))
        for route in ipr.get_routes(family=AF_INET, table=RT_TABLE_MAIN):
            if route["dst_len"] == 0 and _attr(route, "RTA_OIF"):
                src = ipr.route("get", dst=str(_attr(route, "RTA_GATEWAY") or "8.8.8.8"))
                if src and _attr(src[0], "RTA_PREFSRC"):
                    return str(_attr(src[0], "RTA_PREFSRC"))
        for addr in ipr.get_addr(family=AF_INET):
            ip = str(_attr(addr, "IFA_ADDRESS") or "")
            if not ip or ip == metadata_ip:
                continue
            parsed = ipaddress.ip_address(ip)
            if parsed.is_loopback or parsed.is_link_local:
                continue
            return ip
    raise LookupError("no node address found: pass --node-ip (the DaemonSet sets HOST_IP)")


def pod_attachment(pod_ips: Iterable[str]) -> Attachment:
    """Per-pod interfaces with host routes, or a shared bridge?"""
    with IPRoute() as ipr:
        links = _links(ipr)
        ips = [ip for ip in pod_ips if ipaddress.ip_address(ip).version == 4]
        by_oif: dict[int, list[str]] = {}
        for ip in ips:
            try:
                found = ipr.route("get", dst=ip)
            except Exception:  # noqa: S112 - an unroutable pod IP says nothing either way
                continue
            if not found:
                continue
            oif = int(_attr(found[0], "RTA_OIF") or 0)
            by_oif.setdefault(oif, []).append(ip)
        for oif, routed in by_oif.items():
            name, kind = links.get(oif, ("?", ""))
            if kind == "bridge":
                return Attachment(
                    "shared-bridge", f"pod IPs {routed[:3]} are routed through bridge {name}"
                )
            if len(routed) > 1 and name != "lo":
                return Attachment("shared-bridge", f"pod IPs {routed[:3]} share interface {name}")
        # No pod routed yet: kubenet's bridge is always cbr0, carrying the node's pod subnet.
        # (Other bridges, such as docker0, say nothing about how pods are attached.)
        for addr in ipr.get_addr(family=AF_INET):
            index = int(addr["index"])
            name, kind = links.get(index, ("?", ""))
            if kind == "bridge" and name == "cbr0" and addr["prefixlen"] < 32:
                return Attachment(
                    "shared-bridge",
                    f"bridge {name} carries {_attr(addr, 'IFA_ADDRESS')}/{addr['prefixlen']}",
                )
        if by_oif:
            return Attachment("per-pod", f"{len(ips)} pod IPs on {len(by_oif)} interfaces")
        return Attachment("unknown", "no pod IPs routed and no bridge with a pod subnet")
