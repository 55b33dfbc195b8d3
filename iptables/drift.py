"""Finds how the node's rules differ from the ones nmi wants.

Every other tool on the node (kube-proxy, the CNI, an operator with
``iptables -F``) can change the tables under nmi.  :func:`find_drift` compares
the desired state (:func:`iptables.rules.desired_state`) with a parsed
``iptables-save`` and names each difference in words an operator can act on:
a missing chain, a chain whose rules differ, a jump that is missing, not
first, duplicated or different.  An empty list means: in place.

Rules are compared by meaning (:mod:`iptables.normalize`), and also accepted
when they are byte-identical to what ``iptables-save`` printed right after our
own install (a :data:`Snapshot`): whatever way a backend spells our rules,
the spelling it chose itself never counts as drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .normalize import same_rule, same_rules
from .rules import DesiredTable
from .ruleset import Ruleset, rule_target

#: Exact texts read back after an install: (table, chain) -> rules of our
#: chains, and (table, hook) -> the jump rule.
Snapshot = Mapping[tuple[str, str], tuple[str, ...]]


def snapshot(
    desired: Sequence[DesiredTable], current: Ruleset
) -> dict[tuple[str, str], tuple[str, ...]]:
    """Record how ``current`` spells our chains and jumps (call right after installing)."""
    taken: dict[tuple[str, str], tuple[str, ...]] = {}
    for table in desired:
        for chain in table.chains:
            rules = current.chain(table=table.name, chain=chain)
            if rules is not None:
                taken[(table.name, chain)] = tuple(rules)
        for jump in table.jumps:
            hook = current.chain(table=table.name, chain=jump.hook) or []
            found = tuple(r for r in hook if rule_target(r) == jump.target)
            if len(found) == 1:
                taken[(table.name, jump.hook)] = found
    return taken


def find_drift(
    desired: Sequence[DesiredTable],
    current: Ruleset,
    *,
    accepted: Snapshot | None = None,
) -> list[str]:
    """Every way ``current`` differs from ``desired``; empty when in place."""
    accepted = accepted or {}
    problems: list[str] = []
    for table in desired:
        for chain, want in table.chains.items():
            have = current.chain(table=table.name, chain=chain)
            if have is None:
                problems.append(f"{table.name}: chain {chain} is missing")
                continue
            if same_rules(have, want) or tuple(have) == accepted.get((table.name, chain)):
                continue
            problems.append(
                f"{table.name}: chain {chain} rules differ: have {_show(have)}, want {_show(want)}"
            )
        for jump in table.jumps:
            hook = current.chain(table=table.name, chain=jump.hook) or []
            positions = [i for i, r in enumerate(hook) if rule_target(r) == jump.target]
            where = f"{table.name}: jump {jump.hook} -> {jump.target}"
            if not positions:
                problems.append(f"{where} is missing")
                continue
            if len(positions) > 1:
                shown = ", ".join(str(p + 1) for p in positions)
                problems.append(f"{where} is duplicated ({len(positions)} times, at {shown})")
            if positions[0] != 0:
                problems.append(f"{where} is not first (position {positions[0] + 1})")
            have_rule = hook[positions[0]]
            if not (
                same_rule(have_rule, jump.rule)
                or (have_rule,) == accepted.get((table.name, jump.hook))
            ):
                problems.append(f"{where} differs: have {have_rule!r}, want {jump.rule!r}")
    return problems


def _show(rules: Sequence[str]) -> str:
    return "[" + "; ".join(rules) + "]" if rules else "(empty)"
