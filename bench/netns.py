"""nmi under load on a real node in network namespaces (a script that prints numbers, not a test).

Every request leaves a pod's network namespace for ``169.254.169.254:80`` and
is DNATed by the node's iptables, exactly as on a node; the load generator is
``wrk -t1`` run with ``ip netns exec <pod>``.  Everything happens inside the
namespaces :class:`~nmi_sandbox.nodeworld.NodeWorld` creates (no uplink) and
removes again; no traffic goes to any host address.  Every wrk run has a
duration, every client a deadline: the script stops by itself.

Measurements (default: 1-4, about 3.5 minutes on 2 cores):

1. **nmi cache hits** -- a bound, Assigned pod asks for a cached token at 1,
   16 and 64 connections.  nmi runs with its normal flags, its log (one
   access-log line per request) written to a file; then, at 16 and 64
   connections, once each with ``--log-format json`` to a file and with the
   text log to ``/dev/null`` (the cost of the access log), and with
   ``--per-pod-rate=0`` when this nmi has that flag (a check that the per-pod
   budget costs cache hits nothing: they do not draw from it).  1f: the same
   for a pod with a federated identity (``spec.type: 3``), to compare hot paths.
2. **nginx** in the node namespace returning the exact bytes nmi returned,
   with the DNAT pointed at it (``worker_processes`` 1, and 2 for reference):
   the physical limit of this machine.
3. **bare aiohttp + uvloop** (``bench/bare_server.py``) returning the same
   bytes through the same DNAT: the framework's ceiling.
4. **cold path** -- N = 1, 16, 64 concurrent first requests for a
   (identity, resource) nobody asked for yet, upstream latency 20 ms: the
   latency and the number of upstream calls (service principal via Azure AD,
   and user-assigned managed identity via the node IMDS), each round from a
   fresh pod.

``--scale``: 250 pods on the node, 5,000 AzureIdentities and
AzureIdentityBindings and 250 AzureAssignedIdentities created before nmi
starts; time from spawn to ``/readyz`` 200, RSS then and after every pod's
first request.  ``--soak SECONDS``: a paced client at ``--soak-rate`` (500)
requests/s, nmi's RSS sampled every 10 s.  ``--profile DIR``: an extra
16-connection run under ``py-spy record`` (py-spy from PyPI), summarised.

Selecting ``--scale`` or ``--soak`` runs only those; add ``--throughput`` to
run 1-4 as well.  ``--nmi-args '...'`` adds flags to every nmi started.
Needs root, ``wrk`` and ``nginx`` (Debian packages).

usage: python -m bench.netns [--duration 10] [--throughput] [--scale] [--soak SECONDS]
                             [--profile DIR] [--nmi-args ARGS]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from iptables import RuleManager, RuleSpec
from nmi_sandbox import manifests as m
from nmi_sandbox.nodeworld import METADATA_IP, NODE_IP, NodeWorld, PodHandle
from nmi_sandbox.world import Identity

from .measure import ProcessGroupStats, WrkReport, children, parse_wrk, percentile

HERE = Path(__file__).resolve().parent
POD_CLIENT = HERE / "pod_client.py"
BARE_SERVER = HERE / "bare_server.py"

RESOURCE = "https://management.azure.com"
TOKEN_PATH = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={RESOURCE}"
URL = f"http://{METADATA_IP}{TOKEN_PATH}"
CONNECTIONS = (1, 16, 64)
NGINX_PORT = 8480
BARE_PORT = 8481
UPSTREAM_LATENCY = 0.02

# Targets of the project (the "performance" issue).
TARGET_THROUGHPUT_SHARE = 0.85
TARGET_P99_MS = 3.0
TARGET_READY_S = 2.0
TARGET_RSS_MB = 80.0


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- results


@dataclass
class Run:
    """One wrk run against one server."""

    server: str
    connections: int
    report: WrkReport
    cpu_pct: float
    hwm_mb: float

    def row(self) -> str:
        r = self.report
        return (
            f"{self.server:<34} {self.connections:>5} {r.rps:>9.0f} {r.p50_ms:>8.3f} "
            f"{r.p99_ms:>8.3f} {r.errors:>6} {self.cpu_pct:>7.0f}% {self.hwm_mb:>9.1f}"
        )


HEADER = (
    f"{'server':<34} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
    f"{'srv CPU':>8} {'peak RSS MB':>11}"
)


@dataclass
class ColdRound:
    label: str
    concurrency: int
    statuses: dict[str, int]
    latencies_ms: list[float]
    upstream_calls: int
    distinct_tokens: int


@dataclass
class ScaleResult:
    pods: int
    identities: int
    create_s: float
    ready_s: float
    sync_s: float | None
    rss_ready_mb: float
    hwm_ready_mb: float
    first_requests: dict[str, int] = field(default_factory=dict)
    first_requests_s: float = 0.0
    rss_after_mb: float = 0.0
    hwm_after_mb: float = 0.0


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)
    cold: list[ColdRound] = field(default_factory=list)
    scale: ScaleResult | None = None
    notes: list[str] = field(default_factory=list)

    def find(self, server: str, connections: int) -> Run | None:
        for run in self.runs:
            if run.server == server and run.connections == connections:
                return run
        return None


# --------------------------------------------------------------------------- helpers


def _open_for_write(path: Path) -> IO[bytes]:
    return path.open("wb")


def _ensure_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _read_tail(path: Path, size: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-size:].decode(errors="replace")


def _write(path: Path, data: bytes | str) -> None:
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and resolved.startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def machine_lines() -> list[str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def tool(argv: Sequence[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "missing"
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else "?"

    revision = tool(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"])
    return [
        f"nmi source: git {revision}",
        f"machine: {os.cpu_count()} cores, {cpu}, {platform.machine()}, Linux {platform.release()}",
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} (other work on the "
        "machine shares the cores)",
        f"versions: Python {platform.python_version()}, aiohttp {metadata.version('aiohttp')}, "
        f"uvloop {metadata.version('uvloop')}, nmi {metadata.version('nmi')}, "
        f"{tool(['nginx', '-v']).replace('nginx version: ', '')}, "
        f"{' '.join(tool(['wrk', '-v']).split()[:2])}",
    ]


class Bench:
    """One node (NodeWorld) and the processes the benchmark runs on it."""

    def __init__(
        self, node: NodeWorld, workdir: Path, duration: int, nmi_args: Sequence[str] = ()
    ) -> None:
        self.node = node
        self.workdir = workdir
        self.duration = duration
        self.nmi_args = tuple(nmi_args)
        self.nmi: asyncio.subprocess.Process | None = None
        self.nmi_log: Path | None = None

    # -- nmi ------------------------------------------------------------------

    async def start_nmi(self, *extra: str, log: Path | None, timeout: float = 60.0) -> float:
        """Spawn nmi in the node namespace, its stderr to ``log`` (or /dev/null).

        Not :meth:`NodeWorld.start_nmi`: the benchmark chooses where the access
        log goes (a file, /dev/null) to measure its cost.
        Returns seconds from spawn to ``/readyz`` 200 (polled every 10 ms).
        """
        node = self.node
        sink = _open_for_write(log if log is not None else Path(os.devnull))
        try:
            started = time.monotonic()
            proc = await node.net.spawn(
                node.net.node,
                node.nmi_argv(*self.nmi_args, *extra),
                env=node.nmi_env(),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=sink,
            )
        finally:
            sink.close()
        node.nmi = proc
        self.nmi, self.nmi_log = proc, log
        while True:
            if proc.returncode is not None:
                tail = _read_tail(log) if log is not None else ""
                raise RuntimeError(f"nmi exited {proc.returncode}: {tail}")
            if await node.probe("/readyz") == 200:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError("nmi did not become ready")
            await asyncio.sleep(0.01)

    async def stop_nmi(self) -> int:
        assert self.nmi is not None
        code = await self.node.net.kill(self.nmi, signal.SIGTERM, timeout=15)
        self.nmi = None
        self.node.nmi = None
        return code

    def nmi_stats(self) -> ProcessGroupStats:
        assert self.nmi is not None
        return ProcessGroupStats([self.nmi.pid])

    # -- load -----------------------------------------------------------------

    async def wrk(
        self,
        pod: PodHandle,
        server: str,
        stats: Callable[[], ProcessGroupStats],
        connections: int,
        duration: int,
        *,
        record: bool = True,
    ) -> Run:
        group = stats()
        cpu0, t0 = group.cpu(), time.perf_counter()
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            "--latency",
            "-H",
            "Metadata: true",
            URL,
        ]
        code, out, err = await self.node.net.run(pod.ns, argv, timeout=duration + 30)
        wall = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"wrk failed ({code}): {out}{err}")
        run = Run(
            server=server,
            connections=connections,
            report=parse_wrk(out),
            cpu_pct=(group.cpu() - cpu0) / wall * 100,
            hwm_mb=group.hwm_mb(),
        )
        if record:
            say("  " + run.row())
        return run

    async def series(
        self,
        results: Results,
        pod: PodHandle,
        server: str,
        stats: Callable[[], ProcessGroupStats],
        connections: Sequence[int] = CONNECTIONS,
    ) -> None:
        await self.wrk(pod, server, stats, 16, 2, record=False)  # warm-up, not reported
        for c in connections:
            results.runs.append(await self.wrk(pod, server, stats, c, self.duration))

    async def pod_client(self, pod: PodHandle, *args: str, timeout: float) -> dict[str, Any]:
        argv = [sys.executable, str(POD_CLIENT), *args]
        code, out, err = await self.node.net.run(pod.ns, argv, timeout=timeout)
        if code != 0:
            raise RuntimeError(f"pod client failed ({code}): {err[-2000:]}")
        result: dict[str, Any] = json.loads(out)
        return result

    async def token_until_ok(
        self, pod: PodHandle, resource: str = RESOURCE, timeout: float = 20.0
    ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            reply = await self.node.token(pod, resource)
            if reply.status == 200:
                return reply.raw
            if time.monotonic() > deadline:
                raise RuntimeError(f"no token for {pod.name}: {reply.status} {reply.raw[:300]}")
            await asyncio.sleep(0.1)

    # -- other servers ----------------------------------------------------------

    async def point_dnat(self, port: int) -> None:
        """Retarget the node's DNAT for the metadata address to NODE_IP:port."""
        spec = RuleSpec(
            metadata_ip=METADATA_IP, metadata_port=80, target_ip=NODE_IP, target_port=port
        )
        manager = RuleManager(spec, command_prefix=("ip", "netns", "exec", self.node.net.node))
        await manager.install()
        # Flows of the previous target must not be reused by a new connection.
        with contextlib.suppress(Exception):
            await manager.delete_conntrack(ip=METADATA_IP, port=80)

    async def wait_port(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.node.net.entered():
                try:
                    _, writer = await asyncio.wait_for(asyncio.open_connection(NODE_IP, port), 1.0)
                except (OSError, TimeoutError):
                    writer = None
            if writer is not None:
                writer.close()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {NODE_IP}:{port}")
            await asyncio.sleep(0.05)

    async def start_nginx(self, body: bytes, workers: int) -> asyncio.subprocess.Process:
        text = body.decode()
        if any(c in text for c in "$'\\\n"):
            raise ValueError("the body cannot be written as an nginx 'return' string")
        root = self.workdir / f"nginx-{workers}"
        root.mkdir(exist_ok=True)
        temp = "\n".join(
            f"    {kind}_temp_path {root}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = f"""\
worker_processes {workers};
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {{
        listen {NODE_IP}:{NGINX_PORT} default_server;
        default_type application/json;
        location / {{ return 200 '{text}'; }}
    }}
}}
"""
        _write(root / "nginx.conf", conf)
        proc = await self.node.net.spawn(
            self.node.net.node,
            ["nginx", "-p", f"{root}/", "-c", str(root / "nginx.conf"), "-e", str(root / "e.log")],
        )
        await self.wait_port(NGINX_PORT)
        return proc

    async def start_bare(self, body: bytes) -> asyncio.subprocess.Process:
        body_file = self.workdir / "body.json"
        _write(body_file, body)
        proc = await self.node.net.spawn(
            self.node.net.node,
            [sys.executable, str(BARE_SERVER), NODE_IP, str(BARE_PORT), str(body_file)],
        )
        await self.wait_port(BARE_PORT)
        return proc


FEDERATED_SERIES = "nmi, federated identity"


def setup_federated_pod(node: NodeWorld, name: str = "bench-fed") -> PodHandle:
    """A pod with a federated identity (type 3): its service account trusted in Azure AD."""
    w = node.w
    ident = w.add_federated_identity(f"{name}-id", selector=name, service_accounts=(name,))
    pod = node.add_pod(name, selector=name, service_account=name)
    w.assign(pod.manifest, ident)
    return pod


def setup_bound_pod(node: NodeWorld, name: str = "bench") -> tuple[PodHandle, Identity]:
    w = node.w
    mi = w.add_user_assigned_identity(f"{name}-mi", selector=name)
    pod = node.add_pod(name, selector=name)
    w.assign(pod.manifest, mi)
    return pod, mi


# --------------------------------------------------------------------------- 1-4


async def throughput(args: argparse.Namespace, workdir: Path, results: Results) -> None:
    say("\n== 1-4: cache hits vs nginx vs bare aiohttp, cold path ==")
    async with NodeWorld() as node:
        bench = Bench(node, workdir, args.duration, args.nmi_args)
        pod, mi = setup_bound_pod(node)
        log_text = workdir / "nmi-text.log"
        ready = await bench.start_nmi(log=log_text)
        say(f"nmi ready {ready:.2f} s after spawn (pod {pod.ns}, {pod.ip})")
        body = (await bench.token_until_ok(pod)).encode()
        say(f"token reply: {len(body)} bytes")

        say("\n1. nmi cache hits (text log -> file on " + fs_type(log_text) + ")")
        say("  " + HEADER)
        size0 = log_text.stat().st_size
        await bench.series(results, pod, "nmi (text log -> file)", bench.nmi_stats)
        results.notes.append(access_log_note(log_text, size0, "text, nmi default flags"))

        say("\n1f. nmi cache hits of a federated identity (type 3): the same hot path")
        fed_pod = setup_federated_pod(node)
        await bench.token_until_ok(fed_pod)
        say("  " + HEADER)
        await bench.series(results, fed_pod, FEDERATED_SERIES, bench.nmi_stats)

        if args.profile is not None:
            await profile(bench, pod, args.profile, results)

        say("\n4. cold path: concurrent first requests, upstream latency 20 ms")
        await cold_path(bench, mi, results)
        code = await bench.stop_nmi()
        say(f"\nnmi stopped (SIGTERM): exit {code}")

        variants: list[tuple[str, tuple[str, ...], Path | None]] = [
            ("nmi (json log -> file)", ("--log-format", "json"), workdir / "nmi-json.log"),
            ("nmi (text log -> /dev/null)", (), None),
        ]
        if "--per-pod-rate" in args.nmi_help:
            variants.append(
                ("nmi (--per-pod-rate=0)", ("--per-pod-rate=0",), workdir / "nmi-norate.log")
            )
        for label, extra, log in variants:
            say(f"\n1b. {label}")
            await bench.start_nmi(*extra, log=log)
            await bench.token_until_ok(pod)
            size0 = log.stat().st_size if log is not None else 0
            await bench.series(results, pod, label, bench.nmi_stats, connections=(16, 64))
            if log is not None:
                fmt = "json" if "json" in extra else "text"
                results.notes.append(access_log_note(log, size0, f"{fmt}, {label}"))
            await bench.stop_nmi()

        say("\n2. nginx, DNAT retargeted to it (nmi stopped; its rules stay)")
        await bench.point_dnat(NGINX_PORT)
        for workers in (1, 2):
            proc = await bench.start_nginx(body, workers)
            check = await node.token(pod)
            if check.raw.encode() != body:
                raise RuntimeError(f"nginx answered something else: {check.raw[:200]}")
            master = proc.pid

            def nginx_stats(master: int = master) -> ProcessGroupStats:
                return ProcessGroupStats([master, *children(master)])

            await bench.series(
                results,
                pod,
                f"nginx worker_processes {workers}",
                nginx_stats,
                connections=CONNECTIONS if workers == 1 else (16, 64),
            )
            await node.net.kill(proc, signal.SIGTERM)

        say("\n3. bare aiohttp + uvloop, DNAT retargeted to it")
        await bench.point_dnat(BARE_PORT)
        bare = await bench.start_bare(body)
        check = await node.token(pod)
        if check.raw.encode() != body:
            raise RuntimeError(f"bare server answered something else: {check.raw[:200]}")
        bare_pid = bare.pid
        await bench.series(
            results,
            pod,
            "bare aiohttp + uvloop",
            lambda: ProcessGroupStats([bare_pid]),
        )
        await node.net.kill(bare, signal.SIGTERM)

        await bench.point_dnat(node.nmi_port)
        await bench.start_nmi(log=workdir / "nmi-final.log")
        await bench.token_until_ok(pod)
        await bench.stop_nmi()
        say("\nDNAT pointed back at nmi; a new nmi adopted the rules and served the pod")


def access_log_note(log: Path, offset: int, label: str) -> str:
    """Bytes per access-log line written since ``offset``."""
    with log.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    lines = [line for line in data.splitlines() if b"request" in line]
    per_line = len(data) / len(lines) if lines else 0.0
    return f"access log ({label}): {len(lines)} lines, {per_line:.0f} bytes per request"


async def cold_path(bench: Bench, mi: Identity, results: Results) -> None:
    """N concurrent first requests for a fresh resource, from a fresh pod per round.

    Each round's pod is new (so that a per-pod request budget spent by an earlier
    round does not count) and warmed with one cache hit for a resource its identity
    already has (pod, assignment, Secret and the MSAL client known to nmi): what is
    cold is the (identity, resource) pair, as for a new resource on a live node.
    """
    node, w = bench.node, bench.node.w
    sp = w.add_service_principal("bench-sp", selector="bench-sp")
    first = node.add_pod("bench-sp", selector="bench-sp")
    w.assign(first.manifest, sp)
    warm_sp, warm_mi = "https://vault.azure.net", RESOURCE
    await bench.token_until_ok(first, warm_sp)
    cases = (
        ("service principal (Azure AD)", "sp", sp, warm_sp, w.aad, w.aad.add_resource),
        ("managed identity (node IMDS)", "mi", mi, warm_mi, w.imds, w.imds.add_resource),
    )
    pods: dict[tuple[str, int], PodHandle] = {}
    for _, short, ident, warm, _, _ in cases:
        for n in CONNECTIONS:
            pod = node.add_pod(f"cold-{short}-{n}", selector=ident.selector)
            w.assign(pod.manifest, ident)
            await bench.token_until_ok(pod, warm)
            pods[(short, n)] = pod
    w.aad.latency = UPSTREAM_LATENCY
    w.imds.latency = UPSTREAM_LATENCY
    try:
        for label, short, ident, _, upstream, register in cases:
            counter, client_id = upstream.token_requests, ident.client_id
            for n in CONNECTIONS:
                who = pods[(short, n)]
                resource = f"https://bench-cold-{uuid.uuid4().hex[:12]}.example.com"
                register(resource)
                path = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}"
                out = await bench.pod_client(who, "burst", str(n), METADATA_IP, path, timeout=90)
                cold = ColdRound(
                    label=label,
                    concurrency=n,
                    statuses=out["statuses"],
                    latencies_ms=out["latencies_ms"],
                    upstream_calls=counter[(client_id, resource)],
                    distinct_tokens=out["distinct_tokens"],
                )
                results.cold.append(cold)
                say("  " + cold_row(cold))
    finally:
        w.aad.latency = 0.0
        w.imds.latency = 0.0


def cold_row(c: ColdRound) -> str:
    lat = c.latencies_ms
    statuses = " ".join(f"{k}x{v}" for k, v in sorted(c.statuses.items()))
    return (
        f"{c.label:<29} N={c.concurrency:<3} status {statuses:<14} "
        f"latency min {lat[0]:.1f} / p50 {percentile(lat, 50):.1f} / max {lat[-1]:.1f} ms  "
        f"upstream calls {c.upstream_calls}  distinct tokens {c.distinct_tokens}"
    )


# --------------------------------------------------------------------------- profile


async def profile(bench: Bench, pod: PodHandle, outdir: Path, results: Results) -> None:
    """A 16-connection run with py-spy sampling nmi; prints where the time goes."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        say("\n(profile skipped: py-spy not installed; pip install py-spy)")
        return
    assert bench.nmi is not None
    _ensure_dir(outdir)
    raw = outdir / "nmi-c16.collapsed.txt"
    say(f"\nprofile: py-spy record (200 Hz) of nmi at 16 connections -> {raw}")
    spy = await asyncio.create_subprocess_exec(
        str(py_spy),
        "record",
        "--pid",
        str(bench.nmi.pid),
        "--duration",
        str(bench.duration),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(raw),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        run = await bench.wrk(pod, "nmi under py-spy", bench.nmi_stats, 16, bench.duration)
    finally:
        await asyncio.wait_for(spy.wait(), bench.duration + 30)
    say(f"  (py-spy costs CPU on the same 2 cores: {run.report.rps:.0f} req/s under it)")
    for line in summarise_profile(raw):
        say("  " + line)


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")


def _short(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame, frame
    file = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['func']} ({file})", file


def summarise_profile(path: Path, top: int = 18) -> list[str]:
    own: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = other = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ["(no profile written)"]
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if "run_loop (" not in stack:
            other += count  # another thread: the MSAL/to_thread pool, mostly waiting
            continue
        total += count
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1][0]] += count
        by_file[frames[-1][1]] += count
        for name in {f[0] for f in frames}:
            inclusive[name] += count
    if not total:
        return ["(empty profile)"]
    out = [
        f"{total} samples of the event-loop thread (percentages are of these; {other} samples"
        " of other threads left out)",
        "own time, by function:",
    ]
    out += [f"  {n * 100 / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    out.append("own time, by file:")
    out += [f"  {n * 100 / total:5.1f}%  {name}" for name, n in by_file.most_common(top)]
    out.append("inclusive time, nmi frames:")
    picked = [(name, n) for name, n in inclusive.most_common() if "(nmi/" in name]
    out += [f"  {n * 100 / total:5.1f}%  {name}" for name, n in picked[:top]]
    return out


# --------------------------------------------------------------------------- 5


async def scale(args: argparse.Namespace, workdir: Path, results: Results) -> None:
    pods, identities, namespaces = args.scale_pods, args.scale_identities, 50
    say(f"\n== 5: scale: {pods} pods, {identities} identities and bindings ==")
    async with NodeWorld() as node:
        bench = Bench(node, workdir, args.duration, args.nmi_args)
        w = node.w
        started = time.monotonic()
        created: list[dict[str, Any]] = []
        bindings: list[dict[str, Any]] = []
        for n in range(namespaces):
            w.ensure_namespace(f"team-{n:02d}")
        for i in range(identities):
            ns = f"team-{i % namespaces:02d}"
            client_id, object_id = str(uuid.uuid4()), str(uuid.uuid4())
            resource_id = (
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg/"
                f"providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-{i:04d}"
            )
            w.imds.add_user_assigned(
                client_id=client_id, object_id=object_id, resource_id=resource_id
            )
            created.append(
                w.kube.create(
                    m.azure_identity(
                        name=f"id-{i:04d}",
                        namespace=ns,
                        type=0,
                        client_id=client_id,
                        resource_id=resource_id,
                    )
                )
            )
            bindings.append(
                w.kube.create(
                    m.binding(
                        name=f"id-{i:04d}-binding",
                        namespace=ns,
                        identity=f"id-{i:04d}",
                        selector=f"sel-{i:04d}",
                    )
                )
            )
        handles: list[PodHandle] = []
        step = max(1, identities // pods)
        for p in range(pods):
            ident = created[(p * step) % identities]
            meta = ident["metadata"]
            net = node.net.add_pod(f"s{p:03d}")
            manifest = w.add_pod(
                f"app-{p:03d}",
                namespace=meta["namespace"],
                selector=bindings[(p * step) % identities]["spec"]["selector"],
                ip=net.ip,
            )
            w.kube.create(
                m.assigned_identity(
                    pod_name=f"app-{p:03d}",
                    pod_namespace=meta["namespace"],
                    node=w.node,
                    identity=ident,
                    binding_obj=bindings[(p * step) % identities],
                )
            )
            handles.append(PodHandle(net=net, manifest=manifest))
        create_s = time.monotonic() - started
        say(
            f"created in {create_s:.1f} s: {pods} pods (each with a network namespace), "
            f"{identities} AzureIdentities + bindings in {namespaces} namespaces, "
            f"{pods} AzureAssignedIdentities (Assigned)"
        )

        log = workdir / "nmi-scale.log"
        ready = await bench.start_nmi(log=log)
        stats = bench.nmi_stats()
        rss, hwm = stats.rss_mb(), stats.hwm_mb()
        sync = None
        for line in _read_tail(log, 200_000).splitlines():
            if "cluster view synced" in line:
                found = re.search(r"seconds=([\d.]+)", line)
                sync = float(found.group(1)) if found else None
        say(
            f"nmi spawn -> /readyz 200: {ready:.2f} s"
            + (f" (first sync of the cluster view inside nmi: {sync:.2f} s)" if sync else "")
        )
        say(f"nmi RSS at ready: {rss:.1f} MB (peak so far {hwm:.1f} MB)")
        result = ScaleResult(
            pods=pods,
            identities=identities,
            create_s=create_s,
            ready_s=ready,
            sync_s=sync,
            rss_ready_mb=rss,
            hwm_ready_mb=hwm,
        )
        results.scale = result

        # Each pod's first request: a miss, one IMDS call each.  The emulated IMDS's
        # per-VM limits (5 in flight, 20/s) are lifted so that this measures nmi.
        w.imds.enforce_limits = False
        sem = asyncio.Semaphore(16)
        statuses: collections.Counter[str] = collections.Counter()

        async def first(handle: PodHandle) -> None:
            async with sem:
                reply = await node.token(handle)
                statuses[str(reply.status)] += 1

        t0 = time.monotonic()
        calls0 = sum(w.imds.token_requests.values())
        await asyncio.gather(*(first(h) for h in handles))
        result.first_requests_s = time.monotonic() - t0
        calls = sum(w.imds.token_requests.values()) - calls0
        result.first_requests = dict(statuses)
        result.rss_after_mb, result.hwm_after_mb = stats.rss_mb(), stats.hwm_mb()
        say(
            f"first request of every pod ({pods}, 16 at a time, curl in each pod): "
            f"{dict(statuses)} in {result.first_requests_s:.1f} s; node IMDS token calls: "
            f"{calls} ({calls / result.first_requests_s:.1f}/s; the emulator's 5-in-flight and "
            "20/s limits lifted for this step)"
        )
        say(f"nmi RSS after: {result.rss_after_mb:.1f} MB (peak {result.hwm_after_mb:.1f} MB)")
        await bench.stop_nmi()


# --------------------------------------------------------------------------- 6


async def soak(args: argparse.Namespace, workdir: Path, results: Results) -> None:
    seconds, rate = args.soak, args.soak_rate
    say(f"\n== 6: soak: {rate} req/s for {seconds} s (paced client, 8 connections) ==")
    async with NodeWorld() as node:
        bench = Bench(node, workdir, args.duration, args.nmi_args)
        pod, _ = setup_bound_pod(node)
        await bench.start_nmi(log=workdir / "nmi-soak.log")
        await bench.token_until_ok(pod)
        stats = bench.nmi_stats()
        samples: list[tuple[float, float]] = [(0.0, stats.rss_mb())]
        say(f"  t=   0 s  RSS {samples[0][1]:.1f} MB")
        client = asyncio.create_task(
            bench.pod_client(
                pod,
                "paced",
                str(rate),
                str(seconds),
                "8",
                METADATA_IP,
                TOKEN_PATH,
                timeout=seconds + 90,
            )
        )
        t0 = time.monotonic()
        next_sample = 10.0
        while True:
            wait = max(0.0, t0 + next_sample - time.monotonic())
            try:
                out = await asyncio.wait_for(asyncio.shield(client), wait)
            except TimeoutError:
                samples.append((time.monotonic() - t0, stats.rss_mb()))
                say(f"  t={samples[-1][0]:4.0f} s  RSS {samples[-1][1]:.1f} MB")
                next_sample += 10.0
                continue
            break
        if time.monotonic() - t0 - samples[-1][0] > 2:
            samples.append((time.monotonic() - t0, stats.rss_mb()))
            say(f"  t={samples[-1][0]:4.0f} s  RSS {samples[-1][1]:.1f} MB (client done)")
        await bench.stop_nmi()
    first, last = samples[0][1], samples[-1][1]
    after10 = samples[1][1] if len(samples) > 2 else first
    statuses = out["statuses"]
    errors = sum(v for k, v in statuses.items() if k != "200")
    lat = out["latency_ms"]
    say(
        f"  sent {out['scheduled']} at {out['achieved_rps']:.0f} req/s: {statuses}; "
        f"errors {errors}; connections opened {out['connections_opened']}"
    )
    say(
        f"  latency from the scheduled time: p50 {lat.get('p50', 0):.2f} ms, "
        f"p99 {lat.get('p99', 0):.2f} ms, p99.9 {lat.get('p999', 0):.2f} ms, "
        f"max {lat.get('max', 0):.1f} ms"
    )
    say(
        f"  RSS growth: {(last - first) / first * 100:+.1f}% from start ({first:.1f} -> "
        f"{last:.1f} MB), {(last - after10) / after10 * 100:+.1f}% from the 10 s sample"
    )
    results.notes.append(
        f"soak {seconds} s at {rate} req/s: errors {errors}, "
        f"RSS {first:.1f} -> {last:.1f} MB ({(last - first) / first * 100:+.1f}%)"
    )


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, results: Results, ran_throughput: bool) -> None:
    say("\n" + "=" * 100)
    say("SUMMARY")
    for line in machine_lines():
        say(line)
    if results.runs:
        say(
            f"load: wrk -t1 (one thread) -c1/16/64 -d{args.duration}s --latency, from a pod's "
            "network namespace to 169.254.169.254:80 (DNAT on the node);"
        )
        say("      wrk and the server share the machine's cores; server CPU 100% = one core")
        say("\n" + HEADER)
        for run in results.runs:
            say(run.row())
    if results.cold:
        say("\ncold path (N concurrent first requests, fresh resource per round, upstream 20 ms):")
        for cold in results.cold:
            say("  " + cold_row(cold))
    if results.scale is not None:
        s = results.scale
        say(
            f"\nscale: {s.pods} pods, {s.identities} identities/bindings: spawn -> ready "
            f"{s.ready_s:.2f} s, RSS at ready {s.rss_ready_mb:.1f} MB (peak {s.hwm_ready_mb:.1f}),"
            f" after every pod's first request {s.rss_after_mb:.1f} MB "
            f"(peak {s.hwm_after_mb:.1f}), first requests {s.first_requests}"
        )
    for note in results.notes:
        say("note: " + note)

    nmi, nginx, bare = "nmi (text log -> file)", "nginx worker_processes 1", "bare aiohttp + uvloop"
    if ran_throughput:
        say("\nratios (nmi = text log to a file; nginx = worker_processes 1)")
        say(f"  {'':<28}" + "".join(f"{f'c={c}':>10}" for c in CONNECTIONS))
        for label, other in (("nmi/nginx req/s", nginx), ("nmi/bare-aiohttp req/s", bare)):
            cells = []
            for c in CONNECTIONS:
                a, b = results.find(nmi, c), results.find(other, c)
                cells.append(f"{a.report.rps / b.report.rps:>10.2f}" if a and b else f"{'-':>10}")
            say(f"  {label:<28}" + "".join(cells))
        cells = []
        for c in CONNECTIONS:
            a, f = results.find(nmi, c), results.find(FEDERATED_SERIES, c)
            cells.append(f"{f.report.rps / a.report.rps:>10.2f}" if a and f else f"{'-':>10}")
        say(f"  {'federated/managed-id req/s':<28}" + "".join(cells))
        f16 = results.find(FEDERATED_SERIES, 16)
        a16 = results.find(nmi, 16)
        if a16 and f16:
            say(
                f"  p99 at 16 connections: federated {f16.report.p99_ms:.2f} ms, managed "
                f"identity {a16.report.p99_ms:.2f} ms (ratio "
                f"{f16.report.p99_ms / a16.report.p99_ms:.2f}x)"
            )
        a16, n16, b16 = results.find(nmi, 16), results.find(nginx, 16), results.find(bare, 16)
        if a16 and n16 and b16:
            say(
                f"  p99 at 16 connections: nmi {a16.report.p99_ms:.2f} ms, nginx "
                f"{n16.report.p99_ms:.2f} ms (nmi/nginx {a16.report.p99_ms / n16.report.p99_ms:.1f}"
                f"x), bare aiohttp {b16.report.p99_ms:.2f} ms "
                f"(nmi/bare {a16.report.p99_ms / b16.report.p99_ms:.1f}x)"
            )

    say("\ntargets")

    def verdict(ok: bool | None) -> str:
        return "not measured in this run" if ok is None else ("met" if ok else "NOT met")

    shares = []
    for c in (16, 64):
        a, b = results.find(nmi, c), results.find(bare, c)
        if a and b:
            shares.append((c, a.report.rps / b.report.rps))
    share_ok = all(s >= TARGET_THROUGHPUT_SHARE for _, s in shares) if len(shares) == 2 else None
    say(
        "  cache-hit throughput >= 85% of bare aiohttp+uvloop at 16 and 64 connections: "
        + ", ".join(f"c={c}: {s * 100:.0f}%" for c, s in shares)
        + f" -> {verdict(share_ok)}"
    )
    a16 = results.find(nmi, 16)
    p99_ok = a16.report.p99_ms <= TARGET_P99_MS if a16 else None
    say(
        "  p99 <= 3 ms at 16 connections: "
        + (f"{a16.report.p99_ms:.2f} ms" if a16 else "")
        + f" -> {verdict(p99_ok)}"
    )
    cold_ok = all(c.upstream_calls == 1 for c in results.cold) if results.cold else None
    say(
        "  exactly 1 upstream call per identity and resource at any concurrency: "
        + ", ".join(f"N={c.concurrency}: {c.upstream_calls}" for c in results.cold)
        + f" -> {verdict(cold_ok)}"
    )
    sc = results.scale
    say(
        f"  ready within 2 s with {args.scale_pods} pods and {args.scale_identities:,} "
        "identities: "
        + (f"{sc.ready_s:.2f} s" if sc else "")
        + f" -> {verdict(sc.ready_s <= TARGET_READY_S if sc else None)}"
    )
    say(
        "  RSS <= 80 MB there (peak at ready): "
        + (f"{sc.hwm_ready_mb:.1f} MB" if sc else "")
        + f" -> {verdict(sc.hwm_ready_mb <= TARGET_RSS_MB if sc else None)}"
    )


async def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        say("bench.netns needs root (network namespaces, iptables)")
        return 2
    missing = [
        tool for tool in ("wrk", "nginx", "curl", "ip", "iptables") if not shutil.which(tool)
    ]
    if missing:
        say(f"missing: {' '.join(missing)} (apt-get install --no-install-recommends wrk nginx)")
        return 2
    run_throughput = args.throughput or (not args.scale and args.soak is None)
    results = Results()
    started = time.monotonic()
    first_lines = machine_lines()
    for line in first_lines:
        say(line)
    with tempfile.TemporaryDirectory(prefix="nmi-bench-") as tmp:
        workdir = Path(tmp)
        if run_throughput:
            await throughput(args, workdir, results)
        if args.scale:
            await scale(args, workdir, results)
        if args.soak is not None:
            await soak(args, workdir, results)
    if machine_lines()[0] != first_lines[0]:
        results.notes.append(
            f"the nmi source changed during the run (at the start: {first_lines[0]}); "
            "each nmi process ran the code present when it was spawned"
        )
    report(args, results, run_throughput)
    say(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


def nmi_help() -> str:
    """``nmi --help``, to run variants only for flags this nmi has."""
    done = subprocess.run(
        [sys.executable, "-m", "nmi", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.netns", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--throughput", action="store_true", help="run 1-4 with --scale/--soak")
    parser.add_argument("--scale", action="store_true", help="the 250-pod / 5,000-identity run")
    parser.add_argument("--scale-pods", type=int, default=250)
    parser.add_argument("--scale-identities", type=int, default=5000)
    parser.add_argument("--soak", type=int, default=None, metavar="SECONDS")
    parser.add_argument("--soak-rate", type=int, default=500, metavar="REQ_PER_S")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR")
    parser.add_argument(
        "--nmi-args",
        default="",
        metavar="ARGS",
        help="extra flags for every nmi started (one string, shell-split)",
    )
    args = parser.parse_args(argv)
    args.nmi_args = shlex.split(args.nmi_args)
    args.nmi_help = nmi_help()
    if not 1 <= args.duration <= 300:
        parser.error("--duration must be 1..300")
    if args.soak is not None and not 10 <= args.soak <= 86_400:
        parser.error("--soak must be 10..86400 seconds")
    if not 1 <= args.scale_pods <= 250:
        parser.error("--scale-pods must be 1..250 (the node's pod CIDR is a /24)")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
