"""The controller's cloud configuration, read the way AKS hands it over.

Why: the controller talks to Azure Resource Manager as the cluster's own
identity - the service principal or managed identity that AKS writes into
``/etc/kubernetes/azure.json`` (``--cloudconfig``), or, without that file,
the environment variables aad-pod-identity's MIC read (``CLOUD``,
``TENANT_ID``, ``CLIENT_ID``, ``CLIENT_SECRET``, ``SUBSCRIPTION_ID``,
``RESOURCE_GROUP``, ``VM_TYPE``, ``USE_MSI``, ``USER_ASSIGNED_MSI_CLIENT_ID``;
``pkg/cloudprovider/cloudprovider.go``).  The file is JSON; aad-pod-identity
parsed it as YAML (a superset), which only matters for hand-written files: a
YAML-only file is refused with a one-line error.  Clouds are go-autorest's
(``AzurePublicCloud`` when empty, as cloud-provider-azure does;
``AzureUSGovernmentCloud``, ``AzureChinaCloud``, ``AzureGermanCloud``) and
``AzureStackCloud``, whose endpoints come from the JSON file named by
``AZURE_ENVIRONMENT_FILEPATH`` (go-autorest's ``EnvironmentFromFile``).

AKS rotates the service principal's secret by rewriting azure.json (and a
Kubernetes Secret volume is updated by swapping a symlink), so the
configuration is a :class:`CloudConfigSource` that re-reads the file when its
``stat`` changes and keeps the last good configuration when the new file
cannot be used.  The secret is a :class:`Secret`: it never appears in a
``repr``, a ``str`` or a log line.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from ..config import ConfigError
from ..ops.logs import redact_id

__all__ = [
    "AZURE_CHINA",
    "AZURE_GERMANY",
    "AZURE_PUBLIC",
    "AZURE_US_GOVERNMENT",
    "CLOUDS",
    "Cloud",
    "CloudConfig",
    "CloudConfigSource",
    "Secret",
    "VmType",
    "load_cloud_config",
    "resolve_cloud",
]

logger = logging.getLogger(__name__)

VmType = Literal["standard", "vmss", "vmssflex"]

ENVIRONMENT_FILE_VARIABLE: Final = "AZURE_ENVIRONMENT_FILEPATH"
AZURE_STACK: Final = "AzureStackCloud"
_MAX_FILE_BYTES: Final = 1 << 20


class Secret:
    """A string never shown: ``repr`` and ``str`` print a placeholder; :meth:`reveal` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __repr__(self) -> str:
        return "Secret('<redacted>')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class Cloud:
    """One Azure cloud's endpoints, as go-autorest's ``Environment`` names them."""

    name: str
    #: ``resourceManagerEndpoint`` without the trailing ``/``: the compute client's ``base_url``.
    arm_endpoint: str
    #: ``activeDirectoryEndpoint`` without the trailing ``/``: azure-identity's ``authority``.
    authority_host: str
    #: ``tokenAudience``: the ARM audience (``aud`` of the tokens ARM accepts).
    audience: str

    @property
    def arm_scope(self) -> str:
        """The audience + ``/.default``: the scope to ask Azure AD for an ARM token."""
        return self.audience.rstrip("/") + "/.default"


AZURE_PUBLIC: Final = Cloud(
    "AzurePublicCloud",
    "https://management.azure.com",
    "https://login.microsoftonline.com",
    "https://management.azure.com/",
)
AZURE_US_GOVERNMENT: Final = Cloud(
    "AzureUSGovernmentCloud",
    "https://management.usgovcloudapi.net",
    "https://login.microsoftonline.us",
    "https://management.usgovcloudapi.net/",
)
AZURE_CHINA: Final = Cloud(
    "AzureChinaCloud",
    "https://management.chinacloudapi.cn",
    "https://login.chinacloudapi.cn",
    "https://management.chinacloudapi.cn/",
)
AZURE_GERMANY: Final = Cloud(
    "AzureGermanCloud",
    "https://management.microsoftazure.de",
    "https://login.microsoftonline.de",
    "https://management.microsoftazure.de/",
)
CLOUDS: Final[Mapping[str, Cloud]] = {
    "AZUREPUBLICCLOUD": AZURE_PUBLIC,
    "AZURECLOUD": AZURE_PUBLIC,  # the az CLI's name for it
    "AZUREUSGOVERNMENTCLOUD": AZURE_US_GOVERNMENT,
    "AZUREUSGOVERNMENT": AZURE_US_GOVERNMENT,  # the az CLI's name for it
    "AZURECHINACLOUD": AZURE_CHINA,
    "AZUREGERMANCLOUD": AZURE_GERMANY,
}
_KNOWN_NAMES: Final = "AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud, " + (
    f"AzureGermanCloud, {AZURE_STACK}"
)


@dataclass(frozen=True)
class CloudConfig:
    """The validated cloud configuration: where ARM is, which subscription, which credential."""

    cloud: Cloud
    subscription_id: str
    tenant_id: str = ""
    resource_group: str = ""
    vm_type: VmType = "standard"
    #: ``aadClientId``: the service principal (unused with a managed identity).
    client_id: str = ""
    #: ``aadClientSecret``.
    client_secret: Secret = field(default_factory=lambda: Secret(""))
    #: ``useManagedIdentityExtension``: authenticate as the node's managed identity.
    use_managed_identity: bool = False
    #: ``userAssignedIdentityID``: the cluster's own user-assigned identity (client id), which
    #: the controller authenticates as with ``use_managed_identity`` and never removes.
    user_assigned_identity_id: str = ""
    #: Where it came from: the file's path, or ``"environment"``.
    source: str = "environment"

    @property
    def arm_endpoint(self) -> str:
        return self.cloud.arm_endpoint

    @property
    def authority_host(self) -> str:
        return self.cloud.authority_host

    @property
    def arm_scope(self) -> str:
        return self.cloud.arm_scope

    @property
    def credential_kind(self) -> Literal["service_principal", "user_assigned", "system_assigned"]:
        if not self.use_managed_identity:
            return "service_principal"
        return "user_assigned" if self.user_assigned_identity_id else "system_assigned"

    def describe(self) -> str:
        """One log-safe line: no secret, client ids redacted."""
        who = {
            "service_principal": f"service principal {redact_id(self.client_id)}",
            "user_assigned": f"managed identity {redact_id(self.user_assigned_identity_id)}",
            "system_assigned": "the system-assigned managed identity",
        }[self.credential_kind]
        return (
            f"cloud {self.cloud.name} (ARM {self.arm_endpoint}), subscription "
            f"{self.subscription_id}, resource group {self.resource_group or '-'}, vmType "
            f"{self.vm_type}, as {who} (from {self.source})"
        )

    def changed_fields(self, other: CloudConfig) -> list[str]:
        """Names of the fields that differ from ``other`` (never their values)."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


# ----------------------------------------------------------------------------- loading


def load_cloud_config(path: str | None, environ: Mapping[str, str]) -> CloudConfig:
    """Read ``azure.json`` at ``path``, or aad-pod-identity's environment variables without one.

    Raises :class:`~nmi.config.ConfigError` with a one-line message when the
    configuration cannot be used.
    """
    if path:
        return _from_document(_read_json(path, what="cloud config"), path, environ)
    return _from_environment(environ)


def _read_json(path: str, *, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(f"{what} {path}: larger than {_MAX_FILE_BYTES} bytes")
    try:
        document = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        # The position only: the text may hold the secret.
        raise ConfigError(
            f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(document, dict):
        raise ConfigError(f"{what} {path}: not a JSON object")
    return document


def _string(document: Mapping[str, Any], key: str, source: str, *, strip: bool = True) -> str:
    value = document.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"cloud config {source}: {key} must be a string")
    return value.strip() if strip else value


def _boolean(document: Mapping[str, Any], key: str, source: str) -> bool:
    value = document.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        return value.strip().lower() == "true"
    raise ConfigError(f"cloud config {source}: {key} must be true or false")


def _from_document(
    document: Mapping[str, Any], source: str, environ: Mapping[str, str]
) -> CloudConfig:
    def text(key: str) -> str:
        return _string(document, key, source)

    cloud = resolve_cloud(text("cloud"), environ, source=source)
    override = text("resourceManagerEndpoint")
    if override:
        arm = _https_url(override, f"cloud config {source}: resourceManagerEndpoint")
        cloud = Cloud(cloud.name, arm, cloud.authority_host, cloud.audience)
    return _validated(
        source=source,
        cloud=cloud,
        tenant_id=text("tenantId"),
        subscription_id=text("subscriptionId"),
        resource_group=text("resourceGroup"),
        vm_type=text("vmType"),
        client_id=text("aadClientId"),
        client_secret=_string(document, "aadClientSecret", source, strip=False),
        use_managed_identity=_boolean(document, "useManagedIdentityExtension", source),
        user_assigned_identity_id=text("userAssignedIdentityID"),
    )


def _from_environment(environ: Mapping[str, str]) -> CloudConfig:
    source = "environment"

    def env(name: str) -> str:
        return environ.get(name, "").strip()

    return _validated(
        source=source,
        cloud=resolve_cloud(env("CLOUD"), environ, source=source),
        tenant_id=env("TENANT_ID"),
        subscription_id=env("SUBSCRIPTION_ID"),
        resource_group=env("RESOURCE_GROUP"),
        vm_type=env("VM_TYPE"),
        client_id=env("CLIENT_ID"),
        client_secret=environ.get("CLIENT_SECRET", ""),
        # aad-pod-identity: strings.EqualFold(os.Getenv("USE_MSI"), "True") - nothing else.
        use_managed_identity=env("USE_MSI").lower() == "true",
        user_assigned_identity_id=env("USER_ASSIGNED_MSI_CLIENT_ID"),
    )


def _validated(
    *,
    source: str,
    cloud: Cloud,
    tenant_id: str,
    subscription_id: str,
    resource_group: str,
    vm_type: str,
    client_id: str,
    client_secret: str,
    use_managed_identity: bool,
    user_assigned_identity_id: str,
) -> CloudConfig:
    where = f"cloud config {source}"
    env_names = source == "environment"
    if not subscription_id:
        raise ConfigError(
            f"{where}: {'SUBSCRIPTION_ID' if env_names else 'subscriptionId'} is missing"
        )
    normalised_type = vm_type.lower() or "standard"
    if normalised_type not in ("standard", "vmss", "vmssflex"):
        raise ConfigError(
            f"{where}: {'VM_TYPE' if env_names else 'vmType'} {vm_type!r} is not "
            "standard, vmss or vmssflex"
        )
    if not use_managed_identity:
        if not client_id or not client_secret:
            names = (
                "CLIENT_ID and CLIENT_SECRET, or USE_MSI=true"
                if env_names
                else "aadClientId and aadClientSecret, or useManagedIdentityExtension"
            )
            raise ConfigError(f"{where}: no credential: set {names}")
        if not tenant_id:
            raise ConfigError(
                f"{where}: {'TENANT_ID' if env_names else 'tenantId'} is missing "
                "(needed for the service principal)"
            )
    return CloudConfig(
        cloud=cloud,
        subscription_id=subscription_id,
        tenant_id=tenant_id,
        resource_group=resource_group,
        vm_type=normalised_type,  # type: ignore[arg-type]  # checked just above
        client_id=client_id if not use_managed_identity else "",
        client_secret=Secret(client_secret if not use_managed_identity else ""),
        use_managed_identity=use_managed_identity,
        # Kept with a service principal too: it names the cluster's own (kubelet) identity,
        # which the controller never removes from a VM or scale set.
        user_assigned_identity_id=user_assigned_identity_id,
        source=source,
    )


def resolve_cloud(name: str, environ: Mapping[str, str], *, source: str = "environment") -> Cloud:
    """The cloud called ``name`` (case-insensitive; empty is the public cloud).

    ``AzureStackCloud`` reads the environment file named by
    ``AZURE_ENVIRONMENT_FILEPATH``: ``resourceManagerEndpoint``,
    ``activeDirectoryEndpoint`` and the ARM audience, ``tokenAudience`` or
    else ``serviceManagementEndpoint``.
    """
    if not name:
        return AZURE_PUBLIC
    if name.upper() == AZURE_STACK.upper():
        return _azure_stack(environ, source)
    cloud = CLOUDS.get(name.upper())
    if cloud is None:
        raise ConfigError(f"cloud config {source}: unknown cloud {name!r} (known: {_KNOWN_NAMES})")
    return cloud


def _azure_stack(environ: Mapping[str, str], source: str) -> Cloud:
    path = environ.get(ENVIRONMENT_FILE_VARIABLE, "").strip()
    if not path:
        raise ConfigError(
            f"cloud config {source}: cloud {AZURE_STACK} needs {ENVIRONMENT_FILE_VARIABLE} "
            "naming its environment JSON file"
        )
    document = _read_json(path, what=f"{AZURE_STACK} environment file")
    where = f"{AZURE_STACK} environment file {path}"

    def text(key: str) -> str:
        value = document.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string")
        return value.strip()

    arm = text("resourceManagerEndpoint")
    authority = text("activeDirectoryEndpoint")
    audience = text("tokenAudience") or text("serviceManagementEndpoint")
    if not arm:
        raise ConfigError(f"{where}: resourceManagerEndpoint is missing")
    if not authority:
        raise ConfigError(f"{where}: activeDirectoryEndpoint is missing")
    if not audience:
        raise ConfigError(f"{where}: tokenAudience (or serviceManagementEndpoint) is missing")
    return Cloud(
        text("name") or AZURE_STACK,
        _https_url(arm, f"{where}: resourceManagerEndpoint"),
        _https_url(authority, f"{where}: activeDirectoryEndpoint"),
        audience,
    )


def _https_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ConfigError(f"{what} must be an https:// URL, not {value!r}")
    return value.rstrip("/")


# ------------------------------------------------------------------------------ source

_Signature = tuple[int, int, int, int]


def _signature(path: str) -> _Signature | None:
    """What changes when the file is rewritten or its symlink swapped: the target's identity."""
    try:
        st = os.stat(path)  # follows symlinks: a swapped ``..data`` link shows a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class CloudConfigSource:
    """The current :class:`CloudConfig`, re-read when the file changes.

    Construction loads the configuration (a :class:`~nmi.config.ConfigError`
    stops the controller at start).  Afterwards :meth:`run` polls the file's
    ``stat`` (device, inode, size, mtime of the symlink's target) every
    ``interval`` seconds and reloads it when that changes - a rewritten file,
    or a Kubernetes volume whose ``..data`` symlink was swapped.  A new file
    that cannot be used (half-written, invalid) is logged once and the last
    good configuration stays in force.  Without a path (environment
    variables) the configuration never changes.

    :attr:`config` is replaced by a new object only when a field changed, and
    :attr:`generation` then increases: consumers compare either.
    """

    def __init__(
        self,
        path: str | None,
        environ: Mapping[str, str] | None = None,
        *,
        interval: float = 5.0,
    ) -> None:
        self._path = path or None
        self._environ = dict(os.environ if environ is None else environ)
        self._interval = interval
        self._signature = _signature(self._path) if self._path else None
        self._config = load_cloud_config(self._path, self._environ)
        self._generation = 0
        self._changed = asyncio.Event()
        logger.info("cloud config: %s", self._config.describe())

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def config(self) -> CloudConfig:
        return self._config

    @property
    def generation(self) -> int:
        return self._generation

    def reload(self) -> bool:
        """Check the file now (blocking I/O); True if the configuration changed."""
        if self._path is None:
            return False
        return self._apply(*self._probe(self._path, self._signature))

    async def refresh(self) -> bool:
        """:meth:`reload` with the file I/O on a thread."""
        if self._path is None:
            return False
        return self._apply(*await asyncio.to_thread(self._probe, self._path, self._signature))

    async def run(self) -> None:
        """Poll the file until cancelled."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # pragma: no cover - a bug must not stop the polling
                logger.exception("cloud config %s: check failed", self._path)

    async def wait_changed(self, after: int) -> CloudConfig:
        """Wait until :attr:`generation` is greater than ``after``; the configuration then."""
        while self._generation <= after:
            await self._changed.wait()
        return self._config

    def _probe(
        self, path: str, known: _Signature | None
    ) -> tuple[_Signature | None, CloudConfig | ConfigError | None]:
        signature = _signature(path)
        if signature == known:
            return signature, None
        if signature is None:
            return None, ConfigError(f"cloud config {path}: the file is gone")
        try:
            return signature, load_cloud_config(path, self._environ)
        except ConfigError as exc:
            return signature, exc

    def _apply(
        self, signature: _Signature | None, outcome: CloudConfig | ConfigError | None
    ) -> bool:
        if outcome is None:
            return False
        self._signature = signature
        if isinstance(outcome, ConfigError):
            logger.warning(
                "cloud config changed but cannot be used, keeping the previous one: %s", outcome
            )
            return False
        if outcome == self._config:
            return False
        changed = outcome.changed_fields(self._config)
        self._config = outcome
        self._generation += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        logger.info(
            "cloud config reloaded from %s (changed: %s): %s",
            self._path,
            ", ".join(changed),
            outcome.describe(),
        )
        return True
