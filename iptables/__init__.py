"""nmi's interception rules: pods' IMDS traffic to nmi, nothing else.

A top-level package (beside ``nmi``) because it is the one part of the daemon
that changes the node: it renders the iptables ruleset from one readable
template (:data:`TEMPLATE`), installs it atomically with
``iptables-restore --noflush`` in the backend kube-proxy uses (nft or legacy),
adopts the rules a previous nmi left without touching them, repairs drift,
removes the rules on request, and deletes stale conntrack flows.

Typical use::

    spec = RuleSpec(metadata_ip="169.254.169.254", metadata_port=80,
                    target_ip="10.240.0.4", target_port=2579)
    manager = RuleManager(spec)
    await manager.install()
    await manager.run(60.0, on_result=report)
"""

from .backend import Backend, BackendName, backend_named, choose_backend, detect
from .bypass import find_bypasses
from .conntrack import delete_conntrack
from .drift import find_drift
from .errors import IptablesError
from .manager import ReconcileResult, ReconcileStatus, RuleManager
from .normalize import rule_key, same_rule
from .rules import TEMPLATE, RuleSpec, desired_state, render, render_uninstall
from .ruleset import Ruleset, parse_save
from .watch import NftChanges

__all__ = [
    "TEMPLATE",
    "Backend",
    "BackendName",
    "IptablesError",
    "NftChanges",
    "ReconcileResult",
    "ReconcileStatus",
    "RuleManager",
    "RuleSpec",
    "Ruleset",
    "backend_named",
    "choose_backend",
    "delete_conntrack",
    "desired_state",
    "detect",
    "find_bypasses",
    "find_drift",
    "parse_save",
    "render",
    "render_uninstall",
    "rule_key",
    "same_rule",
]
