"""The floods of issue 10 at the issue's own numbers, against a real nmi (prints figures).

A node in network namespaces (no uplink), nmi as its own process with its normal flags,
a bound pod ("victim") asking for its cached token every 20 ms throughout, and a hostile
pod running ``nmi_sandbox.attacker`` through the DNAT.  For each flood: nmi's RSS
before, at its peak (sampled every 20 ms from /proc) and 3 s after; its peak open
descriptors; the victim's p50/p99/max latency and failures — and, as the baseline
measured in the same run, the victim alone before any flood.

    python -m bench.floods            (./dev bench --floods; root)
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from nmi_sandbox.nodeworld import NodeWorld, PodHandle

FLOODS: list[tuple[str, list[str], str]] = [
    ("bodies", ["body", "150", str(1 << 20)], "150 connections x 1 MiB body"),
    ("idle", ["idle", "19000", "8"], "19,000 silent connections, held 8 s"),
    ("queries", ["query", "4096", str(30 * 1024)], "4,096 different 30 KiB queries"),
    ("storm", ["storm", "1352"], "1,352 spellings of one resource (bound pod)"),
    ("denials", ["denials", "50000"], "50,000 refused requests"),
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def attacker(node: NodeWorld, pod: PodHandle, *args: str) -> dict[str, Any]:
    proc = await node.net.spawn(
        pod.ns,
        [sys.executable, "-m", "nmi_sandbox.attacker", *args],
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 900)
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


async def sample(pid: int, stop: asyncio.Event) -> tuple[float, int]:
    peak, fds = 0.0, 0
    while not stop.is_set():
        peak = max(peak, rss_mb(pid))
        fds = max(fds, len(os.listdir(f"/proc/{pid}/fd")))
        await asyncio.sleep(0.02)
    return peak, fds


async def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with NodeWorld() as node:
        ident = node.w.add_user_assigned_identity("victim-id", selector="victim")
        victim = node.add_pod("victim", selector="victim")
        node.w.assign(victim.manifest, ident)
        storm_id = node.w.add_user_assigned_identity("storm-id", selector="storm")
        storm = node.add_pod("storm", selector="storm")
        node.w.assign(storm.manifest, storm_id)
        evil = node.add_pod("evil")
        await node.start_nmi()
        assert node.nmi is not None
        pid = node.nmi.pid
        assert (await node.token(victim)).status == 200
        alone = await attacker(node, victim, "victim", "5", "0.02")
        rows.append({"flood": "none (baseline)", "victim": alone, "rss": [rss_mb(pid)] * 3})
        for name, argv, what in FLOODS:
            assert node.nmi_log is not None
            log_before = node.nmi_log.stat().st_size
            before = rss_mb(pid)
            stop = asyncio.Event()
            sampler = asyncio.ensure_future(sample(pid, stop))
            pod = storm if name == "storm" else evil
            flood = asyncio.ensure_future(attacker(node, pod, *argv))
            served = await attacker(node, victim, "victim", "8", "0.02")
            result = await flood
            stop.set()
            peak, fds = await sampler
            await asyncio.sleep(3)
            rows.append(
                {
                    "flood": f"{name}: {what}",
                    "attacker": result,
                    "victim": served,
                    "rss": [before, peak, rss_mb(pid)],
                    "fds": fds,
                    "log_bytes": node.nmi_log.stat().st_size - log_before,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"# nmi under floods, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        "| flood | nmi RSS before / peak / after (MB) | peak fds | log "
        "| victim p50 / p99 / max (ms) | victim failures |"
    )
    print("|---|---|---|---|---|---|")
    base = rows[0]["victim"]
    for row in rows:
        v = row["victim"]
        fails = {k: n for k, n in v["statuses"].items() if k != "200"}
        rss = " / ".join(f"{x:.0f}" for x in row["rss"])
        ratio = v["p99_ms"] / base["p99_ms"] if base["p99_ms"] else 0
        print(
            f"| {row['flood']} | {rss} | {row.get('fds', '-')} | "
            f"{row.get('log_bytes', 0) / 1024:.0f} KiB | {v['p50_ms']} / {v['p99_ms']} / "
            f"{v['max_ms']} (p99 x{ratio:.1f} of baseline) | {fails or 'none'} |"
        )


def main() -> int:
    if os.geteuid() != 0:
        print("bench.floods needs root (network namespaces)", file=sys.stderr)
        return 2
    report(asyncio.run(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
