"""The iptables package against the real kernel, inside throw-away network namespaces.

Every state-changing command runs in a namespace this file created (named
``nmiipt-<random>-<role>``) through ``ip netns exec``/``ip -n``; the namespaces
are deleted in fixture finalizers, also when a test fails.  Nothing here
touches the host's network namespace.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from iptables import RuleManager, RuleSpec, detect, parse_save, render

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables-nft") is None,
        reason="needs root, ip and iptables-nft",
    ),
]

PREFIX = "nmiipt-"
SPEC = RuleSpec(
    metadata_ip="169.254.169.254", metadata_port=80, target_ip="10.240.0.4", target_port=2579
)
OUR_NAT_JUMP = ["-m", "comment", "--comment", "nmi", "-j", "NMI-METADATA"]
KUBE_JUMP = "-m comment --comment kube-like -j KUBE-SERVICES"
KUBE_RULE = "-d 10.0.0.1/32 -p tcp -m tcp --dport 443 -j RETURN"


# -- helpers -----------------------------------------------------------------------------


async def run(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {err.decode()}")
    return out.decode()


def in_ns(ns: str) -> tuple[str, ...]:
    assert ns.startswith(PREFIX)
    return ("ip", "netns", "exec", ns)


async def ipt(ns: str, backend: str, *args: str) -> str:
    return await run(*in_ns(ns), f"iptables-{backend}", "-w", "5", *args)


async def save(ns: str, backend: str, *args: str) -> str:
    return await run(*in_ns(ns), f"iptables-{backend}-save", *args)


async def chain(ns: str, backend: str, table: str, name: str) -> list[str] | None:
    return parse_save(await save(ns, backend, "-t", table)).chain(table=table, chain=name)


async def eventually(
    probe: Callable[[], Awaitable[str]], want: Callable[[str], bool], *, within: float = 5.0
) -> str:
    """Repeat ``probe`` until ``want`` holds for its answer or the deadline passes."""
    deadline = time.monotonic() + within
    while True:
        got = await probe()
        if want(got) or time.monotonic() > deadline:
            return got


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def make_ns() -> Iterator[Callable[[str], str]]:
    """Creates namespaces on demand; deletes all of them afterwards, whatever happened."""
    created: list[str] = []

    def make(role: str) -> str:
        name = f"{PREFIX}{secrets.token_hex(4)}-{role}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        created.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], check=False)


def _backend_works(ns: str, backend: str) -> bool:
    for table in ("raw", "nat", "filter"):
        probe = subprocess.run(
            [*in_ns(ns), f"iptables-{backend}", "-w", "5", "-t", table, "-S"],
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            return False
    return True


@pytest.fixture(params=["nft", "legacy"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if shutil.which(f"iptables-{name}") is None:
        pytest.skip(f"iptables-{name} is not installed")
    return name


@pytest.fixture
def ns(make_ns: Callable[[str], str], backend: str) -> str:
    name = make_ns("node")
    if not _backend_works(name, backend):
        pytest.skip(f"the {backend} backend does not work here")
    return name


@pytest.fixture
def manager(ns: str, backend: str) -> RuleManager:
    return RuleManager(SPEC, backend=backend, command_prefix=in_ns(ns))


async def add_kube_like(ns: str, backend: str) -> None:
    """Another tool's chain and PREROUTING jump, present before nmi."""
    await ipt(ns, backend, "-t", "nat", "-N", "KUBE-SERVICES")
    await ipt(ns, backend, "-t", "nat", "-A", "KUBE-SERVICES", *KUBE_RULE.split())
    await ipt(ns, backend, "-t", "nat", "-A", "PREROUTING", *KUBE_JUMP.split())


# -- install, adopt, drift, uninstall --------------------------------------------------------


async def test_install_is_idempotent_and_visible(
    ns: str, backend: str, manager: RuleManager
) -> None:
    await add_kube_like(ns, backend)
    assert await manager.check()  # nothing installed yet
    assert await manager.install() is True
    assert manager.restores == 1
    assert await manager.check() == []

    # Second install: unchanged, no restore executed.
    assert await manager.install() is False
    assert manager.restores == 1
    # A new process (new manager) adopts the rules without writing anything.
    successor = RuleManager(SPEC, backend=backend, command_prefix=in_ns(ns))
    assert await successor.install() is False
    assert successor.restores == 0
    assert (await successor.reconcile()).status == "in_place"

    dump = parse_save(await save(ns, backend))
    rendered = render(SPEC)
    for table, name, count in (
        ("raw", "NMI-METADATA", 1),
        ("nat", "NMI-METADATA", 1),
        ("filter", "NMI-LISTENER", 2),
    ):
        rules = dump.chain(table=table, chain=name)
        assert rules is not None and len(rules) == count
        # Rendered in iptables-save's own canonical form: the text round-trips exactly.
        for rule in rules:
            assert f"-A {name} {rule}\n" in rendered
    assert dump.chain(table="nat", chain="PREROUTING") == [
        "-m comment --comment nmi -j NMI-METADATA",
        KUBE_JUMP,
    ]
    assert dump.chain(table="raw", chain="PREROUTING") == [
        "! -i lo -m comment --comment nmi -j NMI-METADATA"
    ]
    assert dump.chain(table="filter", chain="INPUT") == ["-m comment --comment nmi -j NMI-LISTENER"]
    assert dump.chain(table="filter", chain="FORWARD") == [
        "-m comment --comment nmi -j NMI-LISTENER"
    ]
    assert dump.chain(table="nat", chain="KUBE-SERVICES") == [KUBE_RULE]
    assert dump.chain(table="nat", chain="OUTPUT") == []  # host traffic never intercepted


DRIFTS: list[tuple[str, list[list[str]], str]] = [
    ("flush nat chain", [["-t", "nat", "-F", "NMI-METADATA"]], "nat: chain NMI-METADATA rules"),
    ("delete nat jump", [["-t", "nat", "-D", "PREROUTING", "1"]], "is missing"),
    (
        "rule above our jump",
        [["-t", "nat", "-I", "PREROUTING", "1", "-s", "10.99.0.0/16", "-j", "RETURN"]],
        "is not first (position 2)",
    ),
    (
        "duplicate jump",
        [["-t", "nat", "-A", "PREROUTING", *OUR_NAT_JUMP]],
        "is duplicated",
    ),
    (
        "raw chain deleted",
        [
            ["-t", "raw", "-D", "PREROUTING", "1"],
            ["-t", "raw", "-F", "NMI-METADATA"],
            ["-t", "raw", "-X", "NMI-METADATA"],
        ],
        "raw: chain NMI-METADATA is missing",
    ),
    (
        "guard replaced",
        [["-t", "filter", "-R", "NMI-LISTENER", "1", "-j", "RETURN"]],
        "filter: chain NMI-LISTENER rules differ",
    ),
    (
        "jump rewritten",
        [["-t", "raw", "-R", "PREROUTING", "1", "-j", "NMI-METADATA"]],
        "raw: jump PREROUTING -> NMI-METADATA differs",
    ),
]


@pytest.mark.parametrize(("what", "commands", "expected"), DRIFTS, ids=[d[0] for d in DRIFTS])
async def test_drift_is_reported_and_restored(
    ns: str,
    backend: str,
    manager: RuleManager,
    what: str,
    commands: list[list[str]],
    expected: str,
) -> None:
    await add_kube_like(ns, backend)
    await manager.install()
    for command in commands:
        await ipt(ns, backend, *command)
    problems = await manager.check()
    assert any(expected in p for p in problems), problems

    result = await manager.reconcile()
    assert result.restored and result.ok, result
    assert any(expected in p for p in result.problems)
    assert await manager.check() == []
    assert (await manager.reconcile()).status == "in_place"

    prerouting = await chain(ns, backend, "nat", "PREROUTING")
    assert prerouting is not None
    assert prerouting[0] == "-m comment --comment nmi -j NMI-METADATA"
    assert KUBE_JUMP in prerouting
    if what == "rule above our jump":
        assert prerouting[1] == "-s 10.99.0.0/16 -j RETURN"  # theirs kept, just below ours
    assert await chain(ns, backend, "nat", "KUBE-SERVICES") == [KUBE_RULE]


async def test_uninstall_removes_only_ours(ns: str, backend: str, manager: RuleManager) -> None:
    await add_kube_like(ns, backend)
    before = await save(ns, backend, "-t", "nat")
    await manager.install()
    assert await manager.uninstall() is True
    dump = await save(ns, backend)
    assert "NMI-" not in dump
    assert "--comment nmi" not in dump
    assert await chain(ns, backend, "nat", "PREROUTING") == [KUBE_JUMP]
    assert await chain(ns, backend, "nat", "KUBE-SERVICES") == [KUBE_RULE]
    assert _rules_only(await save(ns, backend, "-t", "nat")) == _rules_only(before)
    assert await manager.uninstall() is False
    assert "nat: chain NMI-METADATA is missing" in await manager.check()


def _rules_only(dump: str) -> list[str]:
    return [line for line in dump.splitlines() if line.startswith(("-A", ":"))]


async def test_conntrack_deletion_without_entries(manager: RuleManager) -> None:
    if shutil.which("conntrack") is None:
        pytest.skip("conntrack is not installed")
    await manager.install()
    assert await manager.delete_conntrack(ip="169.254.169.254", port=80) == 0


async def test_detect_follows_existing_rules(make_ns: Callable[[str], str]) -> None:
    if shutil.which("iptables-legacy") is None:
        pytest.skip("iptables-legacy is not installed")
    kube = make_ns("kube")
    if not (_backend_works(kube, "legacy") and _backend_works(kube, "nft")):
        pytest.skip("both backends are needed")
    await add_kube_like(kube, "legacy")
    assert (await detect(chains=["NMI-METADATA"], command_prefix=in_ns(kube))).name == "legacy"
    # Our chain in nft beats kube-proxy's rules in legacy.
    await ipt(kube, "nft", "-t", "nat", "-N", "NMI-METADATA")
    assert (await detect(chains=["NMI-METADATA"], command_prefix=in_ns(kube))).name == "nft"
    empty = make_ns("empty")
    assert (await detect(chains=["NMI-METADATA"], command_prefix=in_ns(empty))).name == "nft"
    manager = RuleManager(SPEC, command_prefix=in_ns(kube))
    assert (await manager.backend()).name == "nft"


# -- the rules at work: pod -> veth -> node ------------------------------------------------

SERVER = """
import socket, sys, threading
def serve(host, port, name):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    def loop():
        while True:
            c, peer = s.accept()
            c.sendall(f"{name} {peer[0]}\\n".encode())
            c.close()
    threading.Thread(target=loop, daemon=True).start()
serve(sys.argv[1], int(sys.argv[2]), "nmi")
serve(sys.argv[3], int(sys.argv[4]), "imds")
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        print(c.makefile().readline().strip())
except OSError as e:
    print("ERR", type(e).__name__)
"""

NODE_IP = "10.250.9.9"
NMI_PORT = 2579
POD1 = "10.250.0.2"
POD2 = "10.250.0.3"
IMDS = "169.254.169.254"


async def connect(ns: str, host: str, port: int, timeout: float = 2.0) -> str:
    out = await run(*in_ns(ns), sys.executable, "-c", CLIENT, host, str(port), str(timeout))
    return out.strip()


async def attach_pod(node: str, pod: str, *, veth: str, ip: str) -> None:
    """A Calico-style pod link: node side without address, proxy ARP, a /32 route."""
    await run("ip", "-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
              "netns", pod)  # fmt: skip
    await run(*in_ns(node), "sysctl", "-q", "-w", f"net.ipv4.conf.{veth}.proxy_arp=1")
    await run(*in_ns(node), "sysctl", "-q", "-w", f"net.ipv4.conf.{veth}.rp_filter=0")
    await run("ip", "-n", node, "link", "set", veth, "up")
    await run("ip", "-n", pod, "addr", "add", f"{ip}/32", "dev", "eth0")
    await run("ip", "-n", pod, "link", "set", "eth0", "up")
    await run("ip", "-n", pod, "route", "add", "default", "dev", "eth0")
    await run("ip", "-n", node, "route", "add", f"{ip}/32", "dev", veth)


def raw_drop_packets(dump: str) -> int:
    """Packet counter of our raw DROP rule in ``iptables-save -c -t raw`` output."""
    for line in dump.splitlines():
        m = re.match(r"^\[(\d+):\d+\] -A NMI-METADATA .*-j DROP", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no raw DROP rule in {dump}")


async def test_pod_traffic_is_intercepted_and_spoofing_dropped(
    make_ns: Callable[[str], str], backend: str
) -> None:
    node = make_ns("node")
    if not _backend_works(node, backend):
        pytest.skip(f"the {backend} backend does not work here")
    pod1, pod2 = make_ns("pod1"), make_ns("pod2")
    for key in ("all", "default"):
        await run(*in_ns(node), "sysctl", "-q", "-w", f"net.ipv4.conf.{key}.rp_filter=0")
    await run("ip", "-n", node, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    await run("ip", "-n", node, "addr", "add", f"{IMDS}/32", "dev", "lo")
    await attach_pod(node, pod1, veth="vpod1", ip=POD1)
    await attach_pod(node, pod2, veth="vpod2", ip=POD2)

    server = await asyncio.create_subprocess_exec(
        *in_ns(node), sys.executable, "-c", SERVER, NODE_IP, str(NMI_PORT), IMDS, "80",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert await asyncio.wait_for(server.stdout.readline(), 10) == b"ready\n"

        # Without rules the pod reaches the node's own metadata listener.
        got = await eventually(lambda: connect(pod1, IMDS, 80), lambda s: s.startswith("imds"))
        assert got == f"imds {POD1}"

        spec = RuleSpec(metadata_ip=IMDS, metadata_port=80, target_ip=NODE_IP, target_port=NMI_PORT)
        manager = RuleManager(spec, backend=backend, command_prefix=in_ns(node))
        assert await manager.install() is True

        # With them, the same connect reaches nmi, which sees the pod's own address.
        assert await connect(pod1, IMDS, 80) == f"nmi {POD1}"
        assert await connect(pod2, IMDS, 80) == f"nmi {POD2}"
        # The node itself still talks to its IMDS (OUTPUT is never intercepted) and to nmi.
        assert await connect(node, IMDS, 80) == f"imds {IMDS}"
        assert await connect(node, NODE_IP, NMI_PORT) == f"nmi {NODE_IP}"
        # A pod cannot bypass the interception by calling nmi's listener directly.
        assert await connect(pod1, NODE_IP, NMI_PORT, timeout=0.5) == "ERR TimeoutError"
        assert raw_drop_packets(await save(node, backend, "-c", "-t", "raw")) == 0

        # Conntrack holds the pods' DNATed flows; deletion finds and removes them.
        if shutil.which("conntrack") is not None:
            assert await manager.delete_conntrack(ip=IMDS, port=80) >= 2
            assert await manager.delete_conntrack(ip=IMDS, port=80) == 0

        # Anti-spoofing: pod2 takes pod1's address; its SYN arrives on the wrong veth.
        await run("ip", "-n", pod2, "addr", "del", f"{POD2}/32", "dev", "eth0")
        await run("ip", "-n", pod2, "addr", "add", f"{POD1}/32", "dev", "eth0")
        await run("ip", "-n", pod2, "route", "replace", "default", "dev", "eth0")
        assert await connect(pod2, IMDS, 80, timeout=0.5) == "ERR TimeoutError"
        assert raw_drop_packets(await save(node, backend, "-c", "-t", "raw")) >= 1
        # ...while the real pod1 is still served.
        assert await connect(pod1, IMDS, 80) == f"nmi {POD1}"

        # Uninstalled, the pod is back to the node's listener.
        assert await manager.uninstall() is True
        assert await connect(pod1, IMDS, 80) == f"imds {POD1}"
    finally:
        server.kill()
        await server.wait()
