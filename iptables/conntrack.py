"""Forgets connections that were set up before the interception existed.

Conntrack keeps the NAT decision of a flow for the flow's lifetime: a pod's
connection to the metadata address opened before nmi's DNAT went in keeps
reaching the node's real IMDS.  nmi deletes the flows that were never DNATed
(answered by the metadata address itself) after every install and repair —
the filter guard already drops their packets, deleting them makes the client
reconnect through the interception at once — and, with
``--enable-conntrack-deletion``, every flow to the metadata address at
start-up, using the ``conntrack`` tool (conntrack-tools).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from .command import run_command
from .errors import IptablesError

_DELETED = re.compile(r"(\d+) flow entr(?:y|ies) ha(?:s|ve) been deleted")


def conntrack_delete_argv(*, ip: str, port: int, unnatted: bool = False) -> list[str]:
    """``conntrack -D`` of TCP flows whose original destination is ``ip:port``; with
    ``unnatted``, only those still answered by ``ip`` itself (never DNATed to nmi)."""
    family = "ipv6" if ipaddress.ip_address(ip).version == 6 else "ipv4"
    argv = ["conntrack", "-D", "-f", family, "-p", "tcp", "--orig-dst", ip, "--dport", str(port)]
    if unnatted:
        argv += ["--reply-src", ip]
    return argv


def parse_deleted(output: str) -> int | None:
    """The count in conntrack's "N flow entries have been deleted." line, if any."""
    match = _DELETED.search(output)
    return int(match.group(1)) if match else None


async def delete_conntrack(
    *,
    ip: str,
    port: int,
    unnatted: bool = False,
    command_prefix: Sequence[str] = (),
    timeout: float = 30.0,
) -> int:
    """Delete the flows to ``ip:port``/tcp; return how many went.  None found is success."""
    result = await run_command(
        conntrack_delete_argv(ip=ip, port=port, unnatted=unnatted),
        prefix=command_prefix,
        timeout=timeout,
        check=False,
    )
    deleted = parse_deleted(result.stderr + result.stdout)
    if deleted is not None:
        # conntrack exits 1 when it deleted nothing; the message says what happened.
        return deleted
    if result.returncode == 0:
        return 0
    raise IptablesError(
        "conntrack deletion failed",
        argv=result.argv,
        returncode=result.returncode,
        stderr=result.stderr,
    )
