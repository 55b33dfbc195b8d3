"""A real node in network namespaces, with nmi intercepting its pods' traffic.

The emulated cluster, Azure AD and the node's IMDS (on 169.254.169.254:80)
live inside the node namespace, which has no uplink; nmi runs there as its
own process with its normal flags and installs its iptables rules in that
namespace; pods are namespaces on veth pairs (or on a bridge) whose clients
call the real metadata address.  The controller (``nmi mic``) can run there
too, as its own process with the Deployment's flags, against the emulated
API server and ARM; the node's IMDS then serves only what ARM shows on the
node.  Used by the e2e tests, the drills and ``nmi sandbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .netns import NodeNetns, Pod
from .processes import mic_args
from .world import LoopbackWorld

METADATA_IP = "169.254.169.254"
NODE_IP = "10.240.0.4"

# What kube-proxy (iptables mode) has on every real node before nmi arrives.  Besides
# realism (nmi's rules must coexist with these), it matters: connection tracking is
# active from the start, as on a real node, so flows opened before nmi keep their
# original destination unless nmi deletes their conntrack entries.
KUBE_PROXY_RULES = """\
*nat
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
COMMIT
*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
"""


@dataclass
class PodHandle:
    """A pod: its namespace on the node and its Kubernetes object."""

    net: Pod
    manifest: dict[str, Any]

    @property
    def ip(self) -> str:
        return self.net.ip

    @property
    def ns(self) -> str:
        return self.net.ns

    @property
    def name(self) -> str:
        return self.net.name


@dataclass
class CurlResult:
    exit_code: int
    status: int
    body: dict[str, Any]
    raw: str


class NodeWorld:
    def __init__(self, *, style: Literal["veth", "bridge"] = "veth") -> None:
        self.net = NodeNetns(style=style, node_ip=NODE_IP, metadata_ip=METADATA_IP)
        self.world: LoopbackWorld | None = None
        self.nmi: asyncio.subprocess.Process | None = None
        self.mic: asyncio.subprocess.Process | None = None
        self.mic_probe_port = 8086
        self.mic_metrics_port = 8889
        self.mic_log: Path | None = None
        self.nmi_port = 2579
        self.probe_port = 8085
        self.metrics_port = 9090
        self.pods: dict[str, PodHandle] = {}
        self.nmi_log: Path | None = None
        self._log_count = 0

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        self.net.create()
        await self._kube_proxy_rules()
        with self.net.entered():
            self.world = LoopbackWorld(imds_host=METADATA_IP, imds_port=80)
            await self.world.start()
        # Azure AD fetches the service-account issuer's documents from the API server,
        # which listens in the node's namespace: its sockets are made there.
        self.world.aad.issuers.socket_factory = self._node_socket

    def _node_socket(self, addr_info: Any) -> socket.socket:
        family, kind, proto, _, _ = addr_info
        with self.net.entered():
            return socket.socket(family, kind, proto)

    async def _kube_proxy_rules(self) -> None:
        proc = await self.net.spawn(
            self.net.node,
            ["iptables-restore", "-w", "5", "--noflush"],
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(KUBE_PROXY_RULES.encode())
        if proc.returncode != 0:
            raise RuntimeError(f"kube-proxy-like rules failed: {err.decode()}")

    async def stop(self) -> None:
        try:
            for proc in (self.nmi, self.mic):
                if proc is not None and proc.returncode is None:
                    await self.net.kill(proc, signal.SIGKILL)
            if self.world is not None:
                with self.net.entered():
                    await self.world.stop()
        finally:
            self.net.destroy()

    async def __aenter__(self) -> NodeWorld:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def w(self) -> LoopbackWorld:
        assert self.world is not None, "not started"
        return self.world

    def nmi_argv(self, *extra: str) -> list[str]:
        w = self.w
        return [
            sys.executable,
            "-m",
            "nmi",
            f"--node={w.node}",
            f"--kubeconfig={w.kubeconfig}",
            f"--node-ip={NODE_IP}",
            f"--nmi-port={self.nmi_port}",
            f"--http-probe-port={self.probe_port}",
            f"--prometheus-port={self.metrics_port}",
            "--probe-address=127.0.0.1",
            f"--allowed-authority-hosts={w.aad.authority_host}",
            "--find-identity-retry-interval=1",
            f"--admin-socket={w.workdir / 'admin.sock'}",
            *extra,
        ]

    def nmi_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["REQUESTS_CA_BUNDLE"] = str(self.w.ca_bundle)
        env["SSL_CERT_FILE"] = str(self.w.ca_bundle)
        env.pop("AZURE_POD_IDENTITY_AUTHORITY_HOST", None)
        return env

    async def spawn_nmi(self, *extra: str) -> asyncio.subprocess.Process:
        # nmi's log goes to a file: an undrained pipe would fill up and stall nmi.
        self._log_count += 1
        self.nmi_log = self.w.workdir / f"nmi-{self._log_count}.log"
        with open(self.nmi_log, "wb") as log:  # noqa: ASYNC230 - once per start, test harness
            proc = await self.net.spawn(
                self.net.node,
                self.nmi_argv(*extra),
                env=self.nmi_env(),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        self.nmi = proc
        return proc

    def nmi_log_text(self) -> str:
        return self.nmi_log.read_text(errors="replace") if self.nmi_log else ""

    async def start_nmi(self, *extra: str, timeout: float = 60.0) -> float:
        """Start nmi and wait until it reports ready; returns seconds from spawn to ready."""
        started = time.monotonic()
        proc = await self.spawn_nmi(*extra)
        deadline = started + timeout
        while True:
            if proc.returncode is not None:
                tail = self.nmi_log_text()[-2000:]
                raise RuntimeError(f"nmi exited {proc.returncode}: {tail}")
            status = await self.probe("/readyz")
            if status == 200:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise TimeoutError("nmi did not become ready")
            # nmi is a separate process: its probe is the only readiness signal there is.
            await asyncio.sleep(0.05)

    async def probe(self, path: str, port: int | None = None) -> int:
        """GET on nmi's probe port from inside the node namespace; 0 if nothing answers."""
        data = await self._node_get("127.0.0.1", port or self.probe_port, path)
        try:
            return int(data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return 0

    # -- the controller -----------------------------------------------------

    def mic_argv(self, *extra: str) -> list[str]:
        """``nmi mic`` with the flags of the Deployment in ``daemonset/mic/``."""
        return [
            sys.executable,
            "-m",
            "nmi",
            *mic_args(
                self.w,
                probe_port=self.mic_probe_port,
                metrics_port=self.mic_metrics_port,
            ),
            *extra,
        ]

    async def start_mic(self, *extra: str, timeout: float = 60.0) -> float:
        """Start the controller and wait until it leads (``/healthz`` says ``Active``);
        from then on the node's IMDS serves only what ARM shows on the node."""
        w = self.w
        w.ensure_namespace("kube-system")
        w.enforce_arm()
        env = self.nmi_env()
        env.update(w.cloud_environ(), MIC_POD_NAME="nmi-mic-0")
        self.mic_log = w.workdir / "mic.log"
        started = time.monotonic()
        with open(self.mic_log, "wb") as log:  # noqa: ASYNC230 - once per start, test harness
            self.mic = await self.net.spawn(
                self.net.node, self.mic_argv(*extra), env=env, stderr=log
            )
        while True:
            if self.mic.returncode is not None:
                tail = self.mic_log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nmi mic exited {self.mic.returncode}: {tail}")
            data = await self._node_get("127.0.0.1", self.mic_probe_port, "/healthz")
            if data.endswith(b"\r\n\r\nActive"):
                return time.monotonic() - started
            if time.monotonic() > started + timeout:
                raise TimeoutError("nmi mic did not become the leader")
            # A separate process: its probe is the only signal there is.
            await asyncio.sleep(0.05)

    async def stop_mic(self) -> int:
        """SIGTERM the controller (it releases its lease) and wait for it."""
        assert self.mic is not None
        return await self.net.kill(self.mic, signal.SIGTERM)

    async def metrics(self, host: str = "127.0.0.1") -> str:
        """nmi's /metrics, fetched from inside the node namespace ("" if nothing answers)."""
        data = await self._node_get(host, self.metrics_port, "/metrics")
        return data.partition(b"\r\n\r\n")[2].decode(errors="replace")

    async def _node_get(self, host: str, port: int, path: str) -> bytes:
        with self.net.entered():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, family=socket.AF_INET), 2
                )
            except (OSError, TimeoutError):
                return b""
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 5)
        except (OSError, TimeoutError):
            return b""
        finally:
            writer.close()

    async def wait_exit(self, timeout: float = 30.0) -> tuple[int, str]:
        assert self.nmi is not None
        code = await asyncio.wait_for(self.nmi.wait(), timeout)
        return code, self.nmi_log_text()

    async def diagnose(self) -> str:
        """The node's rules, listeners and processes, for a failing test's message."""
        parts = []
        for argv in (
            ["iptables-nft-save"],
            ["iptables-legacy-save"],
            ["ss", "-ltnp"],
            ["conntrack", "-L"],
        ):
            code, out, err = await self.net.run(self.net.node, argv)
            parts.append(f"$ {' '.join(argv)} -> {code}\n{out}{err}")
        return "\n".join(parts)

    # -- pods ---------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        selector: str | None = None,
        labels: dict[str, str] | None = None,
        service_account: str = "",
    ) -> PodHandle:
        net_pod = self.net.add_pod(name)
        manifest = self.w.add_pod(
            name,
            namespace=namespace,
            selector=selector,
            labels=labels,
            ip=net_pod.ip,
            service_account=service_account,
        )
        handle = PodHandle(net=net_pod, manifest=manifest)
        self.pods[name] = handle
        return handle

    async def curl(
        self,
        pod: PodHandle,
        target: str,
        *,
        metadata: bool = True,
        timeout: float = 5.0,
        url: str = "",
    ) -> CurlResult:
        """curl http://169.254.169.254<target> (or ``url``) from inside the pod."""
        argv = [
            "curl",
            "-sS",
            "-m",
            str(timeout),
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            url or f"http://{METADATA_IP}{target}",
        ]
        if metadata:
            argv[1:1] = ["-H", "Metadata: true"]
        code, out, err = await self.net.run(pod.ns, argv, timeout=timeout + 10)
        text, _, status = out.rpartition("\n")
        body: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                body = parsed
        try:
            http_status = int(status.strip() or 0)
        except ValueError:
            http_status = 0
        return CurlResult(exit_code=code, status=http_status, body=body, raw=text or err)

    async def token(
        self,
        pod: PodHandle,
        resource: str = "https://management.azure.com",
        *,
        timeout: float = 5.0,
        **params: str,
    ) -> CurlResult:
        from urllib.parse import urlencode

        query = urlencode({"api-version": "2018-02-01", "resource": resource, **params})
        return await self.curl(pod, f"/metadata/identity/oauth2/token?{query}", timeout=timeout)


__all__ = ["METADATA_IP", "NODE_IP", "CurlResult", "NodeWorld", "PodHandle"]
