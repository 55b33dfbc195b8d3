"""Reads ``iptables-save`` output into tables, chains and rules.

The package never trusts what it *meant* to install: every decision (is the
jump there, is it first, which ``-D`` lines are needed, which chains can be
deleted) is taken from what the kernel reports, in the form ``iptables-save``
prints it.  This module is that reading, nothing more: a rule stays the exact
text that followed ``-A <chain>``, so that it can be replayed as ``-D <chain>
<rule>`` and match byte for byte in the same backend.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection
from dataclasses import dataclass, field

#: Built-in chains of the tables this package touches (never declared, flushed or deleted).
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


@dataclass
class Table:
    """One table: chain name -> rules (in order), as printed after ``-A <chain>``."""

    name: str
    chains: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Ruleset:
    """A whole ``iptables-save`` dump: table name -> :class:`Table`."""

    tables: dict[str, Table] = field(default_factory=dict)

    def chain(self, *, table: str, chain: str) -> list[str] | None:
        """The rules of ``table``/``chain``, or ``None`` when the chain does not exist."""
        t = self.tables.get(table)
        if t is None:
            return None
        return t.chains.get(chain)

    def has_chain(self, *, chain: str) -> bool:
        """Whether a chain of that name exists in any table."""
        return any(chain in t.chains for t in self.tables.values())

    def rule_count(self) -> int:
        """Number of rules over all tables."""
        return sum(len(rules) for t in self.tables.values() for rules in t.chains.values())


def parse_save(text: str) -> Ruleset:
    """Parse ``iptables-save`` output.  Comments and unknown lines are ignored."""
    ruleset = Ruleset()
    table: Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = ruleset.tables.setdefault(line[1:], Table(name=line[1:]))
        elif line == "COMMIT":
            table = None
        elif table is None:
            continue
        elif line.startswith(":"):
            name = line[1:].split(maxsplit=1)[0] if len(line) > 1 else ""
            if name:
                table.chains.setdefault(name, [])
        elif line.startswith("-A "):
            parts = line.split(maxsplit=2)
            if len(parts) >= 2:
                table.chains.setdefault(parts[1], []).append(parts[2] if len(parts) == 3 else "")
    return ruleset


def rule_target(rule: str) -> str | None:
    """The chain or target a rule jumps/goes to (``-j X`` / ``-g X``), if any."""
    try:
        tokens = shlex.split(rule)
    except ValueError:
        tokens = rule.split()
    for i, token in enumerate(tokens[:-1]):
        if token in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


def references(table: Table, *, targets: Collection[str]) -> list[tuple[str, str]]:
    """Every ``(chain, rule)`` of ``table`` that jumps to one of ``targets``.

    Rules inside the target chains themselves are not listed.
    """
    found: list[tuple[str, str]] = []
    for chain, rules in table.chains.items():
        if chain in targets:
            continue
        found.extend((chain, rule) for rule in rules if rule_target(rule) in targets)
    return found
