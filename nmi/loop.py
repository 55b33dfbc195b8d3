"""Run a coroutine on uvloop, as every nmi process does (the daemon, the controller).

Why its own module: the subcommands run their main coroutine the same way and
must not import one another's command lines to do it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it is a dependency on Linux)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return int(uvloop.run(coro))
