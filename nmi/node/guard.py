"""Puts the node's interception in place, proves it works, and keeps it there.

Order on start (after the cluster view synced and the listener is up):

1. refuse to run on a node whose pods share a bridge (spoofable) unless
   ``--allow-network-plugin-kubenet``;
2. install the rules — or adopt, unchanged, the ones a previous nmi left, so
   that a restart or an upgrade never opens a window;
3. with ``--enable-conntrack-deletion``, drop flows to the metadata address
   that were set up before the rules;
4. verify the path: the rules read back as rendered, and the DNAT target
   answers as nmi (a probe without the Metadata header must get nmi's JSON
   400) — only then is the node reported ready.

Afterwards a reconcile loop restores drift within ``--ipt-update-interval-sec``
and re-checks how pods are attached.  Nothing here ever removes the rules:
when nmi stops or dies, pods' metadata traffic is refused (DNAT to a closed
port), never passed to the node's own identity.  Only ``nmi uninstall``
removes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from iptables import ReconcileResult, RuleManager, RuleSpec, backend_named

from ..config import Settings
from . import netfacts

log = logging.getLogger(__name__)


class StartupRefused(Exception):
    """nmi must not serve on this node as configured."""


def rule_spec(settings: Settings, target_ip: str, target_port: int) -> RuleSpec:
    return RuleSpec(
        metadata_ip=settings.metadata_ip,
        metadata_port=settings.metadata_port,
        target_ip=target_ip,
        target_port=target_port,
    )


async def make_manager(settings: Settings, spec: RuleSpec) -> RuleManager:
    backend = (
        None if settings.iptables_backend == "auto" else backend_named(settings.iptables_backend)
    )
    return RuleManager(spec, backend=backend)


@dataclass
class InterceptionState:
    installed_at: float = 0.0
    verified_at: float = 0.0
    adopted: bool = False
    last_result: ReconcileResult | None = None
    problem: str | None = "not installed yet"
    attachment: netfacts.Attachment | None = None


class Interception:
    def __init__(
        self,
        *,
        settings: Settings,
        manager: RuleManager,
        target_ip: str,
        target_port: int,
        pod_ips: Callable[[], list[str]],
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.target_ip = target_ip
        self.target_port = target_port
        self.pod_ips = pod_ips
        self.state = InterceptionState()
        self.on_result: Callable[[ReconcileResult], None] | None = None

    def readiness(self) -> str | None:
        return self.state.problem

    async def check_attachment(self) -> netfacts.Attachment:
        attachment = await asyncio.to_thread(netfacts.pod_attachment, self.pod_ips())
        self.state.attachment = attachment
        if attachment.spoofable and not self.settings.allow_network_plugin_kubenet:
            raise StartupRefused(
                "pods on this node share a bridge (kubenet style: "
                f"{attachment.detail}); any pod could claim another pod's IP by ARP spoofing. "
                "Run with --allow-network-plugin-kubenet to accept that risk "
                "(mitigate it by dropping NET_RAW from all pods)."
            )
        if attachment.spoofable:
            log.warning(
                "serving on a bridge-style node: source IPs can be spoofed by pods with NET_RAW",
                extra={"fields": {"detail": attachment.detail}},
            )
        return attachment

    async def establish(self) -> None:
        await self.check_attachment()
        started = time.monotonic()
        changed = await self.manager.install()
        self.state.adopted = not changed
        self.state.installed_at = time.monotonic()
        log.info(
            "interception rules %s",
            "installed" if changed else "already in place (adopted)",
            extra={"fields": {"seconds": round(self.state.installed_at - started, 3)}},
        )
        if self.settings.enable_conntrack_deletion:
            deleted = await self.manager.delete_conntrack(
                ip=self.settings.metadata_ip, port=self.settings.metadata_port
            )
            log.info("deleted %d conntrack entries to the metadata address", deleted)
        await self.verify()

    async def verify(self) -> None:
        problems = await self.manager.check()
        if problems:
            self.state.problem = "rules not in place: " + "; ".join(problems)
            raise StartupRefused(self.state.problem)
        await self._probe_target()
        self.state.verified_at = time.monotonic()
        self.state.problem = None

    async def _probe_target(self) -> None:
        """The DNAT target must be nmi itself: ask it the SDK probe question."""
        url = f"http://{self.target_ip}:{self.target_port}/metadata/identity/oauth2/token"
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url) as resp,
            ):
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StartupRefused(
                f"the DNAT target {self.target_ip}:{self.target_port} "
                f"does not answer as nmi: {type(exc).__name__}"
            ) from None
        if resp.status != 400 or body.get("error_description") != (
            "Required metadata header not specified"
        ):
            raise StartupRefused(
                f"the DNAT target {self.target_ip}:{self.target_port} is not nmi "
                f"(HTTP {resp.status})"
            )

    async def run(self) -> None:
        """Reconcile every --ipt-update-interval-sec, forever."""
        interval = float(self.settings.ipt_update_interval_sec)
        while True:
            await asyncio.sleep(interval)
            result = await self.manager.reconcile()  # reports failures, never raises
            self.state.last_result = result
            if self.on_result is not None:
                self.on_result(result)
            if result.failed:
                self.state.problem = f"reconcile failed: {result.error}"
                log.error("iptables reconcile failed: %s", result.error)
                continue
            if result.restored:
                log.warning(
                    "interception rules drifted and were restored",
                    extra={"fields": {"detail": "; ".join(result.problems)}},
                )
            try:
                await self.check_attachment()
            except StartupRefused as exc:
                self.state.problem = str(exc)
                log.error("%s", exc)
                continue
            self.state.problem = None if result.ok else f"rules not in place: {result.problems}"
