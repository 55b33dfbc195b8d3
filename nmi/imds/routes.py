"""The pod-facing endpoint's front door: which route answers a request.

The connection (``connection.py``) hands every parsed request here twice at
most: first to :meth:`ImdsHandler.fast`, which may answer synchronously (a
cache hit, or a request the shared checks refuse), then — if it declined —
to :meth:`ImdsHandler.__call__`, one coroutine that routes the request
(``target.classify``), lets the route answer, turns any unexpected exception
into an IMDS-style 500 so that nothing escapes, and leaves the request's
metric and access-log line.

Routes: the token path (``token_route``), ``/host/token`` (``host_token``),
other ``/metadata/identity`` paths (404: never proxied), instance metadata
(403 with ``--block-instance-metadata``), and the metadata paths proxied to
the node IMDS (``proxy``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..config import Settings
from . import replies
from .bookkeeping import Access, Bookkeeping
from .host_token import HostTokenRoute
from .messages import Reply, Request
from .proxy import MetadataProxy
from .target import Route, classify
from .token_route import TokenRoute

log = logging.getLogger(__name__)


class ImdsHandler:
    def __init__(
        self,
        *,
        settings: Settings,
        token: TokenRoute,
        host_token: HostTokenRoute,
        proxy: MetadataProxy,
        books: Bookkeeping,
    ) -> None:
        self.settings = settings
        self.token = token
        self.host_token = host_token
        self.proxy = proxy
        self.books = books
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def fast(self, request: Request) -> bytes | None:
        """The complete reply when it can be given synchronously; None: use ``__call__``."""
        target = classify(request.target)
        if target.route is not Route.TOKEN:
            return None
        try:
            return self.token.fast(request, target.query)
        except Exception:  # never worse than the full path, which answers instead
            log.exception("unexpected error on the cache-hit path")
            return None

    async def __call__(self, request: Request) -> Reply:
        started = time.perf_counter()
        access = Access(ip=request.peer_ip)
        self.in_flight += 1
        self.idle.clear()
        try:
            reply = await self._route(request, access)
        except asyncio.CancelledError:
            # The client went away while waiting: account for it as nginx does (499).
            self.books.finished(request, access, 499, time.perf_counter() - started)
            raise
        except Exception:
            log.exception("unexpected error on %s", access.route)
            reply = replies.internal_error()
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        self.books.finished(request, access, reply.status, time.perf_counter() - started)
        return reply

    async def _route(self, request: Request, access: Access) -> Reply:
        target = classify(request.target)
        access.route = target.route.value
        if target.route is Route.TOKEN:
            return await self.token.serve(request, target.query, access)
        if target.route is Route.HOST_TOKEN:
            return await self.host_token.serve(request, target.query, access)
        if target.route in (Route.IDENTITY_OTHER, Route.INVALID):
            return replies.not_found()
        if target.route is Route.INSTANCE and self.settings.block_instance_metadata:
            return replies.forbidden(
                "Instance metadata is blocked by the node managed identity service"
            )
        return await self.proxy.forward(request, target.proxy_target)

    def protocol_error(self, peer_ip: str, status: int, reason: str) -> None:
        self.books.protocol_error(peer_ip, status, reason)
