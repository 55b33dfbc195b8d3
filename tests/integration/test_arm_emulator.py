"""The ARM emulator against the real Azure SDK.

The controller will run ``azure.mgmt.compute.aio.ComputeManagementClient``
over an ``azure.identity.aio.ClientSecretCredential``; here exactly that
stack - pointed at the Azure AD and ARM emulators, trusting the local CA with
``connection_verify`` - reads VMs and scale sets, PATCHes identity blocks and
follows the long-running operations, so that the emulator is held to what the
SDK really sends and understands.  Raw requests (``send_request`` with the
client's own pipeline, or aiohttp) cover the wire details the models hide.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.core.rest import HttpRequest
from azure.identity.aio import ClientSecretCredential
from azure.mgmt.compute import models
from azure.mgmt.compute.aio import ComputeManagementClient

from nmi_sandbox.aad import AzureAdServer, TokenSigner
from nmi_sandbox.arm import (
    DEFAULT_RESOURCE_GROUP,
    DEFAULT_SUBSCRIPTION,
    SDK_API_VERSION,
    ArmServer,
    UserAssignedIdentity,
)
from nmi_sandbox.imds import ImdsServer
from nmi_sandbox.tls import CertificateAuthority

TENANT = "0b1c2d3e-4f50-4a61-8b72-93a4b5c6d7e8"
CLIENT = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d"
OBJECT_ID = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9"
SECRET = "s3cr3t~value.for-the-emulator"
ARM_SCOPE = "https://management.azure.com/.default"
RG = DEFAULT_RESOURCE_GROUP
SUB = DEFAULT_SUBSCRIPTION
VMSS = "aks-nodepool1-12345678-vmss"
VM = "aks-agentpool-12345678-0"
BOTH = "SystemAssigned, UserAssigned"

# aad-pod-identity's extractIdentitiesFromError pattern (pkg/cloudprovider/cloudprovider.go);
# Go's mid-pattern (?i) becomes re.IGNORECASE for the whole pattern here.
AAD_POD_IDENTITY_PATTERN = re.compile(
    r"'(,?/subscriptions/[a-zA-Z0-9-_]+/resourcegroups/[a-zA-Z0-9-_]+/providers/"
    r"Microsoft.ManagedIdentity/userAssignedIdentities/[a-zA-Z0-9-_]+)+'",
    re.IGNORECASE,
)

ClientFactory = Callable[..., ComputeManagementClient]


def erroneous_ids(message: str) -> list[str]:
    match = AAD_POD_IDENTITY_PATTERN.search(message)
    return [] if match is None else match.group(0)[1:-1].split(",")


def message(exc: HttpResponseError) -> str:
    """``error.message`` of an ARM error as the SDK parsed it."""
    assert exc.error is not None and exc.error.message is not None
    return str(exc.error.message)


def header(exc: HttpResponseError, name: str) -> str:
    """A header of the answer that raised ``exc``."""
    response: Any = exc.response
    assert response is not None
    return str(response.headers[name])


def uai(*identities: UserAssignedIdentity, remove: tuple[UserAssignedIdentity, ...] = ()) -> Any:
    entries: dict[str, Any] = {
        i.resource_id: models.UserAssignedIdentitiesValue() for i in identities
    }
    entries.update({i.resource_id: None for i in remove})
    return entries


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
    server = ArmServer(ca=ca, signers=[aad.signer], operation_duration=0.2)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def ids(arm: ArmServer) -> list[UserAssignedIdentity]:
    return [arm.add_identity(f"ua{i}") for i in range(3)]


@pytest.fixture
async def compute(
    aad: AzureAdServer, arm: ArmServer, ca_bundle: Path
) -> AsyncIterator[ClientFactory]:
    """Build the production stack: async ClientSecretCredential + ComputeManagementClient."""
    opened: list[ComputeManagementClient | ClientSecretCredential] = []

    def factory(**kwargs: Any) -> ComputeManagementClient:
        credential = ClientSecretCredential(
            TENANT, CLIENT, SECRET, authority=aad.url, connection_verify=str(ca_bundle)
        )
        kwargs.setdefault("credential_scopes", [ARM_SCOPE])
        kwargs.setdefault("polling_interval", 0.05)
        client = ComputeManagementClient(
            credential, SUB, base_url=arm.url, connection_verify=str(ca_bundle), **kwargs
        )
        opened.extend([client, credential])
        return client

    yield factory
    for item in opened:
        await item.close()


@pytest.fixture
async def https(ca: CertificateAuthority) -> AsyncIterator[aiohttp.ClientSession]:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def arm_token(aad: AzureAdServer, ca_bundle: Path, scope: str = ARM_SCOPE) -> str:
    async with ClientSecretCredential(
        TENANT, CLIENT, SECRET, authority=aad.url, connection_verify=str(ca_bundle)
    ) as credential:
        return (await credential.get_token(scope)).token


def vmss_path(name: str = VMSS) -> str:
    return (
        f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
        f"virtualMachineScaleSets/{name}"
    )


async def raw_patch(
    client: ComputeManagementClient, path: str, body: Any, api_version: str = SDK_API_VERSION
) -> Any:
    request = HttpRequest("PATCH", f"{path}?api-version={api_version}", json=body)
    response = await client.send_request(request)
    await response.read()
    return response


# ------------------------------------------------------------------- reading


async def test_get_vm_vmss_and_instance_through_the_sdk(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM, identities=[ids[0].resource_id])
    vmss_id = arm.add_vmss(VMSS, instances=3, system_assigned=True)
    client = compute()

    vm = await client.virtual_machines.get(RG, VM)
    assert (vm.id, vm.name, vm.type, vm.location) == (
        vm_id,
        VM,
        "Microsoft.Compute/virtualMachines",
        "westeurope",
    )
    assert vm.identity is not None and vm.identity.type == "UserAssigned"
    assert vm.identity.principal_id is None
    (entry,) = (vm.identity.user_assigned_identities or {}).items()
    assert entry[0] == ids[0].resource_id
    assert (entry[1].client_id, entry[1].principal_id) == (ids[0].client_id, ids[0].principal_id)
    assert vm.properties is not None and vm.properties.provisioning_state == "Succeeded"

    vmss = await client.virtual_machine_scale_sets.get(RG, VMSS)
    assert vmss.id == vmss_id and vmss.sku is not None and vmss.sku.capacity == 3
    assert vmss.identity is not None and vmss.identity.type == "SystemAssigned"
    assert vmss.identity.principal_id and vmss.identity.tenant_id
    assert not vmss.identity.user_assigned_identities

    instance = await client.virtual_machine_scale_set_vms.get(RG, VMSS, "2")
    assert instance.name == f"{VMSS}_2" and instance.instance_id == "2"
    assert instance.id == f"{vmss_id}/virtualMachines/2"
    assert instance.properties is not None and instance.properties.os_profile is not None
    assert instance.properties.os_profile.computer_name == f"{VMSS}000002"

    # What the SDK sent: the api-version it was generated for, a token from the AAD emulator.
    assert set(arm.api_versions) == {SDK_API_VERSION}
    assert arm.requests == {"GET vm": 1, "GET vmss": 1, "GET vmss vm": 1}
    assert {(r.appid, r.oid) for r in arm.log} == {(CLIENT, OBJECT_ID)}

    with pytest.raises(HttpResponseError) as missing:
        await client.virtual_machine_scale_sets.get(RG, "nope")
    assert missing.value.status_code == 404 and missing.value.error is not None
    assert missing.value.error.code == "ResourceNotFound"
    with pytest.raises(HttpResponseError) as no_rg:
        await client.virtual_machines.get("other-rg", VM)
    assert no_rg.value.error is not None and no_rg.value.error.code == "ResourceGroupNotFound"
    with pytest.raises(HttpResponseError) as no_instance:
        await client.virtual_machine_scale_set_vms.get(RG, VMSS, "7")
    assert no_instance.value.status_code == 404


async def test_raw_shapes_headers_and_case_insensitive_paths(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    arm.add_vmss(VMSS, system_assigned=True, identities=[ids[1].resource_id])
    client = compute()
    # ARM matches path segments case-insensitively; 2019-12-01 is aad-pod-identity's version.
    response = await client.send_request(
        HttpRequest("GET", f"{vmss_path().lower()}?api-version=2019-12-01")
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "name",
        "id",
        "type",
        "location",
        "tags",
        "identity",
        "sku",
        "properties",
        "etag",
    }
    assert body["identity"]["type"] == BOTH
    assert set(body["identity"]) == {"type", "principalId", "tenantId", "userAssignedIdentities"}
    assert body["identity"]["userAssignedIdentities"] == {
        ids[1].resource_id: {"principalId": ids[1].principal_id, "clientId": ids[1].client_id}
    }
    assert body["properties"]["provisioningState"] == "Succeeded"
    headers = response.headers
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["x-ms-request-id"])
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["x-ms-correlation-request-id"])
    assert int(headers["x-ms-ratelimit-remaining-subscription-reads"]) > 0
    assert headers["x-ms-ratelimit-remaining-resource"].startswith(
        "Microsoft.Compute/GetVMScaleSet3Min;"
    )


async def test_api_version_and_authentication_errors(
    arm: ArmServer, aad: AzureAdServer, ca_bundle: Path, https: aiohttp.ClientSession
) -> None:
    arm.add_vm(VM)
    url = (
        f"{arm.url}/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
        f"virtualMachines/{VM}"
    )
    token = await arm_token(aad, ca_bundle)

    async def get(query: str, auth: str | None) -> tuple[int, dict[str, Any], Any]:
        headers = {} if auth is None else {"Authorization": auth}
        async with https.get(url + query, headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers

    status, body, headers = await get("?api-version=2019-12-01", f"Bearer {token}")
    assert status == 200 and body["name"] == VM
    assert headers["x-ms-request-id"] and headers["x-ms-correlation-request-id"]

    status, body, _ = await get("", f"Bearer {token}")
    assert (status, body["error"]["code"]) == (400, "MissingApiVersionParameter")
    assert body["error"]["message"] == (
        "The api-version query parameter (?api-version=) is required for all requests."
    )
    status, body, _ = await get("?api-version=2017-03-30", f"Bearer {token}")
    assert (status, body["error"]["code"]) == (400, "NoRegisteredProviderFound")
    assert body["error"]["message"].startswith(
        "No registered resource provider found for location 'westeurope' and API version "
        "'2017-03-30' for type 'virtualMachines'. The supported api-versions are '"
    )
    status, body, _ = await get("?api-version=latest", f"Bearer {token}")
    assert (status, body["error"]["code"]) == (400, "InvalidApiVersionParameter")

    def challenge(h: Any) -> None:
        assert h["WWW-Authenticate"].startswith(
            'Bearer authorization_uri="https://login.windows.net/"'
        )
        assert 'error="invalid_token"' in h["WWW-Authenticate"]

    status, body, headers = await get("?api-version=2019-12-01", None)
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    challenge(headers)
    status, body, headers = await get("?api-version=2019-12-01", f"Basic {token}")
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")

    now = int(time.time())
    claims = {"aud": "https://management.azure.com/", "exp": now + 600, "oid": "x", "tid": TENANT}
    forged = TokenSigner().sign(claims)
    status, body, headers = await get("?api-version=2019-12-01", f"Bearer {forged}")
    assert (status, body["error"]["code"]) == (401, "InvalidAuthenticationToken")
    challenge(headers)
    expired = aad.signer.sign({**claims, "exp": now - 3600})
    status, body, _ = await get("?api-version=2019-12-01", f"Bearer {expired}")
    assert (status, body["error"]["code"]) == (401, "ExpiredAuthenticationToken")
    assert re.match(
        r"The access token expiry UTC time '\d+/\d+/\d{4} \d+:\d\d:\d\d [AP]M'",
        body["error"]["message"],
    )
    classic = aad.signer.sign({**claims, "aud": "https://management.core.windows.net/"})
    status, _, _ = await get("?api-version=2019-12-01", f"Bearer {classic}")
    assert status == 200

    arm.tenant_id = "9e8d7c6b-5a49-4837-a625-14f3e2d1c0b9"
    status, body, headers = await get("?api-version=2019-12-01", f"Bearer {token}")
    assert (status, body["error"]["code"]) == (401, "InvalidAuthenticationTokenTenant")
    assert (
        f"The access token is from the wrong issuer 'https://sts.windows.net/{TENANT}/'"
        in (body["error"]["message"])
    )
    assert arm.outcomes[("GET vm", 401)] == 5


async def test_a_token_for_another_audience_is_refused(
    arm: ArmServer, compute: ClientFactory
) -> None:
    arm.add_vm(VM)
    client = compute(credential_scopes=["https://vault.azure.net/.default"])
    with pytest.raises(ClientAuthenticationError) as refused:
        await client.virtual_machines.get(RG, VM)
    assert refused.value.status_code == 401
    assert refused.value.error is not None
    assert refused.value.error.code == "InvalidAuthenticationTokenAudience"
    assert "wrong audience or resource 'https://vault.azure.net'" in message(refused.value)
    assert 'error="invalid_token"' in header(refused.value, "WWW-Authenticate")
    # The Azure AD emulator writes the scope's resource without the trailing "/" into ``aud``
    # (https://management.azure.com), which ARM accepts as it accepts the "/" form.
    vm = await compute().virtual_machines.get(RG, VM)
    assert vm.name == VM


# ------------------------------------------------------------------- writing


async def test_two_identities_in_one_patch_follow_the_lro(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS, instances=2, system_assigned=True)
    client = compute()
    update = models.VirtualMachineScaleSetUpdate(
        identity=models.VirtualMachineScaleSetIdentity(
            type=BOTH, user_assigned_identities=uai(ids[0], ids[1])
        )
    )
    poller = await client.virtual_machine_scale_sets.begin_update(RG, VMSS, update)

    # The PATCH is accepted; nothing is in effect until the operation succeeds.
    assert arm.patches[-1].body == {
        "identity": {
            "type": BOTH,
            "userAssignedIdentities": {ids[0].resource_id: {}, ids[1].resource_id: {}},
        }
    }
    assert arm.patches[-1].status == 200 and arm.patches[-1].appid == CLIENT
    assert not poller.done()
    assert arm.identities_on(vmss_id) == set()
    assert arm.provisioning_state(vmss_id) == "Updating"
    during = await client.virtual_machine_scale_sets.get(RG, VMSS)
    assert during.properties is not None and during.properties.provisioning_state == "Updating"

    result = await poller.result()
    assert result.identity is not None and result.identity.type == BOTH
    assert set(result.identity.user_assigned_identities or {}) == {
        ids[0].resource_id,
        ids[1].resource_id,
    }
    assert arm.identities_on(vmss_id) == {ids[0].resource_id, ids[1].resource_id}
    assert arm.provisioning_state(vmss_id) == "Succeeded"
    node = arm.provider_id(vmss=VMSS, instance=1)
    assert arm.client_ids_on_node(node) == {ids[0].client_id, ids[1].client_id}
    # One PATCH, status polls until done, then the SDK's final GET of the scale set.
    assert arm.requests["PATCH vmss"] == 1
    assert arm.requests["GET operation"] >= 1
    assert arm.requests["GET vmss"] == 2
    assert arm.operations_in_flight == 0


async def test_patch_answer_and_operation_resource_on_the_wire(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS)
    client = compute()
    body = {
        "identity": {"type": "UserAssigned", "userAssignedIdentities": {ids[0].resource_id: {}}}
    }
    response = await raw_patch(client, vmss_path(), body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["properties"]["provisioningState"] == "Updating"
    assert set(answer["identity"]["userAssignedIdentities"]) == {ids[0].resource_id}
    async_op = response.headers["Azure-AsyncOperation"]
    match = re.fullmatch(
        rf"{re.escape(arm.url)}/subscriptions/{SUB}/providers/Microsoft\.Compute/locations/"
        rf"westeurope/operations/(?P<op>[0-9a-f-]{{36}})\?p=[0-9a-f-]{{36}}&api-version="
        rf"{SDK_API_VERSION}",
        async_op,
    )
    assert match is not None, async_op
    assert response.headers["x-ms-request-id"] == match["op"]
    assert response.headers["Location"] == async_op.replace(
        "&api-version", "&monitor=true&api-version"
    )
    assert response.headers["Azure-AsyncNotification"] == "Enabled"

    status = await client.send_request(HttpRequest("GET", async_op))
    running = status.json()
    assert running["status"] == "InProgress" and running["name"] == match["op"]
    assert set(running) == {"startTime", "status", "name"}
    monitor = await client.send_request(HttpRequest("GET", response.headers["Location"]))
    assert monitor.status_code == 202

    await arm.wait_for(lambda: arm.operations_in_flight == 0)
    done = (await client.send_request(HttpRequest("GET", async_op))).json()
    assert done["status"] == "Succeeded" and set(done) == {"startTime", "endTime", "status", "name"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}\+00:00", done["endTime"])
    assert arm.identities_on(vmss_id) == {ids[0].resource_id}
    assert arm.requests["GET operation"] == 3


async def test_remove_with_null_keeps_the_system_identity(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(
        VMSS, system_assigned=True, identities=[ids[0].resource_id, ids[1].resource_id]
    )
    system = arm.system_identity(vmss_id)
    client = compute()

    update = models.VirtualMachineScaleSetUpdate(
        identity=models.VirtualMachineScaleSetIdentity(
            type=BOTH, user_assigned_identities=uai(remove=(ids[0],))
        )
    )
    result = await (await client.virtual_machine_scale_sets.begin_update(RG, VMSS, update)).result()
    # The SDK model serialises None as JSON null: what ARM needs to remove an identity.
    assert arm.patches[-1].body["identity"]["userAssignedIdentities"] == {ids[0].resource_id: None}
    assert result.identity is not None and result.identity.type == BOTH
    assert set(result.identity.user_assigned_identities or {}) == {ids[1].resource_id}
    assert arm.system_identity(vmss_id) == system
    assert (result.identity.principal_id, result.identity.tenant_id) == system

    # The last one goes the aad-pod-identity way: type without UserAssigned, no map.
    last = models.VirtualMachineScaleSetUpdate(
        identity=models.VirtualMachineScaleSetIdentity(type="SystemAssigned")
    )
    result = await (await client.virtual_machine_scale_sets.begin_update(RG, VMSS, last)).result()
    assert result.identity is not None and result.identity.type == "SystemAssigned"
    assert arm.identities_on(vmss_id) == set() and arm.system_identity(vmss_id) == system

    # Lower-cased ids (as aad-pod-identity sends them) name the same identity.
    lower = models.VirtualMachineUpdate(
        identity=models.VirtualMachineIdentity(
            type="UserAssigned",
            user_assigned_identities={
                ids[2].resource_id.lower(): models.UserAssignedIdentitiesValue()
            },
        )
    )
    vm_id = arm.add_vm(VM)
    await (await client.virtual_machines.begin_update(RG, VM, lower)).result()
    assert arm.identities_on(vm_id) == {ids[2].resource_id}
    assert arm.requests["PATCH vm"] == 1


async def test_unknown_or_failing_identity_fails_the_whole_patch(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS, identities=[ids[0].resource_id])
    client = compute()
    ghost = ids[0].resource_id.replace("/ua0", "/ghost")

    async def add(*identity_ids: str) -> HttpResponseError:
        update = models.VirtualMachineScaleSetUpdate(
            identity=models.VirtualMachineScaleSetIdentity(
                type="UserAssigned",
                user_assigned_identities={
                    i: models.UserAssignedIdentitiesValue() for i in identity_ids
                },
            )
        )
        with pytest.raises(HttpResponseError) as failed:
            await client.virtual_machine_scale_sets.begin_update(RG, VMSS, update)
        return failed.value

    error = await add(ids[1].resource_id, ghost)
    assert error.status_code == 400 and error.error is not None
    assert error.error.code == "FailedIdentityOperation"
    assert message(error) == (
        f"Identity operation for resource '{vmss_id}' failed with error 'Failed to perform "
        "resource identity operation. Status: 'NotFound'. Response: "
        f'\'{{"error":{{"code":"NotFound","message":"Resource \'{ghost}\' was not '
        "found.\"}}'.'."
    )
    assert erroneous_ids(message(error)) == [ghost]

    arm.fail_identity(ids[2].resource_id)
    error = await add(ids[2].resource_id)
    assert error.status_code == 400 and error.error is not None
    assert error.error.code == "FailedIdentityOperation"
    assert erroneous_ids(message(error)) == [ids[2].resource_id]

    # Nothing changed and no operation was started.
    assert arm.identities_on(vmss_id) == {ids[0].resource_id}
    assert arm.operations_in_flight == 0 and arm.requests["GET operation"] == 0
    assert [p.status for p in arm.patches] == [400, 400]

    # Dropping the erroneous id (as aad-pod-identity's retry does) lets the rest through.
    arm.clear_identity_failures()
    update = models.VirtualMachineScaleSetUpdate(
        identity=models.VirtualMachineScaleSetIdentity(
            type="UserAssigned", user_assigned_identities=uai(ids[1], ids[2])
        )
    )
    await (await client.virtual_machine_scale_sets.begin_update(RG, VMSS, update)).result()
    assert arm.identities_on(vmss_id) == {i.resource_id for i in ids}


async def test_linked_authorization_failed_names_the_identities(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    arm.fail_identity(ids[1].resource_id, "LinkedAuthorizationFailed")
    arm.fail_identity(ids[2].resource_id, "LinkedAuthorizationFailed")
    client = compute()
    update = models.VirtualMachineUpdate(
        identity=models.VirtualMachineIdentity(
            type="UserAssigned", user_assigned_identities=uai(*ids)
        )
    )
    with pytest.raises(HttpResponseError) as denied:
        await client.virtual_machines.begin_update(RG, VM, update)
    assert denied.value.status_code == 403 and denied.value.error is not None
    assert denied.value.error.code == "LinkedAuthorizationFailed"
    text = message(denied.value)
    assert text.startswith(
        f"The client '{OBJECT_ID}' with object id '{OBJECT_ID}' has permission to perform action "
        f"'Microsoft.Compute/virtualMachines/write' on scope '{vm_id}'; however, it does not have "
        "permission to perform action 'Microsoft.ManagedIdentity/userAssignedIdentities/"
        "assign/action' on the linked scope(s) '"
    )
    assert text.endswith("' or the linked scope(s) are invalid.")
    assert erroneous_ids(text) == [ids[1].resource_id, ids[2].resource_id]
    assert arm.identities_on(vm_id) == set()


async def test_identity_block_consistency(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS, identities=[ids[0].resource_id])
    client = compute()
    one: dict[str, Any] = {ids[1].resource_id: {}}

    async def refused(body: Any) -> tuple[int, str, str]:
        response = await raw_patch(client, vmss_path(), body)
        error = response.json()["error"]
        return response.status_code, error["code"], error["message"]

    status, code, message = await refused({"identity": {"userAssignedIdentities": one}})
    assert (status, code) == (400, "InvalidRequestContent")
    assert "Required property 'type' not found in JSON. Path 'identity'" in message
    status, code, _ = await refused({"identity": {"type": "Both", "userAssignedIdentities": one}})
    assert (status, code) == (400, "InvalidRequestContent")
    status, code, message = await refused(
        {"identity": {"type": "None", "userAssignedIdentities": one}}
    )
    assert (status, code) == (400, "FailedIdentityOperation")
    assert "a non-UserAssigned identity type should not contain: userAssignedIdentities" in message
    status, code, message = await refused(
        {
            "identity": {
                "type": "UserAssigned",
                "userAssignedIdentities": {ids[1].resource_id: {"clientId": "x"}},
            }
        }
    )
    assert (status, code) == (400, "InvalidIdentityValues")
    assert message.startswith(f"Invalid value for the identities '{ids[1].resource_id}'.")
    status, code, _ = await refused(
        {"identity": {"type": "UserAssigned", "userAssignedIdentities": {"not-an-id": {}}}}
    )
    assert (status, code) == (400, "InvalidParameter")
    status, code, _ = await refused(
        {"identity": {"type": "UserAssigned", "userAssignedIdentities": {ids[0].resource_id: None}}}
    )
    assert (status, code) == (400, "FailedIdentityOperation")

    arm.max_identities = 2
    status, code, message = await refused(
        {
            "identity": {
                "type": "UserAssigned",
                "userAssignedIdentities": {i.resource_id: {} for i in ids},
            }
        }
    )
    assert (status, code) == (400, "InvalidParameter") and "limit of 2" in message

    # The values ARM returned may be sent back unchanged.
    echo = {ids[0].resource_id: {"principalId": ids[0].principal_id, "clientId": ids[0].client_id}}
    response = await raw_patch(
        client, vmss_path(), {"identity": {"type": "UserAssigned", "userAssignedIdentities": echo}}
    )
    assert response.status_code == 200
    assert arm.identities_on(vmss_id) == {ids[0].resource_id}


async def test_an_identity_deleted_while_assigned_blocks_updates(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS, identities=[ids[0].resource_id])
    arm.delete_identity(ids[0].resource_id)
    client = compute()
    add = models.VirtualMachineScaleSetUpdate(
        identity=models.VirtualMachineScaleSetIdentity(
            type="UserAssigned", user_assigned_identities=uai(ids[1])
        )
    )
    with pytest.raises(HttpResponseError) as blocked:
        await client.virtual_machine_scale_sets.begin_update(RG, VMSS, add)
    assert blocked.value.error is not None
    assert erroneous_ids(message(blocked.value)) == [ids[0].resource_id]

    repair = models.VirtualMachineScaleSetUpdate(
        identity=models.VirtualMachineScaleSetIdentity(
            type="UserAssigned", user_assigned_identities=uai(ids[1], remove=(ids[0],))
        )
    )
    await (await client.virtual_machine_scale_sets.begin_update(RG, VMSS, repair)).result()
    assert arm.identities_on(vmss_id) == {ids[1].resource_id}


async def test_a_second_patch_preempts_the_running_operation(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    client = compute()

    def adding(identity: UserAssignedIdentity) -> models.VirtualMachineUpdate:
        return models.VirtualMachineUpdate(
            identity=models.VirtualMachineIdentity(
                type="UserAssigned", user_assigned_identities=uai(identity)
            )
        )

    first = await client.virtual_machines.begin_update(RG, VM, adding(ids[0]))
    second = await client.virtual_machines.begin_update(RG, VM, adding(ids[1]))
    with pytest.raises(HttpResponseError) as preempted:
        await first.result()
    assert preempted.value.error is not None
    assert preempted.value.error.code == "OperationPreempted"
    result = await second.result()
    # The second PATCH merged onto the first one's target, as compute's goal state does.
    assert set((result.identity and result.identity.user_assigned_identities) or {}) == {
        ids[0].resource_id,
        ids[1].resource_id,
    }
    assert arm.identities_on(vm_id) == {ids[0].resource_id, ids[1].resource_id}

    arm.concurrent_patches = "conflict"
    running = await client.virtual_machines.begin_update(RG, VM, adding(ids[2]))
    with pytest.raises(HttpResponseError) as conflict:
        await client.virtual_machines.begin_update(RG, VM, adding(ids[2]))
    assert conflict.value.status_code == 409 and conflict.value.error is not None
    assert conflict.value.error.code == "Conflict"
    await running.result()


async def test_a_failed_operation_changes_nothing(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS)
    arm.fail_next_operation()
    client = compute()
    update = models.VirtualMachineScaleSetUpdate(
        identity=models.VirtualMachineScaleSetIdentity(
            type="UserAssigned", user_assigned_identities=uai(ids[0])
        )
    )
    poller = await client.virtual_machine_scale_sets.begin_update(RG, VMSS, update)
    with pytest.raises(HttpResponseError) as failed:
        await poller.result()
    assert failed.value.error is not None and failed.value.error.code == "InternalExecutionError"
    assert arm.identities_on(vmss_id) == set()
    assert arm.provisioning_state(vmss_id) == "Failed"


# ---------------------------------------------------------------- throttling


async def test_429_on_reads_and_writes_separately(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    # retry_total=0: the production controller sees every 429 itself (azure-core would
    # otherwise retry any >= 400 answer carrying Retry-After, PATCH included).
    client = compute(retry_total=0)
    update = models.VirtualMachineUpdate(
        identity=models.VirtualMachineIdentity(
            type="UserAssigned", user_assigned_identities=uai(ids[0])
        )
    )

    arm.throttle("read", 1, retry_after=17)
    with pytest.raises(HttpResponseError) as read:
        await client.virtual_machines.get(RG, VM)
    assert read.value.status_code == 429 and read.value.error is not None
    assert read.value.error.code == "TooManyRequests"
    assert "https://aka.ms/computethrottling" in message(read.value)
    assert header(read.value, "Retry-After") == "17"
    assert header(read.value, "x-ms-ratelimit-remaining-resource").endswith(";0")
    # Writes are not affected by a read throttle.
    poller = await client.virtual_machines.begin_update(RG, VM, update)
    await poller.result()
    assert arm.identities_on(vm_id) == {ids[0].resource_id}

    arm.throttle("write", 1, retry_after=23, code="SubscriptionRequestsThrottled")
    with pytest.raises(HttpResponseError) as write:
        await client.virtual_machines.begin_update(RG, VM, update)
    assert write.value.status_code == 429 and write.value.error is not None
    assert write.value.error.code == "SubscriptionRequestsThrottled"
    assert message(write.value) == (
        f"Number of 'write' requests for subscription '{SUB}' actor '{OBJECT_ID}' exceeded. "
        "Please try again after '23' seconds after additional tasks are completed."
    )
    assert header(write.value, "Retry-After") == "23"
    assert header(write.value, "x-ms-ratelimit-remaining-subscription-writes") == "0"
    assert (await client.virtual_machines.get(RG, VM)).name == VM  # reads still pass
    assert arm.outcomes[("GET vm", 429)] == 1 and arm.outcomes[("PATCH vm", 429)] == 1


async def test_the_sdk_retries_429_with_retry_after_by_itself(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    arm.add_vm(VM)
    seen: list[int] = []
    # raw_response_hook runs after the retry policy: it sees every attempt.
    client = compute(raw_response_hook=lambda r: seen.append(r.http_response.status_code))

    arm.throttle("read", 2, retry_after=0.05)
    assert (await client.virtual_machines.get(RG, VM)).name == VM
    assert seen == [429, 429, 200]
    assert arm.outcomes[("GET vm", 429)] == 2 and arm.outcomes[("GET vm", 200)] == 1

    arm.throttle("write", 1, retry_after=0.05)
    update = models.VirtualMachineUpdate(
        identity=models.VirtualMachineIdentity(
            type="UserAssigned", user_assigned_identities=uai(ids[0])
        )
    )
    await (await client.virtual_machines.begin_update(RG, VM, update)).result()
    assert arm.outcomes[("PATCH vm", 429)] == 1 and arm.outcomes[("PATCH vm", 200)] == 1

    # 5xx: GETs are retried at once (PATCH only on 500, 503 and 504).
    arm.fail_next(1, status=503)
    assert (await client.virtual_machines.get(RG, VM)).name == VM
    assert arm.outcomes[("GET vm", 503)] == 1

    # Per call, retries can be switched off too.
    arm.throttle("read", 1, retry_after=0.05)
    with pytest.raises(HttpResponseError) as once:
        await client.virtual_machines.get(RG, VM, retry_total=0)
    assert once.value.status_code == 429


# ---------------------------------------------------------------- world glue


async def test_out_of_band_changes_and_provider_ids(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vm_id = arm.add_vm(VM)
    vmss_id = arm.add_vmss(VMSS, instances=["0", "10"])
    assert arm.instances(vmss_id) == {"0": f"{VMSS}000000", "10": f"{VMSS}00000a"}
    vm_node = arm.provider_id(vm=VM)
    assert vm_node == (
        f"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
        f"virtualMachines/{VM}"
    )
    vmss_node = arm.provider_id(vmss=VMSS, instance=10)
    assert vmss_node.endswith(f"/virtualMachineScaleSets/{VMSS}/virtualMachines/10")

    arm.set_identities(vmss_id, [ids[0].resource_id, ids[1].resource_id])
    arm.set_identities(vm_id, [ids[2].resource_id], system_assigned=True)
    assert arm.client_ids_on_node(vmss_node) == {ids[0].client_id, ids[1].client_id}
    assert arm.client_ids_on_node(vmss_node.lower()) == {ids[0].client_id, ids[1].client_id}
    assert arm.client_ids_on_node(vm_node) == {ids[2].client_id}
    assert arm.client_ids_on_node(arm.provider_id(vmss=VMSS, instance=3)) == set()
    assert arm.identities_on(f"{vmss_id}/virtualMachines/0") == {
        ids[0].resource_id,
        ids[1].resource_id,
    }

    vmss = await compute().virtual_machine_scale_sets.get(RG, VMSS)
    assert vmss.identity is not None
    assert set(vmss.identity.user_assigned_identities or {}) == {
        ids[0].resource_id,
        ids[1].resource_id,
    }
    with pytest.raises(KeyError):
        arm.set_identities(
            vm_id,
            [
                "/subscriptions/x/resourcegroups/y/providers/Microsoft.ManagedIdentity/userAssignedIdentities/z"
            ],
        )


async def test_imds_serves_an_identity_only_once_arm_shows_it_on_the_node(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    arm.add_vmss(VMSS, instances=2)
    node = arm.provider_id(vmss=VMSS, instance=1)
    imds = ImdsServer(identities_on_node=lambda: arm.client_ids_on_node(node))
    for identity in ids[:2]:
        imds.add_user_assigned(
            client_id=identity.client_id,
            object_id=identity.principal_id,
            resource_id=identity.resource_id,
        )
    await imds.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def token(client_id: str) -> tuple[int, dict[str, Any]]:
                async with http.get(
                    f"{imds.url}/metadata/identity/oauth2/token",
                    params={
                        "api-version": "2018-02-01",
                        "resource": "https://vault.azure.net",
                        "client_id": client_id,
                    },
                    headers={"Metadata": "true"},
                ) as resp:
                    return resp.status, await resp.json()

            not_found = (
                400,
                {"error": "invalid_request", "error_description": "Identity not found"},
            )
            assert await token(ids[0].client_id) == not_found

            update = models.VirtualMachineScaleSetUpdate(
                identity=models.VirtualMachineScaleSetIdentity(
                    type="UserAssigned", user_assigned_identities=uai(ids[0])
                )
            )
            poller = await compute().virtual_machine_scale_sets.begin_update(RG, VMSS, update)
            assert not poller.done()
            assert await token(ids[0].client_id) == not_found  # accepted, not yet in effect
            await poller.result()

            status, body = await token(ids[0].client_id)
            assert status == 200 and body["client_id"] == ids[0].client_id
            assert await token(ids[1].client_id) == not_found
            # Without a selector the node's only identity is served, as IMDS does.
            async with http.get(
                f"{imds.url}/metadata/identity/oauth2/token",
                params={"api-version": "2018-02-01", "resource": "https://vault.azure.net"},
                headers={"Metadata": "true"},
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["client_id"] == ids[0].client_id

            arm.set_identities(arm.provider_id(vmss=VMSS, instance=0), [])
            assert await token(ids[0].client_id) == not_found
    finally:
        await imds.stop()


async def test_wait_for_and_counters(
    arm: ArmServer, ids: list[UserAssignedIdentity], compute: ClientFactory
) -> None:
    vmss_id = arm.add_vmss(VMSS)
    client = compute()
    update = models.VirtualMachineScaleSetUpdate(
        identity=models.VirtualMachineScaleSetIdentity(
            type="UserAssigned", user_assigned_identities=uai(ids[0])
        )
    )
    await client.virtual_machine_scale_sets.begin_update(RG, VMSS, update, polling=False)
    await arm.wait_for(lambda: arm.identities_on(vmss_id) == {ids[0].resource_id})
    assert arm.requests == {"PATCH vmss": 1}
    assert arm.log[-1].key == "PATCH vmss" and arm.log[-1].status == 200
    with pytest.raises(TimeoutError):
        await arm.wait_for(lambda: False, timeout=0.05)
