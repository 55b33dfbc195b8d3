"""Liveness and readiness on ``--http-probe-port``.

``/healthz`` answers while the event loop runs.  ``/readyz`` answers 200 only
when every watch has completed its first sync, the token listener is up and
every other registered check passes (the interception check adds itself
there); otherwise 503 with the failing checks named.  No debug or profiling
endpoint is served here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp import web

Check = Callable[[], str | None]  # None when fine, else why not


class Probes:
    def __init__(self, *, health_text: Callable[[], str] | None = None) -> None:
        # The controller answers /healthz with aad-pod-identity's "Active" / "Not Active".
        self._health_text = health_text
        self._checks: dict[str, Check] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.listening = asyncio.Event()

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def failing(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        for name, check in self._checks.items():
            reason = check()
            if reason is not None:
                problems[name] = reason
        return problems

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text=self._health_text() if self._health_text else "ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        problems = self.failing()
        body = json.dumps({"ready": not problems, "failing": problems}) + "\n"
        return web.Response(
            status=503 if problems else 200, text=body, content_type="application/json"
        )

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = _bound_port(self._runner, port)
        self.listening.set()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _bound_port(runner: web.BaseRunner, default: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return default
