"""The token listener: sockets, the connections on them, their timers, a clean stop.

One ``Listener`` owns every listening socket of the metadata endpoint (the
configured address, and the node address the DNAT leads to) and every
connection accepted on them (``connection.HttpConnection``).  Per-connection
timers — idle keep-alive, a request that never completes, a client that
stops reading — are checked by one sweep a second instead of being armed and
cancelled around each request.  ``stop`` stops accepting, lets each
connection finish the reply in progress (with ``Connection: close``), closes
idle ones at once, and aborts what is left after the grace period.  One
address (one pod) may hold at most ``MAX_CONNECTIONS_PER_IP`` connections:
beyond that, each new one is answered 429 and closed, so a leaking or hostile
pod cannot use up the daemon's file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket

from .connection import HttpConnection, RequestHandler

MAX_CONNECTIONS_PER_IP = 4096  # one pod cannot hold all of the daemon's file descriptors
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
    ) -> None:
        self.handler = handler
        self.max_connections_per_ip = max_connections_per_ip
        self._per_ip: dict[str, int] = {}
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
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="listener-sweep")
        return int(server.sockets[0].getsockname()[1])

    def opened(self, connection: HttpConnection) -> bool:
        """Register a connection; False when its address already has too many."""
        self.connections.add(connection)
        self._all_closed.clear()
        count = self._per_ip.get(connection.peer_ip, 0) + 1
        self._per_ip[connection.peer_ip] = count
        return count <= self.max_connections_per_ip

    def closed(self, connection: HttpConnection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            count = self._per_ip.get(connection.peer_ip, 1) - 1
            if count > 0:
                self._per_ip[connection.peer_ip] = count
            else:
                self._per_ip.pop(connection.peer_ip, None)
        if not self.connections:
            self._all_closed.set()

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
