"""What the network-namespace benchmark reads: wrk's report and a server's /proc figures.

``parse_wrk`` turns ``wrk --latency`` output into numbers (requests/s,
percentiles in milliseconds, socket errors, non-2xx replies); the ``/proc``
readers give the resident memory (``VmRSS``/``VmHWM``) and CPU time of a
server's processes, so that every load run can report what it cost the server.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"^\s*([\d.]+)(us|ms|s|m|h)\s*$")
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+(\S+)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(\w+)", re.MULTILINE)
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def duration_ms(text: str) -> float:
    """``'612.00us'`` -> 0.612; wrk's own unit suffixes."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


@dataclass
class WrkReport:
    """The figures of one ``wrk --latency`` run."""

    requests: int
    rps: float
    percentiles_ms: dict[int, float]
    socket_errors: int
    non_2xx: int

    @property
    def p50_ms(self) -> float:
        return self.percentiles_ms[50]

    @property
    def p99_ms(self) -> float:
        return self.percentiles_ms[99]

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def parse_wrk(text: str) -> WrkReport:
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    percentiles = {int(p): duration_ms(v) for p, v in _PERCENTILE.findall(text)}
    if rps is None or total is None or set(percentiles) != {50, 75, 90, 99}:
        raise ValueError(f"unexpected wrk output:\n{text}")
    socket = _SOCKET.search(text)
    non_2xx = _NON_2XX.search(text)
    return WrkReport(
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        percentiles_ms=percentiles,
        socket_errors=sum(int(g) for g in socket.groups()) if socket else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``); 0 if gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far; 0 if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class ProcessGroupStats:
    """Memory and CPU of a server made of one or more processes."""

    pids: list[int] = field(default_factory=list)

    def hwm_mb(self) -> float:
        """Sum of the processes' peak resident set sizes, MiB."""
        return sum(proc_status_kb(p, "VmHWM") for p in self.pids) / 1024

    def rss_mb(self) -> float:
        return sum(proc_status_kb(p, "VmRSS") for p in self.pids) / 1024

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


__all__ = [
    "ProcessGroupStats",
    "WrkReport",
    "children",
    "cpu_seconds",
    "duration_ms",
    "parse_wrk",
    "percentile",
    "proc_status_kb",
]
