"""The interface a connection arrived through: what pins a pod to its own veth.

Why its own module: it is a fact of the socket, read once per connection by the
connection and enabled once per listening socket by the listener; the caller
decision (``identity/caller.py``) compares it with the pod's pin.
"""

from __future__ import annotations

import socket
import struct

IP_PKTINFO = 8  # <linux/in.h>; Python's socket module does not name these
IP_PKTOPTIONS = 9
_CMSG_HEADER = struct.Struct("@Qii")  # struct cmsghdr: cmsg_len, cmsg_level, cmsg_type
_IN_PKTINFO = struct.Struct("@i4s4s")  # struct in_pktinfo: ipi_ifindex, spec_dst, addr


def arrival_interface(sock: socket.socket) -> int:
    """The interface index the connection's first packet (its SYN) arrived on, or 0.

    With ``IP_PKTINFO`` set on the listening socket, Linux records the incoming
    interface of a TCP connection and returns it through ``IP_PKTOPTIONS``: one
    system call per connection, nothing per request.  Pods are pinned to it.
    """
    try:
        raw = sock.getsockopt(socket.IPPROTO_IP, IP_PKTOPTIONS, 64)
    except OSError:
        return 0
    offset = 0
    while offset + _CMSG_HEADER.size <= len(raw):
        length, level, kind = _CMSG_HEADER.unpack_from(raw, offset)
        if length < _CMSG_HEADER.size:
            break
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            start = offset + _CMSG_HEADER.size
            if start + _IN_PKTINFO.size <= len(raw):
                return int(_IN_PKTINFO.unpack_from(raw, start)[0])
        offset += (length + 7) & ~7
    return 0
