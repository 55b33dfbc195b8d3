"""The controller's cloud configuration (azure.json, env vars, clouds, reload) and node ids."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from nmi.azure.cloud import (
    AZURE_CHINA,
    AZURE_GERMANY,
    AZURE_PUBLIC,
    AZURE_US_GOVERNMENT,
    CloudConfig,
    CloudConfigSource,
    Secret,
    load_cloud_config,
)
from nmi.azure.provider_id import NodeResource, is_identity_id, normalise_id, parse_provider_id
from nmi.config import ConfigError

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SUB = "6f2b3c1e-1d3a-4c55-9a7e-0f4a6b2c9d10"
CLIENT = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d"
KUBELET = "7c6b5a49-3827-4615-a4b3-c2d1e0f9a8b7"
SECRET = "Sp~secret.value-never-shown-1"
ROTATED = "Sp~secret.value-never-shown-2"
RG = "MC_nmi-rg_nmi-aks_westeurope"


def aks(**overrides: Any) -> dict[str, Any]:
    """An azure.json as AKS writes it for a service-principal cluster."""
    document: dict[str, Any] = {
        "cloud": "AzurePublicCloud",
        "tenantId": TENANT,
        "subscriptionId": SUB,
        "aadClientId": CLIENT,
        "aadClientSecret": SECRET,
        "resourceGroup": RG,
        "location": "westeurope",
        "vmType": "vmss",
        "subnetName": "aks-subnet",
        "securityGroupName": "aks-agentpool-12345678-nsg",
        "vnetName": "aks-vnet-12345678",
        "useManagedIdentityExtension": False,
        "useInstanceMetadata": True,
        "loadBalancerSku": "Standard",
    }
    document.update(overrides)
    return {k: v for k, v in document.items() if v is not None}


def write(path: Path, document: Any) -> str:
    path.write_text(document if isinstance(document, str) else json.dumps(document, indent=2))
    return str(path)


def one_line_error(path: str | None, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as raised:
        load_cloud_config(path, environ)
    message = str(raised.value)
    assert "\n" not in message and message
    assert SECRET not in message
    return message


# --------------------------------------------------------------------- azure.json


def test_service_principal_azure_json(tmp_path: Path) -> None:
    config = load_cloud_config(write(tmp_path / "azure.json", aks()), {})
    assert config.cloud == AZURE_PUBLIC
    assert (config.tenant_id, config.subscription_id, config.resource_group) == (TENANT, SUB, RG)
    assert config.vm_type == "vmss" and config.credential_kind == "service_principal"
    assert config.client_id == CLIENT and config.client_secret.reveal() == SECRET
    assert config.arm_endpoint == "https://management.azure.com"
    assert config.authority_host == "https://login.microsoftonline.com"
    assert config.arm_scope == "https://management.azure.com/.default"
    assert config.source == str(tmp_path / "azure.json")
    # The secret shows nowhere: repr, str, describe(), asdict's repr.
    for text in (repr(config), str(config), config.describe(), repr(dataclasses.asdict(config))):
        assert SECRET not in text
    assert "Secret('<redacted>')" in repr(config)
    assert CLIENT not in config.describe() and "5a6b##### REDACTED #####7c8d" in config.describe()


def test_yaml_free_json_details(tmp_path: Path) -> None:
    # A BOM, string booleans, upper-case vmType, empty cloud: all as aad-pod-identity read them.
    raw = "\ufeff" + json.dumps(aks(cloud="", vmType="VMSS", useManagedIdentityExtension="false"))
    config = load_cloud_config(write(tmp_path / "azure.json", raw), {})
    assert config.cloud == AZURE_PUBLIC and config.vm_type == "vmss"
    assert not config.use_managed_identity
    assert load_cloud_config(write(tmp_path / "b.json", aks(vmType=None)), {}).vm_type == "standard"


def test_system_assigned_managed_identity(tmp_path: Path) -> None:
    # AKS writes "msi" placeholders for the client id and secret of a managed-identity cluster.
    document = aks(aadClientId="msi", aadClientSecret="msi", useManagedIdentityExtension=True)
    config = load_cloud_config(write(tmp_path / "azure.json", document), {})
    assert config.credential_kind == "system_assigned" and config.use_managed_identity
    assert config.client_id == "" and not config.client_secret
    assert "system-assigned" in config.describe()


def test_user_assigned_managed_identity(tmp_path: Path) -> None:
    document = aks(
        aadClientId="msi",
        aadClientSecret="msi",
        useManagedIdentityExtension=True,
        userAssignedIdentityID=KUBELET,
        tenantId=None,
    )
    config = load_cloud_config(write(tmp_path / "azure.json", document), {})
    assert config.credential_kind == "user_assigned"
    assert config.user_assigned_identity_id == KUBELET and config.tenant_id == ""
    assert KUBELET not in config.describe()


def test_environment_variables_without_a_file() -> None:
    environ = {
        "CLOUD": "AzureChinaCloud",
        "TENANT_ID": TENANT,
        "CLIENT_ID": CLIENT,
        "CLIENT_SECRET": SECRET,
        "SUBSCRIPTION_ID": SUB,
        "RESOURCE_GROUP": RG,
        "VM_TYPE": "standard",
    }
    config = load_cloud_config(None, environ)
    assert config.cloud == AZURE_CHINA and config.source == "environment"
    assert config.credential_kind == "service_principal" and config.vm_type == "standard"
    assert config.client_secret == Secret(SECRET) and config.resource_group == RG
    assert load_cloud_config("", environ) == config  # an empty --cloudconfig is no file

    msi = {"SUBSCRIPTION_ID": SUB, "USE_MSI": "True", "USER_ASSIGNED_MSI_CLIENT_ID": KUBELET}
    config = load_cloud_config(None, msi)
    assert config.credential_kind == "user_assigned" and config.cloud == AZURE_PUBLIC
    assert load_cloud_config(None, {**msi, "USE_MSI": "TRUE"}).use_managed_identity
    # aad-pod-identity: strings.EqualFold(USE_MSI, "True") - "1" is not true.
    message = one_line_error(None, {**msi, "USE_MSI": "1"})
    assert "no credential: set CLIENT_ID and CLIENT_SECRET, or USE_MSI=true" in message


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (aks(subscriptionId=None), "subscriptionId is missing"),
        (aks(subscriptionId="  "), "subscriptionId is missing"),
        (aks(aadClientSecret=None), "no credential: set aadClientId and aadClientSecret"),
        (aks(aadClientId="", aadClientSecret=""), "no credential"),
        (aks(tenantId=None), "tenantId is missing (needed for the service principal)"),
        (aks(cloud="AzureMoonCloud"), "unknown cloud 'AzureMoonCloud' (known: AzurePublicCloud"),
        (aks(vmType="vmas"), "vmType 'vmas' is not standard, vmss or vmssflex"),
        (aks(useManagedIdentityExtension="maybe"), "useManagedIdentityExtension must be true"),
        (aks(subscriptionId=42), "subscriptionId must be a string"),
        (aks(resourceManagerEndpoint="http://arm.local"), "must be an https:// URL"),
        (aks(cloud="AzureStackCloud"), "needs AZURE_ENVIRONMENT_FILEPATH"),
        ([1, 2], "not a JSON object"),
        (f'{{"aadClientSecret": "{SECRET}", oops}}', "not valid JSON (Expecting"),
        (f"aadClientSecret: {SECRET}\nsubscriptionId: {SUB}\n", "not valid JSON"),
    ],
)
def test_every_error_is_one_line(tmp_path: Path, document: Any, expected: str) -> None:
    path = write(tmp_path / "azure.json", document)
    message = one_line_error(path, {})
    assert expected in message
    assert message.startswith(("cloud config ", "TLS"))


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    message = one_line_error(str(tmp_path / "absent.json"), {})
    assert "cannot read it" in message
    assert "no credential" in one_line_error(None, {"SUBSCRIPTION_ID": SUB})
    assert "SUBSCRIPTION_ID is missing" in one_line_error(None, {})
    assert "VM_TYPE 'x'" in one_line_error(None, {"SUBSCRIPTION_ID": SUB, "VM_TYPE": "x"})


# -------------------------------------------------------------------------- clouds


@pytest.mark.parametrize(
    ("name", "cloud"),
    [
        ("AzurePublicCloud", AZURE_PUBLIC),
        ("azurepubliccloud", AZURE_PUBLIC),
        ("AzureCloud", AZURE_PUBLIC),
        ("AZUREUSGOVERNMENTCLOUD", AZURE_US_GOVERNMENT),
        ("AzureUSGovernment", AZURE_US_GOVERNMENT),
        ("AzureChinaCloud", AZURE_CHINA),
        ("AzureGermanCloud", AZURE_GERMANY),
    ],
)
def test_named_clouds(tmp_path: Path, name: str, cloud: Any) -> None:
    config = load_cloud_config(write(tmp_path / "azure.json", aks(cloud=name)), {})
    assert config.cloud == cloud


def test_each_clouds_endpoints() -> None:
    table = {
        c.name: (c.arm_endpoint, c.authority_host, c.arm_scope)
        for c in (AZURE_PUBLIC, AZURE_US_GOVERNMENT, AZURE_CHINA, AZURE_GERMANY)
    }
    assert table == {
        "AzurePublicCloud": (
            "https://management.azure.com",
            "https://login.microsoftonline.com",
            "https://management.azure.com/.default",
        ),
        "AzureUSGovernmentCloud": (
            "https://management.usgovcloudapi.net",
            "https://login.microsoftonline.us",
            "https://management.usgovcloudapi.net/.default",
        ),
        "AzureChinaCloud": (
            "https://management.chinacloudapi.cn",
            "https://login.chinacloudapi.cn",
            "https://management.chinacloudapi.cn/.default",
        ),
        "AzureGermanCloud": (
            "https://management.microsoftazure.de",
            "https://login.microsoftonline.de",
            "https://management.microsoftazure.de/.default",
        ),
    }


def test_azure_stack_cloud_from_its_environment_file(tmp_path: Path) -> None:
    environment = {
        "name": "AzureStackCloud",
        "managementPortalURL": "https://portal.local.azurestack.external/",
        "resourceManagerEndpoint": "https://management.local.azurestack.external/",
        "activeDirectoryEndpoint": "https://login.microsoftonline.com/",
        "serviceManagementEndpoint": "https://management.contoso.onmicrosoft.com/4b2d-a1",
        "tokenAudience": "https://management.contoso.onmicrosoft.com/4b2d-a1",
        "resourceManagerVMDNSSuffix": "cloudapp.local.azurestack.external",
    }
    environ = {"AZURE_ENVIRONMENT_FILEPATH": write(tmp_path / "env.json", environment)}
    path = write(tmp_path / "azure.json", aks(cloud="AzureStackCloud"))
    config = load_cloud_config(path, environ)
    assert config.cloud.name == "AzureStackCloud"
    assert config.arm_endpoint == "https://management.local.azurestack.external"
    assert config.authority_host == "https://login.microsoftonline.com"
    assert config.arm_scope == "https://management.contoso.onmicrosoft.com/4b2d-a1/.default"

    # serviceManagementEndpoint stands in for a missing tokenAudience.
    del environment["tokenAudience"]
    write(tmp_path / "env.json", environment)
    assert load_cloud_config(path, environ).arm_scope == config.arm_scope
    # resourceManagerEndpoint in azure.json wins over the cloud's.
    override = write(
        tmp_path / "o.json",
        aks(cloud="azurestackcloud", resourceManagerEndpoint="https://arm.example:8443/"),
    )
    assert load_cloud_config(override, environ).arm_endpoint == "https://arm.example:8443"

    for key, expected in [
        ("serviceManagementEndpoint", "tokenAudience (or serviceManagementEndpoint) is missing"),
        ("activeDirectoryEndpoint", "activeDirectoryEndpoint is missing"),
        ("resourceManagerEndpoint", "resourceManagerEndpoint is missing"),
    ]:
        del environment[key]
        write(tmp_path / "env.json", environment)
        assert expected in one_line_error(path, environ)
    write(
        tmp_path / "env.json",
        {
            "resourceManagerEndpoint": "http://x",
            "activeDirectoryEndpoint": "https://y",
            "tokenAudience": "z",
        },
    )
    assert "resourceManagerEndpoint must be an https:// URL" in one_line_error(path, environ)
    write(tmp_path / "env.json", "not json")
    assert "AzureStackCloud environment file" in one_line_error(path, environ)
    missing = {"AZURE_ENVIRONMENT_FILEPATH": str(tmp_path / "nope.json")}
    assert "cannot read it" in one_line_error(path, missing)


def test_secret_value_semantics() -> None:
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")
    assert hash(Secret("a")) == hash(Secret("a"))
    assert not Secret("") and Secret("x")
    assert str(Secret("abc")) == repr(Secret("abc")) == "Secret('<redacted>')"
    assert Secret("a").__eq__("a") is NotImplemented


# --------------------------------------------------------------------------- source


class Volume:
    """A Kubernetes Secret volume: ``azure.json -> ..data/azure.json``, ``..data -> ..<stamp>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.path = root / "azure.json"

    def publish(self, document: Any) -> None:
        stamp = self.root / f"..{time.monotonic_ns()}"
        stamp.mkdir()
        write(stamp / "azure.json", document)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, self.root / "..data")  # the atomic swap the kubelet does
        if not self.path.is_symlink():
            self.path.symlink_to("..data/azure.json")


def test_source_picks_up_a_rotated_secret_by_symlink_swap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nmi.azure")
    volume = Volume(tmp_path / "secret")
    volume.publish(aks())
    source = CloudConfigSource(str(volume.path), {})
    first = source.config
    assert source.generation == 0 and not source.reload()  # unchanged: nothing to do

    volume.publish(aks(aadClientSecret=ROTATED))
    assert source.reload()
    assert source.generation == 1 and source.config is not first
    assert source.config.client_secret.reveal() == ROTATED
    assert source.config.changed_fields(first) == ["client_secret"]

    # Republished with the same content: a new inode, the same config - no new generation.
    volume.publish(aks(aadClientSecret=ROTATED))
    assert not source.reload() and source.generation == 1

    logged = caplog.text
    assert "changed: client_secret" in logged
    assert SECRET not in logged and ROTATED not in logged


def test_a_broken_file_keeps_the_old_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "azure.json"
    write(path, aks())
    source = CloudConfigSource(str(path), {})
    good = source.config

    caplog.set_level(logging.WARNING, logger="nmi.azure.cloud")
    write(path, '{"aadClientSecret": "' + ROTATED + '", "subscr')  # half written, in place
    assert not source.reload()
    assert source.config is good and source.generation == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "keeping the previous one" in warnings[0].getMessage()
    assert "not valid JSON" in warnings[0].getMessage()
    assert ROTATED not in caplog.text
    assert not source.reload()  # the same broken file is reported once
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    write(path, aks(subscriptionId=None, aadClientSecret=ROTATED))  # valid JSON, unusable
    assert not source.reload() and source.config is good
    assert "subscriptionId is missing" in caplog.text

    path.unlink()
    assert not source.reload() and source.config is good
    assert "the file is gone" in caplog.text

    write(path, aks(aadClientSecret=ROTATED))
    assert source.reload() and source.config.client_secret == Secret(ROTATED)


def test_an_environment_source_never_changes() -> None:
    source = CloudConfigSource(None, {"SUBSCRIPTION_ID": SUB, "USE_MSI": "true"})
    assert source.path is None and not source.reload()
    assert source.config.credential_kind == "system_assigned"


def test_a_bad_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CloudConfigSource(write(tmp_path / "azure.json", aks(subscriptionId=None)), {})


async def test_the_poller_notices_the_swap(tmp_path: Path) -> None:
    volume = Volume(tmp_path / "secret")
    volume.publish(aks())
    source = CloudConfigSource(str(volume.path), {}, interval=0.02)
    assert await source.refresh() is False
    task = asyncio.create_task(source.run())
    try:
        volume.publish(aks(aadClientSecret=ROTATED))
        config = await asyncio.wait_for(source.wait_changed(0), 5)
        assert config.client_secret == Secret(ROTATED) and source.generation == 1
    finally:
        task.cancel()
    assert isinstance(config, CloudConfig)


# ---------------------------------------------------------------------- provider ids

VM_ID = (
    f"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
    "virtualMachines/aks-agentpool-12345678-0"
)
VMSS_ID = (
    f"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
    "virtualMachineScaleSets/aks-nodepool1-12345678-vmss/virtualMachines/12"
)


def test_parse_a_vm_provider_id() -> None:
    node = parse_provider_id(VM_ID)
    assert node == NodeResource(SUB, RG, "vm", "aks-agentpool-12345678-0")
    assert node.resource_id == VM_ID.removeprefix("azure://")
    assert node.instance_id is None


def test_parse_a_scale_set_instance() -> None:
    node = parse_provider_id(VMSS_ID)
    assert node == NodeResource(SUB, RG, "vmss", "aks-nodepool1-12345678-vmss", "12")
    assert node.resource_id == (
        f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/aks-nodepool1-12345678-vmss"
    )
    other = parse_provider_id(VMSS_ID.replace("/virtualMachines/12", "/virtualMachines/3"))
    assert other is not None and other.key == node.key  # one identity block per scale set


@pytest.mark.parametrize("variant", [str.lower, str.upper, lambda s: f"  {s}\n"])
def test_provider_id_case_and_space_variants(variant: Any) -> None:
    for provider_id in (VM_ID, VMSS_ID):
        node = parse_provider_id(variant(provider_id))
        reference = parse_provider_id(provider_id)
        assert node is not None and reference is not None
        assert node.kind == reference.kind and node.key == reference.key


@pytest.mark.parametrize(
    "provider_id",
    [
        "",
        "aws:///eu-west-1a/i-0123456789abcdef0",
        "gce://project/europe-west1-b/node-1",
        "kind://docker/kind/kind-control-plane",
        # An AKS virtual node (virtual-kubelet on Azure Container Instances).
        "virtual-kubelet://virtual-node-aci-linux",
        f"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/"
        "Microsoft.ContainerInstance/containerGroups/vk",
        # Malformed Azure ids.
        VMSS_ID.rsplit("/virtualMachines/", 1)[0],
        VM_ID + "/extra",
        VMSS_ID + "/",
        VM_ID.replace("azure:///", "azure://"),
        VM_ID.replace("azure://", ""),
        VM_ID.replace("/resourceGroups/" + RG, "/resourceGroups/"),
        VM_ID.replace("virtualMachines", "virtualMachine"),
    ],
)
def test_anything_else_is_none(provider_id: str) -> None:
    assert parse_provider_id(provider_id) is None


def test_normalise_id_and_identity_ids() -> None:
    identity = (
        f"/subscriptions/{SUB}/resourcegroups/nmi-rg/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/app-1"
    )
    upper = identity.upper().replace("RESOURCEGROUPS", "resourceGroups")
    assert normalise_id(identity) == normalise_id(upper) == normalise_id(f" {identity}/ ")
    assert normalise_id(identity.lstrip("/")) == identity.lower()
    assert normalise_id("") == "" and normalise_id("/") == ""
    assert is_identity_id(identity) and is_identity_id(upper)
    assert not is_identity_id(identity + "/x") and not is_identity_id("app-1")
    assert not is_identity_id(identity.replace("ManagedIdentity", "Compute"))
