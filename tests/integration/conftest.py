"""Fixtures: the loopback world with the real daemon running against the emulators."""

from collections.abc import AsyncIterator

import pytest

from nmi_sandbox.world import LoopbackWorld


@pytest.fixture
async def world() -> AsyncIterator[LoopbackWorld]:
    w = LoopbackWorld()
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


@pytest.fixture
async def running(world: LoopbackWorld) -> LoopbackWorld:
    """The world with nmi started in standard mode."""
    await world.start_daemon()
    return world
