"""A Kubernetes node with pods, built from real Linux network namespaces.

Why it exists: on a node, iptables DNAT sends the pods' traffic for
``169.254.169.254:80`` to nmi, and nmi tells the pods apart by the *source IP*
of that traffic.  The loopback world (:mod:`nmi_sandbox.world`) imitates this
with 127.0.0.x addresses; the end-to-end tests need the real path - a pod's
packet leaving its own network namespace through a veth, arriving in the
node's namespace, going through the node's netfilter and routing - without
touching the machine's own network.  :class:`NodeNetns` builds that node.

The node namespace (``nmie2e-<tag>-node``)
    ``lo`` up, carrying ``node_ip/32`` (where nmi listens) and
    ``metadata_ip/32`` (so that a fake node IMDS can listen on
    ``169.254.169.254:80`` *inside* the node), ``net.ipv4.ip_forward=1``,
    ``net.ipv4.conf.{all,default}.rp_filter`` set to ``rp_filter`` (default 0).
    It has **no uplink, no default route and no route to the host's
    namespace**: the only interfaces are ``lo``, the node ends of the pods'
    veths and, in the bridge style, ``cbr0``.  (The kernel here has no
    ``dummy`` driver, hence the addresses on ``lo``.)

Style ``"veth"`` (Azure CNI, transparent mode) - one veth pair per pod:
    * pod side: ``eth0`` in the pod namespace with ``ip/32``, routes
      ``169.254.1.1 dev eth0 scope link`` and
      ``default via 169.254.1.1 dev eth0``, and - as Azure CNI does - a
      permanent neighbour entry ``169.254.1.1 lladdr <node veth MAC>``.
      The node has no route to 169.254.1.1, so proxy ARP could not answer for
      the gateway: the static entry is what makes ``via 169.254.1.1`` work.
    * node side: ``nmv<10 hex>`` (13 characters, unique per tag and pod), no
      address, ``proxy_arp=1``, ``rp_filter=<rp_filter>``, and the host route
      ``ip/32 dev nmv...`` in the node namespace.
    Every packet a pod sends (to ``169.254.169.254``, to ``node_ip``, to
    another pod) enters the node namespace through the pod's own veth.
    With ``rp_filter=0`` (or 2) a pod that takes another pod's address
    (:meth:`NodeNetns.set_pod_ip`) still reaches the node, whose replies go
    to the *owner* of the address; with ``rp_filter=1`` the node drops it.

Style ``"bridge"`` (kubenet):
    ``cbr0`` in the node namespace with the first address of ``pod_cidr``
    (``10.244.0.1/24``) and a fixed MAC; each pod's veth is a port of it; the
    pod has ``ip/<prefix>`` on ``eth0`` and ``default via 10.244.0.1``.
    nmi must recognise this style from the node's links and routes.

Names: every namespace gets ``/etc/netns/<ns>/resolv.conf`` with
``nameserver 127.0.0.1`` (nothing listens there), so that under
``ip netns exec`` a name missing from :meth:`NodeNetns.hosts` fails at once
instead of sending DNS towards the node, where it dies after a 5 s timeout
(no route; the node's ICMP errors are rate-limited).  :meth:`NodeNetns.hosts`
maps names (``login.microsoftonline.com``, a vault) to addresses.  Processes
that are not started through ``ip netns exec`` (sockets made under
:meth:`NodeNetns.entered`) still see the host's ``/etc``.

Pods live in ``nmie2e-<tag>-pod-<name>``; their IPs come from ``pod_cidr``
starting at its second host address (``10.244.0.2``).

Safety: every namespace name starts with :data:`PREFIX`; everything is made
with ``ip -n <ours>`` / ``ip netns exec <ours>`` so that nothing is created
or changed in the host's namespace; namespaces, ``/etc/netns/<ns>`` and the
processes started through :meth:`NodeNetns.spawn`/:meth:`NodeNetns.run` go
away on :meth:`NodeNetns.destroy`, on leaving the ``with`` block (exceptions
and ``KeyboardInterrupt`` included), when the object is collected, and at
interpreter exit.  :func:`cleanup_stale` removes what a killed run left
behind; it spares namespaces whose owning process (recorded under
``/run/nmie2e/``) is still alive, so parallel runs do not destroy each other.
Processes that a killed run left running are not touched by it: their
namespace loses its name and dies with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal

__all__ = ["PREFIX", "NetnsError", "NodeNetns", "Pod", "cleanup_stale"]

PREFIX: Final = "nmie2e-"
VETH_GATEWAY: Final = "169.254.1.1"
BRIDGE: Final = "cbr0"
POD_IFNAME: Final = "eth0"

_NETNS_RUN_DIR: Final = Path("/run/netns")
_NETNS_ETC_DIR: Final = Path("/etc/netns")
_OWNER_DIR: Final = Path("/run/nmie2e")
_CLONE_NEWNET: Final = 0x40000000
_IP: Final = shutil.which("ip") or "/usr/sbin/ip"
_TAG_RE: Final = re.compile(r"[a-z0-9]{1,16}\Z")
_POD_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?\Z")

_RESOLV_CONF: Final = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
"""DNS inside our namespaces: the namespace's own loopback, where nothing listens."""

_live: set[str] = set()
"""Namespace names owned by not-yet-destroyed :class:`NodeNetns` objects of this process."""
_live_lock = threading.Lock()

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int

Stream = int | IO[Any] | None


class NetnsError(RuntimeError):
    """An ``ip`` command or a namespace operation failed."""


@dataclass
class Pod:
    """A pod of the node: its own network namespace behind a veth."""

    name: str
    ns: str
    ip: str
    host_veth: str


@dataclass
class _Tracked:
    proc: asyncio.subprocess.Process
    pid: int
    start: str | None
    ns: str


@dataclass
class _State:
    """Everything teardown needs; held apart from the object for ``weakref.finalize``."""

    namespaces: list[str] = field(default_factory=list)
    procs: list[_Tracked] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _check_ours(name: str) -> None:
    if not name.startswith(PREFIX) or "/" in name or name in (".", ".."):
        raise ValueError(f"not a namespace of ours: {name!r}")


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat``: tells a process from a later one with its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _signal_group(tracked: _Tracked, sig: int) -> None:
    """Signal the process group of a process we started with ``start_new_session``.

    The group is signalled while its leader still exists (alive or zombie,
    same start time) or after the leader is gone and the PID is unused
    (remaining members keep the group ID from being reused); never when the
    PID now belongs to a different process.
    """
    if tracked.proc.returncode is not None:
        return
    current = _start_time(tracked.pid)
    if current is not None and tracked.start is not None and current != tracked.start:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(tracked.pid, sig)


def _ip(ns: str, lines: Sequence[str]) -> None:
    """Run ``ip`` commands inside namespace ``ns`` (``ip -n ns -batch -``)."""
    _check_ours(ns)
    if not lines:
        return
    script = "".join(line + "\n" for line in lines)
    result = subprocess.run(
        [_IP, "-n", ns, "-batch", "-"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0:
        raise NetnsError(
            f"ip -n {ns} failed ({result.returncode}): {result.stderr.strip()}\ncommands:\n{script}"
        )


def _sysctl(ns: str, values: Mapping[str, str | int]) -> None:
    """Set sysctls inside ``ns`` only: a shell started by ``ip netns exec`` writes /proc/sys."""
    _check_ours(ns)
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[a-z0-9_.]+", key) or not re.fullmatch(r"[0-9]+", str(value)):
            raise ValueError(f"bad sysctl {key}={value}")
        parts.append(f"echo {value} > /proc/sys/{key.replace('.', '/')}")
    result = subprocess.run(
        [_IP, "netns", "exec", ns, "sh", "-ec", "; ".join(parts)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0:
        raise NetnsError(f"sysctl in {ns} failed: {result.stderr.strip()}")


def _write_etc(ns: str, filename: str, text: str) -> None:
    """Write ``/etc/netns/<ns>/<filename>``: ``ip netns exec ns`` bind-mounts it on /etc."""
    _check_ours(ns)
    directory = _NETNS_ETC_DIR / ns
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{filename}.tmp"
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(directory / filename)


def _netns_exists(name: str) -> bool:
    return os.path.lexists(_NETNS_RUN_DIR / name)


def _add_namespace(name: str, state: _State) -> None:
    """Create ``name``, recorded for teardown and with its owner before it exists."""
    _check_ours(name)
    if _netns_exists(name):
        raise NetnsError(f"namespace {name} already exists")
    with _live_lock:
        _live.add(name)
    state.namespaces.append(name)
    _OWNER_DIR.mkdir(mode=0o755, exist_ok=True)
    (_OWNER_DIR / name).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    result = subprocess.run(
        [_IP, "netns", "add", name], capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise NetnsError(f"ip netns add {name} failed: {result.stderr.strip()}")
    _write_etc(name, "resolv.conf", _RESOLV_CONF)


def _delete_namespace(name: str) -> None:
    """Delete namespace ``name`` (prefixed), its ``/etc/netns`` dir and owner record."""
    _check_ours(name)
    if _netns_exists(name):
        result = subprocess.run(
            [_IP, "netns", "delete", name],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if result.returncode != 0 and _netns_exists(name):
            raise NetnsError(f"ip netns delete {name} failed: {result.stderr.strip()}")
    shutil.rmtree(_NETNS_ETC_DIR / name, ignore_errors=True)
    (_OWNER_DIR / name).unlink(missing_ok=True)
    with _live_lock:
        _live.discard(name)


def _teardown(state: _State) -> list[str]:
    """Kill tracked processes, delete namespaces (newest first); return the errors."""
    errors: list[str] = []
    for tracked in list(state.procs):
        _signal_group(tracked, signal.SIGKILL)
    state.procs.clear()
    for name in reversed(list(state.namespaces)):
        try:
            _delete_namespace(name)
        except Exception as exc:
            errors.append(f"{name}: {exc}")
        else:
            state.namespaces.remove(name)
    return errors


def _owner_alive(name: str) -> bool:
    """Whether another, still running process recorded itself as the owner of ``name``."""
    try:
        pid_text, start = (_OWNER_DIR / name).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return False  # ours but not live: a leak of this very process
    return _start_time(pid) == start


def cleanup_stale() -> list[str]:
    """Remove ``nmie2e-*`` namespaces and ``/etc/netns/nmie2e-*`` dirs left by dead runs.

    Spares the namespaces of live :class:`NodeNetns` objects of this process
    and of other processes that are still running.  Returns the removed names.
    """
    names: set[str] = set()
    for directory in (_NETNS_RUN_DIR, _NETNS_ETC_DIR, _OWNER_DIR):
        with contextlib.suppress(FileNotFoundError):
            names.update(p.name for p in directory.iterdir() if p.name.startswith(PREFIX))
    removed: list[str] = []
    for name in sorted(names):
        with _live_lock:
            live = name in _live
        if live or _owner_alive(name):
            continue
        _delete_namespace(name)
        removed.append(name)
    return removed


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _mac(seed: str) -> str:
    """A locally administered unicast MAC derived from ``seed``."""
    digest = hashlib.sha256(seed.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


# --------------------------------------------------------------------------- the node


class NodeNetns:
    """One node namespace and its pods' namespaces; see the module docstring."""

    def __init__(
        self,
        *,
        style: Literal["veth", "bridge"] = "veth",
        node_ip: str = "10.240.0.4",
        metadata_ip: str = "169.254.169.254",
        pod_cidr: str = "10.244.0.0/24",
        tag: str | None = None,
        rp_filter: Literal[0, 1, 2] = 0,
    ) -> None:
        if style not in ("veth", "bridge"):
            raise ValueError(f"unknown style {style!r}")
        self.style: Final = style
        self.node_ip: Final = str(ipaddress.IPv4Address(node_ip))
        self.metadata_ip: Final = str(ipaddress.IPv4Address(metadata_ip))
        self.pod_network: Final = ipaddress.IPv4Network(pod_cidr)
        if self.pod_network.prefixlen > 29:
            raise ValueError(f"pod_cidr {pod_cidr} is too small")
        if ipaddress.IPv4Address(node_ip) in self.pod_network:
            raise ValueError("node_ip must lie outside pod_cidr")
        self.pod_cidr: Final = str(self.pod_network)
        self.tag: Final = tag if tag is not None else secrets.token_hex(4)
        if not _TAG_RE.match(self.tag):
            raise ValueError(f"tag must match {_TAG_RE.pattern}: {self.tag!r}")
        if rp_filter not in (0, 1, 2):
            raise ValueError("rp_filter must be 0, 1 or 2")
        self.rp_filter: Final = rp_filter
        self.node: Final = f"{PREFIX}{self.tag}-node"
        self.bridge_ip: Final = str(self.pod_network.network_address + 1)
        self.gateway: Final = self.bridge_ip if style == "bridge" else VETH_GATEWAY
        """The pods' default gateway."""
        self._pods: dict[str, Pod] = {}
        self._routed_ip: dict[str, str] = {}
        self._seq = 0
        self._created = False
        self._state = _State()
        self._finalizer = weakref.finalize(self, _teardown, self._state)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> NodeNetns:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    async def __aenter__(self) -> NodeNetns:
        self.create()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Kill the tracked processes and reap them in the event loop, then :meth:`destroy`."""
        try:
            for tracked in list(self._state.procs):
                with contextlib.suppress(Exception):
                    await self.kill(tracked.proc)
        finally:
            self.destroy()

    def create(self) -> None:
        """Build the node namespace (see the module docstring)."""
        if not self._finalizer.alive:
            raise NetnsError("this NodeNetns was destroyed; make a new one")
        if self._created:
            return
        self._created = True
        try:
            _add_namespace(self.node, self._state)
            lines = [
                "link set lo up",
                f"address add {self.node_ip}/32 dev lo",
                f"address add {self.metadata_ip}/32 dev lo",
            ]
            if self.style == "bridge":
                lines += [
                    f"link add {BRIDGE} address {_mac(self.tag + '/bridge')} type bridge",
                    f"address add {self.bridge_ip}/{self.pod_network.prefixlen} dev {BRIDGE}",
                    f"link set {BRIDGE} up",
                ]
            _ip(self.node, lines)
            _sysctl(
                self.node,
                {
                    "net.ipv4.ip_forward": 1,
                    "net.ipv4.conf.all.rp_filter": self.rp_filter,
                    "net.ipv4.conf.default.rp_filter": self.rp_filter,
                },
            )
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Kill tracked processes, delete all namespaces and their /etc/netns dirs. Idempotent."""
        errors = self._finalizer() if self._finalizer.alive else None
        self._pods.clear()
        self._routed_ip.clear()
        if errors:
            raise NetnsError("teardown incomplete: " + "; ".join(errors))

    @property
    def namespaces(self) -> list[str]:
        """The names of the namespaces that exist now (node first)."""
        return list(self._state.namespaces)

    @property
    def pods(self) -> dict[str, Pod]:
        return dict(self._pods)

    def pod(self, name: str) -> Pod:
        return self._pods[name]

    # ------------------------------------------------------------------ pods

    def _require_created(self) -> None:
        if not self._created or not self._finalizer.alive:
            raise NetnsError("call create() first (and not after destroy())")

    def _allocate(self) -> str:
        taken = {p.ip for p in self._pods.values()} | set(self._routed_ip.values())
        first = self.pod_network.network_address + 1
        for host in self.pod_network.hosts():
            if host != first and str(host) not in taken:
                return str(host)
        raise NetnsError(f"pod_cidr {self.pod_cidr} is exhausted")

    def _plen(self) -> int:
        return 32 if self.style == "veth" else self.pod_network.prefixlen

    def add_pod(self, name: str, *, ip: str | None = None) -> Pod:
        """Create pod ``name`` with ``ip`` (or the next free address of ``pod_cidr``)."""
        self._require_created()
        if not _POD_RE.match(name):
            raise ValueError(f"pod name must match {_POD_RE.pattern}: {name!r}")
        if name in self._pods:
            raise ValueError(f"pod {name} exists")
        address = str(ipaddress.IPv4Address(ip)) if ip is not None else self._allocate()
        if address in {p.ip for p in self._pods.values()} | set(self._routed_ip.values()):
            raise ValueError(f"{address} is in use on this node")
        if address in (self.node_ip, self.metadata_ip, self.bridge_ip):
            raise ValueError(f"{address} is a node address")
        if self.style == "bridge" and ipaddress.IPv4Address(address) not in self.pod_network:
            raise ValueError(f"{address} is outside {self.pod_cidr}")
        self._seq += 1
        seed = f"{self.tag}/{name}/{self._seq}"
        veth = "nmv" + hashlib.sha256(seed.encode()).hexdigest()[:10]
        node_mac, pod_mac = _mac(seed + "/node"), _mac(seed + "/pod")
        pod = Pod(name=name, ns=f"{PREFIX}{self.tag}-pod-{name}", ip=address, host_veth=veth)
        try:
            _add_namespace(pod.ns, self._state)
            node_lines = [
                f"link add {veth} address {node_mac} type veth"
                f" peer name {POD_IFNAME} address {pod_mac} netns {pod.ns}"
            ]
            if self.style == "bridge":
                node_lines += [f"link set {veth} master {BRIDGE}", f"link set {veth} up"]
            else:
                node_lines += [f"link set {veth} up", f"route add {address}/32 dev {veth}"]
            _ip(self.node, node_lines)
            if self.style == "veth":
                _sysctl(
                    self.node,
                    {
                        f"net.ipv4.conf.{veth}.proxy_arp": 1,
                        f"net.ipv4.conf.{veth}.rp_filter": self.rp_filter,
                    },
                )
            # promote_secondaries: set_pod_ip may delete the primary of a /24.
            _sysctl(pod.ns, {f"net.ipv4.conf.{POD_IFNAME}.promote_secondaries": 1})
            pod_lines = [
                "link set lo up",
                f"address add {address}/{self._plen()} dev {POD_IFNAME}",
                f"link set {POD_IFNAME} up",
                *self._pod_routes(address),
            ]
            if self.style == "veth":
                pod_lines.append(
                    f"neigh replace {VETH_GATEWAY} lladdr {node_mac} dev {POD_IFNAME} nud permanent"
                )
            _ip(pod.ns, pod_lines)
        except BaseException:
            self._drop_pod_ns(pod.ns, veth)
            raise
        self._pods[name] = pod
        self._routed_ip[name] = address
        return pod

    def _pod_routes(self, address: str) -> list[str]:
        if self.style == "veth":
            return [
                f"route replace {VETH_GATEWAY} dev {POD_IFNAME} scope link",
                f"route replace default via {VETH_GATEWAY} dev {POD_IFNAME}",
            ]
        lines = []
        if ipaddress.IPv4Address(address) not in self.pod_network:
            lines.append(f"route replace {self.bridge_ip} dev {POD_IFNAME} scope link")
        return [*lines, f"route replace default via {self.bridge_ip} dev {POD_IFNAME}"]

    def _drop_pod_ns(self, ns: str, veth: str) -> None:
        for tracked in [t for t in self._state.procs if t.ns == ns]:
            _signal_group(tracked, signal.SIGKILL)
            self._state.procs.remove(tracked)
        with contextlib.suppress(NetnsError):
            if self.node in self._state.namespaces:
                _ip(self.node, [f"link delete {veth}"])
        if ns in self._state.namespaces:
            _delete_namespace(ns)
            self._state.namespaces.remove(ns)

    def remove_pod(self, name: str) -> None:
        """Kill the pod's tracked processes, delete its veth and namespace."""
        pod = self._pods.pop(name)
        self._routed_ip.pop(name, None)
        self._drop_pod_ns(pod.ns, pod.host_veth)

    def set_pod_ip(self, name: str, ip: str) -> None:
        """Replace the address inside the pod's namespace; the node's routes stay as they were.

        The drill of a pod taking another pod's (or an unassigned) address.
        """
        pod = self._pods[name]
        new = str(ipaddress.IPv4Address(ip))
        if new == pod.ip:
            return
        plen = self._plen()
        _ip(
            pod.ns,
            [
                f"address add {new}/{plen} dev {POD_IFNAME}",
                f"address delete {pod.ip}/{plen} dev {POD_IFNAME}",
                *self._pod_routes(new),
            ],
        )
        pod.ip = new

    def hosts(self, ns: str, entries: Mapping[str, str]) -> None:
        """Write ``/etc/netns/<ns>/hosts`` (name -> IP), seen by ``ip netns exec ns``."""
        self._require_ns(ns)
        by_ip: dict[str, list[str]] = {}
        for hostname, address in entries.items():
            by_ip.setdefault(str(ipaddress.ip_address(address)), []).append(hostname)
        text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        text += "".join(f"{a}\t{' '.join(names)}\n" for a, names in by_ip.items())
        _write_etc(ns, "hosts", text)

    # ------------------------------------------------------------------ entering

    def _require_ns(self, ns: str) -> None:
        if ns not in self._state.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of this node")

    @contextlib.contextmanager
    def entered(self, ns: str | None = None) -> Iterator[None]:
        """Move the *current thread* into ``ns`` (default: the node) for the block.

        Sockets created inside belong to that namespace for their whole life;
        threads started inside inherit it.  The thread always returns to the
        namespace it was in.  In a coroutine, every other task of the loop
        runs in ``ns`` too while the block awaits: keep such blocks short.
        """
        target = ns if ns is not None else self.node
        self._require_ns(target)
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = os.open(_NETNS_RUN_DIR / target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(original)

    # ------------------------------------------------------------------ processes

    def _track(self, proc: asyncio.subprocess.Process, ns: str) -> _Tracked:
        tracked = _Tracked(proc=proc, pid=proc.pid, start=_start_time(proc.pid), ns=ns)
        self._state.procs.append(tracked)
        return tracked

    def _untrack(self, proc: asyncio.subprocess.Process) -> _Tracked | None:
        for tracked in self._state.procs:
            if tracked.proc is proc:
                self._state.procs.remove(tracked)
                return tracked
        return None

    async def _exec(
        self,
        ns: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        stdout: Stream,
        stderr: Stream,
        stdin: Stream = asyncio.subprocess.DEVNULL,
    ) -> tuple[asyncio.subprocess.Process, _Tracked]:
        self._require_ns(ns)
        if not argv:
            raise ValueError("empty argv")
        proc = await asyncio.create_subprocess_exec(
            _IP,
            "netns",
            "exec",
            ns,
            *argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
        return proc, self._track(proc, ns)

    async def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> tuple[int, str, str]:
        """Run ``argv`` in ``ns`` to completion: (exit status, stdout, stderr).

        ``env``, if given, is the whole environment (as for ``subprocess``;
        ``argv[0]`` is looked up in its ``PATH``).  On timeout (or
        cancellation) the process group is killed and the error re-raised.
        """
        proc, tracked = await self._exec(
            ns, argv, env, asyncio.subprocess.PIPE, asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            _signal_group(tracked, signal.SIGKILL)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(proc.wait(), 10)
            raise
        finally:
            self._untrack(proc)
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: Stream = asyncio.subprocess.DEVNULL,
        stderr: Stream = asyncio.subprocess.DEVNULL,
        stdin: Stream = asyncio.subprocess.DEVNULL,
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` in ``ns`` in a new session; it is killed on destroy.

        ``env``, if given, is the whole environment, as for :meth:`run`.

        ``ip netns exec`` execs ``argv`` in place, so ``proc.pid`` is the
        program's own PID and its process group.  Unread pipes fill up: pass
        ``PIPE`` only for output that is read.
        """
        proc, _ = await self._exec(ns, argv, env, stdout, stderr, stdin)
        return proc

    async def kill(
        self,
        proc: asyncio.subprocess.Process,
        sig: int = signal.SIGKILL,
        *,
        timeout: float = 10,
    ) -> int:
        """Signal a spawned process's group, wait for it (SIGKILL after ``timeout``)."""
        tracked = next((t for t in self._state.procs if t.proc is proc), None)
        if tracked is None:
            if proc.returncode is None:
                raise ValueError(f"process {proc.pid} was not started by this node")
            return proc.returncode
        _signal_group(tracked, sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            _signal_group(tracked, signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is not None:
                self._untrack(proc)
        assert proc.returncode is not None
        return proc.returncode
