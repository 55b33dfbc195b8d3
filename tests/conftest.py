"""Every test's event loop is uvloop's, as nmi's is in production (``nmi`` runs on uvloop).

uvloop's transports are not ``asyncio`` classes and differ in details (flow control,
``get_extra_info``); the in-process daemon must be tested on the loop it runs on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    return {"uvloop": uvloop.new_event_loop}
