"""The controller's composition root: watches, the lease, and acting while leader.

Start: probes and metrics (``/healthz`` answers ``Active`` on the leader and
``Not Active`` elsewhere, as aad-pod-identity's did; ``/readyz`` is 200 once
this replica's watches have synced, leader or not) → the cloud configuration
and the ARM client → the five watches, first sync → the campaign for the
Lease.  Every replica keeps its view synced; only the lease holder acts:
when elected it reads the ledger and reconciles every pod (an adopted state
costs no write), runs the machine workers, the drift check every
``--identity-assignment-reconcile-interval`` and a full resync every
``--syncRetryDuration``; when it loses the lease it stops at once — every
write is fenced by the lease (``writes.py``) — and campaigns again.  On
SIGTERM it releases the lease so that another replica takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

from ..azure.cloud import CloudConfigSource
from ..azure.credentials import CredentialSource
from ..azure.identities import IdentityClient
from ..azure.provider_id import normalise_id
from ..kube.client import KubeApi
from ..kube.informer import Informer
from ..ops.events import EventRecorder
from ..ops.metrics import MetricsServer
from ..ops.probes import Probes
from .controller import Controller
from .flags import LEDGER_CONFIGMAP, MicSettings
from .leader import LeaderElector
from .ledger import Ledger
from .machines import Machines
from .metrics import MicMetrics
from .view import (
    ControllerView,
    parse_assignment,
    parse_binding,
    parse_identity,
    parse_node,
    parse_pod,
)
from .writes import Writes

log = logging.getLogger(__name__)

CRD = "/apis/aadpodidentity.k8s.io/v1"


class Mic:
    """One controller replica: ``await start()``, act while leader, ``await stop()``."""

    def __init__(
        self,
        settings: MicSettings,
        *,
        api: Any = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self._api = api
        self._own_api: KubeApi | None = None
        self._environ = dict(os.environ if environ is None else environ)
        self.view = ControllerView()
        self.metrics = MicMetrics()
        self.metrics_server = MetricsServer(self.metrics)
        self.elector: LeaderElector | None = None
        self.probes = Probes(health_text=self._health)
        self.controller: Controller | None = None
        self.machines: Machines | None = None
        self.ledger: Ledger | None = None
        self.events: EventRecorder | None = None
        self.informers: list[Informer[Any]] = []
        self.cloud: CloudConfigSource | None = None
        self.credentials: CredentialSource | None = None
        self.client: IdentityClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.acting = asyncio.Event()

    def _health(self) -> str:
        return "Active" if self.elector is not None and self.elector.is_leader() else "Not Active"

    def is_acting(self) -> bool:
        return self.acting.is_set() and self.elector is not None and self.elector.is_leader()

    # -- start --------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.probes.add_check("watches", self._watches_check)
        await self.probes.start(s.probe_address, s.http_probe_port)
        await self.metrics_server.start(s.prometheus_address, s.prometheus_port)
        self.cloud = CloudConfigSource(s.cloudconfig or None, self._environ)
        self.credentials = CredentialSource(self.cloud, environ=self._environ)
        self.client = IdentityClient(
            self.credentials,
            max_retry=s.update_user_msi_max_retry,
            retry_interval=s.update_user_msi_retry_interval,
            polling_interval=s.arm_polling_interval,
            observe=self.metrics.observe_cloud,
        )
        api = self._api
        if api is None:
            self._own_api = await KubeApi.connect(s.kubeconfig)
            api = self._own_api
        self.elector = LeaderElector(
            api=api,
            namespace=s.leader_namespace,
            name=s.leader_name,
            identity=s.leader_instance,
            lease_duration=s.leader_duration,
            renew_deadline=s.renew_deadline,
            retry_period=s.retry_period,
        )
        writes = Writes(
            api=api,
            qps=s.client_qps,
            in_flight=s.create_delete_batch,
            is_leader=self.elector.is_leader,
            observe=self.metrics.observe_write,
        )
        self.ledger = Ledger(
            api=api, writes=writes, namespace=s.ledger_namespace, name=LEDGER_CONFIGMAP
        )
        if hasattr(api, "post"):
            self.events = EventRecorder(api=api, node_name=s.leader_instance, component="nmi-mic")
        self.machines = Machines(
            client=self.client,
            ledger=self.ledger,
            immutable=self._immutable,
            on_done=self._machine_done,
            on_failed=self._machine_failed,
            on_error=self._machine_error,
            coalesce=s.arm_coalesce,
            reconcile_interval=s.reconcile_interval,
            is_acting=self.is_acting,
        )
        self.controller = Controller(
            view=self.view,
            writes=writes,
            machines=self.machines,
            events=self.events,
            metrics=self.metrics,
            force_namespaced=s.force_namespaced,
            workers=max(1, min(s.create_delete_batch, 32)),
        )
        self._watch(api)
        for informer in self.informers:
            self._tasks.append(asyncio.create_task(informer.run(), name=f"watch-{informer.name}"))
        if self.events is not None:
            self._tasks.append(asyncio.create_task(self.events.run(), name="events"))
        self._tasks.append(asyncio.create_task(self.cloud.run(), name="cloudconfig"))
        await asyncio.gather(*(i.synced.wait() for i in self.informers))
        self.controller.nodes_synced = True
        log.info(
            "cluster view synced",
            extra={
                "fields": {
                    "pods": len(self.view.pods),
                    "bindings": len(self.view.bindings),
                    "identities": len(self.view.identities),
                    "assignments": len(self.view.assignments),
                    "nodes": len(self.view.nodes),
                }
            },
        )
        self._tasks.append(asyncio.create_task(self.elector.run(), name="leader-election"))
        self._tasks.append(asyncio.create_task(self._act(), name="act"))

    def _watch(self, api: Any) -> None:
        view = self.view

        def feeding(on: Any) -> Any:
            def handler(kind: str, old: Any, new: Any) -> None:
                touched = on(kind, old, new)
                if self.controller is not None and self.is_acting():
                    self.controller.enqueue(touched)

            return handler

        common: dict[str, Any] = {"api": api}
        self.informers = [
            Informer(
                path="/api/v1/pods",
                parse=parse_pod,
                name="pods",
                label_selector="aadpodidbinding",
                handler=feeding(view.on_pod),
                **common,
            ),
            Informer(
                path=f"{CRD}/azureidentitybindings",
                parse=parse_binding,
                name="azureidentitybindings",
                handler=feeding(view.on_binding),
                **common,
            ),
            Informer(
                path=f"{CRD}/azureidentities",
                parse=parse_identity,
                name="azureidentities",
                handler=feeding(view.on_identity),
                **common,
            ),
            Informer(
                path="/api/v1/nodes",
                parse=parse_node,
                name="nodes",
                handler=feeding(view.on_node),
                **common,
            ),
            Informer(
                path=f"{CRD}/azureassignedidentities",
                parse=parse_assignment,
                name="azureassignedidentities",
                handler=feeding(view.on_assignment),
                **common,
            ),
        ]

    def _watches_check(self) -> str | None:
        pending = [i.name for i in self.informers if not i.synced.is_set()]
        if not self.informers:
            return "not started"
        return f"waiting for first sync of {', '.join(pending)}" if pending else None

    def _immutable(self) -> frozenset[str]:
        """Identity ids never removed: --immutable-user-msis and the cluster's own identity
        (client ids, mapped to the ids of the AzureIdentities that name them)."""
        client_ids = set(self.settings.immutable_user_msis)
        if self.cloud is not None and self.cloud.config.user_assigned_identity_id:
            client_ids.add(self.cloud.config.user_assigned_identity_id.lower())
        return frozenset(
            normalise_id(r.view.resource_id)
            for r in self.view.identities.values()
            if r.view.resource_id and r.view.client_id.lower() in client_ids
        )

    async def _machine_done(self, key: str, state: Any) -> None:
        if self.controller is not None:
            await self.controller.machine_done(key, state)

    async def _machine_error(self, key: str, message: str) -> None:
        if self.controller is not None:
            await self.controller.machine_error(key, message)

    async def _machine_failed(self, key: str, failures: Any) -> None:
        if self.controller is not None:
            await self.controller.machine_failed(key, failures)

    # -- acting while leader ---------------------------------------------------------------

    async def _act(self) -> None:
        assert self.elector is not None and self.controller is not None
        assert self.machines is not None and self.ledger is not None
        while True:
            await self.elector.elected.wait()
            started = time.monotonic()
            try:
                await self.ledger.load()
            except Exception as exc:
                log.error("ledger not readable (%s); retrying", exc)
                await asyncio.sleep(self.settings.retry_period)
                continue
            self.metrics.leader_elections.inc()
            self.acting.set()
            self.controller.start()
            self.controller.enqueue_all()
            log.info("acting as the leader", extra={"fields": {"pods": len(self.view.pods)}})
            settling = asyncio.create_task(self._settle(), name="settle")
            periodic = [
                settling,
                asyncio.create_task(self._every(self.settings.reconcile_interval, self._drift)),
                asyncio.create_task(
                    self._every(self.settings.sync_retry_duration, self.controller.enqueue_all)
                ),
            ]
            await self.elector.lost.wait()
            self.acting.clear()
            for task in periodic:
                task.cancel()
            await self.controller.stop()
            await self.machines.stop()
            log.warning("stopped acting after %.1fs as the leader", time.monotonic() - started)

    async def _settle(self) -> None:
        """Once every pod has been reconciled, the needs are complete: removals may start."""
        assert self.controller is not None and self.machines is not None
        await self.controller.idle.wait()
        machines = [n.machine for n in self.view.nodes.values() if n.machine is not None]
        self.machines.settle(machines)
        log.info("first pass done: identities no pod needs may now be removed")

    async def _drift(self) -> None:
        if self.machines is not None:
            await self.machines.reconcile_all()

    async def _every(self, interval: float, call: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            result = call()
            if asyncio.iscoroutine(result):
                await result

    # -- stop -------------------------------------------------------------------------------

    async def stop(self) -> None:
        self.acting.clear()
        if self.controller is not None:
            await self.controller.stop()
        if self.machines is not None:
            await self.machines.stop()
        if self.elector is not None:
            await self.elector.release()
        if self.events is not None:
            await self.events.flush(timeout=1.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.client is not None:
            await self.client.close()
        if self.credentials is not None:
            await self.credentials.close()
        await self.probes.stop()
        await self.metrics_server.stop()
        if self._own_api is not None:
            await self._own_api.close()

    async def run_until_signalled(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("stopping: releasing the lease")
        await self.stop()
        return 0
