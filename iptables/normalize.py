"""Compares iptables rules by meaning, not by spelling.

What we render and what ``iptables-save`` prints back are the same rule in
slightly different words: save adds ``-m tcp`` after ``-p tcp``, appends
``/32`` to host addresses, puts ``-d`` before ``! -i`` and may quote a
comment; the nft backend can order options differently from the legacy one.
:func:`rule_key` maps a rule to a canonical, hashable form in which those
differences vanish:

* tokens are split the shell way (quotes removed);
* the rule is cut into *groups*: each base match (``-s``, ``-d``, ``-i``,
  ``-o``, ``-p``, ``-f``, with its ``!``), each ``-m <module>`` with its
  options, and the target (``-j``/``-g`` with its options);
* options that follow ``-p tcp``/``-p udp`` without an explicit ``-m`` belong
  to the implicit ``tcp``/``udp`` module, and an empty ``-m tcp`` is dropped;
* addresses become networks (``1.2.3.4`` -> ``1.2.3.4/32``), protocol numbers
  become names, comma lists of ``--ctstate``/``--state`` are sorted;
* options inside a module are sorted, and the match groups are sorted; the
  target stays last.

Two rules with the same key filter the same packets the same way for every
rule this package writes.  The manager additionally remembers the exact text
read back right after an install, so even a spelling this module does not
know cannot cause an endless restore loop.
"""

from __future__ import annotations

import ipaddress
import shlex

#: A rule's canonical form: sorted match groups, then the target group.
RuleKey = tuple[str, ...]

_BASE = {
    "-s": "s",
    "--source": "s",
    "--src": "s",
    "-d": "d",
    "--destination": "d",
    "--dst": "d",
    "-i": "i",
    "--in-interface": "i",
    "-o": "o",
    "--out-interface": "o",
    "-p": "p",
    "--protocol": "p",
}
_PROTOCOLS = {"6": "tcp", "17": "udp", "1": "icmp", "132": "sctp"}
_LIST_OPTIONS = frozenset({"--ctstate", "--state", "--ctstatus"})


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        return value


def _is_option(token: str) -> bool:
    if token == "!":
        return True
    if not token.startswith("-") or len(token) < 2:
        return False
    # "-1" is a value, not an option.
    return not token[1:].replace(".", "", 1).isdigit()


class _Group:
    """A module or target being collected: name plus its options."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        self.options: list[str] = []

    def add(self, *, negated: bool, option: str, args: list[str]) -> None:
        if option in _LIST_OPTIONS:
            args = [",".join(sorted(a.split(","))) for a in args]
        text = ("!" if negated else "") + option
        if args:
            text += "=" + " ".join(args)
        self.options.append(text)

    def render(self, *, sort_options: bool) -> str:
        opts = sorted(self.options) if sort_options else self.options
        return f"{self.kind}:{self.name}[{','.join(opts)}]"


def rule_key(rule: str) -> RuleKey:
    """The canonical form of a rule (the text after ``-A <chain>``)."""
    try:
        tokens = shlex.split(rule)
    except ValueError:
        tokens = rule.split()
    matches: list[str] = []
    modules: list[_Group] = []
    target: _Group | None = None
    current: _Group | None = None
    protocol: str | None = None
    negated = False
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "!":
            negated = True
            continue
        if token in _BASE and i < len(tokens):
            kind = _BASE[token]
            value = tokens[i]
            i += 1
            if kind in ("s", "d"):
                value = _address(value)
            elif kind == "p":
                value = _PROTOCOLS.get(value.lower(), value.lower())
                protocol = value
            matches.append(("!" if negated else "") + kind + ":" + value)
            current = None
        elif token in ("-f", "--fragment"):
            matches.append(("!" if negated else "") + "f")
            current = None
        elif token in ("-m", "--match") and i < len(tokens):
            current = _Group("m", tokens[i])
            i += 1
            modules.append(current)
        elif token in ("-j", "--jump", "-g", "--goto") and i < len(tokens):
            current = _Group("j" if token in ("-j", "--jump") else "g", tokens[i])
            i += 1
            target = current
        elif token.startswith("--"):
            if current is None:
                # An option of the implicit protocol module (``-p tcp --dport 80``).
                name = protocol or "?"
                existing = [m for m in modules if m.name == name]
                current = existing[0] if existing else _Group("m", name)
                if not existing:
                    modules.append(current)
            args: list[str] = []
            while i < len(tokens) and not _is_option(tokens[i]):
                args.append(tokens[i])
                i += 1
            current.add(negated=negated, option=token, args=args)
        else:
            matches.append("?:" + token)
        negated = False
    # Merge the implicit and explicit protocol module, drop it when empty.
    merged: dict[str, _Group] = {}
    groups: list[str] = list(matches)
    for module in modules:
        if module.name in ("tcp", "udp") and module.name == protocol:
            into = merged.setdefault(module.name, _Group("m", module.name))
            into.options.extend(module.options)
            continue
        groups.append(module.render(sort_options=True))
    groups.extend(m.render(sort_options=True) for m in merged.values() if m.options)
    key = sorted(groups)
    if target is not None:
        key.append(target.render(sort_options=True))
    return tuple(key)


def same_rule(a: str, b: str) -> bool:
    """Whether two rules are the same once normalised."""
    return a == b or rule_key(a) == rule_key(b)


def same_rules(a: list[str] | tuple[str, ...], b: list[str] | tuple[str, ...]) -> bool:
    """Whether two chains hold the same rules in the same order, once normalised."""
    return len(a) == len(b) and all(same_rule(x, y) for x, y in zip(a, b, strict=True))
