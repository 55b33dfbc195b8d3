"""The admin endpoint of a running daemon, and its client: how ``nmi explain`` reaches
the token cache state and the last upstream errors, which exist only in memory.

Why a Unix socket (default ``/run/nmi/admin.sock``, mode 0600) and never a TCP
port: no debug endpoint may be reachable from the network, and the file's
permissions decide who may ask.  Read-only: ``GET /explain?namespace=&pod=``
(with the optional ``resource``, ``client_id``, ``msi_res_id``, ``object_id``)
answers the live explanation of one pod (:func:`model.daemon_explanation`):
the daemon's decision on its live view, the cache entries of the identity it
uses (presence, remaining lifetime, refresh due; never a token) and the last
upstream error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from ..identity.decide import IdentitySelector
from .model import DaemonView, daemon_explanation

log = logging.getLogger(__name__)

DEFAULT_ADMIN_SOCKET = "/run/nmi/admin.sock"
JSONDict = dict[str, Any]


def selector_from(query: Mapping[str, str]) -> IdentitySelector:
    return IdentitySelector(
        client_id=query.get("client_id", ""),
        object_id=query.get("object_id", ""),
        resource_id=query.get("msi_res_id", "") or query.get("mi_res_id", ""),
    )


def admin_handler(daemon: DaemonView) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The read-only admin endpoint: ``GET /explain?namespace=&pod=&resource=&client_id=...``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path != "/explain":
            return web.json_response({"error": "not_found"}, status=404)
        if request.method != "GET":
            return web.json_response({"error": "method_not_allowed"}, status=405)
        q = request.query
        namespace, pod = q.get("namespace", ""), q.get("pod", "")
        if not namespace or not pod:
            return web.json_response(
                {"error": "invalid_request", "error_description": "namespace and pod are required"},
                status=400,
            )
        federation = daemon.federation
        if federation is not None and not federation.issuer:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(federation.learn_issuer(), timeout=3.0)
        doc = daemon_explanation(
            daemon,
            namespace=namespace,
            pod=pod,
            selector=selector_from(q),
            resource=q.get("resource", ""),
        )
        return web.json_response(doc)

    return handle


def _prepare_socket_path(path: Path) -> bool:
    """Make room for the socket; True if its directory had to be created."""
    created = not path.parent.exists()
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return created
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left behind by a previous process
        return created
    finally:
        probe.close()
    raise RuntimeError(f"another process serves {path}; not taking it over")


class AdminServer:
    """Serves :func:`admin_handler` on a Unix socket (mode 0600), never on the network."""

    def __init__(
        self,
        *,
        daemon: DaemonView,
        path: str | os.PathLike[str] = DEFAULT_ADMIN_SOCKET,
        mode: int = 0o600,
    ) -> None:
        self.path = Path(path)
        self.mode = mode
        self._handler = admin_handler(daemon)
        self._runner: web.AppRunner | None = None
        self._created_dir = False

    async def start(self) -> None:
        self._created_dir = await asyncio.to_thread(_prepare_socket_path, self.path)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.UnixSite(runner, str(self.path))
            await site.start()
            await asyncio.to_thread(os.chmod, self.path, self.mode)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("admin endpoint on unix socket", extra={"fields": {"path": str(self.path)}})

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self.path.unlink)
            if self._created_dir:
                with contextlib.suppress(OSError):  # not empty: someone else uses it
                    await asyncio.to_thread(self.path.parent.rmdir)


async def query_admin(
    path: str | os.PathLike[str],
    *,
    namespace: str,
    pod: str,
    resource: str = "",
    client_id: str = "",
    msi_res_id: str = "",
    object_id: str = "",
    timeout: float = 5.0,
) -> JSONDict:
    """Ask a daemon's admin socket about one pod."""
    params = {"namespace": namespace, "pod": pod}
    for key, value in (
        ("resource", resource),
        ("client_id", client_id),
        ("msi_res_id", msi_res_id),
        ("object_id", object_id),
    ):
        if value:
            params[key] = value
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session,
        session.get(f"http://nmi-admin/explain?{urlencode(params)}") as resp,
    ):
        doc = await resp.json(content_type=None)
        if resp.status != 200 or not isinstance(doc, dict):
            raise RuntimeError(f"admin socket answered HTTP {resp.status}: {doc}")
        return doc
