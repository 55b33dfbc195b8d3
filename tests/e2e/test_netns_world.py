"""The namespace-built node (nmi_sandbox.netns): topology, reachability, isolation, cleanup."""

import asyncio
import errno
import gc
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from nmi_sandbox.netns import PREFIX, NodeNetns, cleanup_stale

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

Style = Literal["veth", "bridge"]
STYLES: list[Style] = ["veth", "bridge"]

# An HTTP server that answers every GET with the client's source address.
ECHO_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""

UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def host_ipv4_addresses() -> list[str]:
    """The host namespace's global IPv4 addresses (read only), minus the test ranges."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        a["local"]
        for link in json.loads(out)
        for a in link.get("addr_info", [])
        if not a["local"].startswith(("10.244.", "10.240.0.", "169.254."))
    ]


def exists(path: str) -> bool:
    return Path(path).exists()


def thread_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def ns_id(name: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"


async def wait_listening(net: NodeNetns, ns: str, host: str, port: int) -> None:
    """Poll until something accepts on host:port inside ns."""
    deadline = time.monotonic() + 10
    while True:
        with net.entered(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(1)
            sock.connect((host, port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
        finally:
            sock.close()
        await asyncio.sleep(0.02)


async def curl(net: NodeNetns, ns: str, url: str) -> tuple[int, str, str]:
    return await net.run(ns, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", url])


async def start_echo(net: NodeNetns, ns: str, host: str, port: int) -> asyncio.subprocess.Process:
    proc = await net.spawn(ns, [sys.executable, "-c", ECHO_SERVER, host, str(port)])
    await wait_listening(net, ns, host, port)
    return proc


@pytest.fixture(params=STYLES)
async def net(request: pytest.FixtureRequest) -> AsyncIterator[NodeNetns]:
    async with NodeNetns(style=request.param) as n:
        yield n
    assert not {ns for ns in netns_list() if ns.startswith(f"{PREFIX}{n.tag}-")}


async def run_ok(net: NodeNetns, ns: str, argv: list[str]) -> str:
    code, out, err = await net.run(ns, argv)
    assert code == 0, err
    return out


# --------------------------------------------------------------------------- topology


async def test_topology(net: NodeNetns) -> None:
    a, b = net.add_pod("a"), net.add_pod("b")
    assert a.ip != b.ip and {a.ip, b.ip} <= {"10.244.0.2", "10.244.0.3"}
    assert net.node == f"{PREFIX}{net.tag}-node"
    for ns in (net.node, a.ns, b.ns):
        assert ns.startswith(PREFIX) and ns in netns_list()
    for pod in (a, b):
        assert pod.host_veth.startswith("nmv") and len(pod.host_veth) <= 15
    assert a.host_veth != b.host_veth

    lo = json.loads(await run_ok(net, net.node, ["ip", "-j", "-4", "addr", "show", "dev", "lo"]))
    assert {f"{x['local']}/{x['prefixlen']}" for x in lo[0]["addr_info"]} == {
        "127.0.0.1/8",
        "10.240.0.4/32",
        "169.254.169.254/32",
    }
    assert await run_ok(net, net.node, ["ip", "-4", "route", "show", "default"]) == ""
    assert await run_ok(net, net.node, ["cat", "/proc/sys/net/ipv4/ip_forward"]) == "1\n"
    node_routes = await run_ok(net, net.node, ["ip", "-4", "route"])
    pod_routes = await run_ok(net, a.ns, ["ip", "-4", "route"])
    pod_addr = await run_ok(net, a.ns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])

    if net.style == "veth":
        for pod in (a, b):
            assert f"{pod.ip} dev {pod.host_veth} scope link" in node_routes
            sysctl = f"/proc/sys/net/ipv4/conf/{pod.host_veth}/"
            assert await run_ok(net, net.node, ["cat", sysctl + "proxy_arp"]) == "1\n"
            assert await run_ok(net, net.node, ["cat", sysctl + "rp_filter"]) == "0\n"
            veth = json.loads(
                await run_ok(net, net.node, ["ip", "-j", "addr", "show", "dev", pod.host_veth])
            )
            assert not [x for x in veth[0]["addr_info"] if x["family"] == "inet"]
        assert "cbr0" not in await run_ok(net, net.node, ["ip", "link"])
        assert f"inet {a.ip}/32 " in pod_addr
        assert "default via 169.254.1.1 dev eth0" in pod_routes
        assert "169.254.1.1 dev eth0 scope link" in pod_routes
        neigh = await run_ok(net, a.ns, ["ip", "neigh", "show", "169.254.1.1"])
        assert "PERMANENT" in neigh
    else:
        bridge = await run_ok(net, net.node, ["ip", "-4", "-o", "addr", "show", "dev", "cbr0"])
        assert "inet 10.244.0.1/24 " in bridge
        assert "10.244.0.0/24 dev cbr0" in node_routes
        for pod in (a, b):
            link = await run_ok(net, net.node, ["ip", "-o", "link", "show", pod.host_veth])
            assert "master cbr0" in link
        assert f"inet {a.ip}/24 " in pod_addr
        assert "default via 10.244.0.1 dev eth0" in pod_routes


# --------------------------------------------------------------------------- reachability


async def test_pods_reach_servers_in_the_node_with_their_own_source_ip(net: NodeNetns) -> None:
    a, b = net.add_pod("a"), net.add_pod("b")
    await start_echo(net, net.node, net.node_ip, 8080)
    await start_echo(net, net.node, net.metadata_ip, 80)
    await start_echo(net, b.ns, b.ip, 8081)
    for pod in (a, b):
        assert await curl(net, pod.ns, f"http://{net.node_ip}:8080/") == (0, pod.ip, "")
        assert await curl(net, pod.ns, "http://169.254.169.254/metadata") == (0, pod.ip, "")
    # pod to pod, through the node
    assert await curl(net, a.ns, f"http://{b.ip}:8081/") == (0, a.ip, "")


async def test_spawned_process_is_killed_by_pid_group(net: NodeNetns) -> None:
    proc = await start_echo(net, net.node, net.node_ip, 8080)
    assert await net.kill(proc, 15) == -15
    with net.entered(), pytest.raises(ConnectionRefusedError):
        socket.create_connection((net.node_ip, 8080), timeout=2).close()
    assert await net.kill(proc) == -15  # already gone: just its status


async def test_run_times_out_and_kills(net: NodeNetns) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await net.run(net.node, ["sleep", "30"], timeout=0.3)
    assert time.monotonic() - started < 10
    assert await net.run(net.node, ["sh", "-c", "echo $X"], env={"X": "y"}) == (0, "y\n", "")


# --------------------------------------------------------------------------- entering


async def test_entered_moves_only_this_thread_and_comes_back(net: NodeNetns) -> None:
    pod = net.add_pod("a")
    before = thread_netns()
    assert before != ns_id(net.node)
    seen_by_thread: list[str] = []
    with net.entered():
        assert thread_netns() == ns_id(net.node)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((net.node_ip, 9090))  # the node's address exists only in there
        listener.listen()
        worker = threading.Thread(target=lambda: seen_by_thread.append(thread_netns()))
        worker.start()
        worker.join()
    assert thread_netns() == before
    assert seen_by_thread == [ns_id(net.node)]

    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(OSError) as info:
        probe.bind((net.node_ip, 0))
    probe.close()
    assert info.value.errno == errno.EADDRNOTAVAIL

    # The socket made inside still lives in the node: a pod reaches it.
    def answer_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    acceptor = threading.Thread(target=answer_once)
    acceptor.start()
    try:
        assert await curl(net, pod.ns, f"http://{net.node_ip}:9090/") == (0, "ok", "")
    finally:
        acceptor.join(10)
        listener.close()

    with pytest.raises(RuntimeError), net.entered(pod.ns):
        assert thread_netns() == ns_id(pod.ns)
        raise RuntimeError("boom")
    assert thread_netns() == before
    with pytest.raises(ValueError), net.entered("not-ours"):
        pass
    assert thread_netns() == before


async def test_node_has_no_way_to_the_host(net: NodeNetns) -> None:
    assert await run_ok(net, net.node, ["ip", "-4", "route", "show", "default"]) == ""
    links = json.loads(await run_ok(net, net.node, ["ip", "-j", "link"]))
    assert {link["ifname"] for link in links} <= {"lo", "cbr0"}

    # 127.0.0.1 inside the node is the node's own loopback, not the host's.
    host_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    host_listener.bind(("127.0.0.1", 0))
    host_listener.listen()
    port = host_listener.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable here
        with net.entered(), pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        host_listener.close()

    # The host's own addresses are not routable from the node (no packet leaves).
    for ip in host_ipv4_addresses():
        with net.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock, pytest.raises(OSError) as info:
            sock.settimeout(2)
            sock.connect((ip, 22))
        assert info.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH), (ip, info.value)


# --------------------------------------------------------------------------- drills


async def test_set_pod_ip_changes_only_the_pod(net: NodeNetns) -> None:
    a, b = net.add_pod("a"), net.add_pod("b")
    original = a.ip
    node_routes = await run_ok(net, net.node, ["ip", "-4", "route"])
    with net.entered():
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver:
        receiver.bind((net.node_ip, 9999))
        receiver.settimeout(10)

        net.set_pod_ip("a", b.ip)  # a takes b's address
        assert net.pod("a").ip == b.ip
        addr = await run_ok(net, a.ns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        assert f"inet {b.ip}/" in addr and f"inet {original}/" not in addr
        assert f"default via {net.gateway} dev eth0" in await run_ok(
            net, a.ns, ["ip", "-4", "route"]
        )
        assert await run_ok(net, net.node, ["ip", "-4", "route"]) == node_routes

        # What a node daemon sees: a's packet, carrying b's address, through a's veth.
        await run_ok(net, a.ns, [sys.executable, "-c", UDP_SEND, net.node_ip, "9999", "from-a"])
        data, source = receiver.recvfrom(100)
        assert (data, source[0]) == (b"from-a", b.ip)

    net.set_pod_ip("a", original)
    await start_echo(net, net.node, net.node_ip, 8080)
    assert await curl(net, a.ns, f"http://{net.node_ip}:8080/") == (0, original, "")


async def reverse_path_drops(net: NodeNetns) -> int:
    """TcpExt IPReversePathFilter of the node namespace: packets rp_filter dropped."""
    lines = (await run_ok(net, net.node, ["cat", "/proc/net/netstat"])).splitlines()
    header, values = next(
        (h.split(), v.split()) for h, v in itertools.pairwise(lines) if h.startswith("TcpExt:")
    )
    return int(values[header.index("IPReversePathFilter")])


async def test_strict_rp_filter_drops_a_stolen_address() -> None:
    async with NodeNetns(rp_filter=1) as net:
        a, b = net.add_pod("a"), net.add_pod("b")
        assert (
            await run_ok(net, net.node, ["cat", "/proc/sys/net/ipv4/conf/all/rp_filter"]) == "1\n"
        )
        original = a.ip
        before = await reverse_path_drops(net)
        net.set_pod_ip("a", b.ip)
        assert a.ip == b.ip  # the Pod record follows
        await run_ok(net, a.ns, [sys.executable, "-c", UDP_SEND, net.node_ip, "9999", "x"])
        deadline = time.monotonic() + 10
        while await reverse_path_drops(net) == before:
            assert time.monotonic() < deadline, "rp_filter dropped nothing"
            await asyncio.sleep(0.02)
        net.set_pod_ip("a", original)
        addr = await run_ok(net, a.ns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        assert f"inet {original}/32" in addr and f"inet {b.ip}/" not in addr


async def test_remove_pod_and_hosts_file(net: NodeNetns) -> None:
    a, b = net.add_pod("a"), net.add_pod("b", ip="10.244.0.77")
    assert b.ip == "10.244.0.77"
    with pytest.raises(ValueError):
        net.add_pod("d", ip=b.ip)
    with pytest.raises(ValueError):
        net.add_pod("Bad_Name")
    assert len(net.namespaces) == 3
    net.hosts(a.ns, {"login.microsoftonline.com": net.node_ip, "myvault.vault.azure.net": b.ip})
    out = await run_ok(net, a.ns, ["getent", "hosts", "login.microsoftonline.com"])
    assert out.split()[0] == net.node_ip
    out = await run_ok(net, a.ns, ["getent", "hosts", "myvault.vault.azure.net"])
    assert out.split()[0] == b.ip
    assert exists(f"/etc/netns/{a.ns}/hosts")
    # Names missing from the hosts file fail at once: DNS goes to the pod's own loopback.
    started = time.monotonic()
    for _ in range(3):
        code, _, _ = await net.run(a.ns, ["getent", "hosts", "nowhere.invalid"])
        assert code == 2
    assert time.monotonic() - started < 3
    sleeper = await net.spawn(a.ns, ["sleep", "300"])

    net.remove_pod("a")
    assert a.ns not in netns_list()
    assert not exists(f"/etc/netns/{a.ns}")
    assert await asyncio.wait_for(sleeper.wait(), 10) == -9
    links = await run_ok(net, net.node, ["ip", "-o", "link"])
    assert a.host_veth not in links and b.host_veth in links
    assert a.ip not in await run_ok(net, net.node, ["ip", "-4", "route"])
    assert net.add_pod("c").ip == a.ip  # the address is free again


# --------------------------------------------------------------------------- cleanup


async def test_destroy_removes_everything_and_is_idempotent() -> None:
    net = NodeNetns(style="bridge")
    net.create()
    pod = net.add_pod("a")
    net.hosts(net.node, {"x.example": net.node_ip})
    proc = await net.spawn(pod.ns, ["sleep", "300"])
    mine = {net.node, pod.ns}
    assert mine <= netns_list()
    net.destroy()
    net.destroy()
    assert not mine & netns_list()
    assert not exists(f"/etc/netns/{net.node}")
    assert await asyncio.wait_for(proc.wait(), 10) == -9
    with pytest.raises(RuntimeError):
        net.create()


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_with_block_cleans_up_on_exceptions(interrupt: type[BaseException]) -> None:
    with pytest.raises(interrupt), NodeNetns() as net:
        net.add_pod("a")
        names = set(net.namespaces)
        raise interrupt()
    assert len(names) == 2 and not names & netns_list()


def test_forgotten_node_is_collected() -> None:
    net = NodeNetns()
    net.create()
    names = set(net.namespaces)
    del net
    gc.collect()
    assert not names & netns_list()


def test_cleanup_stale_removes_leaks_and_spares_live_owners() -> None:
    tag = os.urandom(4).hex()
    leaked = f"{PREFIX}{tag}-leak"
    other = f"{PREFIX}{tag}-other"
    subprocess.run(["ip", "netns", "add", leaked], check=True)
    Path(f"/etc/netns/{leaked}").mkdir(parents=True)
    Path(f"/etc/netns/{leaked}/hosts").write_text("127.0.0.1 localhost\n")
    # A namespace owned by another process that is still running.
    owner = subprocess.Popen(["sleep", "60"])
    try:
        subprocess.run(["ip", "netns", "add", other], check=True)
        stat = Path(f"/proc/{owner.pid}/stat").read_text()
        start = stat[stat.rfind(")") + 2 :].split()[19]
        Path(f"/run/nmie2e/{other}").write_text(f"{owner.pid} {start}\n")
        with NodeNetns(tag=tag) as live:
            removed = cleanup_stale()
            assert leaked in removed
            assert leaked not in netns_list() and not Path(f"/etc/netns/{leaked}").exists()
            assert live.node in netns_list() and other in netns_list()
        owner.kill()
        owner.wait()
        assert other in cleanup_stale()
        assert other not in netns_list()
    finally:
        owner.kill()
        owner.wait()
        for name in (leaked, other):
            if name in netns_list():
                subprocess.run(["ip", "netns", "delete", name], check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
            Path(f"/run/nmie2e/{name}").unlink(missing_ok=True)
