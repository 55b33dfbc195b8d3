"""``nmi sandbox`` as a user runs it: the demonstration behaves, and nothing is left behind."""

import asyncio
import os
import shutil
import sys

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is installed by ./dev"),
]


async def namespaces() -> set[str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "list", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return {line.split()[0] for line in out.decode().splitlines() if line.strip()}


@pytest.mark.parametrize("mode", [[], ["--loopback"]])
async def test_sandbox_once(mode: list[str]) -> None:
    before = await namespaces()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nmi",
        "sandbox",
        "--once",
        *mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    assert "OK: the controller assigned the identity and put it on the scale set" in text
    assert "Identity not found" in text
    # The seed's process, printed as it happened, in order.
    steps = [
        "AzureAssignedIdentity default/demo-app-default-demo-identity Created",
        "ARM: identity demo-identity added to scale set",
        "AzureAssignedIdentity default/demo-app-default-demo-identity Assigned",
        "pod default/demo-app got its token: HTTP 200",
        "AzureAssignedIdentity default/demo-app-default-demo-identity deleted",
        "ARM: identity demo-identity removed from scale set",
    ]
    positions = [text.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), text
    assert await namespaces() == before
