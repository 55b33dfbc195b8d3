"""The token listener: sockets, the connections on them, their timers, a clean stop.

One ``Listener`` owns every listening socket of the metadata endpoint (the
configured address, and the node address the DNAT leads to) and every
connection accepted on them (``connection.HttpConnection``).  Per-connection
timers — idle keep-alive, a request that never completes, a client that
stops reading — are checked by one sweep a second instead of being armed and
cancelled around each request.  ``stop`` stops accepting, lets each
connection finish the reply in progress (with ``Connection: close``), closes
idle ones at once, and aborts what is left after the grace period.

What one pod can make the daemon hold is bounded where it is taken:

* connections, when they are accepted: at most ``max_connections_per_ip``
  per address, and ``max_connections`` in all — kept below the descriptor
  limit with room for the daemon's own files.  When the node-wide cap is
  reached, a connection from an address that holds few is still admitted: an
  idle connection of the address that holds the most is closed for it, so
  one pod's flood never locks out the others.  Refused connections get a 429
  and are closed at once;
* bytes, as they are read (request heads, the bodies the proxied APIs take,
  requests queued behind a slow one): at most ``max_bytes_per_ip`` per
  address and ``max_bytes`` in all (:meth:`Listener.hold`); a request that
  would exceed them is answered 503 and its connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket

from .arrival import IP_PKTINFO
from .connection import HttpConnection, RequestHandler

MAX_CONNECTIONS_PER_IP = 4096  # one pod cannot hold all of the daemon's file descriptors
MAX_CONNECTIONS = 16384  # all pods: about 3 KB of memory each, well within the pod's limit
RESERVED_FILES = 1024  # descriptors kept for the daemon's own use (API, upstream, files)
MAX_BYTES_PER_IP = 1 << 20
MAX_BYTES = 32 << 20
KEEPALIVE_TIMEOUT = 75.0  # as aiohttp, nginx (75 s) and Go's net/http default idle timeout
REQUEST_TIMEOUT = 15.0  # from the first byte of a request to its last
WRITE_TIMEOUT = 30.0  # a client that reads none of its replies for this long


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (as Go's runtime does for
    every server) and return it: each connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def per_address_limit(open_files: int) -> int:
    """Connections one address may hold: a quarter of the descriptors, at most 4,096."""
    return max(64, min(MAX_CONNECTIONS_PER_IP, open_files // 4))


def connection_limit(open_files: int) -> int:
    """Connections in all: below the descriptor limit, with the daemon's own reserve."""
    return max(64, min(MAX_CONNECTIONS, open_files - RESERVED_FILES))


class Listener:
    def __init__(
        self,
        handler: RequestHandler,
        *,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        sweep_interval: float = 1.0,
        max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP,
        max_connections: int = MAX_CONNECTIONS,
        max_bytes_per_ip: int = MAX_BYTES_PER_IP,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.handler = handler
        self.max_connections_per_ip = max_connections_per_ip
        self.max_connections = max_connections
        self.max_bytes_per_ip = max_bytes_per_ip
        self.max_bytes = max_bytes
        self._per_ip: dict[str, set[HttpConnection]] = {}
        self._bytes_per_ip: dict[str, int] = {}
        self.held = 0  # bytes held by all connections
        self.refused = 0
        self.evicted = 0
        self.closing = False
        self.connections: set[HttpConnection] = set()
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        self.sweep_interval = sweep_interval
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int) -> int:
        """Start listening on ``host:port`` (0: any free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: HttpConnection(self),
            host,
            port,
            backlog=1024,
            reuse_address=True,
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
        )
        for sock in server.sockets:
            if sock.family == socket.AF_INET:  # so that accepted sockets record their interface
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="listener-sweep")
        return int(server.sockets[0].getsockname()[1])

    def opened(self, connection: HttpConnection) -> bool:
        """Register a new connection; False when it must be refused (see the limits)."""
        ip = connection.peer_ip
        mine = self._per_ip.get(ip)
        count = len(mine) if mine is not None else 0
        if count >= self.max_connections_per_ip:
            self.refused += 1
            return False
        if len(self.connections) >= self.max_connections and not self._evict_for(count):
            self.refused += 1
            return False
        if mine is None:
            mine = self._per_ip[ip] = set()
        mine.add(connection)
        self.connections.add(connection)
        self._all_closed.clear()
        return True

    def _evict_for(self, count: int) -> bool:
        """Make room for a connection of an address holding ``count``: close an idle
        connection of the address holding the most, if that is more."""
        heaviest = max(self._per_ip.values(), key=len, default=None)
        if heaviest is None or len(heaviest) <= count + 1:
            return False
        victim = next((c for c in heaviest if c.idle), None) or next(iter(heaviest))
        self.evicted += 1
        self._forget(victim)
        victim.abort()
        return True

    def closed(self, connection: HttpConnection) -> None:
        self._forget(connection)
        if not self.connections:
            self._all_closed.set()

    def _forget(self, connection: HttpConnection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            mine = self._per_ip.get(connection.peer_ip)
            if mine is not None:
                mine.discard(connection)
                if not mine:
                    del self._per_ip[connection.peer_ip]
        self.release(connection, connection.held)

    def hold(self, connection: HttpConnection, size: int) -> bool:
        """Account ``size`` bytes more held for ``connection``; False over a budget."""
        ip = connection.peer_ip
        mine = self._bytes_per_ip.get(ip, 0) + size
        if mine > self.max_bytes_per_ip or self.held + size > self.max_bytes:
            return False
        self._bytes_per_ip[ip] = mine
        self.held += size
        connection.held += size
        return True

    def release(self, connection: HttpConnection, size: int) -> None:
        size = min(size, connection.held)
        if size <= 0:
            return
        connection.held -= size
        self.held -= size
        left = self._bytes_per_ip.get(connection.peer_ip, 0) - size
        if left > 0:
            self._bytes_per_ip[connection.peer_ip] = left
        else:
            self._bytes_per_ip.pop(connection.peer_ip, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = loop.time()
            for connection in list(self.connections):
                connection.sweep(
                    now,
                    keepalive=self.keepalive_timeout,
                    request_timeout=self.request_timeout,
                    write_timeout=self.write_timeout,
                )

    async def stop(self, grace: float) -> None:
        """Stop accepting; finish replies in progress for up to ``grace`` seconds."""
        self.closing = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.shutdown()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), grace)
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
