"""End-to-end tests in network namespaces: root and iproute2 only; stale namespaces swept first."""

import os
import shutil
from collections.abc import Iterator

import pytest

from nmi_sandbox.netns import cleanup_stale

CAN_RUN = os.geteuid() == 0 and shutil.which("ip") is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CAN_RUN:
        return
    skip = pytest.mark.skip(reason="needs root and iproute2 (network namespaces)")
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_namespaces() -> Iterator[None]:
    """Remove namespaces left by killed runs (never those of live processes)."""
    if CAN_RUN:
        cleanup_stale()
    yield
