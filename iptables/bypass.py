"""Finds other tools' rules that take pods' metadata traffic around the interception.

The filter guard drops whatever escapes the DNAT, so such rules cannot leak a
token; but they silently stop service for the pods they match, and an
operator must hear about it.  Two shapes are known:

* a ``NOTRACK`` (``-j CT --notrack`` or ``-j NOTRACK``) rule in the raw
  table's ``PREROUTING`` (or a chain it jumps to): untracked packets skip the
  nat table, so they are never DNATed.  Calico's doNotTrack policies and
  Cilium's no-conntrack mode install these for pod ranges;
* a rule ahead of nmi's jump in nat ``PREROUTING`` that ends the packet's way
  through the chain (``ACCEPT``, ``RETURN``, ``DNAT``, ``REDIRECT``): the jump
  is then never reached.  Drift repair moves nmi's jump back to the top, but
  the rule's author should know.

A rule is reported when it *may* match TCP traffic to the metadata address and
port: no destination, protocol or port restriction that excludes it (matches
nmi cannot evaluate, such as ipsets, count as "may").
"""

from __future__ import annotations

import ipaddress
import shlex

from .rules import RuleSpec
from .ruleset import BUILTIN_CHAINS, Ruleset, rule_target

_ENDING = frozenset({"ACCEPT", "RETURN", "DNAT", "REDIRECT"})


def may_match(rule: str, *, ip: str, port: int) -> bool:
    """Whether ``rule`` (as ``iptables-save`` prints it) can match TCP to ``ip:port``."""
    try:
        words = shlex.split(rule)
    except ValueError:
        return True
    negate = False
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else ""
        if word == "!":
            negate = True
            i += 1
            continue
        if word in ("-d", "--destination"):
            inside = _contains(value, ip)
            if inside is not None and inside == negate:
                return False
        elif word in ("-p", "--protocol"):
            proto = value.lower()
            if (proto not in ("tcp", "all", "6", "0")) != negate:
                return False
        elif word in ("--dport", "--destination-port"):
            inside = _port_in(value, port)
            if inside is not None and inside == negate:
                return False
        negate = False
        i += 1
    return True


def _contains(value: str, ip: str) -> bool | None:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def _port_in(value: str, port: int) -> bool | None:
    try:
        if ":" in value:
            low, high = value.split(":", 1)
            return int(low or 0) <= port <= int(high or 65535)
        return int(value) == port
    except ValueError:
        return None


def _notrack(rule: str) -> bool:
    target = rule_target(rule)
    return target == "NOTRACK" or (target == "CT" and "--notrack" in rule.split())


def find_bypasses(spec: RuleSpec, current: Ruleset) -> list[str]:
    """Rules that may take pods' metadata traffic around nmi's DNAT, described."""
    found: list[str] = []
    ip, port = spec.metadata_ip, spec.metadata_port
    seen: set[str] = set()
    todo = ["PREROUTING"]
    while todo:  # raw PREROUTING and the chains it jumps to
        chain = todo.pop()
        if chain in seen:
            continue
        seen.add(chain)
        for rule in current.chain(table="raw", chain=chain) or []:
            target = rule_target(rule)
            if target is not None and target == spec.chain:
                continue
            if _notrack(rule) and may_match(rule, ip=ip, port=port):
                found.append(f"raw {chain}: {rule} (untracked traffic is never intercepted)")
            elif (
                target
                and target not in BUILTIN_CHAINS
                and current.chain(table="raw", chain=target) is not None
            ):
                todo.append(target)
    for rule in current.chain(table="nat", chain="PREROUTING") or []:
        target = rule_target(rule)
        if target == spec.chain:
            break
        if target in _ENDING and may_match(rule, ip=ip, port=port):
            found.append(f"nat PREROUTING: {rule} (ahead of nmi's jump)")
    return found
