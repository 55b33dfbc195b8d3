"""Puts the node's interception in place, proves it works, and keeps it there.

Order on start (after the cluster view synced and the listener is up):

1. find the network plugin (``netfacts.network_plugin``) and say in one line
   what was found and why nmi runs or refuses: on a node whose pods share a
   bridge (spoofable) it refuses unless ``--allow-network-plugin-kubenet``;
2. install the rules — or adopt, unchanged, the ones a previous nmi left, so
   that a restart or an upgrade never opens a window;
3. delete the conntrack flows to the metadata address that were never
   DNATed (with ``--enable-conntrack-deletion``: every flow to it);
4. verify the path: the rules read back as rendered, the DNAT target answers
   as nmi, and no other rule takes pods' metadata traffic around the DNAT —
   only then is the node reported ready.

Afterwards changes are noticed as they happen — the kernel announces every
nftables commit (``iptables.NftChanges``); with the legacy backend the rules
are read every second — and drift is restored at once, followed again by the
conntrack deletion; ``--ipt-update-interval-sec`` remains the backstop.  Rules
of other tools that bypass the interception (NOTRACK for the pod range, an
``ACCEPT`` ahead of the jump) make the node not ready, raise a Warning Event
on the node and a metric: the filter guard already drops what they let
through, so pods are refused, never served the node's identity.

Nothing here ever removes the rules: when nmi stops or dies, pods' metadata
traffic is refused (DNAT to a closed port, and the guard), never passed to
the node's own identity.  Only ``nmi uninstall`` removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from iptables import (
    IptablesError,
    NftChanges,
    ReconcileResult,
    RuleManager,
    RuleSpec,
    backend_named,
)

from ..config import Settings
from . import netfacts

log = logging.getLogger(__name__)

LEGACY_POLL = 1.0  # seconds between reads of the rules when no change is announced


class StartupRefused(Exception):
    """nmi must not serve on this node as configured."""


def rule_spec(
    settings: Settings, target_ip: str, target_port: int, *, anti_spoofing: bool = True
) -> RuleSpec:
    return RuleSpec(
        metadata_ip=settings.metadata_ip,
        metadata_port=settings.metadata_port,
        target_ip=target_ip,
        target_port=target_port,
        anti_spoofing=anti_spoofing,
        metrics_port=settings.prometheus_port if settings.metrics_allowed_sources else 0,
        metrics_sources=settings.metrics_allowed_sources,
    )


async def make_manager(settings: Settings, spec: RuleSpec) -> RuleManager:
    backend = (
        None if settings.iptables_backend == "auto" else backend_named(settings.iptables_backend)
    )
    return RuleManager(spec, backend=backend)


async def detect_plugin(settings: Settings, pod_ips: list[str]) -> netfacts.NetworkPlugin:
    """The node's network plugin, and the decision about it, said in one line."""
    plugin = await asyncio.to_thread(netfacts.network_plugin, pod_ips)
    if plugin.spoofable and not settings.allow_network_plugin_kubenet:
        raise StartupRefused(
            f"network plugin {plugin.name} ({plugin.detail}): pods share a bridge, so any pod "
            "could claim another pod's IP by ARP spoofing; run with "
            "--allow-network-plugin-kubenet to accept that risk (mitigate it by dropping "
            "NET_RAW from all pods)"
        )
    if plugin.spoofable:
        why = (
            "runs (--allow-network-plugin-kubenet): source IPs can be spoofed by pods with NET_RAW"
        )
    elif plugin.style == "cilium":
        why = (
            "runs without the rpfilter rule (Cilium verifies endpoint sources) and needs "
            "Cilium's legacy host routing (bpf.hostLegacyRouting=true) for iptables interception"
        )
    elif plugin.style == "per-pod":
        why = "runs: a veth and a host route per pod; sources checked by rpfilter, pods pinned"
    else:
        why = "runs: no pod attached yet; checked again at every reconcile"
    log.info("network plugin: %s (%s): nmi %s", plugin.name, plugin.detail, why)
    return plugin


@dataclass
class InterceptionState:
    installed_at: float = 0.0
    verified_at: float = 0.0
    adopted: bool = False
    last_result: ReconcileResult | None = None
    rules_problem: str | None = "not installed yet"
    plugin_problem: str | None = None
    bypasses: tuple[str, ...] = ()
    plugin: netfacts.NetworkPlugin | None = None
    repairs: int = 0
    conntrack_deleted: int = 0


class Interception:
    def __init__(
        self,
        *,
        settings: Settings,
        manager: RuleManager,
        target_ip: str,
        target_port: int,
        pod_ips: Callable[[], list[str]],
        plugin: netfacts.NetworkPlugin | None = None,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.target_ip = target_ip
        self.target_port = target_port
        self.pod_ips = pod_ips
        self.state = InterceptionState(plugin=plugin)
        self.on_result: Callable[[ReconcileResult], None] | None = None
        self.on_bypass: Callable[[tuple[str, ...]], None] | None = None
        self._changes: NftChanges | None = None

    def readiness(self) -> str | None:
        s = self.state
        if s.rules_problem or s.plugin_problem:
            return s.rules_problem or s.plugin_problem
        if s.bypasses:
            return "interception bypassed by: " + "; ".join(s.bypasses)
        return None

    async def establish(self) -> None:
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
        else:
            await self._forget_escaped_flows()
        await self.verify()

    async def verify(self) -> None:
        problems = await self.manager.check()
        if problems:
            self.state.rules_problem = "rules not in place: " + "; ".join(problems)
            raise StartupRefused(self.state.rules_problem)
        await self._probe_target()
        await self._check_bypasses()
        self.state.rules_problem = None
        self.state.verified_at = time.monotonic()

    async def _forget_escaped_flows(self) -> None:
        """Delete flows to the metadata address that the DNAT never saw: the guard drops
        their packets anyway, and without their conntrack entry the client reconnects
        through the interception at once."""
        try:
            deleted = await self.manager.delete_conntrack(
                ip=self.settings.metadata_ip, port=self.settings.metadata_port, unnatted=True
            )
        except (IptablesError, OSError) as exc:
            log.warning("conntrack entries not deleted: %s", exc)
            return
        self.state.conntrack_deleted += deleted
        if deleted:
            log.warning("deleted %d flows to the metadata address that escaped nmi", deleted)

    async def _probe_target(self) -> None:
        """The DNAT target must be nmi itself: a POST to the token path is answered 405
        by nmi whatever its flags (the method is checked before anything else)."""
        url = f"http://{self.target_ip}:{self.target_port}/metadata/identity/oauth2/token"
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url) as resp,
            ):
                body = await resp.json(content_type=None)
                server = resp.headers.get("Server", "")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StartupRefused(
                f"the DNAT target {self.target_ip}:{self.target_port} "
                f"does not answer as nmi: {type(exc).__name__}"
            ) from None
        if (
            resp.status != 405
            or server != "nmi"
            or not isinstance(body, dict)
            or body.get("error") != "method_not_allowed"
        ):
            raise StartupRefused(
                f"the DNAT target {self.target_ip}:{self.target_port} is not nmi "
                f"(HTTP {resp.status}, Server {server!r})"
            )

    async def _check_bypasses(self) -> None:
        bypasses = tuple(await self.manager.bypasses())
        if bypasses != self.state.bypasses:
            self.state.bypasses = bypasses
            if bypasses:
                log.error(
                    "rules of another tool take pods' metadata traffic around nmi (pods are "
                    "refused, not served, until they are removed): %s",
                    "; ".join(bypasses),
                )
            else:
                log.info("no rule bypasses the interception any more")
            if self.on_bypass is not None:
                self.on_bypass(bypasses)

    async def run(self) -> None:
        """Repair drift as soon as it is announced (or read), forever."""
        backstop = float(self.settings.ipt_update_interval_sec)
        backend = await self.manager.backend()
        if backend.name == "nft":
            changes = NftChanges()
            try:
                changes.start()
                self._changes = changes
            except OSError as exc:
                log.warning(
                    "no nftables change notifications (%s): reading every %gs", exc, LEGACY_POLL
                )
        last_full = time.monotonic()
        try:
            while True:
                if self._changes is not None:
                    announced = await self._changes.changed(backstop)
                    if announced:
                        await asyncio.sleep(0.05)  # let a burst of commits settle
                else:
                    await asyncio.sleep(min(LEGACY_POLL, backstop))
                full = time.monotonic() - last_full >= backstop
                if full:
                    last_full = time.monotonic()
                await self.reconcile(check_plugin=full)
        finally:
            if self._changes is not None:
                self._changes.close()
                self._changes = None

    async def reconcile(self, *, check_plugin: bool = False) -> ReconcileResult:
        result = await self.manager.reconcile()  # reports failures, never raises
        self.state.last_result = result
        if self.on_result is not None:
            self.on_result(result)
        if result.failed:
            self.state.rules_problem = f"reconcile failed: {result.error}"
            log.error("iptables reconcile failed: %s", result.error)
            return result
        self.state.rules_problem = None
        if result.restored:
            self.state.repairs += 1
            log.warning(
                "interception rules drifted and were restored",
                extra={"fields": {"detail": "; ".join(result.problems)}},
            )
            await self._forget_escaped_flows()
        with contextlib.suppress(IptablesError):
            await self._check_bypasses()
        if check_plugin:
            try:
                self.state.plugin = await detect_plugin(self.settings, self.pod_ips())
                self.state.plugin_problem = None
            except StartupRefused as exc:
                self.state.plugin_problem = str(exc)
                log.error("%s", exc)
        return result
