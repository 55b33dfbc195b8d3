"""Notices, within moments, that somebody changed the node's nftables rules.

Why: a flushed nat table or a rule inserted ahead of nmi's jump must be
repaired at once, not at the next reconcile tick.  With the nft backend
(iptables-nft, the default of current distributions) the kernel announces
every committed ruleset change on the nfnetlink multicast group
``NFNLGRP_NFTABLES`` — the messages ``xtables-monitor`` prints — so
:class:`NftChanges` subscribes to it and wakes the caller once per burst.
The legacy backend has no such announcement: callers fall back to polling.

The socket is read on the event loop (``add_reader``, non-blocking); the
messages themselves are not parsed — any change triggers one check, and the
check reads the rules as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7


class NftChanges:
    """``await changed()`` returns after the next nftables change (or ``timeout``)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._event = asyncio.Event()
        self.seen = 0

    def start(self) -> None:
        """Subscribe (needs CAP_NET_ADMIN in the node's network namespace)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: changes were lost, which is a change too
                self.seen += 1
                self._event.set()
                break
            if not data:
                break
            self.seen += 1
            self._event.set()

    async def changed(self, timeout: float) -> bool:
        """Wait for a change; False on timeout.  A burst counts once."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
