"""The ``nmi`` command: aad-pod-identity's NMI flags, same names and defaults.

``nmi [flags]`` runs the daemon; ``nmi explain``, ``nmi uninstall`` and
``nmi sandbox`` (a source checkout only) are subcommands.  Flags are read as
Go reads them (``--flag`` or ``-flag``, ``--flag=false``, ``--flag value``,
klog's ``-v=N``: see :mod:`nmi.flags`), and every value is validated before
anything starts: a wrong value is a one-line error and exit code 2.  The
flags aad-pod-identity had that mean nothing here are accepted and each logs
why (:data:`COMPAT_FLAGS`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, LogFormat, OperationMode, Settings
from .flags import (
    bool_flag,
    compat_flags,
    compat_warnings,
    csv,
    go_style,
    hosts,
    non_negative_int,
    port,
    seconds,
)
from .loop import run_loop
from .ops import logs

log = logging.getLogger("nmi")

# aad-pod-identity NMI flags accepted for drop-in compatibility, without effect.
COMPAT_FLAGS = {
    "--MICNamespace": "nmi has no ReplicaSet-name bypass; exempt MIC with an "
    "AzurePodIdentityException",
    "--enableScaleFeatures": "nmi's watches are always scoped to its node",
    "--enableProfile": "nmi exposes no profiling endpoint",
    "--custom-user-agent": "nmi's upstream calls carry MSAL's own User-Agent",
    "--logtostderr": "nmi always logs to stderr",
    "--alsologtostderr": "nmi always logs to stderr",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmi",
        description="Node Managed Identity: serves each pod the token of its own Azure identity.",
        epilog="Subcommands: 'nmi sandbox' runs the local world with simulated pods; "
        "'nmi uninstall' removes the node's interception rules; "
        "'nmi explain NAMESPACE/POD' explains a pod's identity decision.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument(
        "--node", default=os.environ.get("NODE_NAME", ""), help="node name (env NODE_NAME)"
    )
    p.add_argument("--nmi-listen-address", default="127.0.0.1", help="address of the token server")
    p.add_argument("--nmi-port", type=port, default=2579, help="port of the token server")
    p.add_argument("--metadata-ip", default="169.254.169.254", help="instance metadata IP")
    p.add_argument("--metadata-port", type=port, default=80, help="instance metadata port")
    p.add_argument(
        "--operation-mode",
        default="standard",
        type=str.lower,
        choices=["standard", "managed"],
        help="standard (AzureAssignedIdentity from MIC) or managed (bindings matched by nmi)",
    )
    bool_flag(p, "--forceNamespaced", False, "only identities and bindings of the pod's namespace")
    p.add_argument(
        "--http-probe-port", type=port, default=8085, help="port of /healthz and /readyz"
    )
    p.add_argument("--prometheus-port", type=port, default=9090, help="port of /metrics")
    bool_flag(p, "--block-instance-metadata", False, "answer 403 for /metadata/instance")
    bool_flag(p, "--metadata-header-required", True, "require the header Metadata: true")
    p.add_argument("--retry-attempts-for-created", type=non_negative_int, default=16)
    p.add_argument("--retry-attempts-for-assigned", type=non_negative_int, default=4)
    p.add_argument(
        "--find-identity-retry-interval",
        type=seconds,
        default=5.0,
        help="seconds per attempt: waits are bounded by attempts x interval (woken on change)",
    )
    p.add_argument("--ipt-update-interval-sec", type=non_negative_int, default=60)
    bool_flag(
        p, "--set-retry-after-header", False, "503 + Retry-After instead of 404 while not ready"
    )
    bool_flag(
        p, "--enable-conntrack-deletion", False, "delete conntrack entries to the metadata IP"
    )
    bool_flag(p, "--allow-network-plugin-kubenet", False, "run on bridge (kubenet) nodes")
    p.add_argument("--kubelet-config", default="/etc/default/kubelet")
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig (else $KUBECONFIG, else in-cluster)"
    )
    p.add_argument("--log-format", default="text", type=str.lower, choices=["text", "json"])
    p.add_argument(
        "-v", "--v", dest="verbosity", type=non_negative_int, default=0, help="log verbosity"
    )
    p.add_argument(
        "--allowed-authority-hosts",
        type=hosts,
        default=frozenset(),
        help="extra Azure AD login hosts (host[:port], comma-separated) secrets may be sent to",
    )
    bool_flag(
        p,
        "--allow-cross-namespace-secrets",
        False,
        "let an AzureIdentity use a Secret outside its own namespace",
    )
    p.add_argument(
        "--probe-address",
        default="127.0.0.1",
        help="address of the probe server (loopback: the DaemonSet's probes name host 127.0.0.1)",
    )
    p.add_argument("--prometheus-address", default="0.0.0.0", help="address of the metrics server")
    p.add_argument(
        "--upstream-timeout", type=seconds, default=30.0, help="timeout of upstream calls"
    )
    p.add_argument("--shutdown-grace", type=seconds, default=10.0, help="time to finish requests")
    p.add_argument(
        "--new-pod-grace",
        type=seconds,
        default=3.0,
        help="a pod this young (seconds) waits for its binding to be seen before a refusal",
    )
    p.add_argument(
        "--node-ip",
        default=os.environ.get("HOST_IP", ""),
        help="node IPv4 address the DNAT targets (env HOST_IP; default: found via netlink)",
    )
    bool_flag(
        p,
        "--manage-iptables",
        True,
        "install and keep the interception rules (false: someone else redirects the traffic)",
    )
    p.add_argument(
        "--iptables-backend",
        default="auto",
        choices=["auto", "nft", "legacy"],
        help="iptables backend (auto: the one the node's other rules use)",
    )
    p.add_argument(
        "--per-pod-rate",
        type=float,
        default=10.0,
        help="requests/s per pod that may cost upstream calls or waits (0: unlimited); "
        "beyond it a pod is served from the cache or gets 429",
    )
    p.add_argument("--per-pod-burst", type=float, default=50.0, help="burst of --per-pod-rate")
    bool_flag(
        p, "--kube-events", True, "record Kubernetes Events on pods whose token request fails"
    )
    p.add_argument(
        "--admin-socket",
        default="/run/nmi/admin.sock",
        help="read-only admin endpoint (Unix socket) for 'nmi explain'; empty to disable",
    )
    p.add_argument(
        "--metrics-allowed-sources",
        type=csv,
        default=(),
        help="CIDRs (comma-separated) that may reach --prometheus-port, enforced by nmi's "
        "rules; empty: open",
    )
    p.add_argument(
        "--startup-taint",
        default="",
        help="taint key nmi removes from its node once its rules are verified (node pools "
        "are created with it, see the README); empty: none",
    )
    p.add_argument(
        "--secret-label",
        default="",
        help="KEY or KEY=VALUE: only Secrets carrying this label may hold an identity's "
        "credential; empty: any Secret of the identity's namespace",
    )
    p.add_argument(
        "--federated-token-audience",
        default="api://AzureADTokenExchange",
        help="audience of the service-account tokens exchanged with Azure AD for federated "
        "identities (spec.type 3); annotation aadpodidentity.k8s.io/federated-token-audience "
        "on an identity overrides it",
    )
    p.add_argument(
        "--federation-shadow-interval",
        type=seconds,
        default=600.0,
        help="how often the background federation trial of an identity annotated "
        "aadpodidentity.k8s.io/federation=shadow runs per service account (Go duration or "
        "seconds, at least 10s)",
    )
    compat_flags(p, COMPAT_FLAGS)
    return p


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    force = bool(args.forceNamespaced) or env.get("FORCENAMESPACED", "").strip().lower() == "true"
    return Settings(
        node_name=args.node,
        listen_address=args.nmi_listen_address,
        port=args.nmi_port,
        metadata_ip=args.metadata_ip,
        metadata_port=args.metadata_port,
        operation_mode=OperationMode(args.operation_mode),
        force_namespaced=force,
        http_probe_port=args.http_probe_port,
        prometheus_port=args.prometheus_port,
        block_instance_metadata=args.block_instance_metadata,
        metadata_header_required=args.metadata_header_required,
        retry_attempts_for_created=args.retry_attempts_for_created,
        retry_attempts_for_assigned=args.retry_attempts_for_assigned,
        find_identity_retry_interval=args.find_identity_retry_interval,
        ipt_update_interval_sec=args.ipt_update_interval_sec,
        set_retry_after_header=args.set_retry_after_header,
        enable_conntrack_deletion=args.enable_conntrack_deletion,
        allow_network_plugin_kubenet=args.allow_network_plugin_kubenet,
        kubelet_config=args.kubelet_config,
        kubeconfig=args.kubeconfig,
        log_format=LogFormat(args.log_format),
        verbosity=args.verbosity,
        allowed_authority_hosts=args.allowed_authority_hosts,
        allow_cross_namespace_secrets=args.allow_cross_namespace_secrets,
        probe_address=args.probe_address,
        metrics_address=args.prometheus_address,
        upstream_timeout=args.upstream_timeout,
        shutdown_grace=args.shutdown_grace,
        new_pod_grace=args.new_pod_grace,
        node_ip=args.node_ip,
        per_pod_rate=args.per_pod_rate,
        per_pod_burst=args.per_pod_burst,
        manage_iptables=args.manage_iptables,
        iptables_backend=args.iptables_backend,
        kube_events=args.kube_events,
        admin_socket=args.admin_socket,
        metrics_allowed_sources=tuple(
            str(ipaddress.ip_network(c, strict=False)) if _is_network(c) else c
            for c in args.metrics_allowed_sources
        ),
        startup_taint=args.startup_taint,
        secret_label=args.secret_label,
        federated_token_audience=args.federated_token_audience.strip(),
        federation_shadow_interval=args.federation_shadow_interval,
    )


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _warn_compat(args: argparse.Namespace) -> None:
    for line in compat_warnings(args, COMPAT_FLAGS):
        log.warning(line)


def _sandbox(argv: Sequence[str]) -> int:
    """``nmi sandbox`` lives in ``nmi_sandbox``, which only a source checkout has: the
    emulators it runs are never part of the distribution nor of the image."""
    try:
        from nmi_sandbox.sandbox import main as sandbox_main
    except ImportError:
        print(
            "nmi sandbox: the emulated world is not installed here (the image carries only "
            "nmi itself); run ./dev sandbox in a checkout of the nmi repository",
            file=sys.stderr,
        )
        return 2
    return sandbox_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "sandbox":
        return _sandbox(args_list[1:])
    if args_list and args_list[0] == "explain":
        from .explain.command import main as explain_main

        return explain_main(args_list[1:])
    if args_list and args_list[0] == "mic":
        from .mic.command import main as mic_main

        return mic_main(args_list[1:])
    if args_list and args_list[0] == "uninstall":
        from .node.uninstall import main as uninstall_main

        return uninstall_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(go_style(args_list))
    if args.version:
        print(f"nmi {__version__}")
        return 0
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logs.setup(fmt=settings.log_format, verbosity=settings.verbosity)
    _warn_compat(args)
    from .app import Daemon

    return run_loop(Daemon(settings).run_until_signalled())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
