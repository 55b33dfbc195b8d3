"""Command-line flags the way aad-pod-identity's Go binaries read them.

Why: nmi's subcommands (the daemon, ``nmi mic``, ``nmi explain``) are drop-in
replacements for Go programs whose flags users already have in manifests and
Helm values.  Go's ``flag`` package accepts ``-name`` and ``--name``, pflag
``--name``; both accept ``--name=value``, ``--name value`` and a bare boolean
``--name`` (klog adds ``-v=N``).  This module turns such an argument list
into what :mod:`argparse` reads, and holds the value types every subcommand
validates with, so that a wrong value is one clear line and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

_TRUE = {"1", "t", "true", "yes", "y", "on"}
_FALSE = {"0", "f", "false", "no", "n", "off"}


def parse_bool(value: str) -> bool:
    """Go's ``strconv.ParseBool`` spellings (and yes/no, on/off)."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {value!r}")


def port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} out of range")
    return number


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{number} must not be negative")
    return number


def positive_int(value: str) -> int:
    number = non_negative_int(value)
    if number == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return number


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(value: str) -> float:
    """A duration: a plain number of seconds, or Go's ``time.ParseDuration`` form
    (``1h30m``, ``3m``, ``500ms``, ``15s``)."""
    text = value.strip().lower()
    try:
        number = float(text)
    except ValueError:
        number = _go_duration(text, value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return number


def _go_duration(text: str, original: str) -> float:
    total = 0.0
    rest = text
    if not rest:
        raise argparse.ArgumentTypeError(f"invalid duration {original!r}")
    while rest:
        digits = 0
        while digits < len(rest) and (rest[digits].isdigit() or rest[digits] == "."):
            digits += 1
        unit_end = digits
        while unit_end < len(rest) and not (rest[unit_end].isdigit() or rest[unit_end] == "."):
            unit_end += 1
        number, unit = rest[:digits], rest[digits:unit_end]
        if not number or unit not in _UNITS:
            raise argparse.ArgumentTypeError(f"invalid duration {original!r}")
        try:
            total += float(number) * _UNITS[unit]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid duration {original!r}") from None
        rest = rest[unit_end:]
    return total


def hosts(value: str) -> frozenset[str]:
    """A comma-separated list of ``host[:port]``."""
    found = frozenset(h.strip().lower() for h in value.split(",") if h.strip())
    for host in found:
        if "/" in host or " " in host:
            raise argparse.ArgumentTypeError(f"{host!r} is not host[:port]")
    return found


def csv(value: str) -> tuple[str, ...]:
    """A comma-separated list (empty items dropped)."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def bool_flag(parser: argparse.ArgumentParser, name: str, default: bool, help_text: str) -> None:
    """``--name`` (true), ``--name=false``, ``--name false``: as Go reads booleans."""
    parser.add_argument(
        name,
        nargs="?",
        const=True,
        default=default,
        type=parse_bool,
        metavar="BOOL",
        help=help_text,
    )


def go_style(argv: Sequence[str]) -> list[str]:
    """Rewrite Go ``flag`` spellings into what argparse reads.

    ``-name`` / ``-name=value`` become ``--name`` / ``--name=value`` (Go accepts
    one or two dashes for every flag); klog's ``-v=4`` and ``-v4`` become
    ``--v=4``; ``-h`` stays.  Values (``-5`` after a flag) and everything after
    ``--`` are left alone.
    """
    out: list[str] = []
    after_separator = False
    for arg in argv:
        if after_separator or arg == "--":
            after_separator = True
            out.append(arg)
        elif arg.startswith("-v=") or (arg.startswith("-v") and arg[2:].isdigit()):
            out.append("--v=" + arg[2:].lstrip("="))
        elif len(arg) > 2 and arg[0] == "-" and arg[1].isalpha():
            out.append("-" + arg)
        else:
            out.append(arg)
    return out


def compat_flags(parser: argparse.ArgumentParser, reasons: dict[str, str]) -> None:
    """Flags accepted for drop-in compatibility that have no effect (each with why).

    Any spelling is accepted (``--name``, ``--name=value``, ``--name value``);
    :func:`compat_warnings` then names each one that was given.
    """
    for name in reasons:
        parser.add_argument(name, nargs="?", const="true", default=None, help=argparse.SUPPRESS)


def compat_warnings(args: argparse.Namespace, reasons: dict[str, str]) -> list[str]:
    """One line per compatibility flag the user gave: what it did in Go, why not here."""
    given = []
    for name, why in reasons.items():
        if getattr(args, name.lstrip("-").replace("-", "_"), None) is not None:
            given.append(f"{name} has no effect: {why}")
    return given
