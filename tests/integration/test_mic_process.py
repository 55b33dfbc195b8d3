"""``nmi mic`` as real processes: flags, two replicas, the leader killed with SIGKILL.

The controller's promise to a platform engineer who runs two replicas: one
acts, the other takes over within the lease duration when the first dies
without a word (SIGKILL: no lease released), and not one assignment is lost
or written twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

from nmi_sandbox.world import MIC_NAMESPACE, LoopbackWorld

GV = "aadpodidentity.k8s.io/v1"
LEASE = 3  # seconds: short, so that the test is


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nmi",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bad_flags_stop_it_at_start_with_one_line() -> None:
    code, _, err = await run("mic", "--clientQps=0")
    assert code == 2 and "--clientQps" in err
    code, _, err = await run("mic", "--leader-election-duration=1s")
    assert code == 2 and "at least 2s" in err
    code, _, err = await run("mic", "--http-probe-port=70000")
    assert code == 2 and "port" in err
    code, _, err = await run("mic", "-leader-election-namespace", "Not_A_Name")
    assert code == 2 and "Kubernetes name" in err
    code, _, err = await run("mic", "--cloudconfig=/nonexistent/azure.json")
    assert code == 2 and "/nonexistent/azure.json" in err
    assert len(err.strip().splitlines()) == 1, err


class Replica:
    def __init__(self, proc: asyncio.subprocess.Process, probe: int, name: str) -> None:
        self.proc, self.probe, self.name = proc, probe, name

    async def health(self) -> str:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.probe}/healthz") as resp,
            ):
                return await resp.text()
        except aiohttp.ClientError:
            return ""

    async def ready(self) -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.probe}/readyz") as resp,
            ):
                return resp.status == 200
        except aiohttp.ClientError:
            return False


async def start_replica(w: LoopbackWorld, name: str, log: Path) -> Replica:
    probe = free_port()
    env = {**os.environ, **w.cloud_environ(), "MIC_POD_NAME": name}
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nmi",
            "mic",
            f"--kubeconfig={w.kubeconfig}",
            f"--cloudconfig={w.cloudconfig}",
            f"--leader-election-namespace={MIC_NAMESPACE}",
            "--leader-election-name=nmi-mic",
            f"--leader-election-duration={LEASE}s",
            f"--http-probe-port={probe}",
            "--probe-address=127.0.0.1",
            f"--prometheus-port={free_port()}",
            "--prometheus-address=127.0.0.1",
            "--log-format=json",
            env=env,
            stderr=sink,
        )
    replica = Replica(proc, probe, name)
    deadline = time.monotonic() + 60
    while not await replica.ready():
        assert proc.returncode is None, "the controller exited; see its log"
        assert time.monotonic() < deadline, "the controller never became ready"
        await asyncio.sleep(0.1)  # a separate process: its probe is the only signal
    return replica


async def test_the_leader_killed_the_other_takes_over_and_nothing_is_lost(
    world: LoopbackWorld,
) -> None:
    w = world
    w.ensure_namespace(MIC_NAMESPACE)
    replicas = [await start_replica(w, f"mic-{n}", w.workdir / f"mic-{n}.log") for n in range(2)]
    try:
        deadline = time.monotonic() + 20
        while True:
            states = [await r.health() for r in replicas]
            if sorted(states) == ["Active", "Not Active"]:
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)
        leader = replicas[states.index("Active")]
        other = replicas[1 - states.index("Active")]

        w.add_user_assigned_identity("ident", selector="app")
        w.add_service_principal("sp", selector="app")
        for n in range(10):
            w.add_pod(f"before-{n}", selector="app")
        await wait_all_assigned(w, 20)

        leader.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await leader.proc.wait()
        for n in range(10):
            w.add_pod(f"after-{n}", selector="app")
        await wait_all_assigned(w, 40, count=40)
        took = time.monotonic() - killed
        assert took <= LEASE + 2 + 1.0, f"the new leader's writes came {took:.1f}s after the kill"
        assert await other.health() == "Active"
        names = sorted(a["metadata"]["name"] for a in w.kube.list(GV, "AzureAssignedIdentity"))
        expected = sorted(
            f"{p}-{i}-default-{ident}"
            for p in ("before", "after")
            for i in range(10)
            for ident in ("ident", "sp")
        )
        assert names == expected  # none lost, none twice
        # Each assignment was created once: no replica wrote one the other had written.
        assert w.kube.requests["POST azureassignedidentities"] == 40
        lease = w.kube.get("coordination.k8s.io/v1", "Lease", "nmi-mic", MIC_NAMESPACE)
        assert lease is not None and lease["spec"]["holderIdentity"] == other.name
        assert lease["spec"]["leaseTransitions"] >= 1
    finally:
        for r in replicas:
            if r.proc.returncode is None:
                r.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(r.proc.wait(), 20)
                except TimeoutError:
                    r.proc.kill()
                    await r.proc.wait()


async def wait_all_assigned(w: LoopbackWorld, timeout: float, count: int = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = w.kube.list(GV, "AzureAssignedIdentity")
        if len(found) == count and all(a["status"]["status"] == "Assigned" for a in found):
            return
        assert time.monotonic() < deadline, f"{len(found)} assignments, not all Assigned"
        await asyncio.sleep(0.05)
