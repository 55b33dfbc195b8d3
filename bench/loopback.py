"""Loopback measurements of the request path (a script that prints numbers, not a test).

1. Cache-hit latency: a pod (source 127.0.0.x) sends 1,000 sequential token
   requests over one keep-alive connection; p50/p99/mean are printed next to
   the same client against a bare aiohttp server that returns a static body of
   the same size (the framework's floor, measured in the same run).
2. Cold concurrency: N concurrent requests for a token nobody has asked for
   yet, with the upstream slowed by 20 ms; prints how many upstream calls were
   made (service principal via Azure AD, and managed identity via IMDS).
3. Created -> Assigned: a request waiting for MIC, answered after the status
   changes (the wake-up plus the IMDS token call), 20 samples.

The client runs in its own process (``bench/http_client.py``) so that it does
not share an event loop or a GIL with the daemon.

usage: python -m bench.loopback [--requests 1000] [--concurrency 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from nmi_sandbox.world import LoopbackWorld

CLIENT = Path(__file__).with_name("http_client.py")
RESOURCE = "https://management.azure.com"
TARGET = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={RESOURCE}"


async def run_client(host: str, port: int, source: str, count: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT),
        host,
        str(port),
        source,
        TARGET,
        str(count),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("client failed")
    result: dict[str, Any] = json.loads(out)
    return result


async def static_server(body: bytes) -> tuple[web.ServerRunner, int]:
    async def handler(_: web.BaseRequest) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    runner = web.ServerRunner(web.Server(handler), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, port


def fmt(stats: dict[str, Any]) -> str:
    return (
        f"p50 {stats['p50_ms']:.3f} ms   p99 {stats['p99_ms']:.3f} ms   "
        f"mean {stats['mean_ms']:.3f} ms   ({stats['n']} requests, {stats['errors']} non-200)"
    )


async def main(requests: int, concurrency: int) -> None:
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    async with LoopbackWorld() as world:
        await world.start_daemon()
        assert world.daemon is not None
        mi = world.add_user_assigned_identity("bench-mi", selector="bench")
        pod = world.add_pod("bench", selector="bench")
        world.assign(pod, mi)
        await world.pod_visible(pod)
        await world.synced(lambda idx: bool(idx.assignments("default", "bench")))
        ip = world.pod_ip(pod)
        warm = await world.get_token(ip, RESOURCE)
        assert warm.status == 200, warm.body

        hits = await run_client("127.0.0.1", world.daemon.port, ip, requests)
        runner, port = await static_server(json.dumps(warm.body).encode())
        try:
            floor = await run_client("127.0.0.1", port, ip, requests)
        finally:
            await runner.cleanup()
        print(f"\n1. cache hits, {requests} sequential requests on one keep-alive connection")
        print(f"   nmi:                 {fmt(hits)}")
        print(f"   bare aiohttp static: {fmt(floor)}")
        print(
            f"   ratio nmi/bare p50: {hits['p50_ms'] / floor['p50_ms']:.2f}x, "
            f"p99: {hits['p99_ms'] / floor['p99_ms']:.2f}x"
        )

        fed = world.add_federated_identity("bench-fed", selector="fed", service_accounts=("fed",))
        fed_pod = world.add_pod("bench-fed", selector="fed", service_account="fed")
        world.assign(fed_pod, fed)
        await world.pod_visible(fed_pod)
        await world.synced(lambda idx: bool(idx.assignments("default", "bench-fed")))
        fed_ip = world.pod_ip(fed_pod)
        warm_fed = await world.get_token(fed_ip, RESOURCE)
        assert warm_fed.status == 200, warm_fed.body
        # Alternating rounds (the machine's speed drifts): the median of each kind's rounds.
        rounds: dict[str, list[dict[str, Any]]] = {"mi": [], "fed": []}
        for _ in range(5):
            for kind, source in (("mi", ip), ("fed", fed_ip)):
                rounds[kind].append(
                    await run_client("127.0.0.1", world.daemon.port, source, requests)
                )

        def median(kind: str, key: str) -> float:
            return float(statistics.median(r[key] for r in rounds[kind]))

        print(
            f"\n1b. cache hits of a federated identity (type 3) and of the managed identity, "
            f"5 alternating rounds of {requests} sequential requests (medians of the rounds)"
        )
        for kind, label in (("fed", "federated"), ("mi", "managed identity")):
            print(
                f"   {label + ':':<20} p50 {median(kind, 'p50_ms'):.3f} ms   "
                f"p99 {median(kind, 'p99_ms'):.3f} ms   "
                f"(non-200: {sum(r['errors'] for r in rounds[kind])})"
            )
        print(
            "   ratio federated/managed identity p50: "
            f"{median('fed', 'p50_ms') / median('mi', 'p50_ms'):.2f}x, p99: "
            f"{median('fed', 'p99_ms') / median('mi', 'p99_ms'):.2f}x; TokenRequests "
            f"{world.kube.requests['POST serviceaccounts/token']}, Azure AD exchanges "
            f"{sum(world.aad.federated_exchanges.values())}"
        )

        print(f"\n2. {concurrency} concurrent cold requests, upstream latency 20 ms")
        world.aad.latency = 0.02
        world.imds.latency = 0.02
        sp = world.add_service_principal("bench-sp", selector="bench-sp")
        sp_pod = world.add_pod("bench-sp", selector="bench-sp")
        world.assign(sp_pod, sp)
        await world.pod_visible(sp_pod)
        await world.synced(lambda idx: bool(idx.assignments("default", "bench-sp")))
        for label, source, client_id, counter, resource in (
            (
                "service principal (Azure AD)",
                world.pod_ip(sp_pod),
                sp.client_id,
                world.aad.token_requests,
                "https://vault.azure.net",
            ),
            (
                "managed identity (IMDS)",
                ip,
                mi.client_id,
                world.imds.token_requests,
                "https://storage.azure.com",
            ),
        ):
            started = time.perf_counter()
            replies = await asyncio.gather(
                *(world.get_token(source, resource) for _ in range(concurrency))
            )
            elapsed = time.perf_counter() - started
            ok = sum(r.status == 200 for r in replies)
            print(
                f"   {label}: {ok}/{concurrency} answered 200 in {elapsed * 1000:.0f} ms, "
                f"upstream calls: {counter[(client_id, resource)]}, "
                f"distinct tokens handed out: {len({r.token for r in replies if r.status == 200})}"
            )
        fed_requests = world.kube.requests["POST serviceaccounts/token"]
        fed_exchanges = sum(world.aad.federated_exchanges.values())
        started = time.perf_counter()
        replies = await asyncio.gather(
            *(world.get_token(fed_ip, "https://vault.azure.net") for _ in range(concurrency))
        )
        elapsed = time.perf_counter() - started
        print(
            f"   federated (TokenRequest + Azure AD): "
            f"{sum(r.status == 200 for r in replies)}/{concurrency} answered 200 in "
            f"{elapsed * 1000:.0f} ms, Azure AD calls: "
            f"{sum(world.aad.federated_exchanges.values()) - fed_exchanges}, TokenRequests: "
            f"{world.kube.requests['POST serviceaccounts/token'] - fed_requests} (the pod's "
            f"service-account token is still fresh), distinct tokens handed out: "
            f"{len({r.token for r in replies if r.status == 200})}"
        )
        await wake_up(world)


async def wake_up(world: LoopbackWorld, samples: int = 20) -> None:
    print(
        f"\n3. Created -> Assigned: time from the status change to the answer ({samples} samples)"
    )
    world.imds.latency = 0.0
    times: list[float] = []
    for i in range(samples):
        ident = world.add_user_assigned_identity(f"wake-{i}", selector=f"wake-{i}")
        pod = world.add_pod(f"wake-{i}", selector=f"wake-{i}")
        world.assign(pod, ident, state="Created")
        await world.pod_visible(pod)
        await world.binding_visible(ident)
        await world.synced(lambda idx, i=i: bool(idx.assignments("default", f"wake-{i}")))
        request = asyncio.create_task(world.get_token(world.pod_ip(pod), RESOURCE))
        await asyncio.sleep(0.05)  # a benchmark, not a test: let the request reach its wait
        changed = time.perf_counter()
        world.set_assignment_state(pod, ident, "Assigned")
        reply = await request
        assert reply.status == 200, reply.body
        times.append((time.perf_counter() - changed) * 1000)
    times.sort()
    print(
        f"   p50 {times[len(times) // 2]:.1f} ms, max {times[-1]:.1f} ms "
        "(includes nmi's IMDS token call for the newly assigned identity)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1000)
    ns = parser.parse_args()
    asyncio.run(main(ns.requests, ns.concurrency))
