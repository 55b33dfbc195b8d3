"""The watches that keep the node's cluster view live.

Scoped as tightly as the API allows: only the pods of this node (field
selector ``spec.nodeName``), only the AzureAssignedIdentities of this node
(label ``nodename``, as MIC writes it), and the identities, bindings and
exceptions that decisions need.  The daemon is ready only once every watch
has completed its first LIST.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from ..config import OperationMode
from .index import ClusterIndex
from .informer import Informer, RawApi
from .objects import (
    GROUP,
    VERSION,
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    Pod,
)

CRD_PREFIX = f"/apis/{GROUP}/{VERSION}"


class ClusterWatch:
    """Runs the informers that feed one :class:`ClusterIndex`."""

    def __init__(
        self, *, api: RawApi, index: ClusterIndex, mode: OperationMode, watch_timeout: int = 290
    ) -> None:
        node = index.node_name
        self.index = index
        common = {"api": api, "watch_timeout": watch_timeout}
        self.informers: list[Informer[object]] = [
            Informer(
                path="/api/v1/pods",
                parse=Pod.parse,
                name="pods",
                field_selector=f"spec.nodeName={node}",
                handler=index.on_pod,
                **common,  # type: ignore[arg-type]
            ),
            Informer(
                path=f"{CRD_PREFIX}/azureidentities",
                parse=AzureIdentity.parse,
                name="azureidentities",
                handler=index.on_identity,
                **common,  # type: ignore[arg-type]
            ),
            Informer(
                path=f"{CRD_PREFIX}/azureidentitybindings",
                parse=AzureIdentityBinding.parse,
                name="azureidentitybindings",
                handler=index.on_binding,
                **common,  # type: ignore[arg-type]
            ),
            Informer(
                path=f"{CRD_PREFIX}/azurepodidentityexceptions",
                parse=AzurePodIdentityException.parse,
                name="azurepodidentityexceptions",
                handler=index.on_exception,
                **common,  # type: ignore[arg-type]
            ),
        ]
        if mode is OperationMode.STANDARD:
            self.informers.append(
                Informer(
                    path=f"{CRD_PREFIX}/azureassignedidentities",
                    parse=AzureAssignedIdentity.parse,
                    name="azureassignedidentities",
                    label_selector=f"nodename={node}",
                    handler=index.on_assigned,
                    **common,  # type: ignore[arg-type]
                )
            )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for informer in self.informers:
            self._tasks.append(asyncio.create_task(informer.run(), name=f"watch-{informer.name}"))

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in self.informers)), timeout)

    def unsynced(self) -> Iterable[str]:
        return (i.name for i in self.informers if not i.synced.is_set())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
