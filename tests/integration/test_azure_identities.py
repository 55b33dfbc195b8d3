"""IdentityClient against the ARM and Azure AD emulators, with the real async SDK.

The production stack end to end: an azure.json (``AzureStackCloud`` whose
environment file points at the emulators) -> CloudConfigSource ->
CredentialSource (ClientSecretCredential, or ManagedIdentityCredential against
the IMDS emulator) on one shared aiohttp session trusting the local CA ->
ComputeManagementClient -> the ARM emulator, which counts every request, so
"no request while throttled" and "one PATCH per 150 identities" are checked
on the wire.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nmi.azure.cloud import CloudConfigSource
from nmi.azure.credentials import CredentialSource
from nmi.azure.identities import (
    MAX_IDENTITIES_PER_PATCH,
    ArmError,
    AuthenticationFailed,
    IdentityClient,
    IdentityFailure,
    IdentityState,
    NotFound,
    OperationFailed,
    ResourceDeleting,
    Throttled,
    extract_identity_ids,
    parse_retry_after,
)
from nmi.azure.provider_id import NodeResource, normalise_id, parse_provider_id
from nmi_sandbox.aad import AzureAdServer
from nmi_sandbox.arm import ArmServer, UserAssignedIdentity
from nmi_sandbox.imds import ImdsServer
from nmi_sandbox.tls import CertificateAuthority

TENANT = "0b1c2d3e-4f50-4a61-8b72-93a4b5c6d7e8"
CLIENT = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d"
OBJECT_ID = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9"
SECRET = "s3cr3t~first.value-for-the-emulator"
ROTATED = "s3cr3t~second.value-after-rotation"
BOTH = "SystemAssigned, UserAssigned"
VM = "aks-agentpool-12345678-0"
VMSS = "aks-nodepool1-12345678-vmss"

# aad-pod-identity's extractIdentitiesFromError pattern, as tests/integration/test_arm_emulator.py
# ports it: the implementation must find the same ids in the emulator's messages.
AAD_POD_IDENTITY_PATTERN = re.compile(
    r"'(,?/subscriptions/[a-zA-Z0-9-_]+/resourcegroups/[a-zA-Z0-9-_]+/providers/"
    r"Microsoft.ManagedIdentity/userAssignedIdentities/[a-zA-Z0-9-_]+)+'",
    re.IGNORECASE,
)


def ported(message: str) -> list[str]:
    match = AAD_POD_IDENTITY_PATTERN.search(message)
    return [] if match is None else match.group(0)[1:-1].split(",")


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition (re-checked every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@dataclass
class Observed:
    calls: list[tuple[str, float, bool]] = field(default_factory=list)

    def __call__(self, operation: str, seconds: float, error: bool) -> None:
        self.calls.append((operation, seconds, error))

    def names(self) -> list[tuple[str, bool]]:
        return [(op, error) for op, _, error in self.calls]


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def ca_bundle(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca.write_bundle(tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.fixture
async def aad(ca: CertificateAuthority) -> AsyncIterator[AzureAdServer]:
    server = AzureAdServer(ca=ca)
    server.add_app(tenant_id=TENANT, client_id=CLIENT, secrets=[SECRET], object_id=OBJECT_ID)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def arm(ca: CertificateAuthority, aad: AzureAdServer) -> AsyncIterator[ArmServer]:
    server = ArmServer(ca=ca, signers=[aad.signer], operation_duration=0.15)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def ids(arm: ArmServer) -> list[UserAssignedIdentity]:
    return [arm.add_identity(f"ua{i}") for i in range(6)]


@dataclass
class Setup:
    """The files the controller is given: azure.json and the AzureStackCloud environment."""

    directory: Path
    environ: dict[str, str]
    aad: AzureAdServer
    arm: ArmServer

    def document(self, secret: str, **overrides: Any) -> dict[str, Any]:
        return {
            "cloud": "AzureStackCloud",
            "tenantId": TENANT,
            "subscriptionId": "6f2b3c1e-1d3a-4c55-9a7e-0f4a6b2c9d10",
            "resourceGroup": "MC_nmi-rg_nmi-aks_westeurope",
            "vmType": "vmss",
            "aadClientId": CLIENT,
            "aadClientSecret": secret,
            **overrides,
        }

    @property
    def config_path(self) -> Path:
        return self.directory / "azure.json"

    def publish(self, document: dict[str, Any]) -> None:
        """Write azure.json the way the kubelet updates a Secret volume: a new timestamped
        directory, then an atomic swap of the ``..data`` symlink."""
        stamp = self.directory / f"..{time.monotonic_ns()}"
        stamp.mkdir()
        (stamp / "azure.json").write_text(json.dumps(document))
        data = self.directory / "..data"
        tmp = self.directory / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, data)
        if not self.config_path.is_symlink():
            self.config_path.symlink_to("..data/azure.json")


@pytest.fixture
def setup(aad: AzureAdServer, arm: ArmServer, ca_bundle: Path, tmp_path: Path) -> Setup:
    environment = tmp_path / "azurestackcloud.json"
    environment.write_text(
        json.dumps(
            {
                "name": "AzureStackCloud",
                "resourceManagerEndpoint": arm.url + "/",
                "activeDirectoryEndpoint": aad.url + "/",
                "tokenAudience": "https://management.azure.com/",
            }
        )
    )
    volume = tmp_path / "volume"
    volume.mkdir()
    environ = {"AZURE_ENVIRONMENT_FILEPATH": str(environment), "SSL_CERT_FILE": str(ca_bundle)}
    made = Setup(volume, environ, aad, arm)
    made.publish(made.document(SECRET))
    return made


ClientFactory = Callable[..., Awaitable[IdentityClient]]


@pytest.fixture
async def make_client(setup: Setup) -> AsyncIterator[ClientFactory]:
    opened: list[IdentityClient] = []

    async def factory(**kwargs: Any) -> IdentityClient:
        source = kwargs.pop("source", None) or CloudConfigSource(
            str(setup.config_path), setup.environ
        )
        kwargs.setdefault("polling_interval", 0.05)
        kwargs.setdefault("retry_interval", 0.01)
        client = IdentityClient(CredentialSource(source, environ=setup.environ), **kwargs)
        opened.append(client)
        return client

    yield factory
    for client in opened:
        await client.close()


def vm_node(arm: ArmServer, name: str = VM) -> NodeResource:
    node = parse_provider_id(arm.provider_id(vm=name))
    assert node is not None
    return node


def vmss_node(arm: ArmServer, instance: int = 0) -> NodeResource:
    node = parse_provider_id(arm.provider_id(vmss=VMSS, instance=instance))
    assert node is not None
    return node


def keys(*identities: UserAssignedIdentity) -> frozenset[str]:
    return frozenset(normalise_id(i.resource_id) for i in identities)


# ------------------------------------------------------------------- reading


async def test_get_a_vm_and_a_scale_set(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    arm.add_vm(VM, identities=[ids[0].resource_id])
    vmss_id = arm.add_vmss(
        VMSS, instances=3, system_assigned=True, identities=[ids[1].resource_id, ids[2].resource_id]
    )
    observed = Observed()
    client = await make_client(observe=observed)

    vm = await client.get(vm_node(arm))
    assert vm.system_assigned is False and vm.identity_type == "UserAssigned"
    assert vm.user_assigned == keys(ids[0])
    assert vm.provisioning_state == "Succeeded"
    assert vm.spelled == (ids[0].resource_id,)

    # Every instance of a scale set names the scale set itself.
    first, third = vmss_node(arm, 0), vmss_node(arm, 2)
    assert first.key == third.key and first.resource_id == vmss_id
    vmss = await client.get(third)
    assert vmss.resource_id == vmss_id and vmss.identity_type == BOTH
    assert vmss.user_assigned == keys(ids[1], ids[2])

    with pytest.raises(NotFound) as missing:
        await client.get(vm_node(arm, "no-such-vm"))
    assert missing.value.status == 404 and missing.value.code == "ResourceNotFound"

    assert arm.requests == {"GET vm": 2, "GET vmss": 1}
    assert observed.names() == [("vm_get", False), ("vmss_get", False), ("vm_get", True)]
    assert all(seconds >= 0 for _, seconds, _ in observed.calls)
    # The service principal's token, from the Azure AD emulator, for every call.
    assert {(r.appid, r.oid) for r in arm.log} == {(CLIENT, OBJECT_ID)}


async def test_one_session_serves_azure_ad_and_arm(
    setup: Setup, arm: ArmServer, make_client: ClientFactory
) -> None:
    arm.add_vm(VM)
    client = await make_client()
    for _ in range(10):
        await client.get(vm_node(arm))
    credentials = client.credentials
    # One connection to Azure AD, one to ARM, reused: not one per request.
    assert credentials.pool.connections == 2
    assert setup.aad.issued[(CLIENT, "https://management.azure.com")] == 1


# ------------------------------------------------------------------- writing


async def test_add_identities_follows_the_operation_and_keeps_the_system_identity(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS, instances=2, system_assigned=True)
    system = arm.system_identity(vmss_id)
    observed = Observed()
    client = await make_client(observe=observed)

    result = await client.update(
        vmss_node(arm, 1), add=[ids[0].resource_id, ids[1].resource_id], remove=[]
    )
    assert result.complete and result.patches == 1
    assert result.added == keys(ids[0], ids[1]) and result.removed == frozenset()
    assert arm.patches[-1].body == {
        "identity": {
            "type": BOTH,
            "userAssignedIdentities": {ids[0].resource_id: {}, ids[1].resource_id: {}},
        }
    }
    # update() returned once the operation had succeeded: the identities are in effect.
    assert arm.identities_on(vmss_id) == {ids[0].resource_id, ids[1].resource_id}
    assert arm.system_identity(vmss_id) == system
    assert result.state is not None and result.state.identity_type == BOTH
    assert result.state.user_assigned == keys(ids[0], ids[1])
    assert result.state.provisioning_state == "Succeeded"
    # One GET (the current block), one PATCH, status polls - and no final GET of the resource.
    assert arm.requests["GET vmss"] == 1 and arm.requests["PATCH vmss"] == 1
    assert arm.requests["GET operation"] >= 1 and arm.operations_in_flight == 0
    assert observed.names() == [("vmss_get", False), ("vmss_update", False)]

    # Visible to a fresh read; asking again for what is there costs no PATCH.
    again = await client.update(vmss_node(arm), add=[ids[0].resource_id.upper()], remove=[])
    assert again.added == keys(ids[0]) and again.patches == 0
    assert arm.requests["PATCH vmss"] == 1

    # A VM without a system identity gets type UserAssigned.
    vm_id = arm.add_vm(VM)
    await client.update(vm_node(arm), add=[ids[2].resource_id], remove=[])
    assert arm.patches[-1].body["identity"]["type"] == "UserAssigned"
    assert arm.identities_on(vm_id) == {ids[2].resource_id}
    assert arm.system_identity(vm_id) is None


async def test_remove_sends_null_and_the_type_follows(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(
        VMSS, system_assigned=True, identities=[ids[0].resource_id, ids[1].resource_id]
    )
    system = arm.system_identity(vmss_id)
    vm_id = arm.add_vm(VM, identities=[ids[2].resource_id, ids[3].resource_id])
    client = await make_client()

    # Ids compare case-insensitively; the removal names the id as ARM spells it.
    removed = await client.update(vmss_node(arm), add=[], remove=[ids[0].resource_id.lower()])
    assert removed.removed == keys(ids[0]) and removed.patches == 1
    assert arm.patches[-1].body == {
        "identity": {"type": BOTH, "userAssignedIdentities": {ids[0].resource_id: None}}
    }
    assert arm.identities_on(vmss_id) == {ids[1].resource_id}

    # The last user identity: type SystemAssigned, no map; the system identity stays.
    last = await client.update(vmss_node(arm), add=[], remove=[ids[1].resource_id])
    assert last.removed == keys(ids[1])
    assert arm.patches[-1].body == {"identity": {"type": "SystemAssigned"}}
    assert arm.identities_on(vmss_id) == set() and arm.system_identity(vmss_id) == system
    assert last.state is not None and last.state.identity_type == "SystemAssigned"

    # Add and remove in one call: one coalesced PATCH; an id in both lists is kept.
    both = await client.update(
        vm_node(arm),
        add=[ids[4].resource_id, ids[3].resource_id],
        remove=[ids[2].resource_id, ids[3].resource_id, ids[5].resource_id],
    )
    assert both.patches == 1
    assert both.added == keys(ids[3], ids[4])
    assert both.removed == keys(ids[2], ids[5])  # ids[5] was not there: nothing to send
    assert arm.patches[-1].body == {
        "identity": {
            "type": "UserAssigned",
            "userAssignedIdentities": {ids[2].resource_id: None, ids[4].resource_id: {}},
        }
    }
    assert arm.identities_on(vm_id) == {ids[3].resource_id, ids[4].resource_id}

    # Everything off a VM without a system identity: type None.
    await client.update(vm_node(arm), add=[], remove=[ids[3].resource_id, ids[4].resource_id])
    assert arm.patches[-1].body == {"identity": {"type": "None"}}
    assert arm.identities_on(vm_id) == set()

    # Nothing to change: no request at all.
    before = sum(arm.requests.values())
    nothing = await client.update(vm_node(arm), add=[], remove=[])
    assert nothing.patches == 0 and nothing.state is None
    assert sum(arm.requests.values()) == before


async def test_replacing_the_last_identity_never_empties_the_set(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM, identities=[ids[0].resource_id])
    client = await make_client(max_per_patch=1)
    result = await client.update(
        vm_node(arm), add=[ids[1].resource_id], remove=[ids[0].resource_id]
    )
    assert result.complete and result.patches == 2
    # The addition went first: ARM refuses an empty UserAssigned set.
    assert [p.body["identity"]["userAssignedIdentities"] for p in arm.patches] == [
        {ids[1].resource_id: {}},
        {ids[0].resource_id: None},
    ]
    assert arm.identities_on(vm_id) == {ids[1].resource_id}


async def test_320_identities_take_three_patches(
    arm: ArmServer, make_client: ClientFactory
) -> None:
    arm.max_identities = 400
    many = [arm.add_identity(f"bulk{i:03d}") for i in range(320)]
    vm_id = arm.add_vm(VM)
    client = await make_client()

    result = await client.update(vm_node(arm), add=[i.resource_id for i in many], remove=[])
    assert result.complete and result.patches == 3
    assert result.added == keys(*many)
    sizes = [len(p.body["identity"]["userAssignedIdentities"]) for p in arm.patches]
    assert sizes == [MAX_IDENTITIES_PER_PATCH, MAX_IDENTITIES_PER_PATCH, 20]
    assert arm.identities_on(vm_id) == {i.resource_id for i in many}
    assert arm.requests["PATCH vm"] == 3 and arm.requests["GET vm"] == 1

    # Removing all of them is one PATCH: type None drops the whole set.
    cleared = await client.update(vm_node(arm), add=[], remove=[i.resource_id for i in many])
    assert cleared.removed == keys(*many) and cleared.patches == 1
    assert arm.patches[-1].body == {"identity": {"type": "None"}}
    assert arm.identities_on(vm_id) == set()


async def test_failed_identity_operation_applies_the_rest(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS, identities=[ids[0].resource_id])
    arm.fail_identity(ids[2].resource_id)
    observed = Observed()
    client = await make_client(observe=observed)

    result = await client.update(
        vmss_node(arm),
        add=[ids[1].resource_id, ids[2].resource_id, ids[3].resource_id],
        remove=[ids[0].resource_id],
    )
    assert result.added == keys(ids[1], ids[3]) and result.removed == keys(ids[0])
    assert not result.unapplied and not result.complete
    (failure,) = result.failed.items()
    assert failure[0] == normalise_id(ids[2].resource_id)
    assert failure[1].status == 400 and failure[1].code == "FailedIdentityOperation"
    assert failure[1].message.startswith(f"Identity operation for resource '{vmss_id}' failed")
    # The same id aad-pod-identity's pattern finds, and ARM's message as it was.
    assert ported(failure[1].message) == [ids[2].resource_id]
    assert extract_identity_ids(failure[1].message) == [ids[2].resource_id]
    # Two PATCHes: the refused one, then the rest.
    assert [p.status for p in arm.patches] == [400, 200]
    assert set(arm.patches[-1].body["identity"]["userAssignedIdentities"]) == {
        ids[0].resource_id,
        ids[1].resource_id,
        ids[3].resource_id,
    }
    assert arm.identities_on(vmss_id) == {ids[1].resource_id, ids[3].resource_id}
    assert observed.names() == [
        ("vmss_get", False),
        ("vmss_update", True),
        ("vmss_update", False),
    ]


async def test_linked_authorization_failed_names_several_identities(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    arm.fail_identity(ids[1].resource_id, "LinkedAuthorizationFailed")
    arm.fail_identity(ids[2].resource_id, "LinkedAuthorizationFailed")
    client = await make_client()

    result = await client.update(
        vm_node(arm), add=[ids[0].resource_id, ids[1].resource_id, ids[2].resource_id], remove=[]
    )
    assert result.added == keys(ids[0])
    assert set(result.failed) == keys(ids[1], ids[2])
    failure = result.failed[normalise_id(ids[1].resource_id)]
    assert failure.status == 403 and failure.code == "LinkedAuthorizationFailed"
    assert ported(failure.message) == [ids[1].resource_id, ids[2].resource_id]
    # ARM's message names the caller by object id, never by client (application) id.
    assert OBJECT_ID in failure.message and CLIENT not in failure.message
    assert [p.status for p in arm.patches] == [403, 200]
    assert arm.identities_on(vm_id) == {ids[0].resource_id}


async def test_the_retry_budget_and_what_is_left_unapplied(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    # FailedIdentityOperation names one identity at a time.
    arm.fail_identity(ids[0].resource_id)
    arm.fail_identity(ids[1].resource_id)
    add = [ids[0].resource_id, ids[1].resource_id, ids[2].resource_id]

    stingy = await make_client(max_retry=1)
    result = await stingy.update(vm_node(arm), add=add, remove=[])
    assert set(result.failed) == keys(ids[0], ids[1])
    assert result.unapplied == keys(ids[2]) and result.added == frozenset()
    assert [p.status for p in arm.patches] == [400, 400]
    assert arm.identities_on(vm_id) == set()

    arm.patches.clear()
    default = await make_client()  # --update-user-msi-max-retry 2
    result = await default.update(vm_node(arm), add=add, remove=[])
    assert set(result.failed) == keys(ids[0], ids[1]) and result.added == keys(ids[2])
    assert not result.unapplied and result.patches == 3
    assert [p.status for p in arm.patches] == [400, 400, 200]
    assert arm.identities_on(vm_id) == {ids[2].resource_id}

    # Not an identity id at all: reported, never sent.
    bad = await default.update(vm_node(arm), add=["not-an-identity"], remove=[])
    assert bad.failed["/not-an-identity"].code == "InvalidIdentityId"
    assert bad.patches == 0


async def test_failed_operation_deleting_resource_and_concurrent_updates(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS)
    client = await make_client()

    arm.fail_next_operation()
    with pytest.raises(OperationFailed) as failed:
        await client.update(vmss_node(arm), add=[ids[0].resource_id], remove=[])
    assert failed.value.code == "InternalExecutionError" and failed.value.partial is None
    assert arm.identities_on(vmss_id) == set()

    deleting = IdentityState(vmss_id, False, frozenset(), "Deleting")
    patches = arm.requests["PATCH vmss"]
    with pytest.raises(ResourceDeleting):
        await client.update(vmss_node(arm), add=[ids[0].resource_id], remove=[], current=deleting)
    assert arm.requests["PATCH vmss"] == patches

    # Two updates of one scale set at once run one after the other: no OperationPreempted.
    first, second = await asyncio.gather(
        client.update(vmss_node(arm, 0), add=[ids[1].resource_id], remove=[]),
        client.update(vmss_node(arm, 1), add=[ids[2].resource_id], remove=[]),
    )
    assert first.complete and second.complete
    assert arm.identities_on(vmss_id) == {ids[1].resource_id, ids[2].resource_id}


# ---------------------------------------------------------------- throttling


async def test_a_read_429_blocks_reads_but_not_writes(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    observed = Observed()
    client = await make_client(observe=observed)
    node = vm_node(arm)
    current = await client.get(node)

    arm.throttle("read", 1, retry_after=1)
    with pytest.raises(Throttled) as throttled:
        await client.get(node)
    assert throttled.value.kind == "read" and throttled.value.error is not None
    assert throttled.value.error.status == 429 and throttled.value.error.code == "TooManyRequests"
    assert 0 < throttled.value.retry_after <= 1
    # azure-core did not retry the 429 by itself.
    assert arm.outcomes[("GET vm", 429)] == 1 and arm.requests["GET vm"] == 2

    # Blocked: refused at once, without a request.
    with pytest.raises(Throttled) as blocked:
        await client.get(node)
    assert blocked.value.error is None and 0 < blocked.value.retry_after <= 1
    assert arm.requests["GET vm"] == 2
    assert client.throttled_for(node.subscription, "read") > 0
    assert client.throttled_for(node.subscription, "write") == 0

    # Writes go on (the operation's status is read once the read block is over).
    result = await client.update(node, add=[ids[0].resource_id], remove=[], current=current)
    assert result.complete and arm.requests["PATCH vm"] == 1
    assert arm.identities_on(vm_id) == {ids[0].resource_id}

    await eventually(lambda: client.throttled_for(node.subscription, "read") == 0)
    state = await client.get(node)
    assert state.user_assigned == keys(ids[0])
    assert [name for name in observed.names() if name[0] == "vm_get"] == [
        ("vm_get", False),
        ("vm_get", True),
        ("vm_get", True),
        ("vm_get", False),
    ]


async def test_a_throttled_operation_status_is_followed_after_retry_after(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    client = await make_client()
    node = vm_node(arm)
    current = await client.get(node)
    arm.throttle("read", 1, retry_after=0.2)  # the next read is the operation's status
    result = await client.update(node, add=[ids[0].resource_id], remove=[], current=current)
    assert result.complete and arm.identities_on(vm_id) == {ids[0].resource_id}
    assert arm.outcomes[("GET operation", 429)] == 1
    assert arm.outcomes[("GET operation", 200)] >= 1


async def test_a_write_429_blocks_writes_but_not_reads(
    arm: ArmServer, ids: list[UserAssignedIdentity], make_client: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS)
    observed = Observed()
    client = await make_client(observe=observed)
    node = vmss_node(arm)

    arm.throttle("write", 1, retry_after=1, code="SubscriptionRequestsThrottled")
    with pytest.raises(Throttled) as throttled:
        await client.update(node, add=[ids[0].resource_id], remove=[])
    assert throttled.value.kind == "write" and throttled.value.error is not None
    assert throttled.value.error.code == "SubscriptionRequestsThrottled"
    assert arm.outcomes[("PATCH vmss", 429)] == 1

    # Refused at once - not even the GET that would precede the PATCH is sent.
    requests = sum(arm.requests.values())
    with pytest.raises(Throttled) as blocked:
        await client.update(node, add=[ids[0].resource_id], remove=[])
    assert blocked.value.error is None and blocked.value.kind == "write"
    assert sum(arm.requests.values()) == requests

    # Reads go on.
    assert (await client.get(node)).user_assigned == frozenset()

    await eventually(lambda: client.throttled_for(node.subscription, "write") == 0)
    result = await client.update(node, add=[ids[0].resource_id], remove=[])
    assert result.complete and arm.identities_on(vmss_id) == {ids[0].resource_id}
    assert [name for name in observed.names() if name[0] == "vmss_update"] == [
        ("vmss_update", True),
        ("vmss_update", True),
        ("vmss_update", False),
    ]


async def test_server_errors_are_reported_not_retried(
    arm: ArmServer, make_client: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    client = await make_client()
    node = vm_node(arm)

    arm.fail_next(1, status=503)
    with pytest.raises(ArmError) as failed:
        await client.get(node)
    assert failed.value.status == 503 and not isinstance(failed.value, Throttled)
    assert arm.requests["GET vm"] == 1  # azure-core did not retry it
    assert client.throttled_for(node.subscription, "read") == 0

    # A 5xx with Retry-After is ARM asking to wait: reads are blocked like after a 429.
    arm.fail_next(1, status=503, retry_after=1)
    with pytest.raises(Throttled) as throttled:
        await client.get(node)
    assert throttled.value.error is not None and throttled.value.error.status == 503
    assert arm.requests["GET vm"] == 2

    # A PATCH that fails after a successful one: the error carries what was applied.
    arm.max_identities = 400
    many = [arm.add_identity(f"bulk{i:03d}") for i in range(MAX_IDENTITIES_PER_PATCH + 1)]

    def fail_the_second_patch(operation: str, seconds: float, error: bool) -> None:
        if operation == "vm_update" and not error:
            arm.fail_next(1, status=500)  # the next request is the second PATCH

    failing = await make_client(observe=fail_the_second_patch)
    with pytest.raises(ArmError) as second:
        await failing.update(node, add=[i.resource_id for i in many], remove=[])
    assert second.value.status == 500 and arm.outcomes[("PATCH vm", 500)] == 1
    partial = second.value.partial
    assert partial is not None and partial.patches == 2
    assert len(partial.added) == MAX_IDENTITIES_PER_PATCH and len(partial.unapplied) == 1
    assert len(arm.identities_on(vm_id)) == MAX_IDENTITIES_PER_PATCH


# ------------------------------------------------------------ credentials


async def test_a_rotated_secret_is_used_by_the_next_call(
    setup: Setup, arm: ArmServer, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the Azure SDK's included
    arm.add_vm(VM)
    source = CloudConfigSource(str(setup.config_path), setup.environ, interval=0.02)
    client = await make_client(source=source)
    credentials = client.credentials
    await client.get(vm_node(arm))
    first = credentials.generation
    assert first is not None and first.credential.tokens == 1

    # Azure AD now accepts only the new secret; the Secret volume gets it by a symlink swap.
    setup.aad.set_secrets(CLIENT, [ROTATED])
    watcher = asyncio.create_task(source.run())
    try:
        setup.publish(setup.document(ROTATED))
        config = await asyncio.wait_for(source.wait_changed(0), 5)
        assert config.client_secret.reveal() == ROTATED
        assert ROTATED not in repr(config)
    finally:
        watcher.cancel()

    state = await client.get(vm_node(arm))
    assert state.user_assigned == frozenset()
    second = credentials.generation
    assert second is not None and second is not first and second.credential.tokens == 1
    assert first.closed  # the old credential and its ARM client are closed
    assert setup.aad.issued[(CLIENT, "https://management.azure.com")] == 2
    assert arm.requests["GET vm"] == 2

    # Neither secret nor any token (a JWT: "eyJ...") was logged, by nmi or by the SDK.
    assert "new ARM credential" in caplog.text
    assert SECRET not in caplog.text and ROTATED not in caplog.text
    assert "eyJ" not in caplog.text


async def test_a_refused_secret_is_an_authentication_failure(
    setup: Setup, arm: ArmServer, make_client: ClientFactory
) -> None:
    arm.add_vm(VM)
    setup.aad.set_secrets(CLIENT, [ROTATED])  # the file still has the old one
    client = await make_client()
    with pytest.raises(AuthenticationFailed) as refused:
        await client.get(vm_node(arm))
    assert "AADSTS7000215" in str(refused.value)
    # Azure AD's message names the app: its client id is redacted, as in nmi's logs.
    assert SECRET not in str(refused.value)
    assert CLIENT not in str(refused.value)
    assert "5a6b##### REDACTED #####7c8d" in str(refused.value)
    assert arm.requests == {}


async def test_a_user_assigned_managed_identity_as_the_credential(
    setup: Setup,
    aad: AzureAdServer,
    ca: CertificateAuthority,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    imds = ImdsServer()
    arm = ArmServer(ca=ca, signers=[imds.signer], operation_duration=0.1)
    kubelet = arm.add_identity("aks-agentpool", principal_id=OBJECT_ID)
    identity = arm.add_identity("app")
    imds.add_user_assigned(
        client_id=kubelet.client_id, object_id=OBJECT_ID, resource_id=kubelet.resource_id
    )
    await imds.start()
    await arm.start()
    try:
        stack = setup.directory.parent / "imds-stack.json"
        stack.write_text(
            json.dumps(
                {
                    "resourceManagerEndpoint": arm.url,
                    "activeDirectoryEndpoint": aad.url,
                    "tokenAudience": "https://management.azure.com/",
                }
            )
        )
        environ = {**setup.environ, "AZURE_ENVIRONMENT_FILEPATH": str(stack)}
        path = setup.directory.parent / "msi.json"
        document = setup.document(
            "msi",
            aadClientId="msi",
            useManagedIdentityExtension=True,
            userAssignedIdentityID=kubelet.client_id,
        )
        path.write_text(json.dumps(document))
        # azure-identity reads the IMDS address from the environment.
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds.url)
        source = CloudConfigSource(str(path), environ)
        assert source.config.credential_kind == "user_assigned"
        client = IdentityClient(CredentialSource(source, environ=environ), polling_interval=0.05)
        try:
            arm.add_vm(VM)
            await client.update(vm_node(arm), add=[identity.resource_id], remove=[])
            assert arm.identities_on(arm.provider_id(vm=VM)) == {identity.resource_id}
            assert imds.issued[(kubelet.client_id, "https://management.azure.com")] == 1
            assert {r.oid for r in arm.log} == {OBJECT_ID}
        finally:
            await client.close()
    finally:
        await arm.stop()
        await imds.stop()


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Resource '/subscriptions/s-1/resourcegroups/rg_1/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/id-1' was not found.",
            [
                "/subscriptions/s-1/resourcegroups/rg_1/providers/Microsoft.ManagedIdentity/"
                "userAssignedIdentities/id-1"
            ],
        ),
        (
            "on the linked scope(s) '/subscriptions/s/resourceGroups/rg/providers/"
            "microsoft.managedidentity/userassignedidentities/a,/subscriptions/s/resourcegroups/"
            "rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b' or",
            [
                "/subscriptions/s/resourceGroups/rg/providers/microsoft.managedidentity/"
                "userassignedidentities/a",
                "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/"
                "userAssignedIdentities/b",
            ],
        ),
        ("Operation 'x' failed for resource '/subscriptions/s/resourceGroups/rg'.", []),
        ("", []),
    ],
)
def test_extract_identity_ids_as_aad_pod_identity(message: str, expected: list[str]) -> None:
    assert extract_identity_ids(message) == expected
    assert ported(message) == expected


def test_extract_identity_ids_with_a_dotted_resource_group() -> None:
    # Resource-group names may hold '.', '(' and ')'; aad-pod-identity's pattern missed them.
    identity = (
        "/subscriptions/s/resourcegroups/rg.prod(eu)/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/app"
    )
    assert extract_identity_ids(f"Resource '{identity}' was not found.") == [identity]
    assert ported(f"Resource '{identity}' was not found.") == []


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("17") == 17.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("99999") == 3600.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert parse_retry_after(date, now=now) == pytest.approx(30.0)
    assert parse_retry_after(None) is None and parse_retry_after("") is None
    assert parse_retry_after("soon") is None and parse_retry_after("nan") is None


def test_identity_failure_is_a_plain_value() -> None:
    assert IdentityFailure(403, "LinkedAuthorizationFailed", "m") == IdentityFailure(
        403, "LinkedAuthorizationFailed", "m"
    )
