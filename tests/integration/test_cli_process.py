"""The ``nmi`` command as a real process: flags, serving, SIGTERM."""

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp

from nmi_sandbox.processes import free_port
from nmi_sandbox.processes import run_nmi as run
from nmi_sandbox.world import LoopbackWorld

ARM = "https://management.azure.com"


async def test_version_and_bad_flags() -> None:
    code, out, _ = await run("--version")
    assert code == 0 and out.startswith("nmi ")
    code, _, err = await run("--node", "n", "--operation-mode", "weird")
    assert code == 2 and "operation-mode" in err
    code, _, err = await run("--node", "n", "--nmi-port", "99999")
    assert code == 2 and "port" in err
    code, _, err = await run("--nmi-port", "1")
    assert code == 2 and "--node" in err


async def test_daemon_process_serves_and_stops_on_sigterm(world: LoopbackWorld) -> None:
    ident = world.add_user_assigned_identity("proc-id")
    pod = world.add_pod("proc", selector=ident.selector)
    world.assign(pod, ident)
    log = world.workdir / "nmi.log"
    proc, port, _ = await start_process(
        world, "--log-format=json", "--MICNamespace=default", log=log
    )
    try:
        assert await pod_request(world, pod, port, ARM) == 200
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
        assert code == 0
        lines = log.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        access = [r for r in records if r.get("logger") == "nmi.access"]
        assert access and access[-1]["status"] == 200 and access[-1]["pod"] == "proc"
        assert any("MICNamespace" in r["msg"] for r in records)
        assert ident.client_id not in "\n".join(lines)  # client ids are redacted in logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def start_process(
    world: LoopbackWorld, *extra: str, log: Path | None = None
) -> tuple[asyncio.subprocess.Process, int, int]:
    """nmi as a process in the host namespace: loopback only, no iptables, log to a file."""
    port, probe = free_port(), free_port()
    sink = log.open("wb") if log is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nmi",
            f"--node={world.node}",
            f"--kubeconfig={world.kubeconfig}",
            f"--nmi-port={port}",
            "--metadata-ip=127.0.0.1",
            f"--metadata-port={world.imds.port}",
            f"--http-probe-port={probe}",
            "--probe-address=127.0.0.1",
            f"--prometheus-port={free_port()}",
            "--prometheus-address=127.0.0.1",
            f"--allowed-authority-hosts={world.aad.authority_host}",
            "--manage-iptables=false",
            f"--admin-socket={world.workdir / 'admin.sock'}",
            *extra,
            stderr=sink if sink is not None else asyncio.subprocess.DEVNULL,
        )
    finally:
        if sink is not None:
            sink.close()  # the child has its own copy
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"http://127.0.0.1:{probe}/readyz") as resp:
                    if resp.status == 200:
                        return proc, port, probe
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)  # a separate process: its probe is the only signal
    proc.kill()
    raise AssertionError("nmi never became ready")


async def pod_request(
    world: LoopbackWorld,
    pod: dict,  # type: ignore[type-arg]
    port: int,
    resource: str = "https://vault.azure.net",
) -> int:
    """A token request from the pod's own address; the HTTP status."""
    connector = aiohttp.TCPConnector(local_addr=(world.pod_ip(pod), 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = (
            f"http://127.0.0.1:{port}/metadata/identity/oauth2/token"
            f"?api-version=2018-02-01&resource={resource}"
        )
        async with session.get(url, headers={"Metadata": "true"}) as resp:
            return resp.status


async def test_sigterm_finishes_in_flight_requests(world: LoopbackWorld) -> None:
    ident = world.add_service_principal("drain-id")
    pod = world.add_pod("drain", selector=ident.selector)
    world.assign(pod, ident)
    world.aad.latency = 1.5
    proc, port, _ = await start_process(world, "--shutdown-grace=10")
    try:
        request = asyncio.create_task(pod_request(world, pod, port))
        await world.aad.wait_for_requests(1)  # the request is in flight, upstream
        proc.send_signal(signal.SIGTERM)
        assert await request == 200
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_second_signal_exits_at_once(world: LoopbackWorld) -> None:
    ident = world.add_service_principal("stuck-id")
    pod = world.add_pod("stuck", selector=ident.selector)
    world.assign(pod, ident)
    world.aad.latency = 60
    proc, port, probe = await start_process(world, "--shutdown-grace=30")
    request = asyncio.create_task(pod_request(world, pod, port))
    try:
        await world.aad.wait_for_requests(1)
        proc.send_signal(signal.SIGTERM)
        # stopping: no longer ready (signals sent back to back would merge into one)
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"http://127.0.0.1:{probe}/readyz") as resp:
                    if resp.status == 503:
                        break
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 5)
        assert code != 0
    finally:
        request.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_memory_stays_flat_under_a_flood_of_bad_requests(world: LoopbackWorld) -> None:
    ident = world.add_user_assigned_identity("flood-id")
    pod = world.add_pod("flood", selector=ident.selector)
    world.assign(pod, ident)
    proc, port, _ = await start_process(world)
    bad = [
        b"GET /metadata/identity/oauth2/token?resource=%zz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metadata/identity/oauth2/token?resource=r%d HTTP/1.1\r\n"
        b"Host: x\r\nMetadata: true\r\n\r\n",
        b"POST /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /metadata/identity/issuecredential/%s HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ]

    async def flood(rounds: int) -> None:
        for i in range(rounds):
            raw = bad[i % len(bad)].replace(b"%d", str(i).encode()).replace(b"%s", str(i).encode())
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if b"Host: x\r\n" in raw:
                raw = raw.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n", 1)
            writer.write(raw)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert data.startswith(b"HTTP/1.")

    try:
        await flood(600)  # warm up: caches, buffers, lazy imports
        before = rss_kib(proc.pid)
        await flood(3000)
        after = rss_kib(proc.pid)
        assert after - before < 5 * 1024, (before, after)
        assert await pod_request(world, pod, port, ARM) == 200  # still serving
    finally:
        proc.kill()
        await proc.wait()
