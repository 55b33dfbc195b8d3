"""Which VM or scale set a node is, and how ARM ids compare.

Why: the controller learns a node's VM (availability-set or standalone nodes)
or scale set (``vmss`` node pools) only from ``node.spec.providerID``, which
the Azure cloud provider writes as ``azure://`` + the ARM id of the VM or of
the scale-set instance.  The identity block lives on the VM or on the whole
scale set, so every instance of one scale set maps to the same
:attr:`NodeResource.resource_id`.  ARM compares ids case-insensitively (and
hands back ``resourcegroups`` or ``resourceGroups`` as it pleases), so the
controller compares identity ids only through :func:`normalise_id`.

Anything that is not one of the two Azure forms - another cloud's provider
id, an AKS virtual node (virtual-kubelet), a malformed string - is ``None``:
such a node gets no identity from the controller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "NodeKind",
    "NodeResource",
    "is_identity_id",
    "normalise_id",
    "parse_provider_id",
]

NodeKind = Literal["vm", "vmss"]

_SEGMENT: Final = r"[^/\s]+"
_PROVIDER_ID_RE: Final = re.compile(
    rf"azure:///subscriptions/(?P<sub>{_SEGMENT})/resourcegroups/(?P<rg>{_SEGMENT})"
    r"/providers/microsoft\.compute/"
    rf"(?:virtualmachines/(?P<vm>{_SEGMENT})"
    rf"|virtualmachinescalesets/(?P<vmss>{_SEGMENT})/virtualmachines/(?P<instance>{_SEGMENT}))",
    re.IGNORECASE,
)
_IDENTITY_ID_RE: Final = re.compile(
    rf"/subscriptions/{_SEGMENT}/resourcegroups/{_SEGMENT}/providers/"
    rf"microsoft\.managedidentity/userassignedidentities/{_SEGMENT}",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class NodeResource:
    """The VM, or the scale set and instance, behind one node.

    Fields keep the spelling of the providerID; compare nodes of one scale set
    by :attr:`key` (ARM names are case-insensitive).
    """

    subscription: str
    resource_group: str
    kind: NodeKind
    name: str
    instance_id: str | None = None

    @property
    def resource_id(self) -> str:
        """The ARM id whose ``identity`` block is read and PATCHed: the VM or the scale set."""
        collection = "virtualMachines" if self.kind == "vm" else "virtualMachineScaleSets"
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/{collection}/{self.name}"
        )

    @property
    def key(self) -> str:
        """:attr:`resource_id` normalised: equal for every instance of one scale set."""
        return normalise_id(self.resource_id)


def parse_provider_id(provider_id: str) -> NodeResource | None:
    """The node's VM or scale-set instance, or None for anything else.

    Accepted (segment names in any case, as ARM accepts them)::

        azure:///subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<vm>
        azure:///subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/
            virtualMachineScaleSets/<vmss>/virtualMachines/<instance>
    """
    match = _PROVIDER_ID_RE.fullmatch(provider_id.strip())
    if match is None:
        return None
    if match["vm"] is not None:
        return NodeResource(match["sub"], match["rg"], "vm", match["vm"])
    return NodeResource(match["sub"], match["rg"], "vmss", match["vmss"], match["instance"])


def normalise_id(resource_id: str) -> str:
    """The form in which ARM ids compare: trimmed, one leading ``/``, no trailing ``/``, lower case.

    ARM treats ids case-insensitively (``resourcegroups`` and ``resourceGroups``
    name the same thing); lower case is what aad-pod-identity compared and sent.
    """
    trimmed = resource_id.strip().strip("/")
    return "/" + trimmed.lower() if trimmed else ""


def is_identity_id(value: str) -> bool:
    """True for a user-assigned identity id:
    ``/subscriptions/<sub>/resourcegroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>``
    (any case)."""
    return _IDENTITY_ID_RE.fullmatch(value.strip()) is not None
