"""Which iptables the node uses: nf_tables (``nft``) or ``legacy``.

Both kernels' interfaces can hold rules at the same time and each is invisible
to the other's tools, so nmi must write where kube-proxy and the CNI write, or
its jump would sit in a table the packets never see first.  :func:`detect`
follows kubernetes-sigs/iptables-wrappers: a backend that already holds our
chain wins (a previous nmi chose it); otherwise kubelet's/kube-proxy's hint
chains decide; otherwise the backend with more ``KUBE-*`` rules, then more
rules at all; otherwise ``nft``.  Choosing is a pure function
(:func:`choose_backend`) so it can be tested with canned ``iptables-save``
outputs.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from .command import run_command
from .errors import IptablesError
from .ruleset import Ruleset, parse_save

BackendName = Literal["nft", "legacy"]
BACKENDS: tuple[BackendName, ...] = ("nft", "legacy")

#: Chains kubelet/kube-proxy create to mark the backend they use.
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


@dataclass(frozen=True)
class Backend:
    """The commands of one backend."""

    name: BackendName
    save: str
    restore: str

    def save_argv(self) -> list[str]:
        return [self.save]

    def restore_argv(self, *, lock_wait: float) -> list[str]:
        """``iptables-restore -w <s> --noflush``: wait for the xtables lock, never flush tables."""
        seconds = max(1, int(-(-lock_wait // 1)))  # whole seconds, rounded up
        return [self.restore, "-w", str(seconds), "--noflush"]


def backend_named(name: str, *, which: Callable[[str], str | None] = shutil.which) -> Backend:
    """The backend ``name`` ("nft" or "legacy") with the commands found on this machine.

    Prefers ``iptables-<name>-save``/``-restore``; falls back to the plain
    ``iptables-save``/``iptables-restore`` names when the suffixed ones are absent.
    """
    if name not in BACKENDS:
        raise ValueError(f"iptables backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    chosen: BackendName = "nft" if name == "nft" else "legacy"

    def command(verb: str) -> str:
        suffixed = f"iptables-{name}-{verb}"
        return suffixed if which(suffixed) is not None else f"iptables-{verb}"

    return Backend(name=chosen, save=command("save"), restore=command("restore"))


def choose_backend(
    *, nft: Ruleset | None, legacy: Ruleset | None, chains: Collection[str]
) -> BackendName:
    """Pick a backend from both backends' current rules (``None``: that backend is unusable)."""
    if nft is None and legacy is None:
        raise IptablesError("neither the nft nor the legacy iptables backend works here")
    if nft is None:
        return "legacy"
    if legacy is None:
        return "nft"

    def prefer(n: int, lg: int) -> BackendName | None:
        if n == lg:
            return None
        return "nft" if n > lg else "legacy"

    def ours(rs: Ruleset) -> int:
        return int(any(rs.has_chain(chain=c) for c in chains))

    def hinted(rs: Ruleset) -> int:
        return int(any(rs.has_chain(chain=c) for c in HINT_CHAINS))

    def kube_rules(rs: Ruleset) -> int:
        return sum(
            len(rules) if chain.startswith("KUBE-") else sum("KUBE-" in r for r in rules)
            for t in rs.tables.values()
            for chain, rules in t.chains.items()
        )

    for measure in (ours, hinted, kube_rules, Ruleset.rule_count):
        choice = prefer(measure(nft), measure(legacy))
        if choice is not None:
            return choice
    return "nft"


async def detect(
    *,
    chains: Collection[str],
    command_prefix: Sequence[str] = (),
    timeout: float = 30.0,
    which: Callable[[str], str | None] = shutil.which,
) -> Backend:
    """Read both backends (read-only ``iptables-*-save``) and pick one."""
    backends = [backend_named(name, which=which) for name in BACKENDS]

    async def read(backend: Backend) -> Ruleset | None:
        try:
            result = await run_command(
                backend.save_argv(), prefix=command_prefix, timeout=timeout, check=False
            )
        except IptablesError:
            return None
        return parse_save(result.stdout) if result.returncode == 0 else None

    nft, legacy = await asyncio.gather(*(read(b) for b in backends))
    if backends[0].save == backends[1].save:
        # Only the plain names exist: one binary, whichever backend it is.
        legacy = None
    name = choose_backend(nft=nft, legacy=legacy, chains=chains)
    return backends[0] if name == "nft" else backends[1]
