"""The controller's targets (issue 11), measured on this machine; prints the figures.

``nmi mic`` runs as its own process (the Deployment's flags) against the emulated API
server and ARM, which run in this process; every figure comes from what the
emulators saw on the wire (requests by kind, objects' states) and from /proc.

* **burst**: 1,000 pods of 50 user-assigned identities on 20 nodes in 4 scale sets,
  created at once; ARM takes 1 s per PATCH and 2 s per long-running operation.  Time
  from creation to every assignment ``Assigned``, PATCHes per scale set, Kubernetes
  writes — at ``--clientQps`` 100, 50 (nmi's default) and 5 (aad-pod-identity's).
* **steady**: 150 pods of 47 identities, then N minutes of nothing: ARM requests by
  kind, Kubernetes writes (the Lease's renewals apart).
* **failover**: two replicas; the leader SIGKILLed; time to the new leader's first
  write (a pod created right after the kill), duplicates and losses.
* **memory**: 5,000 pods and 1,000 identities: the controller's RSS when done.

    python -m bench.mic [--steady-minutes 10] [--only burst,steady,failover,memory]
    (./dev bench --mic)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nmi_sandbox import manifests as m
from nmi_sandbox.processes import MicProcess
from nmi_sandbox.world import MIC_NAMESPACE, LoopbackWorld

GV = "aadpodidentity.k8s.io/v1"
AAI = "AzureAssignedIdentity"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def add_nodes(w: LoopbackWorld, pools: int = 4, per_pool: int = 5) -> list[tuple[str, str]]:
    """Scale sets with instances and their Node objects; returns (node name, vmss id)."""
    nodes = []
    for k in range(pools):
        vmss = f"aks-pool{k}-12345678-vmss"
        vmss_id = w.arm.add_vmss(vmss, instances=per_pool)
        for instance, computer in sorted(w.arm.instances(vmss_id).items()):
            w.kube.create(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": computer},
                    "spec": {"providerID": w.arm.provider_id(vmss=vmss, instance=instance)},
                }
            )
            nodes.append((computer, vmss_id))
    return nodes


def add_identities(w: LoopbackWorld, count: int, *, user_assigned: bool) -> list[str]:
    """``count`` identities, each with a binding whose selector is its name."""
    names = [f"id-{i}" for i in range(count)]
    for name in names:
        if user_assigned:
            w.add_user_assigned_identity(name, selector=name)
        else:
            w.kube.create(
                m.azure_identity(
                    name=name,
                    type=1,
                    client_id=m.new_guid(),
                    tenant_id="72f988bf-86f1-41af-91ab-2d7cd011db47",
                    secret_name=f"{name}-secret",
                )
            )
            w.kube.create(
                m.binding(name=f"{name}-binding", namespace="default", identity=name, selector=name)
            )
    return names


def add_pods(
    w: LoopbackWorld, count: int, identities: list[str], nodes: list[tuple[str, str]]
) -> dict[str, float]:
    """``count`` pods round-robin over identities and nodes; returns creation times."""
    created: dict[str, float] = {}
    for n in range(count):
        name = f"pod-{n}"
        obj = m.pod(
            name=name,
            node=nodes[n % len(nodes)][0],
            ip=f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
            labels={"aadpodidbinding": identities[n % len(identities)]},
        )
        status = obj.pop("status")
        w.kube.create(obj)
        w.kube.patch("v1", "Pod", name, "default", {"status": status}, subresource="status")
        created[name] = time.monotonic()
    return created


async def wait_assigned(
    w: LoopbackWorld, created: dict[str, float], timeout: float
) -> dict[str, float]:
    """When each pod's assignment was first seen ``Assigned`` (polled every 50 ms)."""
    assigned: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(assigned) < len(created):
        now = time.monotonic()
        for a in w.kube.list(GV, AAI):
            pod = a["spec"]["pod"]
            if (
                pod in created
                and pod not in assigned
                and (a.get("status") or {}).get("status") == "Assigned"
            ):
                assigned[pod] = now
        if now > deadline:
            break
        await asyncio.sleep(0.05)
    return assigned


def assignment_writes(w: LoopbackWorld) -> Counter[str]:
    return Counter(
        {
            k.split(" ")[0]: v
            for k, v in w.kube.requests.items()
            if k.endswith("azureassignedidentities") and not k.startswith(("LIST", "WATCH"))
        }
    )


# ------------------------------------------------------------------------------ scenarios


async def burst(qps: float) -> dict[str, Any]:
    async with LoopbackWorld() as w:
        w.arm.patch_latency = 1.0
        w.arm.operation_duration = 2.0
        nodes = add_nodes(w)
        identities = add_identities(w, 50, user_assigned=True)
        w.ensure_namespace(MIC_NAMESPACE)
        mic = await MicProcess.start(w, "mic-0", f"--clientQps={qps:g}")
        try:
            await mic.leading()
            started = time.monotonic()
            created = add_pods(w, 1000, identities, nodes)
            assigned = await wait_assigned(w, created, timeout=600)
            latencies = sorted(assigned[p] - created[p] for p in assigned)
            per_vmss = Counter(p.resource_id.lower() for p in w.arm.patches)
            return {
                "scenario": "burst",
                "client_qps": qps,
                "assigned": len(assigned),
                "all_assigned_s": round(max(assigned.values()) - started, 2) if assigned else None,
                "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
                "latency_max_s": round(latencies[-1], 2) if latencies else None,
                "patches_per_vmss": sorted(per_vmss.values()),
                "arm_requests": dict(w.arm.requests),
                "assignment_writes": dict(assignment_writes(w)),
            }
        finally:
            await mic.stop()


async def steady(minutes: float) -> dict[str, Any]:
    async with LoopbackWorld() as w:
        nodes = add_nodes(w)
        identities = add_identities(w, 47, user_assigned=True)
        w.ensure_namespace(MIC_NAMESPACE)
        mic = await MicProcess.start(w, "mic-0")
        try:
            await mic.leading()
            created = add_pods(w, 150, identities, nodes)
            assigned = await wait_assigned(w, created, timeout=120)
            # Before the window: the settle pass, and the burst's "binding applied" Events,
            # which the Event rate limit (5, then 1/s; summaries after 60 s) sends late.
            await asyncio.sleep(90)
            arm_before = Counter(w.arm.requests)
            kube_before = Counter(w.kube.requests)
            await asyncio.sleep(minutes * 60)  # the measurement window itself
            arm = Counter(w.arm.requests) - arm_before
            kube = Counter(w.kube.requests) - kube_before
            writes = {
                k: v
                for k, v in kube.items()
                if k.split(" ")[0] in ("POST", "PUT", "PATCH", "DELETE")
            }
            return {
                "scenario": "steady",
                "minutes": minutes,
                "pods_assigned": len(assigned),
                "arm_requests": dict(arm),
                "arm_writes": sum(v for k, v in arm.items() if k.startswith("PATCH")),
                "kube_writes": writes,
                "kube_writes_besides_lease": sum(
                    v for k, v in writes.items() if not k.endswith("leases")
                ),
            }
        finally:
            await mic.stop()


async def failover() -> dict[str, Any]:
    async with LoopbackWorld() as w:
        nodes = add_nodes(w, pools=1, per_pool=2)
        identities = add_identities(w, 5, user_assigned=True)
        w.ensure_namespace(MIC_NAMESPACE)
        replicas = [await MicProcess.start(w, f"mic-{n}") for n in range(2)]
        try:
            await replicas[0].leading(timeout=30)
            leader, other = replicas
            created = add_pods(w, 50, identities, nodes)
            await wait_assigned(w, created, timeout=60)
            leader.kill()
            killed = time.monotonic()
            await leader.proc.wait()
            obj = m.pod(
                name="after-kill",
                node=nodes[0][0],
                ip="10.9.9.9",
                labels={"aadpodidbinding": "id-0"},
            )
            status = obj.pop("status")
            w.kube.create(obj)
            w.kube.patch(
                "v1", "Pod", "after-kill", "default", {"status": status}, subresource="status"
            )
            first_write = None
            while first_write is None and time.monotonic() - killed < 60:
                if w.kube.get(GV, AAI, "after-kill-default-id-0", "default") is not None:
                    first_write = time.monotonic() - killed
                await asyncio.sleep(0.02)
            later = {"after-kill": killed}
            done = await wait_assigned(w, later, timeout=30)
            found = w.kube.list(GV, AAI)
            names = [a["metadata"]["name"] for a in found]
            return {
                "scenario": "failover",
                "lease_duration_s": 15,
                "first_write_after_kill_s": round(first_write, 2) if first_write else None,
                "assigned_after_kill_s": round(done["after-kill"] - killed, 2) if done else None,
                "assignments": len(found),
                "expected": 51,
                "duplicates": len(names) - len(set(names)),
                "creates": w.kube.requests["POST azureassignedidentities"],
                "new_leader_active": await other.health() == "Active",
            }
        finally:
            for r in replicas:
                await r.stop()


async def memory() -> dict[str, Any]:
    async with LoopbackWorld() as w:
        nodes = add_nodes(w)
        identities = add_identities(w, 1000, user_assigned=False)
        w.ensure_namespace(MIC_NAMESPACE)
        mic = await MicProcess.start(w, "mic-0")
        try:
            await mic.leading()
            idle = rss_mb(mic.proc.pid)
            created = add_pods(w, 5000, identities, nodes)
            peak = idle
            assigned: dict[str, float] = {}
            deadline = time.monotonic() + 900
            while len(assigned) < len(created) and time.monotonic() < deadline:
                peak = max(peak, rss_mb(mic.proc.pid))
                assigned = {
                    a["spec"]["pod"]: 0.0
                    for a in w.kube.list(GV, AAI)
                    if (a.get("status") or {}).get("status") == "Assigned"
                }
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)
            return {
                "scenario": "memory",
                "pods": 5000,
                "identities": 1000,
                "assigned": len(assigned),
                "rss_idle_mb": round(idle, 1),
                "rss_peak_mb": round(max(peak, rss_mb(mic.proc.pid)), 1),
                "rss_after_mb": round(rss_mb(mic.proc.pid), 1),
            }
        finally:
            await mic.stop()


async def run(only: set[str], steady_minutes: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if "burst" in only:
        for qps in (100, 50, 5):
            rows.append(await burst(qps))
            print(json.dumps(rows[-1]), file=sys.stderr)
    if "steady" in only:
        rows.append(await steady(steady_minutes))
        print(json.dumps(rows[-1]), file=sys.stderr)
    if "failover" in only:
        rows.append(await failover())
        print(json.dumps(rows[-1]), file=sys.stderr)
    if "memory" in only:
        rows.append(await memory())
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"# nmi mic, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    for row in rows:
        kind = row["scenario"]
        if kind == "burst":
            print(
                f"burst 1000 pods/50 ids/20 nodes/4 VMSS, clientQps {row['client_qps']:g}: "
                f"all Assigned after {row['all_assigned_s']} s (per pod p50 "
                f"{row['latency_p50_s']} s, max {row['latency_max_s']} s); PATCHes per VMSS "
                f"{row['patches_per_vmss']}; assignment writes {row['assignment_writes']}"
            )
        elif kind == "steady":
            print(
                f"steady 150 pods/47 ids, {row['minutes']:g} min: ARM {row['arm_requests']} "
                f"({row['arm_writes']} writes); Kubernetes writes besides the Lease: "
                f"{row['kube_writes_besides_lease']} (all: {row['kube_writes']})"
            )
        elif kind == "failover":
            print(
                f"failover (lease 15 s, leader SIGKILLed): new leader's first write "
                f"{row['first_write_after_kill_s']} s after the kill, Assigned after "
                f"{row['assigned_after_kill_s']} s; assignments {row['assignments']}/"
                f"{row['expected']}, duplicates {row['duplicates']}, creates {row['creates']}"
            )
        elif kind == "memory":
            print(
                f"memory 5000 pods/1000 ids: RSS idle {row['rss_idle_mb']} MB, peak "
                f"{row['rss_peak_mb']} MB, after {row['rss_after_mb']} MB "
                f"({row['assigned']} assigned)"
            )


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.mic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steady-minutes", type=float, default=10.0)
    parser.add_argument("--only", default="burst,steady,failover,memory")
    args = parser.parse_args()
    import uvloop

    rows = uvloop.run(run(set(args.only.split(",")), args.steady_minutes))
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
