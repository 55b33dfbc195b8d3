"""The four rtnetlink questions nmi asks the kernel, over a plain netlink socket.

``netfacts`` needs the node's links (name and kind), IPv4 addresses, main
routing table and one route lookup per pod IP.  pyroute2 answers them, but
importing it costs a node daemon about 9 MB of resident memory and 160
modules (``unittest.mock`` among them) for four requests; this module asks
them directly with ``socket.AF_NETLINK`` and reads only the attributes used
(rtnetlink(7), the same messages ``ip link``/``ip addr``/``ip route`` send).
It is synchronous; callers run it in a thread.  The e2e tests compare its
answers with ``ip -j`` in a network namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300

IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RTA_TABLE = 15

RT_TABLE_MAIN = 254

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTATTR = struct.Struct("=HH")  # length, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags


class NetlinkError(OSError):
    pass


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND ("bridge", "veth", ...), "" for plain devices


@dataclass(frozen=True, slots=True)
class Address:
    index: int
    address: str
    prefixlen: int


@dataclass(frozen=True, slots=True)
class Route:
    dst: str  # "" for the default route
    dst_len: int
    oif: int
    gateway: str
    prefsrc: str
    table: int


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    end = len(data)
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            break
        found.setdefault(kind & 0x3FFF, data[offset + _RTATTR.size : offset + length])
        offset += _align(length)
    return found


def _text(value: bytes | None) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace") if value else ""


def _ip(value: bytes | None) -> str:
    if not value:
        return ""
    if len(value) == 4:
        return str(ipaddress.IPv4Address(value))
    if len(value) == 16:
        return str(ipaddress.IPv6Address(value))
    return ""


def _u32(value: bytes | None) -> int:
    return int(struct.unpack("=I", value[:4])[0]) if value and len(value) >= 4 else 0


class RtNetlink:
    """One NETLINK_ROUTE socket; use as a context manager."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def __enter__(self) -> RtNetlink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _request(self, kind: int, flags: int, payload: bytes) -> Iterator[tuple[int, bytes]]:
        self._seq += 1
        seq = self._seq
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST | flags, seq, 0)
        self._sock.send(header + payload)
        dump = bool(flags & NLM_F_DUMP)
        while True:
            data = self._sock.recv(1 << 17)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(errno.EBADMSG, "malformed netlink message")
                body = data[offset + _NLMSGHDR.size : offset + length]
                offset += _align(length)
                if mseq != seq:
                    continue  # not ours (a late answer to an earlier request)
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EIO
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return  # an acknowledgement
                yield mtype, body
                if not dump and not mflags & NLM_F_MULTI:
                    return

    def links(self) -> list[Link]:
        payload = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        out = []
        for mtype, body in self._request(RTM_GETLINK, NLM_F_DUMP, payload):
            if mtype != RTM_NEWLINK or len(body) < _IFINFOMSG.size:
                continue
            _, _, index, _, _ = _IFINFOMSG.unpack_from(body)
            attrs = _attrs(body, _IFINFOMSG.size)
            info = attrs.get(IFLA_LINKINFO)
            kind = _text(_attrs(info).get(IFLA_INFO_KIND)) if info else ""
            out.append(Link(index=index, name=_text(attrs.get(IFLA_IFNAME)), kind=kind))
        return out

    def addresses(self, family: int = socket.AF_INET) -> list[Address]:
        payload = _IFADDRMSG.pack(family, 0, 0, 0, 0)
        out = []
        for mtype, body in self._request(RTM_GETADDR, NLM_F_DUMP, payload):
            if mtype != RTM_NEWADDR or len(body) < _IFADDRMSG.size:
                continue
            fam, prefixlen, _, _, index = _IFADDRMSG.unpack_from(body)
            if fam != family:
                continue
            attrs = _attrs(body, _IFADDRMSG.size)
            # IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
            # point-to-point links); they are equal elsewhere.
            address = _ip(attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS))
            if address:
                out.append(Address(index=index, address=address, prefixlen=prefixlen))
        return out

    def routes(self, family: int = socket.AF_INET, table: int = RT_TABLE_MAIN) -> list[Route]:
        payload = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        out = []
        for mtype, body in self._request(RTM_GETROUTE, NLM_F_DUMP, payload):
            route = _route(mtype, body)
            if route is not None and route.table == table:
                out.append(route)
        return out

    def route_get(self, dst: str) -> Route | None:
        """The route the kernel would use for ``dst`` (``ip route get``)."""
        address = ipaddress.ip_address(dst)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        payload = _RTMSG.pack(family, address.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
        packed = address.packed
        payload += _RTATTR.pack(_RTATTR.size + len(packed), RTA_DST) + packed
        for mtype, body in self._request(RTM_GETROUTE, 0, payload):
            return _route(mtype, body)
        return None


def _route(mtype: int, body: bytes) -> Route | None:
    if mtype != RTM_NEWROUTE or len(body) < _RTMSG.size:
        return None
    _, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(body)
    attrs = _attrs(body, _RTMSG.size)
    if RTA_TABLE in attrs:
        table = _u32(attrs[RTA_TABLE])
    return Route(
        dst=_ip(attrs.get(RTA_DST)),
        dst_len=dst_len,
        oif=_u32(attrs.get(RTA_OIF)),
        gateway=_ip(attrs.get(RTA_GATEWAY)),
        prefsrc=_ip(attrs.get(RTA_PREFSRC)),
        table=table,
    )
