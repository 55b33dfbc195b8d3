"""The one exception type of the package.

Callers (the daemon's reconcile loop) need a single thing to catch for "the
iptables machinery said no", carrying the command and its stderr so that the
log line explains itself.  Expected conditions (a chain that does not exist
yet, nothing to delete) are never errors: the package reads the current state
first and only asks for changes that apply to it.
"""

from __future__ import annotations

from collections.abc import Sequence


class IptablesError(Exception):
    """A command of the iptables/conntrack family failed or could not run."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        detail = stderr.strip()
        super().__init__(f"{message}: {detail}" if detail else message)
        self.argv: tuple[str, ...] = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
