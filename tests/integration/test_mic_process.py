"""``nmi mic`` as real processes: flags, two replicas, the leader killed with SIGKILL.

The controller's promise to a platform engineer who runs two replicas: one
acts, the other takes over within the lease duration when the first dies
without a word (SIGKILL: no lease released), and not one assignment is lost
or written twice.
"""

from __future__ import annotations

import asyncio
import time

from nmi_sandbox.processes import MicProcess
from nmi_sandbox.processes import run_nmi as run
from nmi_sandbox.world import MIC_NAMESPACE, LoopbackWorld

GV = "aadpodidentity.k8s.io/v1"
LEASE = 3  # seconds: short, to keep the test short


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


async def test_the_leader_killed_the_other_takes_over_and_nothing_is_lost(
    world: LoopbackWorld,
) -> None:
    w = world
    replicas = [
        await MicProcess.start(w, f"mic-{n}", f"--leader-election-duration={LEASE}s")
        for n in range(2)
    ]
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

        leader.kill()
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
            await r.stop()


async def wait_all_assigned(w: LoopbackWorld, timeout: float, count: int = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = w.kube.list(GV, "AzureAssignedIdentity")
        if len(found) == count and all(a["status"]["status"] == "Assigned" for a in found):
            return
        assert time.monotonic() < deadline, f"{len(found)} assignments, not all Assigned"
        await asyncio.sleep(0.05)
