"""One frozen description of how this daemon runs.

Everything the rest of the code needs to know about flags and environment is
here, validated once at start, so that a bad value is a clear error before
anything listens or touches the node, never a crash later.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field


class OperationMode(enum.StrEnum):
    """Where the pod -> identity assignments come from."""

    STANDARD = "standard"  # AzureAssignedIdentity objects written by MIC
    MANAGED = "managed"  # bindings matched by nmi itself, no controller


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


# Login hosts of the Azure clouds that MSAL knows (public, US Gov, China, Germany legacy).
KNOWN_AUTHORITY_HOSTS: frozenset[str] = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.microsoftonline.de",
        "login.windows.net",
        "login.microsoft.com",
        "sts.windows.net",
        "login.partner.microsoftonline.cn",
        "login.usgovcloudapi.net",
    }
)

DEFAULT_AUTHORITY = "https://login.microsoftonline.com/"

# A qualified Kubernetes key: [prefix/]name (label and taint keys).
_TAINT_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


class ConfigError(ValueError):
    """A flag or environment value that nmi cannot run with."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The validated configuration of one nmi process."""

    node_name: str
    listen_address: str = "127.0.0.1"
    port: int = 2579
    metadata_ip: str = "169.254.169.254"
    metadata_port: int = 80
    operation_mode: OperationMode = OperationMode.STANDARD
    force_namespaced: bool = False
    http_probe_port: int = 8085
    prometheus_port: int = 9090
    block_instance_metadata: bool = False
    metadata_header_required: bool = True
    retry_attempts_for_created: int = 16
    retry_attempts_for_assigned: int = 4
    find_identity_retry_interval: float = 5.0
    ipt_update_interval_sec: int = 60
    set_retry_after_header: bool = False
    enable_conntrack_deletion: bool = False
    allow_network_plugin_kubenet: bool = False
    kubelet_config: str = "/etc/default/kubelet"
    kubeconfig: str | None = None
    log_format: LogFormat = LogFormat.TEXT
    verbosity: int = 0
    allowed_authority_hosts: frozenset[str] = field(default_factory=frozenset)
    allow_cross_namespace_secrets: bool = False
    probe_address: str = "0.0.0.0"
    metrics_address: str = "0.0.0.0"
    upstream_timeout: float = 30.0
    pod_lookup_timeout: float = 2.0
    new_pod_grace: float = 3.0
    shutdown_grace: float = 10.0
    node_ip: str = ""
    per_pod_rate: float = 10.0
    per_pod_burst: float = 50.0
    manage_iptables: bool = True
    iptables_backend: str = "auto"
    kube_events: bool = True
    admin_socket: str = ""  # empty: no admin endpoint (the CLI defaults to /run/nmi/admin.sock)
    metrics_allowed_sources: tuple[str, ...] = ()  # CIDRs; empty: the metrics port is open
    startup_taint: str = ""  # taint key removed from the node once interception is verified
    secret_label: str = ""  # key or key=value a Secret must carry to be used; empty: any
    # Federation (spec.type 3): the audience of the service-account tokens nmi requests
    # for Azure AD (an identity's annotation may name another), and how often the
    # "shadow" trial of an identity with one service account may run.
    federated_token_audience: str = "api://AzureADTokenExchange"
    federation_shadow_interval: float = 600.0

    def __post_init__(self) -> None:
        if not self.node_name:
            raise ConfigError("--node (or NODE_NAME) is required: nmi serves the pods of one node")
        for name in ("port", "metadata_port", "http_probe_port", "prometheus_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')}={value} is not a TCP port")
        for name in ("listen_address", "metadata_ip", "probe_address", "metrics_address"):
            value = getattr(self, name)
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ConfigError(
                    f"{name.replace('_', '-')}={value!r} is not an IP address"
                ) from None
        if self.retry_attempts_for_created < 0 or self.retry_attempts_for_assigned < 0:
            raise ConfigError("retry attempts must not be negative")
        if self.find_identity_retry_interval < 0:
            raise ConfigError("--find-identity-retry-interval must not be negative")
        if self.ipt_update_interval_sec <= 0:
            raise ConfigError("--ipt-update-interval-sec must be positive")
        if self.new_pod_grace < 0:
            raise ConfigError("--new-pod-grace must not be negative")
        if self.upstream_timeout <= 0:
            raise ConfigError("upstream timeout must be positive")
        if self.node_ip:
            try:
                if ipaddress.ip_address(self.node_ip).version != 4:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"--node-ip={self.node_ip!r} is not an IPv4 address") from None
        if self.per_pod_rate < 0 or self.per_pod_burst < 1:
            raise ConfigError("--per-pod-rate must be >= 0 and --per-pod-burst >= 1")
        if self.iptables_backend not in ("auto", "nft", "legacy"):
            raise ConfigError("--iptables-backend must be auto, nft or legacy")
        for source in self.metrics_allowed_sources:
            try:
                network = ipaddress.ip_network(source, strict=False)
            except ValueError:
                raise ConfigError(f"--metrics-allowed-sources: {source!r} is not a CIDR") from None
            if network.version != 4 or str(network) != source:
                raise ConfigError(
                    f"--metrics-allowed-sources: write {source!r} as an IPv4 CIDR ({network})"
                )
        if self.startup_taint and not _TAINT_KEY.match(self.startup_taint):
            raise ConfigError(f"--startup-taint={self.startup_taint!r} is not a taint key")
        if not self.federated_token_audience.strip():
            raise ConfigError("--federated-token-audience must not be empty")
        if self.federation_shadow_interval < 10:
            raise ConfigError("--federation-shadow-interval must be at least 10s")
        if self.secret_label:
            key, _, _ = self.secret_label.partition("=")
            if not _TAINT_KEY.match(key):
                raise ConfigError(f"--secret-label={self.secret_label!r} is not key or key=value")

    @property
    def namespaced_everywhere(self) -> bool:
        """Managed mode only ever matches bindings in the pod's own namespace."""
        return self.force_namespaced or self.operation_mode is OperationMode.MANAGED

    @property
    def wait_for_created(self) -> float:
        """How long a request may wait for MIC to create an assignment (seconds)."""
        return self.retry_attempts_for_created * self.find_identity_retry_interval

    @property
    def wait_for_assigned(self) -> float:
        """How long a request may wait in all, until its assignment is Assigned (seconds)."""
        return (
            self.retry_attempts_for_created + self.retry_attempts_for_assigned
        ) * self.find_identity_retry_interval

    @property
    def metadata_endpoint(self) -> str:
        host = self.metadata_ip
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.metadata_port}"

    def authority_host_allowed(self, host: str) -> bool:
        """Whether a service principal's secret may be sent to this login host."""
        host = host.lower()
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if host in self.allowed_authority_hosts:
            return True
        # Known clouds only on the default HTTPS port.
        return bare in KNOWN_AUTHORITY_HOSTS and (bare == host or host.endswith(":443"))
