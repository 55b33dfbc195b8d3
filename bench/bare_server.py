"""The framework's ceiling: aiohttp's low-level server on uvloop returning a fixed body.

Set up the way nmi sets up its token listener (``web.Server`` with no access
log and handler cancellation, a ``ServerRunner`` and a ``TCPSite`` with
backlog 1024, uvloop), but the handler only returns the bytes it was given,
with nmi's headers.  Run by ``bench.netns`` inside the node's network
namespace; stops on SIGTERM or SIGINT.

usage: bare_server.py HOST PORT BODY_FILE
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

HEADERS = {"Content-Type": "application/json; charset=utf-8", "Server": "nmi"}


async def serve(host: str, port: int, body: bytes) -> None:
    async def handler(_: web.BaseRequest) -> web.Response:
        return web.Response(body=body, headers=HEADERS)

    server = web.Server(handler, access_log=None, handler_cancellation=True)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, body_file = argv
    uvloop.run(serve(host, int(port), Path(body_file).read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
