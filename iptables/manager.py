"""Keeps nmi's interception rules in place on the node.

:class:`RuleManager` is the only stateful part of the package.  It reads the
node (``iptables-save``), compares with the rendered template, and when
anything differs writes everything back in ONE ``iptables-restore --noflush``
run, so that pods never see a moment without the DNAT:

* ``install`` on a node that already has exactly our rules (a previous nmi
  left them, by design) changes nothing at all — a restart or an upgrade is
  seamless;
* ``reconcile``/``run`` repair drift (a flushed chain, a deleted or demoted
  jump) the same way;
* ``uninstall`` is the only way the rules go away.

All commands run as child processes (never blocking the event loop), behind
an optional ``command_prefix`` such as ``("ip", "netns", "exec", NS)``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from . import conntrack
from .backend import Backend, backend_named, detect
from .bypass import find_bypasses
from .command import run_command
from .drift import find_drift, snapshot
from .errors import IptablesError
from .rules import RuleSpec, desired_state, render, render_uninstall
from .ruleset import Ruleset, parse_save

log = logging.getLogger(__name__)

#: Extra seconds a command may take beyond waiting for the xtables lock.
_COMMAND_SLACK = 30.0


class ReconcileStatus(enum.StrEnum):
    """Outcome of one reconcile pass."""

    IN_PLACE = "in_place"
    RESTORED = "restored"
    FAILED = "failed"


@dataclass(frozen=True)
class ReconcileResult:
    """What a reconcile pass found and did.

    ``problems`` is the drift found before repairing (empty when in place);
    ``error`` is set when the pass failed.
    """

    status: ReconcileStatus
    problems: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The rules are in place after this pass."""
        return self.status is not ReconcileStatus.FAILED

    @property
    def restored(self) -> bool:
        return self.status is ReconcileStatus.RESTORED

    @property
    def failed(self) -> bool:
        return self.status is ReconcileStatus.FAILED


class RuleManager:
    """Installs, checks, repairs and removes the rules of one :class:`RuleSpec`.

    ``backend``: a :class:`Backend`, ``"nft"``/``"legacy"``, or ``None`` to detect
    it on first use.  ``command_prefix`` is put before every command.
    ``lock_wait``: seconds ``iptables-restore -w`` waits for the xtables lock.
    """

    def __init__(
        self,
        spec: RuleSpec,
        *,
        backend: Backend | str | None = None,
        command_prefix: Sequence[str] = (),
        lock_wait: float = 5.0,
    ) -> None:
        if lock_wait <= 0:
            raise ValueError("lock_wait must be positive")
        self.spec = spec
        self.command_prefix: tuple[str, ...] = tuple(command_prefix)
        self.lock_wait = lock_wait
        self._backend: Backend | None = (
            backend_named(backend) if isinstance(backend, str) else backend
        )
        self._desired = desired_state(spec)
        self._accepted: dict[tuple[str, str], tuple[str, ...]] = {}
        self._lock = asyncio.Lock()
        #: Number of ``iptables-restore`` runs so far (for metrics and tests).
        self.restores = 0

    # -- reading -------------------------------------------------------------

    async def backend(self) -> Backend:
        """The backend in use; detected on first use when none was given."""
        if self._backend is None:
            self._backend = await detect(
                chains=(self.spec.chain, self.spec.guard_chain),
                command_prefix=self.command_prefix,
                timeout=self._timeout,
            )
            log.info("iptables backend: %s", self._backend.name)
        return self._backend

    async def current(self) -> Ruleset:
        """The node's rules now, as ``iptables-save`` prints them."""
        backend = await self.backend()
        result = await run_command(
            backend.save_argv(), prefix=self.command_prefix, timeout=self._timeout
        )
        return parse_save(result.stdout)

    def render(self, *, current: Ruleset | None = None) -> str:
        """The restore input for this spec (see :func:`iptables.rules.render`)."""
        return render(self.spec, current=current)

    async def check(self) -> list[str]:
        """Drift between the node and the spec; empty when the rules are in place."""
        return self._drift(await self.current())

    # -- writing -------------------------------------------------------------

    async def install(self) -> bool:
        """Put the rules in place; ``True`` when anything had to change.

        When the node already holds exactly our rules nothing is written.
        Otherwise one atomic restore fixes everything; a restore that loses a
        race with another writer is retried once from a fresh read.
        """
        async with self._lock:
            current = await self.current()
            if not self._drift(current):
                return False
            await self._repair(current)
            return True

    async def reconcile(self) -> ReconcileResult:
        """Check, and restore when anything drifted.  Never raises for iptables errors."""
        async with self._lock:
            try:
                current = await self.current()
                problems = self._drift(current)
                if not problems:
                    return ReconcileResult(ReconcileStatus.IN_PLACE)
                log.warning("iptables drift: %s", "; ".join(problems))
                await self._repair(current)
                return ReconcileResult(ReconcileStatus.RESTORED, tuple(problems))
            except IptablesError as exc:
                return ReconcileResult(ReconcileStatus.FAILED, error=str(exc))

    async def uninstall(self) -> bool:
        """Remove our jumps and chains; ``True`` when there was anything to remove."""
        async with self._lock:
            text = render_uninstall(self.spec, current=await self.current())
            if not text:
                return False
            await self._restore(text)
            self._accepted.clear()
            return True

    async def run(
        self,
        interval: float,
        on_result: Callable[[ReconcileResult], None] | None = None,
    ) -> NoReturn:
        """Reconcile now and every ``interval`` seconds, forever (cancel to stop).

        Failures become ``FAILED`` results and are retried next time round;
        nothing but cancellation ends the loop.
        """
        if interval <= 0:
            raise ValueError("interval must be positive")
        while True:
            try:
                result = await self.reconcile()
            except Exception as exc:  # a bug must not stop the repairs
                log.exception("iptables reconcile crashed")
                result = ReconcileResult(ReconcileStatus.FAILED, error=repr(exc))
            if result.failed:
                log.error("iptables reconcile failed: %s", result.error)
            if on_result is not None:
                try:
                    on_result(result)
                except Exception:
                    log.exception("iptables on_result callback failed")
            await asyncio.sleep(interval)

    async def delete_conntrack(self, *, ip: str, port: int, unnatted: bool = False) -> int:
        """Delete conntrack flows whose original destination is ``ip:port``/tcp (with
        ``unnatted``: only those that were not DNATed)."""
        return await conntrack.delete_conntrack(
            ip=ip,
            port=port,
            unnatted=unnatted,
            command_prefix=self.command_prefix,
            timeout=self._timeout,
        )

    async def bypasses(self, current: Ruleset | None = None) -> list[str]:
        """Other tools' rules that may take metadata traffic around the DNAT."""
        return find_bypasses(self.spec, current if current is not None else await self.current())

    # -- internals -----------------------------------------------------------

    @property
    def _timeout(self) -> float:
        return self.lock_wait + _COMMAND_SLACK

    def _drift(self, current: Ruleset) -> list[str]:
        return find_drift(self._desired, current, accepted=self._accepted)

    async def _repair(self, current: Ruleset) -> None:
        """One restore from ``current``; re-read and retry once if it did not take."""
        problems: list[str] = []
        for attempt in (1, 2):
            try:
                await self._restore(render(self.spec, current=current))
            except IptablesError:
                if attempt == 2:
                    raise
                current = await self.current()  # somebody changed the tables under us
                continue
            after = await self.current()
            spelled = find_drift(self._desired, after)
            self._accepted = snapshot(self._desired, after)
            problems = self._drift(after)
            if not problems:
                if spelled:
                    log.warning(
                        "iptables prints our rules differently than rendered: %s",
                        "; ".join(spelled),
                    )
                return
            current = after
        raise IptablesError("rules not in place after restore: " + "; ".join(problems))

    async def _restore(self, text: str) -> None:
        backend = await self.backend()
        self.restores += 1
        await run_command(
            backend.restore_argv(lock_wait=self.lock_wait),
            prefix=self.command_prefix,
            stdin=text,
            timeout=self._timeout,
        )
