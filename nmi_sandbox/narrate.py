"""The sandbox's narrator: prints the seed's process as it happens.

The demonstration creates an AzureIdentity, a binding and a pod and lets the
controller and nmi do the rest; this watches the emulated API server and ARM
(what ``kubectl get azureassignedidentities -w`` and the portal's identity
blade would show) and prints each step once, with the seconds since the
start: an assignment ``Created`` (and what it waits on), the identity added
to the node's scale set, ``Assigned``, deleted, the identity removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from .world import LoopbackWorld

GV = "aadpodidentity.k8s.io/v1"
STEP = "aadpodidentity.k8s.io/mic-step"


class Narrator:
    def __init__(self, world: LoopbackWorld, *, out: Callable[[str], None] = print) -> None:
        self.world = world
        self.out = out
        self.started = time.monotonic()
        self._assignments: dict[str, str] = {}
        self._on_vmss: set[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        """Print a step of the demonstration itself, after what the world shows until now."""
        self._look()
        self._print(text)

    def _print(self, text: str) -> None:
        line = f"  [{time.monotonic() - self.started:6.2f}s] {text}"
        self.lines.append(text)
        self.out(line)

    def start(self) -> None:
        self._look()
        self._task = asyncio.create_task(self._run(), name="narrator")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._look()

    async def _run(self) -> None:
        while True:
            self._look()
            await asyncio.sleep(0.02)  # a view of two emulators' state, not a wait on it

    def _look(self) -> None:
        """Print what changed since the last look, in causal order when several things did:
        identities added to the scale set (they precede ``Assigned``), then the assignments,
        then identities removed (they follow a deletion)."""
        w = self.world
        vmss = w.vmss_id.rsplit("/", 1)[-1]
        on_vmss = {i.rsplit("/", 1)[-1] for i in w.arm.identities_on(w.vmss_id)}
        before = self._on_vmss if self._on_vmss is not None else on_vmss
        patches = w.arm.requests["PATCH vmss"]
        for name in sorted(on_vmss - before):
            self._print(
                f"ARM: identity {name} added to scale set {vmss} "
                f"(PATCH #{patches}, long-running operation followed)"
            )
        seen: dict[str, str] = {}
        for a in w.kube.list(GV, "AzureAssignedIdentity"):
            meta = a["metadata"]
            name = f"{meta['namespace']}/{meta['name']}"
            status = str((a.get("status") or {}).get("status") or "")
            step = (meta.get("annotations") or {}).get(STEP, "")
            seen[name] = status
            if self._assignments.get(name) != status:
                spec = a.get("spec") or {}
                detail = f" ({step})" if step else ""
                self._print(
                    f"controller: AzureAssignedIdentity {name} {status} - pod "
                    f"{spec.get('podNamespace')}/{spec.get('pod')} on node "
                    f"{spec.get('nodename')}{detail}"
                )
        for name in sorted(set(self._assignments) - set(seen)):
            self._print(f"controller: AzureAssignedIdentity {name} deleted")
        self._assignments = seen
        for name in sorted(before - on_vmss):
            self._print(f"ARM: identity {name} removed from scale set {vmss} (PATCH #{patches})")
        self._on_vmss = on_vmss
