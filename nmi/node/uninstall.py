"""``nmi uninstall``: the one way nmi's interception rules leave a node.

nmi never removes its rules when it stops or crashes (pods must stay refused,
never reach the node's own identity).  Removing nmi from a node for good is a
deliberate act: delete the DaemonSet, then run this on each node (or as a
one-off privileged pod with hostNetwork).  Pods' metadata traffic then goes
to the node's IMDS again.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from iptables import IptablesError, RuleManager, RuleSpec


async def _uninstall(metadata_ip: str, metadata_port: int, backend: str) -> bool:
    # The target is irrelevant for removal: the chains and jumps are found by name.
    spec = RuleSpec(
        metadata_ip=metadata_ip, metadata_port=metadata_port, target_ip="127.0.0.1", target_port=1
    )
    manager = RuleManager(spec, backend=None if backend == "auto" else backend)
    return await manager.uninstall()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="nmi uninstall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metadata-ip", default="169.254.169.254")
    parser.add_argument("--metadata-port", type=int, default=80)
    parser.add_argument("--iptables-backend", default="auto", choices=["auto", "nft", "legacy"])
    args = parser.parse_args(list(argv))
    try:
        removed = asyncio.run(
            _uninstall(args.metadata_ip, args.metadata_port, args.iptables_backend)
        )
    except IptablesError as exc:
        print(f"nmi uninstall: {exc}", file=sys.stderr)
        return 1
    print("interception rules removed" if removed else "no interception rules were installed")
    return 0
