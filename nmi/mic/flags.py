"""``nmi mic``'s command line: aad-pod-identity MIC's flags, same names, validated once.

Users move from aad-pod-identity with their manifests and Helm values, so the
flags keep their names, Go syntax (one or two dashes, ``--flag=false``) and,
with one deliberate exception, their defaults: ``--clientQps`` is 50 instead
of 5 (aad-pod-identity's 5 Kubernetes writes per second take minutes for a
deployment of a few hundred pods; API Priority and Fairness protects the API
server today — README, "The controller").  Every value is checked before
anything starts: a wrong one is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import ConfigError, LogFormat
from ..flags import (
    bool_flag,
    compat_flags,
    csv,
    non_negative_int,
    port,
    positive_float,
    positive_int,
    seconds,
)

COMPAT_FLAGS = {
    "--enableScaleFeatures": "the controller's watches and desired state are always incremental",
    "--enableProfile": "the controller exposes no profiling endpoint",
    "--config-map-name": "there is no CRD type upgrade to track (the CRDs are v1 only)",
    "--type-upgrade-status-key": "there is no CRD type upgrade to track",
    "--enable-type-upgrade": "there is no CRD type upgrade to do",
    "--custom-user-agent": "ARM calls carry the Azure SDK's User-Agent with nmi's version",
    "--logtostderr": "the controller always logs to stderr",
    "--alsologtostderr": "the controller always logs to stderr",
}

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
LEDGER_CONFIGMAP = "nmi-mic-ledger"


@dataclass(frozen=True, kw_only=True)
class MicSettings:
    """The validated configuration of one controller replica."""

    kubeconfig: str | None = None
    cloudconfig: str = ""
    force_namespaced: bool = False
    sync_retry_duration: float = 3600.0
    reconcile_interval: float = 180.0
    leader_instance: str = ""
    leader_namespace: str = "default"
    leader_name: str = "aad-pod-identity-mic"
    leader_duration: float = 15.0
    http_probe_port: int = 8080
    prometheus_port: int = 8888
    probe_address: str = "0.0.0.0"
    prometheus_address: str = "0.0.0.0"
    create_delete_batch: int = 20
    client_qps: float = 50.0
    immutable_user_msis: tuple[str, ...] = ()
    update_user_msi_max_retry: int = 2
    update_user_msi_retry_interval: float = 1.0
    pod_namespace: str = ""  # MIC_POD_NAMESPACE: where the ledger lives
    log_format: LogFormat = LogFormat.TEXT
    verbosity: int = 0
    arm_polling_interval: float = 1.0
    arm_coalesce: float = 0.5  # seconds a VM's or scale set's first change waits for others

    def __post_init__(self) -> None:
        if not self.leader_instance:
            raise ConfigError("--leader-election-instance is empty and no host name is known")
        for label, value in (
            ("--leader-election-namespace", self.leader_namespace),
            ("--leader-election-name", self.leader_name),
            ("MIC_POD_NAMESPACE", self.ledger_namespace),
        ):
            if not _NAME.match(value):
                raise ConfigError(f"{label}={value!r} is not a Kubernetes name")
        if self.leader_duration < 2:
            raise ConfigError("--leader-election-duration must be at least 2s")
        if self.reconcile_interval <= 0 or self.sync_retry_duration <= 0:
            raise ConfigError("intervals must be positive")
        if self.create_delete_batch < 1 or self.client_qps <= 0:
            raise ConfigError("--createDeleteBatch and --clientQps must be positive")

    @property
    def ledger_namespace(self) -> str:
        return self.pod_namespace or self.leader_namespace

    @property
    def renew_deadline(self) -> float:
        """A leader that could not renew for this long stops acting (before it expires)."""
        return self.leader_duration / 2

    @property
    def retry_period(self) -> float:
        return self.leader_duration / 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmi mic",
        description="The controller: assigns identities to pods (AzureAssignedIdentity) and "
        "puts user-assigned identities on the nodes' VMs and scale sets through ARM.",
    )
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (else $KUBECONFIG, in-cluster)")
    p.add_argument(
        "--cloudconfig",
        default="",
        help="azure.json (AKS: /etc/kubernetes/azure.json); empty: aad-pod-identity's env vars",
    )
    bool_flag(p, "--forceNamespaced", False, "only identities and bindings of the pod's namespace")
    p.add_argument("--syncRetryDuration", type=seconds, default=3600.0, help="full resync period")
    p.add_argument(
        "--identity-assignment-reconcile-interval",
        type=seconds,
        default=180.0,
        help="how often the VMs' and scale sets' identities are read to repair drift",
    )
    p.add_argument("--leader-election-instance", default="", help="this replica (host name)")
    p.add_argument("--leader-election-namespace", default="default")
    p.add_argument("--leader-election-name", default="aad-pod-identity-mic")
    p.add_argument("--leader-election-duration", type=seconds, default=15.0)
    p.add_argument("--http-probe-port", type=port, default=8080, help="/healthz, /readyz")
    p.add_argument("--prometheus-port", type=port, default=8888, help="/metrics")
    p.add_argument("--probe-address", default="0.0.0.0")
    p.add_argument("--prometheus-address", default="0.0.0.0")
    p.add_argument(
        "--createDeleteBatch",
        type=positive_int,
        default=20,
        help="Kubernetes writes in flight at most",
    )
    p.add_argument(
        "--clientQps",
        type=positive_float,
        default=50.0,
        help="Kubernetes writes per second (aad-pod-identity: 5; see the README)",
    )
    p.add_argument(
        "--immutable-user-msis",
        type=csv,
        default=(),
        help="client ids of identities never removed from VMs and scale sets",
    )
    p.add_argument("--update-user-msi-max-retry", type=non_negative_int, default=2)
    p.add_argument("--update-user-msi-retry-interval", type=seconds, default=1.0)
    p.add_argument("--log-format", default="text", type=str.lower, choices=["text", "json"])
    p.add_argument("-v", "--v", dest="verbosity", type=non_negative_int, default=0)
    compat_flags(p, COMPAT_FLAGS)
    return p


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> MicSettings:
    env = os.environ if environ is None else environ
    force = bool(args.forceNamespaced) or env.get("FORCENAMESPACED", "").strip().lower() == "true"
    return MicSettings(
        kubeconfig=args.kubeconfig,
        cloudconfig=args.cloudconfig,
        force_namespaced=force,
        sync_retry_duration=args.syncRetryDuration,
        reconcile_interval=args.identity_assignment_reconcile_interval,
        leader_instance=args.leader_election_instance
        or env.get("MIC_POD_NAME", "")
        or socket.gethostname(),
        leader_namespace=args.leader_election_namespace,
        leader_name=args.leader_election_name,
        leader_duration=args.leader_election_duration,
        http_probe_port=args.http_probe_port,
        prometheus_port=args.prometheus_port,
        probe_address=args.probe_address,
        prometheus_address=args.prometheus_address,
        create_delete_batch=args.createDeleteBatch,
        client_qps=args.clientQps,
        immutable_user_msis=tuple(c.lower() for c in args.immutable_user_msis),
        update_user_msi_max_retry=args.update_user_msi_max_retry,
        update_user_msi_retry_interval=args.update_user_msi_retry_interval,
        pod_namespace=env.get("MIC_POD_NAMESPACE", ""),
        log_format=LogFormat(args.log_format),
        verbosity=args.verbosity,
    )
