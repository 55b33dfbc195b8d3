"""What nmi asks of iptables, as one template an operator can read.

:data:`TEMPLATE` is the whole ruleset, in the ``iptables-restore`` language
and in the canonical order ``iptables-save`` prints, so that ``nmi`` can show
it verbatim in its docs and an operator can diff it against
``iptables-save``.  Three tables, one chain each, one jump each:

* ``raw``: metadata traffic whose source address would not be routed back
  through the interface it came in on is dropped (strict reverse-path check)
  before anything else sees it, so a pod cannot borrow another pod's IP to
  get that pod's token;
* ``nat``: pod traffic to the metadata address is DNATed to nmi; only in
  ``PREROUTING``, so the node's own processes (``OUTPUT``) keep talking to the
  real IMDS;
* ``filter``: nmi's listener accepts pod traffic only when it arrived through
  that DNAT (or over loopback from the node itself); and pod traffic that is
  still addressed to the metadata service after the nat table — delivered
  locally (``INPUT``) or routed on towards it (``FORWARD``, as on Azure) — is
  dropped: it escaped the interception (a flushed nat table, a NOTRACK rule,
  an ``ACCEPT`` ahead of the jump), so the node fails closed whatever else
  changes its rules.  Optionally, the metrics port is closed to all but the
  given source ranges.

The input is meant for ``iptables-restore --noflush``: a ``:CHAIN - [0:0]``
line creates-or-flushes only that chain and the table is committed at once, so
rules are replaced without a window.  Built-in chains and other tools' chains
are never declared, flushed or deleted.  Each jump is ``-I <hook> 1``; given
the current state, :func:`render` puts a ``-D`` before it for every jump to our
chain that already exists, so the jump ends up exactly once, first.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .ruleset import BUILTIN_CHAINS, Ruleset, references, rule_target

#: The ruleset, with ``{placeholders}`` filled from a :class:`RuleSpec`.
TEMPLATE = """\
# nmi: pods' TCP traffic to the instance metadata service {metadata_ip}:{metadata_port}
# goes to nmi at {target_ip}:{target_port}.  Input for iptables-restore --noflush.
*raw
:{chain} - [0:0]
# Anti-spoofing: drop metadata traffic whose source is routed via another interface.
{anti_spoofing}
-I PREROUTING 1 ! -i lo -m comment --comment {comment} -j {chain}
COMMIT
*nat
:{chain} - [0:0]
# Interception: pods' metadata traffic goes to nmi (PREROUTING only: never the node's own).
-A {chain} -d {metadata_ip}/32 -p tcp -m tcp --dport {metadata_port} -m comment --comment {comment} -j DNAT --to-destination {target_ip}:{target_port}
-I PREROUTING 1 -m comment --comment {comment} -j {chain}
COMMIT
*filter
:{guard_chain} - [0:0]
# Guard: nmi's listener is reachable from outside only through the interception above.
-A {guard_chain} -d {target_ip}/32 ! -i lo -p tcp -m tcp --dport {target_port} -m conntrack ! --ctstate DNAT -m comment --comment {comment} -j DROP
# Fail-closed: metadata traffic that escaped the interception is dropped, local or routed.
-A {guard_chain} -d {metadata_ip}/32 ! -i lo -p tcp -m tcp --dport {metadata_port} -m comment --comment {comment} -j DROP
{metrics}
-I INPUT 1 -m comment --comment {comment} -j {guard_chain}
-I FORWARD 1 -m comment --comment {comment} -j {guard_chain}
COMMIT
"""  # noqa: E501

_ANTI_SPOOFING = (
    "-A {chain} -d {metadata_ip}/32 -p tcp -m tcp --dport {metadata_port} -m rpfilter --invert "
    "-m comment --comment {comment} -j DROP"
)
_METRICS_ALLOW = (
    "-A {guard_chain} -s {source} -p tcp -m tcp --dport {metrics_port} "
    "-m comment --comment {comment} -j RETURN"
)
_METRICS_DROP = (
    "-A {guard_chain} ! -i lo -p tcp -m tcp --dport {metrics_port} "
    "-m comment --comment {comment} -j DROP"
)

_CHAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,28}$")
_COMMENT = re.compile(r"^[A-Za-z0-9_.:/=@+-]{1,200}$")
_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "REJECT", "DNAT", "SNAT", "MASQUERADE"})
_JUMP = re.compile(r"^-I (?P<hook>\S+) 1 (?P<rule>.*)$")


@dataclass(frozen=True)
class RuleSpec:
    """The parameters of the ruleset.  Validated: they end up in restore input."""

    metadata_ip: str
    metadata_port: int
    target_ip: str
    target_port: int
    chain: str = "NMI-METADATA"
    guard_chain: str = "NMI-LISTENER"
    comment: str = "nmi"
    # Off where the network plugin routes pods' IPs through one device (Cilium's
    # cilium_host) and verifies their source addresses itself.
    anti_spoofing: bool = True
    # With sources: only these ranges (and loopback) reach the metrics port.
    metrics_port: int = 0
    metrics_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for label, value in (("metadata_ip", self.metadata_ip), ("target_ip", self.target_ip)):
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{label} must be an IP address, got {value!r}") from None
            if address.version != 4:
                raise ValueError(f"{label} must be an IPv4 address, got {value!r}")
            if address.is_unspecified:
                raise ValueError(f"{label} must be a specific address, got {value!r}")
            if str(address) != value:
                raise ValueError(f"{label} must be written canonically ({address}), got {value!r}")
        for label, port in (
            ("metadata_port", self.metadata_port),
            ("target_port", self.target_port),
        ):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"{label} must be a TCP port (1-65535), got {port!r}")
        for label, name in (("chain", self.chain), ("guard_chain", self.guard_chain)):
            if not _CHAIN_NAME.match(name) or name in BUILTIN_CHAINS or name in _TARGETS:
                raise ValueError(f"{label} must be a custom chain name (<=28 chars), got {name!r}")
        if not _COMMENT.match(self.comment):
            raise ValueError(
                f"comment must be a single word of safe characters, got {self.comment!r}"
            )
        if self.metrics_sources:
            if isinstance(self.metrics_port, bool) or not 0 < self.metrics_port < 65536:
                raise ValueError("metrics_port must be a TCP port when metrics_sources are given")
            for source in self.metrics_sources:
                try:
                    network = ipaddress.ip_network(source, strict=False)
                except ValueError:
                    raise ValueError(f"metrics source {source!r} is not a CIDR") from None
                if network.version != 4 or str(network) != source:
                    raise ValueError(
                        f"metrics source must be a canonical IPv4 CIDR ({network}), got {source!r}"
                    )


@dataclass(frozen=True)
class Jump:
    """The rule in a built-in chain (``hook``) that sends packets to our chain."""

    hook: str
    rule: str
    target: str


@dataclass(frozen=True)
class DesiredTable:
    """What one table must contain: our chains' rules and the jumps to them."""

    name: str
    chains: dict[str, tuple[str, ...]]
    jumps: tuple[Jump, ...]


def template_text(spec: RuleSpec) -> str:
    """The template filled in: the install input for a node without any of our rules."""
    values = {
        "metadata_ip": spec.metadata_ip,
        "metadata_port": spec.metadata_port,
        "target_ip": spec.target_ip,
        "target_port": spec.target_port,
        "chain": spec.chain,
        "guard_chain": spec.guard_chain,
        "comment": spec.comment,
        "metrics_port": spec.metrics_port,
    }
    metrics = []
    if spec.metrics_sources:
        metrics = [_METRICS_ALLOW.format(**values, source=s) for s in spec.metrics_sources]
        metrics.append(_METRICS_DROP.format(**values))
    text = TEMPLATE.format(
        **values,
        anti_spoofing=_ANTI_SPOOFING.format(**values) if spec.anti_spoofing else "",
        metrics="\n".join(metrics),
    )
    return "".join(line + "\n" for line in text.splitlines() if line)


def desired_state(spec: RuleSpec) -> tuple[DesiredTable, ...]:
    """The rendered template read back as data, in table order."""
    tables: list[DesiredTable] = []
    name: str | None = None
    chains: dict[str, list[str]] = {}
    jumps: list[Jump] = []
    for line in template_text(spec).splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, chains, jumps = line[1:], {}, []
        elif line == "COMMIT" and name is not None:
            tables.append(
                DesiredTable(
                    name=name,
                    chains={c: tuple(r) for c, r in chains.items()},
                    jumps=tuple(jumps),
                )
            )
            name = None
        elif line.startswith(":"):
            chains[line[1:].split()[0]] = []
        elif line.startswith("-A "):
            _, chain, rule = line.split(maxsplit=2)
            chains[chain].append(rule)
        elif m := _JUMP.match(line):
            jumps.append(Jump(hook=m["hook"], rule=m["rule"], target=rule_target(m["rule"]) or ""))
    return tuple(tables)


def render(spec: RuleSpec, *, current: Ruleset | None = None) -> str:
    """The complete ``iptables-restore --noflush`` input that installs ``spec``.

    With ``current`` (the parsed ``iptables-save`` of the node), every jump to
    our chains that already sits in the jump's built-in chain is deleted
    (``-D``) right before the ``-I <hook> 1``, in the same table transaction.
    Without it, the output is the template as is (a node without our rules).
    """
    text = template_text(spec)
    if current is None:
        return text
    out: list[str] = []
    table: str | None = None
    ours = {spec.chain, spec.guard_chain}
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif (m := _JUMP.match(line)) and table is not None:
            existing = current.chain(table=table, chain=m["hook"]) or []
            out.extend(f"-D {m['hook']} {rule}" for rule in existing if rule_target(rule) in ours)
        out.append(line)
    return "\n".join(out) + "\n"


def render_uninstall(spec: RuleSpec, *, current: Ruleset) -> str:
    """The ``iptables-restore --noflush`` input that removes all of ours.

    Deletes every rule that jumps to one of our chains (wherever it is), then
    flushes and deletes our chains — only what ``current`` shows to exist.
    Empty when nothing of ours is there.  Tables go in reverse install order
    (guard first, anti-spoofing last).
    """
    ours = {spec.chain, spec.guard_chain}
    blocks: list[str] = []
    for desired in reversed(desired_state(spec)):
        table = current.tables.get(desired.name)
        if table is None:
            continue
        present = [c for c in desired.chains if c in table.chains]
        refs = references(table, targets=ours)
        if not present and not refs:
            continue
        lines = [f"*{desired.name}"]
        lines.extend(f":{c} - [0:0]" for c in present)
        lines.extend(f"-D {chain} {rule}" for chain, rule in refs)
        lines.extend(f"-X {c}" for c in present)
        lines.append("COMMIT")
        blocks.append("\n".join(lines) + "\n")
    return "".join(blocks)
