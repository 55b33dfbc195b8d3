"""The controller's metrics, under aad-pod-identity MIC's names (so dashboards keep working).

aad-pod-identity exported OpenCensus views with the namespace ``aadpodidentity``;
the same names are kept here (``aadpodidentity_mic_cycle_count``,
``..._cloud_provider_operations_duration_seconds`` by ``operation_type``
``vm_get``/``vm_update``/``vmss_get``/``vmss_update``, ``..._assigned_identity_*``,
``..._mic_new_leader_election_count``, ``..._kubernetes_api_operations_errors_count``),
with buckets that start where this controller's operations do, plus what it
lacked: how long a pod waits from being seen to its identity being
``Assigned``.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from ..ops.metrics import CONTENT_TYPE, ExactCounter

FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SLOW = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
P = "aadpodidentity_"


class MicMetrics:
    """The controller's registry and its ``/metrics`` handler."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cycles = ExactCounter(f"{P}mic_cycle_count", "Drains of the work queue.", registry=r)
        self.cycle_seconds = Histogram(
            f"{P}mic_cycle_duration_seconds",
            "Time to drain the work queue.",
            buckets=SLOW,
            registry=r,
        )
        self.cloud_seconds = Histogram(
            f"{P}cloud_provider_operations_duration_seconds",
            "ARM calls on VMs and scale sets.",
            ["operation_type"],
            buckets=SLOW,
            registry=r,
        )
        self.cloud_errors = ExactCounter(
            f"{P}cloud_provider_operations_errors_count",
            "Failed ARM calls on VMs and scale sets.",
            ["operation_type"],
            registry=r,
        )
        self.k8s_errors = ExactCounter(
            f"{P}kubernetes_api_operations_errors_count",
            "Failed Kubernetes API writes.",
            ["operation_type"],
            registry=r,
        )
        self.leader_elections = ExactCounter(
            f"{P}mic_new_leader_election_count", "Times this replica became the leader.", registry=r
        )
        self.assignment_ops: dict[str, tuple[ExactCounter, Histogram]] = {}
        for op in ("addition", "deletion", "update"):
            self.assignment_ops[op] = (
                ExactCounter(
                    f"{P}assigned_identity_{op}_count", f"AzureAssignedIdentity {op}s.", registry=r
                ),
                Histogram(
                    f"{P}assigned_identity_{op}_duration_seconds",
                    f"Time of an AzureAssignedIdentity {op}.",
                    buckets=FAST,
                    registry=r,
                ),
            )
        self.assignment_latency = Histogram(
            "nmi_mic_assignment_latency_seconds",
            "From a pod seen needing an identity to its AzureAssignedIdentity Assigned.",
            buckets=SLOW,
            registry=r,
        )

    def observe_cloud(self, operation: str, seconds: float, error: bool) -> None:
        self.cloud_seconds.labels(operation).observe(seconds)
        if error:
            self.cloud_errors.labels(operation).inc()

    def observe_write(self, what: str, seconds: float, error: bool) -> None:
        op = {"create": "addition", "delete": "deletion", "update": "update"}.get(what)
        if op is not None and not error:
            count, duration = self.assignment_ops[op]
            count.inc()
            duration.observe(seconds)
        if error:
            kind = {
                "create": "assigned_identity_addition",
                "delete": "assigned_identity_deletion",
                "update": "assigned_identity_update",
                "status": "update_azure_assigned_identity_status",
            }.get(what, what)
            self.k8s_errors.labels(kind).inc()

    async def handle(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE}
        )
