"""The identities of each VM and scale set: one coalesced change at a time, no more.

Why: aad-pod-identity made one blocking ARM operation per scale set per
cycle, and a cycle per event — PATCH storms and 429s (#676, #677, #988,
#1139, #1267).  Here every VM or scale set ("machine") has one worker:

* the pods' reconciles only say what a machine needs (:meth:`Machines.need`)
  and touch it; the worker waits :attr:`coalesce` seconds after the first
  touch, so a burst of new pods becomes one change, and never runs two
  changes of one machine at once (the next one takes everything that arrived
  meanwhile);
* a change is computed against the machine's identity block as last seen
  (from the previous PATCH, or a GET when unknown): add what is needed and
  missing; remove what is present, no longer needed by any pod on any node of
  the machine, recorded in the ledger as added by the controller, and not
  immutable (``--immutable-user-msis``, the cluster's own identity);
* nothing is removed before :meth:`Machines.settle` — until the new leader
  has reconciled every pod once, the needs are incomplete, and a removal
  computed from them could take an identity away from a pod that has it;
  settling then visits every machine the ledger names, so an identity whose
  last pod went while no controller ran is removed too;
* at steady state nothing is written and only the drift check reads: every
  ``--identity-assignment-reconcile-interval`` each machine with needs is read
  once, and what an operator removed is put back;
* throttling waits for ``Retry-After``; other failures back off (1 s to 5 min);
  identities ARM refuses (``FailedIdentityOperation``,
  ``LinkedAuthorizationFailed``) are reported to the controller, which tells
  the bindings, and tried again only after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from ..azure.identities import (
    CloudError,
    IdentityClient,
    IdentityFailure,
    IdentityState,
    NotFound,
    Throttled,
)
from ..azure.provider_id import NodeResource, normalise_id
from .ledger import Ledger

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0


@dataclass
class _Machine:
    node: NodeResource  # any node of the machine: what IdentityClient addresses
    needs: Counter[str] = field(default_factory=Counter)  # identity id -> pods needing it
    state: IdentityState | None = None
    state_at: float = 0.0
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    backoff: float = 1.0
    failed: dict[str, tuple[IdentityFailure, float]] = field(default_factory=dict)
    last_error: str = ""
    step: str = ""


Done = Callable[[str, IdentityState], Awaitable[None]]
Failed = Callable[[str, dict[str, IdentityFailure]], Awaitable[None]]
Errored = Callable[[str, str], Awaitable[None]]


async def _no_error_hook(key: str, message: str) -> None:
    return None


class Machines:
    def __init__(
        self,
        *,
        client: IdentityClient,
        ledger: Ledger,
        immutable: Callable[[], frozenset[str]],
        on_done: Done,
        on_failed: Failed,
        coalesce: float = 0.5,
        reconcile_interval: float = 180.0,
        is_acting: Callable[[], bool] = lambda: True,
        on_error: Errored = _no_error_hook,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.immutable = immutable
        self.on_done = on_done
        self.on_failed = on_failed
        self.coalesce = coalesce
        self.reconcile_interval = reconcile_interval
        self.is_acting = is_acting
        self.on_error = on_error
        self._machines: dict[str, _Machine] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.settled = False
        self.patches = 0
        self.reads = 0

    # -- what the controller tells --------------------------------------------------

    def need(self, node: NodeResource, identity: str, delta: int) -> None:
        """``delta`` more (or fewer) pods of the machine need ``identity``."""
        machine = self._machine(node)
        machine.needs[identity] += delta
        if machine.needs[identity] <= 0:
            del machine.needs[identity]
        self.touch(node)

    def present(self, node: NodeResource, identity: str) -> bool:
        machine = self._machines.get(node.key)
        return bool(machine and machine.state and identity in machine.state.user_assigned)

    def status(self, node: NodeResource) -> tuple[str, str]:
        """(what the machine's worker is doing, its last error) — for ``nmi explain``."""
        machine = self._machines.get(node.key)
        return (machine.step, machine.last_error) if machine else ("", "")

    @property
    def idle(self) -> bool:
        """No worker is running or due, and no ledger clean-up is pending."""
        return not self._background and all(
            (m.task is None or m.task.done()) and not m.dirty.is_set()
            for m in self._machines.values()
        )

    def touch(self, node: NodeResource) -> None:
        machine = self._machine(node)
        machine.dirty.set()
        if machine.task is None or machine.task.done():
            machine.task = asyncio.create_task(self._run(node.key), name=f"machine {node.name}")

    def forget(self, node: NodeResource) -> None:
        """The machine has no node any more (a deleted VM, a scale set scaled to zero): stop
        its worker, drop its state and its ledger entry; no ARM call."""
        machine = self._machines.pop(node.key, None)
        if machine is not None and machine.task is not None:
            machine.task.cancel()
        if self.ledger.added(node.resource_id) and self.is_acting():
            task = asyncio.create_task(self._forget_ledger(node), name=f"forget {node.name}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _forget_ledger(self, node: NodeResource) -> None:
        await self._forget_ledger_id(node.resource_id)

    async def _forget_ledger_id(self, resource_id: str) -> None:
        try:
            await self.ledger.record(resource_id, forget=self.ledger.added(resource_id))
        except Exception as exc:  # the next leader's ledger load still has it: harmless
            log.warning("ledger entry of %s not removed: %s", resource_id, exc)

    def settle(self, nodes: Iterable[NodeResource]) -> None:
        """Every pod has been reconciled once: the needs are complete, removals may start.
        Visit every machine the ledger names (through one of its ``nodes``); forget the
        ledger entries of machines that have no node any more."""
        self.settled = True
        by_key = {node.key: node for node in nodes}
        for machine in list(self._machines.values()):
            self.touch(machine.node)
        for resource_id in self.ledger.machines():
            node = by_key.get(normalise_id(resource_id))
            if node is not None:
                self.touch(node)
            elif self.is_acting():
                task = asyncio.create_task(
                    self._forget_ledger_id(resource_id), name="forget a machine"
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def reconcile_all(self) -> None:
        """The drift check: read every machine that has needs, once, and repair it."""
        for machine in list(self._machines.values()):
            machine.state = None  # read fresh
            self.touch(machine.node)

    async def stop(self) -> None:
        tasks = [m.task for m in self._machines.values() if m.task is not None]
        tasks += list(self._background)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._machines.clear()
        self.settled = False

    # -- the worker ---------------------------------------------------------------------

    def _machine(self, node: NodeResource) -> _Machine:
        machine = self._machines.get(node.key)
        if machine is None:
            machine = self._machines[node.key] = _Machine(node=node)
        return machine

    async def _run(self, key: str) -> None:
        while True:
            machine = self._machines.get(key)
            if machine is None or not machine.dirty.is_set():
                return
            await asyncio.sleep(self.coalesce)  # let a burst of changes gather
            machine.dirty.clear()
            if not self.is_acting():
                return
            try:
                await self._pass(machine)
                machine.backoff = 1.0
                machine.last_error = ""
            except Throttled as exc:
                machine.step = f"throttled by ARM, retrying in {exc.retry_after:.0f}s"
                machine.last_error = (
                    f"ARM throttling ({exc.kind}), Retry-After {exc.retry_after:.0f}s"
                )
                await self._tell(key, f"ARM is throttling {exc.kind}s: waiting for Retry-After")
                await asyncio.sleep(max(exc.retry_after, 0.1))
                machine.dirty.set()
            except NotFound as exc:
                machine.last_error = f"{machine.node.resource_id} not found: {exc}"
                log.warning("machine %s: %s", machine.node.name, machine.last_error)
                return
            except (CloudError, OSError) as exc:
                machine.state = None  # read it again before the next change
                machine.last_error = f"{type(exc).__name__}: {exc}"
                machine.step = f"failed, retrying in {machine.backoff:.0f}s"
                log.warning("machine %s: %s", machine.node.name, machine.last_error)
                await self._tell(key, machine.last_error)
                await asyncio.sleep(machine.backoff)
                machine.backoff = min(machine.backoff * 2, MAX_BACKOFF)
                machine.dirty.set()

    async def _tell(self, key: str, message: str) -> None:
        """Report a failure of the machine's worker (the controller annotates the waiting
        assignments, which ``nmi explain`` shows); never fails the worker."""
        try:
            await self.on_error(key, message[:1000])
        except Exception as exc:  # the report is best effort
            log.debug("machine error report failed: %s", exc)

    async def _pass(self, machine: _Machine) -> None:
        node = machine.node
        if machine.state is None or time.monotonic() - machine.state_at > self.reconcile_interval:
            machine.step = f"reading {node.resource_id}"
            self.reads += 1
            machine.state = await self.client.get(node)
            machine.state_at = time.monotonic()
        state = machine.state
        now = time.monotonic()
        needed = set(machine.needs)
        blocked = {i for i, (_, until) in machine.failed.items() if until > now}
        add = needed - state.user_assigned - blocked
        ours = self.ledger.added(node.resource_id)
        remove = (state.user_assigned & ours) - needed - self.immutable() if self.settled else set()
        if add or remove:
            machine.step = f"updating {node.resource_id}: adding {len(add)}, removing {len(remove)}"
            await self.ledger.record(node.resource_id, add=add)
            self.patches += 1
            result = await self.client.update(node, add=add, remove=remove, current=state)
            if result.state is not None:
                machine.state = result.state
                machine.state_at = time.monotonic()
            await self.ledger.record(node.resource_id, forget=set(result.removed))
            if result.failed:
                for identity, failure in result.failed.items():
                    previous = machine.failed.get(identity)
                    backoff = 60.0 if previous is None else min(MAX_BACKOFF, 2 * 60.0)
                    machine.failed[identity] = (failure, time.monotonic() + backoff)
                await self.on_failed(node.key, dict(result.failed))
            if result.unapplied:
                machine.dirty.set()
        for identity in [i for i in machine.failed if i in machine.state.user_assigned]:
            del machine.failed[identity]
        machine.step = ""
        await self.on_done(node.key, machine.state)
