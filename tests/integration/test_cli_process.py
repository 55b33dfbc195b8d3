"""The ``nmi`` command as a real process: flags, serving, SIGTERM."""

import asyncio
import json
import signal
import socket
import sys

import aiohttp

from nmi.testing.world import LoopbackWorld


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
    port, probe = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nmi",
        f"--node={world.node}",
        f"--kubeconfig={world.kubeconfig}",
        "--nmi-listen-address=127.0.0.1",
        f"--nmi-port={port}",
        "--metadata-ip=127.0.0.1",
        f"--metadata-port={world.imds.port}",
        f"--http-probe-port={probe}",
        "--probe-address=127.0.0.1",
        f"--allowed-authority-hosts={world.aad.authority_host}",
        "--log-format=json",
        "--MICNamespace=default",
        "--manage-iptables=false",  # this test runs in the host namespace
        f"--admin-socket={world.workdir / 'admin.sock'}",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(f"http://127.0.0.1:{probe}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                # the process gives no other signal of readiness than its probe
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("nmi never became ready")
            connector = aiohttp.TCPConnector(local_addr=(world.pod_ip(pod), 0))
            async with aiohttp.ClientSession(connector=connector) as pod_session:
                url = (
                    f"http://127.0.0.1:{port}/metadata/identity/oauth2/token"
                    "?api-version=2018-02-01&resource=https://management.azure.com"
                )
                async with pod_session.get(url, headers={"Metadata": "true"}) as resp:
                    assert resp.status == 200, await resp.text()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
        assert code == 0
        assert proc.stderr is not None
        lines = (await proc.stderr.read()).decode().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        access = [r for r in records if r.get("logger") == "nmi.access"]
        assert access and access[-1]["status"] == 200 and access[-1]["pod"] == "proc"
        assert any("MICNamespace" in r["msg"] for r in records)
        text = "\n".join(lines)
        assert ident.client_id not in text  # client ids are redacted in logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def start_process(
    world: LoopbackWorld, *extra: str
) -> tuple[asyncio.subprocess.Process, int]:
    port, probe = free_port(), free_port()
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
        stderr=asyncio.subprocess.DEVNULL,
    )
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


async def pod_request(world: LoopbackWorld, pod: dict, port: int) -> int:  # type: ignore[type-arg]
    connector = aiohttp.TCPConnector(local_addr=(world.pod_ip(pod), 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = (
            f"http://127.0.0.1:{port}/metadata/identity/oauth2/token"
            "?api-version=2018-02-01&resource=https://vault.azure.net"
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
