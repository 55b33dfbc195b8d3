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
    assert "OK: the bound pod got its own token, the unbound pod was refused." in text
    assert "Identity not found" in text
    assert await namespaces() == before
