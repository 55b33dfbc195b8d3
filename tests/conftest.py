"""Every test's event loop is uvloop's, as nmi's is in production (``nmi`` runs on uvloop).

uvloop's transports are not ``asyncio`` classes and differ in details (flow control,
``get_extra_info``); the in-process daemon must be tested on the loop it runs on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


# -- the end-to-end layer must run ------------------------------------------------------
# e2e tests skip themselves where they cannot run (no root, no iptables).  A green run
# that skipped them would hide that the node-level promises were never checked, so any
# skipped e2e test fails the session unless NMI_ALLOW_E2E_SKIP=1 says it is on purpose.
_skipped_e2e: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "e2e" in report.keywords:
        _skipped_e2e.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_e2e and os.environ.get("NMI_ALLOW_E2E_SKIP") != "1":
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"FAILED: {len(_skipped_e2e)} end-to-end tests were skipped (first: "
                f"{_skipped_e2e[0]}); run as root with iptables and iproute2 (./dev test "
                "installs them), or set NMI_ALLOW_E2E_SKIP=1 to skip them on purpose",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
