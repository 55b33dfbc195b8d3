"""The composition root: builds the parts and orders start-up and shutdown.

Start: probes (alive, not ready) -> watches, wait for the first sync -> token
listener -> ready.  Stop: the listener stops accepting, in-flight requests get
``shutdown_grace`` seconds to finish, then everything closes.  nmi never
removes the node's interception rules on the way down: while it is not
listening, pods' metadata traffic is refused, never sent to the node's IMDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Iterable

import aiohttp
from prometheus_client.core import Metric

from .config import OperationMode, Settings
from .explain.admin import AdminServer
from .identity.caller import Callers
from .identity.decide import NODE_IDENTITY
from .identity.wait import Resolver
from .imds.bookkeeping import Bookkeeping
from .imds.host_token import HostTokenRoute
from .imds.listener import (
    Listener,
    connection_limit,
    per_address_limit,
    raise_open_file_limit,
)
from .imds.proxy import MetadataProxy
from .imds.routes import ImdsHandler
from .imds.token_route import TokenRoute
from .kube.client import KubeApi
from .kube.cluster import ClusterWatch
from .kube.index import ClusterIndex
from .kube.informer import RawApi
from .kube.secrets import SecretStore
from .node import netfacts
from .node.guard import Interception, StartupRefused, detect_plugin, make_manager, rule_spec
from .node.taint import TaintError, remove_startup_taint
from .ops import events
from .ops.events import EventRecorder
from .ops.last_errors import LastErrors
from .ops.looplag import LoopLag
from .ops.metrics import Metrics, MetricsServer, counter, exact_counter, gauge
from .ops.probes import Probes
from .tokens.cache import CacheKey, TokenCache
from .tokens.federation import Federation
from .tokens.service import TokenService
from .tokens.shadow import ShadowTrials
from .tokens.upstream import Upstream

log = logging.getLogger(__name__)


class Daemon:
    """One nmi process: ``await start()``, serve, ``await stop()``."""

    def __init__(self, settings: Settings, *, api: RawApi | None = None) -> None:
        self.settings = settings
        self._api = api
        self._own_api: KubeApi | None = None
        self.index = ClusterIndex(node_name=settings.node_name)
        self.probes = Probes()
        self.metrics = Metrics()
        self.metrics_server = MetricsServer(self.metrics)
        self.loop_lag = LoopLag(observe=self.metrics.loop_lag.observe)
        self.metrics.add_collector(self._collect)
        self.watch: ClusterWatch | None = None
        self.secrets: SecretStore | None = None
        self.cache = TokenCache()
        self.upstream = Upstream(settings=settings)
        self.tokens: TokenService | None = None
        self.federation: Federation | None = None
        self.proxy = MetadataProxy(
            endpoint=settings.metadata_endpoint, timeout=settings.upstream_timeout
        )
        self.handler: ImdsHandler | None = None
        self.books: Bookkeeping | None = None
        self.callers: Callers | None = None
        self.resolver: Resolver | None = None
        self.events: EventRecorder | None = None
        self.last_errors = LastErrors()
        self.admin: AdminServer | None = None
        self.listener: Listener | None = None
        self.interception: Interception | None = None
        self._background: list[asyncio.Task[None]] = []
        self.port = 0
        self.listening = False
        self.started_at = 0.0
        self.ready_at = 0.0
        self.intercepting_at = 0.0

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.started_at = time.monotonic()
        self.probes.add_check("watches", self._watches_check)
        self.probes.add_check("listener", lambda: None if self.listening else "not listening")
        if s.manage_iptables:
            # Registered before anything listens: never ready before the path is verified.
            self.probes.add_check("interception", self._interception_check)
        await self.probes.start(s.probe_address, s.http_probe_port)
        await self.metrics_server.start(s.metrics_address, s.prometheus_port)

        api = self._api
        if api is None:
            self._own_api = await KubeApi.connect(s.kubeconfig)
            api = self._own_api
        self.watch = ClusterWatch(api=api, index=self.index, mode=s.operation_mode)
        self.watch.start()
        self.secrets = SecretStore(api=api)
        if isinstance(api, KubeApi):  # federated identities need the TokenRequest API
            self.federation = Federation(
                index=self.index,
                cache=self.cache,
                api=api,
                default_audience=s.federated_token_audience,
            )
            self.index.pod_gone.append(self.federation.pod_gone)
            self.metrics.add_collector(self.federation.collect)
        federation = self.federation
        self.tokens = TokenService(
            settings=s,
            secrets=self.secrets,
            upstream=self.upstream,
            cache=self.cache,
            metrics=self.metrics,
            assertions=federation.assertions if federation is not None else None,
            pod_of_service_account=federation.presenter if federation is not None else None,
        )
        if s.kube_events and isinstance(api, KubeApi):
            self.events = EventRecorder(api=api, node_name=s.node_name)
            self._background.append(asyncio.create_task(self.events.run(), name="events"))
        if federation is not None:
            federation.shadow = ShadowTrials(settings=s, tokens=self.tokens, events=self.events)
            self._background.append(
                asyncio.create_task(federation.shadow.run(), name="federation-shadow")
            )
        self.books = Bookkeeping(
            settings=s, metrics=self.metrics, events=self.events, last_errors=self.last_errors
        )
        self.callers = Callers(index=self.index, settings=s)
        self.resolver = Resolver(
            index=self.index, settings=s, object_id_of=self.tokens.object_id_of
        )
        token_route = TokenRoute(
            settings=s,
            callers=self.callers,
            resolver=self.resolver,
            tokens=self.tokens,
            books=self.books,
            shadow=federation.shadow if federation is not None else None,
        )
        self.handler = ImdsHandler(
            settings=s,
            token=token_route,
            host_token=HostTokenRoute(index=self.index, tokens=token_route),
            proxy=self.proxy,
            books=self.books,
        )
        await self.proxy.start()
        log.info("waiting for the first sync of the cluster view")
        await self.watch.wait_synced()
        log.info(
            "cluster view synced",
            extra={
                "fields": {
                    "pods": len(list(self.index.pods())),
                    "seconds": round(time.monotonic() - self.started_at, 3),
                }
            },
        )
        open_files = raise_open_file_limit()
        self.listener = Listener(
            self.handler,
            max_connections_per_ip=per_address_limit(open_files),
            max_connections=connection_limit(open_files),
        )
        self.port = await self.listener.listen(s.listen_address, s.port)
        self.listening = True
        if s.manage_iptables:
            await self._intercept()
        self._background.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self._background.append(asyncio.create_task(self._pin_new_pods(), name="pins"))
        self._background.append(asyncio.create_task(self.loop_lag.run(), name="loop-lag"))
        self._background.append(
            asyncio.create_task(self.cache.run_refresher(in_use=self._token_in_use), name="refresh")
        )
        self._background.append(
            asyncio.create_task(self.secrets.run_janitor(), name="secret-janitor")
        )
        if s.admin_socket:
            admin = AdminServer(daemon=self, path=s.admin_socket)
            try:
                await admin.start()
                self.admin = admin
            except (OSError, RuntimeError) as exc:
                log.warning("no admin socket for 'nmi explain': %s", exc)
        self.ready_at = time.monotonic()
        log.info(
            "serving",
            extra={
                "fields": {
                    "address": f"{s.listen_address}:{self.port}",
                    "mode": s.operation_mode.value,
                }
            },
        )

    async def _intercept(self) -> None:
        """Install (or adopt) the node's rules and prove the path; see nmi.node."""
        s = self.settings
        assert self.listener is not None
        listen = ipaddress.ip_address(s.listen_address)
        if listen.is_unspecified or listen.is_loopback:
            target = await asyncio.to_thread(
                netfacts.node_address, configured=s.node_ip, metadata_ip=s.metadata_ip
            )
        else:
            target = s.listen_address
        if listen.is_loopback:
            # Pods reach nmi through a DNAT to the node address (no route_localnet needed):
            # listen there too; the loopback listener keeps serving /host/token.
            await self.listener.listen(target, self.port)

        def pod_ips() -> list[str]:
            return [ip for p in self.index.pods() if p.can_call for ip in p.ips]

        plugin = await detect_plugin(s, pod_ips())
        spec = rule_spec(s, target, self.port, anti_spoofing=plugin.anti_spoofing)
        manager = await make_manager(s, spec)
        self.interception = Interception(
            settings=s,
            manager=manager,
            target_ip=target,
            target_port=self.port,
            pod_ips=pod_ips,
            plugin=plugin,
        )
        self.interception.on_result = lambda result: self.metrics.reconciles.labels(
            result.status.value
        ).inc()
        self.interception.on_bypass = self._bypass_changed
        await self.interception.establish()
        if s.startup_taint and self._own_api is not None:
            try:
                await remove_startup_taint(self._own_api, s.node_name, s.startup_taint)
            except (TaintError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # Not fatal: the node stays tainted (no new pods) until the next attempt.
                log.error("start-up taint %s not removed: %s", s.startup_taint, exc)
                self._background.append(
                    asyncio.create_task(self._retry_taint(), name="startup-taint")
                )
        self.intercepting_at = time.monotonic()
        log.info(
            "interception verified",
            extra={
                "fields": {
                    "target": f"{target}:{self.port}",
                    "seconds_since_start": round(self.intercepting_at - self.started_at, 3),
                }
            },
        )
        self._background.append(asyncio.create_task(self.interception.run(), name="iptables"))

    async def _retry_taint(self) -> None:
        assert self._own_api is not None
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await remove_startup_taint(
                    self._own_api, self.settings.node_name, self.settings.startup_taint
                )
                return
            except (TaintError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("start-up taint still not removed: %s", exc)
                delay = min(delay * 2, 60.0)

    def _bypass_changed(self, bypasses: tuple[str, ...]) -> None:
        """Another tool's rules bypass the interception (or no longer do): tell the node."""
        if not bypasses or self.events is None:
            return
        self.events.record(
            events.node(self.settings.node_name),
            reason=events.INTERCEPTION_BYPASSED,
            message="Rules of another tool take pods' metadata traffic around nmi; those "
            "pods are refused until they are removed: " + "; ".join(bypasses),
            action="Intercept",
        )

    def _collect(self) -> Iterable[Metric]:
        """Scrape-time values: nothing on the request path maintains these."""
        c = self.cache
        yield counter(
            "nmi_token_cache_requests",
            "Token lookups by result (hit, miss) and background refreshes.",
            ["result"],
            [
                (["hit"], c.hits),
                (["miss"], c.misses),
                (["refresh"], c.refreshes),
                (["refresh_failure"], c.refresh_failures),
            ],
        )
        yield gauge("nmi_token_cache_entries", "Tokens held.", [], [([], len(c))])
        informers = self.watch.informers if self.watch is not None else []
        yield counter(
            "nmi_kube_watch_restarts",
            "Watch streams re-established, by resource.",
            ["resource"],
            [([i.name], i.watch_restarts) for i in informers],
        )
        yield counter(
            "nmi_kube_lists",
            "Full LISTs (first sync and re-lists after 410), by resource.",
            ["resource"],
            [([i.name], i.lists) for i in informers],
        )
        yield gauge(
            "nmi_kube_watch_staleness_seconds",
            "Seconds since the API server was last heard from.",
            ["resource"],
            [([i.name], i.staleness()) for i in informers],
        )
        yield gauge(
            "nmi_kube_synced",
            "1 once the first LIST of the resource completed.",
            ["resource"],
            [([i.name], 1.0 if i.synced.is_set() else 0.0) for i in informers],
        )
        yield exact_counter(
            "aadpodidentity_kubernetes_api_operations_errors_count",
            "aad-pod-identity compatible Kubernetes API errors (list/watch), by resource.",
            ["operation_type"],
            [([f"watch_{i.name}"], i.errors) for i in informers],
        )
        if self.events is not None:
            e = self.events
            yield counter(
                "nmi_kube_events",
                "Kubernetes Events about pods, by outcome.",
                ["result"],
                [
                    (["emitted"], e.emitted),
                    (["suppressed"], e.suppressed),
                    (["dropped"], e.dropped),
                    (["failed"], e.failed),
                ],
            )
        if self.books is not None:
            yield counter(
                "nmi_access_log_suppressed",
                "Access-log lines of repeated refusals left out (counted on the next line).",
                [],
                [([], self.books.denial_lines.suppressed)],
            )
        if self.listener is not None:
            lst = self.listener
            yield gauge(
                "nmi_connections",
                "Open connections to the token listener.",
                [],
                [([], len(lst.connections))],
            )
            yield counter(
                "nmi_connections_refused",
                "Connections refused or closed by the connection limits, by why.",
                ["reason"],
                [(["limit"], lst.refused), (["evicted"], lst.evicted)],
            )
            yield gauge(
                "nmi_request_bytes_held",
                "Bytes of requests being read or queued (bounded per address and in all).",
                [],
                [([], lst.held)],
            )
        if self.interception is not None:
            st = self.interception.state
            yield gauge(
                "nmi_interception_bypasses",
                "Rules of other tools that take pods' metadata traffic around nmi's DNAT.",
                [],
                [([], len(st.bypasses))],
            )
            yield counter(
                "nmi_interception_repairs",
                "Times the interception rules were found changed and restored.",
                [],
                [([], st.repairs)],
            )
            yield counter(
                "nmi_conntrack_escaped_flows_deleted",
                "Flows to the metadata address that bypassed nmi, deleted after a repair.",
                [],
                [([], st.conntrack_deleted)],
            )
        yield gauge(
            "nmi_requests_in_flight",
            "Requests being served.",
            [],
            [([], self.handler.in_flight if self.handler else 0)],
        )

    def _token_in_use(self, key: CacheKey) -> bool:
        """Does a pod of this node still have the identity this cached token belongs to?"""
        if key.subject and (self.federation is None or not self.federation.in_use(key)):
            return False  # a federated token: no pod of its service account is left
        if key.owner == NODE_IDENTITY:
            return any(
                exc.matches(pod)
                for pod in self.index.pods()
                if pod.can_call
                for exc in self.index.exceptions_in(pod.meta.namespace)
            )
        if self.settings.operation_mode is OperationMode.MANAGED:
            return key.owner in self.index.bound_identity_keys()
        return key.owner in self.index.assigned_identity_keys()

    @property
    def synced(self) -> bool:
        """Whether every watch completed its first sync (the admin endpoint reports it)."""
        return self.watch is not None and self.watch.synced

    def _interception_check(self) -> str | None:
        if self.interception is None:
            return "interception rules not installed yet"
        return self.interception.readiness()

    def _watches_check(self) -> str | None:
        if self.watch is None:
            return "not started"
        pending = list(self.watch.unsynced())
        return f"waiting for first sync of {', '.join(pending)}" if pending else None

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(60)
            self.cache.sweep()
            if self.federation is not None:
                self.federation.assertions.sweep()
            if self.callers is not None:
                self.callers.prune()

    async def _pin_new_pods(self) -> None:
        """Pin pods to the interface the node routes their IP to, as they appear (before
        they call): an IP taken over by a new sandbox then arrives through another one."""
        assert self.callers is not None
        callers = self.callers
        while True:
            await self.index.changed.wait(3600)
            await asyncio.sleep(0.2)  # one route dump for a burst of new pods
            unpinned = [
                (pod, ip)
                for pod in self.index.pods()
                if pod.can_call and not pod.meta.deleting
                for ip in pod.ips
                if not callers.pinned(pod, ip)
            ]
            if not unpinned:
                continue
            try:
                routes = await asyncio.to_thread(netfacts.host_route_interfaces)
            except OSError as exc:
                log.debug("no host routes for pinning: %s", exc)
                continue
            for pod, ip in unpinned:
                callers.hint(pod, ip, routes.get(ip, 0))

    # -- stop ----------------------------------------------------------------

    async def stop(self) -> None:
        self.listening = False
        if self.listener is not None:
            # Stop accepting; replies in progress finish (Connection: close), up to the grace.
            await self.listener.stop(self.settings.shutdown_grace)
        if self.books is not None:
            self.books.flush()
        if self.admin is not None:
            await self.admin.stop()
        if self.events is not None:
            await self.events.flush(timeout=1.0)  # best effort: the last refusals' Events
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.watch is not None:
            await self.watch.stop()
        if self.secrets is not None:
            await self.secrets.close()
        await self.cache.close()
        if self.federation is not None:
            await self.federation.assertions.close()
        await self.proxy.close()
        self.upstream.close()
        await self.probes.stop()
        await self.metrics_server.stop()
        if self._own_api is not None:
            await self._own_api.close()

    async def run_until_signalled(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting at once")
                os._exit(1)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await self.start()
        except StartupRefused as exc:
            log.error("refusing to start: %s", exc)
            await self.stop()
            return 1
        await stop.wait()
        log.info("stopping: no new connections, finishing in-flight requests")
        await self.stop()
        return 0
