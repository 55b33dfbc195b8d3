"""The emulated ARM's state: resource ids, identities, and the identity PATCH merge.

Kept apart from the HTTP server so that the rules - which ids are well formed,
how a PATCH of the ``identity`` block merges into what a VM or scale set has,
which error ARM answers for which mistake - read in one place.  See
:mod:`nmi_sandbox.arm` for what is emulated and where the wording comes from.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

__all__ = [
    "COMPUTE_API_VERSIONS",
    "DEFAULT_LOCATION",
    "DEFAULT_RESOURCE_GROUP",
    "DEFAULT_SUBSCRIPTION",
    "DEFAULT_TENANT_ID",
    "SDK_API_VERSION",
    "ArmError",
    "IdentityState",
    "NodeRef",
    "Operation",
    "Resource",
    "UserAssignedIdentity",
    "identity_resource_id",
    "merge_identity",
    "parse_identity_id",
    "parse_node_id",
]

SDK_API_VERSION: Final = "2026-04-01"
"""The ``api-version`` azure-mgmt-compute 39 sends for VMs, scale sets and their instances."""

COMPUTE_API_VERSIONS: Final[tuple[str, ...]] = (
    "2018-06-01",
    "2018-10-01",
    "2019-03-01",
    "2019-07-01",
    "2019-12-01",  # aad-pod-identity's MIC (azure-sdk-for-go compute/mgmt/2019-12-01)
    "2020-06-01",
    "2020-12-01",
    "2021-03-01",
    "2021-04-01",
    "2021-07-01",
    "2021-11-01",
    "2022-03-01",
    "2022-08-01",
    "2022-11-01",
    "2023-03-01",
    "2023-07-01",
    "2023-09-01",
    "2024-03-01",
    "2024-07-01",
    "2024-11-01",
    "2025-04-01",
    "2025-11-01",
    SDK_API_VERSION,
)
"""Microsoft.Compute versions accepted; all use the ``userAssignedIdentities`` map
(versions before 2018-06-01 had an ``identityIds`` list and are not emulated)."""

DEFAULT_SUBSCRIPTION: Final = "6f2b3c1e-1d3a-4c55-9a7e-0f4a6b2c9d10"
DEFAULT_RESOURCE_GROUP: Final = "MC_nmi-rg_nmi-aks_westeurope"
DEFAULT_IDENTITY_RESOURCE_GROUP: Final = "nmi-rg"
DEFAULT_LOCATION: Final = "westeurope"
DEFAULT_TENANT_ID: Final = "72f988bf-86f1-41af-91ab-2d7cd011db47"
"""The tenant of system-assigned identities unless told (the IMDS emulator's default too)."""

ResourceKind = Literal["vm", "vmss"]

_IDENTITY_ID_RE: Final = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/"
    r"microsoft\.managedidentity/userassignedidentities/(?P<name>[^/]+)$",
    re.IGNORECASE,
)
_NODE_ID_RE: Final = re.compile(
    r"^(?:azure://)?/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/"
    r"microsoft\.compute/(?P<type>virtualmachines|virtualmachinescalesets)/(?P<name>[^/]+)"
    r"(?:/virtualmachines/(?P<instance>[^/]+))?/?$",
    re.IGNORECASE,
)
_INVALID_IDENTITY_VALUES: Final = (
    "Invalid value for the identities '{ids}'. The 'UserAssignedIdentities' property keys "
    "should only be empty json objects, null or the resource exisiting property."
)


class UserAssignedIdentity(NamedTuple):
    """A user-assigned managed identity in the registry."""

    resource_id: str
    client_id: str
    principal_id: str


class NodeRef(NamedTuple):
    """What a node's ``providerID`` (or an ARM id) names."""

    subscription: str
    resource_group: str
    kind: ResourceKind
    name: str
    instance: str | None


@dataclass(eq=False)
class ArmError(Exception):
    """An ARM error answer: status, ``error.code``, ``error.message`` (and extras)."""

    status: int
    code: str
    message: str
    target: str | None = None
    details: list[dict[str, Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target is not None:
            error["target"] = self.target
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


@dataclass
class IdentityState:
    """The identity block of a VM or scale set.

    ``user_assigned`` maps the case-folded identity id to the identity as it
    was when assigned (ARM keeps showing an identity deleted since).
    """

    system_assigned: bool = False
    principal_id: str | None = None
    tenant_id: str | None = None
    user_assigned: dict[str, UserAssignedIdentity] = field(default_factory=dict)

    def copy(self) -> IdentityState:
        return IdentityState(
            self.system_assigned, self.principal_id, self.tenant_id, dict(self.user_assigned)
        )

    @property
    def type(self) -> str:
        if self.system_assigned and self.user_assigned:
            return "SystemAssigned, UserAssigned"
        if self.system_assigned:
            return "SystemAssigned"
        if self.user_assigned:
            return "UserAssigned"
        return "None"

    def render(self) -> dict[str, Any] | None:
        """The ``identity`` JSON ARM returns, or None (ARM omits the block) for type None."""
        if not self.system_assigned and not self.user_assigned:
            return None
        block: dict[str, Any] = {"type": self.type}
        if self.system_assigned:
            block["principalId"] = self.principal_id
            block["tenantId"] = self.tenant_id
        if self.user_assigned:
            block["userAssignedIdentities"] = {
                ua.resource_id: {"principalId": ua.principal_id, "clientId": ua.client_id}
                for ua in self.user_assigned.values()
            }
        return block


_COLLECTIONS: Final[dict[str, str]] = {"vm": "virtualMachines", "vmss": "virtualMachineScaleSets"}


@dataclass
class Operation:
    """A compute long-running operation: applies ``target`` to ``resource`` when it ends."""

    id: str
    resource: Resource
    target: IdentityState
    duration: float
    failure: dict[str, str] | None
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    status: str = "InProgress"
    ended: datetime.datetime | None = None
    error: dict[str, str] | None = None
    task: asyncio.Task[None] | None = None

    def finish(self, status: str, error: dict[str, str] | None = None) -> None:
        self.status = status
        self.error = error
        self.ended = datetime.datetime.now(datetime.UTC)

    def render(self) -> dict[str, Any]:
        """The Azure-AsyncOperation resource, as compute writes it."""
        body: dict[str, Any] = {"startTime": dotnet_timestamp(self.started)}
        if self.ended is not None:
            body["endTime"] = dotnet_timestamp(self.ended)
        body["status"] = self.status
        if self.error is not None:
            body["error"] = dict(self.error)
        body["name"] = self.id
        return body


@dataclass
class Resource:
    """A VM or a scale set (with its instances: instance id -> computer name)."""

    kind: ResourceKind
    subscription: str
    resource_group: str
    name: str
    location: str
    identity: IdentityState
    instances: dict[str, str] = field(default_factory=dict)
    vm_size: str = "Standard_D4s_v3"
    provisioning_state: str = "Succeeded"
    etag: int = 1
    unique_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    pending: Operation | None = None

    @property
    def id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/{_COLLECTIONS[self.kind]}/{self.name}"
        )

    def render(self, identity: IdentityState, state: str) -> dict[str, Any]:
        """The GET (or PATCH answer) body with ``identity`` and ``provisioningState``."""
        body: dict[str, Any] = {
            "name": self.name,
            "id": self.id,
            "type": f"Microsoft.Compute/{_COLLECTIONS[self.kind]}",
            "location": self.location,
            "tags": {},
        }
        block = identity.render()
        if block is not None:
            body["identity"] = block
        created = dotnet_timestamp(self.created)
        if self.kind == "vm":
            body["properties"] = {
                "vmId": self.unique_id,
                "hardwareProfile": {"vmSize": self.vm_size},
                "provisioningState": state,
                "timeCreated": created,
            }
        else:
            body["sku"] = {
                "name": self.vm_size,
                "tier": "Standard",
                "capacity": len(self.instances),
            }
            body["properties"] = {
                "singlePlacementGroup": False,
                "orchestrationMode": "Uniform",
                "upgradePolicy": {"mode": "Manual"},
                "provisioningState": state,
                "overprovision": False,
                "uniqueId": self.unique_id,
                "timeCreated": created,
            }
        body["etag"] = f'"{self.etag}"'
        return body

    def render_instance(self, instance: str) -> dict[str, Any]:
        """A scale-set instance (``virtualMachineScaleSets/virtualMachines``)."""
        body: dict[str, Any] = {
            "name": f"{self.name}_{instance}",
            "id": f"{self.id}/virtualMachines/{instance}",
            "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
            "location": self.location,
            "instanceId": instance,
            "sku": {"name": self.vm_size, "tier": "Standard"},
        }
        block = self.identity.render()
        if block is not None:
            body["identity"] = block
        body["properties"] = {
            "latestModelApplied": self.pending is None,
            "vmId": str(uuid.uuid5(uuid.UUID(self.unique_id), instance)),
            "hardwareProfile": {"vmSize": self.vm_size},
            "osProfile": {"computerName": self.instances[instance]},
            "provisioningState": "Succeeded",
            "timeCreated": dotnet_timestamp(self.created),
        }
        return body


def identity_resource_id(subscription: str, resource_group: str, name: str) -> str:
    """``/subscriptions/{sub}/resourcegroups/{rg}/providers/Microsoft.ManagedIdentity/...``.

    The lower-case ``resourcegroups`` is how ARM writes identity ids on VMs and
    scale sets (and how ``az identity show`` prints them).
    """
    return (
        f"/subscriptions/{subscription}/resourcegroups/{resource_group}/providers/"
        f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )


def parse_identity_id(value: str) -> tuple[str, str, str] | None:
    """``(subscription, resource_group, name)`` of a user-assigned identity id, else None."""
    match = _IDENTITY_ID_RE.match(value)
    if match is None:
        return None
    return match["sub"], match["rg"], match["name"]


def parse_node_id(value: str) -> NodeRef:
    """Parse a node ``providerID`` (``azure:///subscriptions/...``) or a VM/VMSS ARM id."""
    match = _NODE_ID_RE.match(value.strip())
    if match is None:
        raise ValueError(f"not a VM or scale-set id: {value!r}")
    kind: ResourceKind = "vmss" if match["type"].casefold() == "virtualmachinescalesets" else "vm"
    if kind == "vm" and match["instance"] is not None:
        raise ValueError(f"not a VM or scale-set id: {value!r}")
    return NodeRef(match["sub"], match["rg"], kind, match["name"], match["instance"])


def dotnet_timestamp(moment: datetime.datetime) -> str:
    """``2024-05-01T10:11:12.1234567+00:00``: how compute writes operation times."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0+00:00"


def dotnet_utc(epoch: float) -> str:
    """``5/1/2024 10:11:12 AM``: how ARM writes times in token errors."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    hour = moment.hour % 12 or 12
    suffix = "AM" if moment.hour < 12 else "PM"
    return (
        f"{moment.month}/{moment.day}/{moment.year} {hour}:{moment.minute:02d}:"
        f"{moment.second:02d} {suffix}"
    )


def invalid_content(detail: str) -> ArmError:
    return ArmError(
        400,
        "InvalidRequestContent",
        f"The request content was invalid and could not be deserialized: '{detail}'.",
    )


def failed_identity_operation(
    resource_id: str, status: str, code: str, message: str, *, http_status: int = 400
) -> ArmError:
    """compute's wrapper around an error of the managed-identity resource provider."""
    inner = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":"))
    return ArmError(
        http_status,
        "FailedIdentityOperation",
        f"Identity operation for resource '{resource_id}' failed with error 'Failed to perform "
        f"resource identity operation. Status: '{status}'. Response: '{inner}'.'.",
    )


def identity_not_found(resource_id: str, identity_id: str) -> ArmError:
    return failed_identity_operation(
        resource_id, "NotFound", "NotFound", f"Resource '{identity_id}' was not found."
    )


def linked_authorization_failed(
    *, caller: str, action: str, resource_id: str, identity_ids: list[str]
) -> ArmError:
    return ArmError(
        403,
        "LinkedAuthorizationFailed",
        f"The client '{caller}' with object id '{caller}' has permission to perform action "
        f"'{action}' on scope '{resource_id}'; however, it does not have permission to perform "
        "action 'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' on the linked "
        f"scope(s) '{','.join(identity_ids)}' or the linked scope(s) are invalid.",
    )


@dataclass(frozen=True)
class InjectedIdentityFailure:
    code: Literal["FailedIdentityOperation", "LinkedAuthorizationFailed"]
    status: int


_IDENTITY_TYPES: Final[dict[frozenset[str], tuple[bool, bool]]] = {
    frozenset({"none"}): (False, False),
    frozenset({"systemassigned"}): (True, False),
    frozenset({"userassigned"}): (False, True),
    frozenset({"systemassigned", "userassigned"}): (True, True),
}


def _parse_type(value: object) -> tuple[bool, bool]:
    """``(system, user)`` of an identity ``type`` (case and spacing insensitive)."""
    if isinstance(value, str):
        parts = frozenset(p.strip().casefold() for p in value.split(","))
        parsed = _IDENTITY_TYPES.get(parts)
        if parsed is not None:
            return parsed
    raise invalid_content(
        f"Error converting value {json.dumps(value)} to type "
        "'Microsoft.Azure.Management.Compute.Models.ResourceIdentityType'. Path 'identity.type'"
    )


def merge_identity(
    current: IdentityState,
    patch: object,
    *,
    resource_id: str,
    resource_type: str,
    caller: str,
    registry: Mapping[str, UserAssignedIdentity],
    failures: Mapping[str, InjectedIdentityFailure],
    limit: int,
    tenant_id: str,
) -> IdentityState:
    """The identity block after PATCHing ``patch`` onto ``current``, or an :class:`ArmError`.

    Merge rules (ARM's): with a ``type`` that includes ``UserAssigned``, entries
    with ``{}`` add, ``null`` remove, unnamed identities stay; a type without
    ``UserAssigned`` drops every user-assigned identity; a type without
    ``SystemAssigned`` drops the system identity.  Checks, in ARM's order: the
    linked-scope authorization of every identity the body assigns (403
    ``LinkedAuthorizationFailed`` naming them all), the body's shape
    (``InvalidRequestContent``, ``InvalidParameter``, ``InvalidIdentityValues``),
    then the managed-identity provider: every identity the resource would have
    must exist (``FailedIdentityOperation`` naming the first that does not - so
    an identity deleted while assigned blocks every update until it is
    removed, as aad-pod-identity#515 saw) and the count must stay within
    ``limit``.
    """
    if not isinstance(patch, dict):
        raise invalid_content(
            f"Error converting value {json.dumps(patch)} to type "
            "'Microsoft.Azure.Management.Compute.Models.VirtualMachineIdentity'. Path 'identity'"
        )
    entries_raw = patch.get("userAssignedIdentities")
    if entries_raw is not None and not isinstance(entries_raw, dict):
        raise invalid_content(
            "Unexpected character encountered while parsing value. "
            "Path 'identity.userAssignedIdentities'"
        )
    entries: dict[str, Any] = dict(entries_raw or {})

    # ARM checks the linked scopes before compute sees the body.
    assigning = [key for key, value in entries.items() if value is not None]
    denied = [
        key
        for key in assigning
        if (f := failures.get(key.casefold())) and f.code == "LinkedAuthorizationFailed"
    ]
    if denied:
        error = linked_authorization_failed(
            caller=caller,
            action=f"Microsoft.Compute/{resource_type}/write",
            resource_id=resource_id,
            identity_ids=denied,
        )
        error.status = failures[denied[0].casefold()].status
        raise error

    if "type" not in patch:
        raise invalid_content("Required property 'type' not found in JSON. Path 'identity'")
    system, user = _parse_type(patch["type"])

    if entries and not user:
        raise failed_identity_operation(
            resource_id,
            "BadRequest",
            "BadRequest",
            "The request format was unexpected, a non-UserAssigned identity type should not "
            "contain: userAssignedIdentities",
        )

    seen: dict[str, str] = {}
    for key, value in entries.items():
        folded = key.casefold()
        if parse_identity_id(key) is None:
            raise ArmError(
                400,
                "InvalidParameter",
                f"ResourceIdentity identityId '{key}' is not a valid reference to a "
                "Microsoft.ManagedIdentity identity.",
                target="resourceIdentity.identityIds",
            )
        if folded in seen:
            raise ArmError(
                400,
                "InvalidParameter",
                f"ResourceIdentity identityId '{key}' cannot be duplicated in the provided "
                "identityIds list.",
                target="resourceIdentity.identityIds",
            )
        seen[folded] = key
        if value is None or value == {}:
            continue
        existing = current.user_assigned.get(folded)
        if (
            isinstance(value, dict)
            and existing is not None
            and value == {"principalId": existing.principal_id, "clientId": existing.client_id}
        ):
            continue
        if isinstance(value, dict):
            raise ArmError(400, "InvalidIdentityValues", _INVALID_IDENTITY_VALUES.format(ids=key))
        raise invalid_content(
            f"Error converting value {json.dumps(value)} to type 'UserAssignedIdentitiesValue'. "
            f"Path 'identity.userAssignedIdentities['{key}']'"
        )

    result = current.copy()
    if system and not current.system_assigned:
        result.principal_id = str(uuid.uuid4())
        result.tenant_id = tenant_id
    elif not system:
        result.principal_id = None
        result.tenant_id = None
    result.system_assigned = system
    if not user:
        result.user_assigned = {}
    else:
        for key, value in entries.items():
            folded = key.casefold()
            if value is None:
                result.user_assigned.pop(folded, None)
            elif folded not in result.user_assigned:
                known = registry.get(folded)
                placeholder = UserAssignedIdentity(key, "", "")
                result.user_assigned[folded] = known or placeholder
        if not result.user_assigned:
            raise failed_identity_operation(
                resource_id,
                "BadRequest",
                "BadRequest",
                "The request format was unexpected : Request requires identities to be assigned.",
            )

    injected = [
        key
        for key in assigning
        if (f := failures.get(key.casefold())) and f.code == "FailedIdentityOperation"
    ]
    if injected:
        error = identity_not_found(resource_id, injected[0])
        error.status = failures[injected[0].casefold()].status
        raise error
    for folded, identity in result.user_assigned.items():
        if folded not in registry:
            raise identity_not_found(resource_id, identity.resource_id)
    if len(result.user_assigned) > limit:
        raise ArmError(
            400,
            "InvalidParameter",
            f"The number of user assigned identities ({len(result.user_assigned)}) for resource "
            f"'{resource_id}' exceeds the limit of {limit}.",
            target="identity.userAssignedIdentities",
        )
    return result
