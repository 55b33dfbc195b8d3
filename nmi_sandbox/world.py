"""The local world on loopback: an emulated cluster and Azure, and nmi serving it.

One object starts the Kubernetes API emulator (HTTPS, bearer token, written
kubeconfig), Azure AD (HTTPS) and the node IMDS, with one private CA trusted
through ``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE`` as in production; it starts
the real :class:`~nmi.app.Daemon` against them, and it offers the scenario
steps the tests, the sandbox and the benchmarks share: create a pod on the
node, create identities of each type (registered upstream, with their
Secret), bind them, assign them as MIC would, and ask for a token *as a pod*
— from the pod's own loopback address (127.0.0.x), so that nmi attributes
the call by source IP exactly as it does on a node.

Azure Resource Manager is emulated too: the node is instance 0 of the scale
set :data:`VMSS` (its Node object carries the providerID), every
user-assigned identity exists in ARM, and the controller (``nmi mic``,
:meth:`LoopbackWorld.start_mic`) runs against it with an ``azure.json`` of
the ``AzureStackCloud`` whose environment file names the emulators - the
production path.  :meth:`LoopbackWorld.enforce_arm` makes the node's IMDS
serve only the identities ARM shows on the node, as Azure does; tests that
assign as MIC would (:meth:`LoopbackWorld.assign`) leave it off.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from nmi.app import Daemon
from nmi.config import OperationMode, Settings
from nmi.mic.app import Mic
from nmi.mic.flags import MicSettings

from . import manifests as m
from .aad import AzureAdServer
from .arm import DEFAULT_SUBSCRIPTION, ArmServer
from .imds import ImdsServer
from .kube import KubeApiServer
from .tls import CertificateAuthority, make_client_certificate

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
NODE = "aks-nodepool1-12345678-vmss000000"
VMSS = "aks-nodepool1-12345678-vmss"  # the node is its instance 0
MIC_NAMESPACE = "kube-system"


@dataclass
class Identity:
    """One Azure identity of the world and its Kubernetes objects."""

    name: str
    namespace: str
    type: int
    client_id: str
    resource_id: str
    object_id: str
    selector: str
    manifest: dict[str, Any]
    secret_value: str = field(default="", repr=False)


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def token(self) -> str:
        return str(self.body.get("access_token", ""))


class LoopbackWorld:
    def __init__(
        self,
        *,
        node: str = NODE,
        workdir: Path | None = None,
        imds_host: str = "127.0.0.1",
        imds_port: int = 0,
    ) -> None:
        self.node = node
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="nmi-world-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.ca = CertificateAuthority()
        self.kube = KubeApiServer(ca=self.ca)
        self.aad = AzureAdServer(ca=self.ca, hostnames=["localhost"])
        self.imds = ImdsServer(tenant_id=TENANT, host=imds_host, port=imds_port)
        self.arm = ArmServer(
            ca=self.ca, signers=[self.aad.signer, self.imds.signer], operation_duration=0.2
        )
        self.vmss_id = ""
        self.provider_id = ""
        self.mics: list[Mic] = []
        self.mic_client_id = str(uuid.uuid4())
        self._mic_secret = f"mic-{uuid.uuid4()}"
        self.cloudconfig = workdir / "azure.json"
        self.environment_file = workdir / "azurestackcloud.json"
        self.kubeconfig = workdir / "kubeconfig"
        self.ca_bundle = workdir / "ca.pem"
        self.daemon: Daemon | None = None
        self._saved_env: dict[str, str | None] = {}
        self._next_ip = 10
        self.identities: dict[str, Identity] = {}

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        await self.kube.start()
        await self.aad.start()
        await self.imds.start()
        await self.arm.start()
        self.kube.write_kubeconfig(self.kubeconfig)
        self.ca.write_bundle(self.ca_bundle)
        for key in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = str(self.ca_bundle)
        self.aad.add_tenant(TENANT)
        self._cloud_setup()
        self.vmss_id = self.arm.add_vmss(VMSS, instances=1)
        self.provider_id = self.arm.provider_id(vmss=VMSS, instance=0)
        self.kube.create(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node}},
                "spec": {"providerID": self.provider_id},
            }
        )

    def _cloud_setup(self) -> None:
        """The controller's service principal in Azure AD and its azure.json, as AKS writes it."""
        self.aad.add_app(tenant_id=TENANT, client_id=self.mic_client_id, secrets=[self._mic_secret])
        self.environment_file.write_text(
            json.dumps(
                {
                    "name": "AzureStackCloud",
                    "resourceManagerEndpoint": self.arm.url + "/",
                    "activeDirectoryEndpoint": self.aad.url + "/",
                    "tokenAudience": "https://management.azure.com/",
                }
            )
        )
        self.write_cloudconfig()

    def write_cloudconfig(self, **overrides: Any) -> None:
        """(Re)write the controller's azure.json (atomically, as AKS rewrites it)."""
        document = {
            "cloud": "AzureStackCloud",
            "tenantId": TENANT,
            "subscriptionId": DEFAULT_SUBSCRIPTION,
            "resourceGroup": "MC_nmi-rg_nmi-aks_westeurope",
            "vmType": "vmss",
            "aadClientId": self.mic_client_id,
            "aadClientSecret": self._mic_secret,
            **overrides,
        }
        staged = self.cloudconfig.with_suffix(".tmp")
        staged.write_text(json.dumps(document))
        os.replace(staged, self.cloudconfig)

    def rotate_mic_secret(self, *, publish: bool) -> str:
        """A new secret for the controller's service principal in Azure AD (the old one stops
        working); ``publish`` also writes it into azure.json, as AKS's rotation does."""
        self._mic_secret = f"mic-{uuid.uuid4()}"
        self.aad.set_secrets(self.mic_client_id, [self._mic_secret])
        if publish:
            self.write_cloudconfig()
        return self._mic_secret

    def cloud_environ(self) -> dict[str, str]:
        """What the controller's container has in its environment for the emulated cloud."""
        return {
            "AZURE_ENVIRONMENT_FILEPATH": str(self.environment_file),
            "SSL_CERT_FILE": str(self.ca_bundle),
            "MIC_POD_NAMESPACE": MIC_NAMESPACE,
        }

    def enforce_arm(self) -> None:
        """The node's IMDS serves only the user-assigned identities ARM shows on it."""
        provider_id = self.provider_id
        self.imds.identities_on_node = lambda: self.arm.client_ids_on_node(provider_id)

    def mic_settings(self, **overrides: Any) -> MicSettings:
        values: dict[str, Any] = {
            "kubeconfig": str(self.kubeconfig),
            "cloudconfig": str(self.cloudconfig),
            "leader_instance": f"nmi-mic-{len(self.mics)}",
            "leader_namespace": MIC_NAMESPACE,
            "leader_name": "nmi-mic",
            "leader_duration": 4.0,
            "http_probe_port": 0,
            "prometheus_port": 0,
            "probe_address": "127.0.0.1",
            "prometheus_address": "127.0.0.1",
            "pod_namespace": MIC_NAMESPACE,
            "arm_polling_interval": 0.05,
            "arm_coalesce": 0.1,
            "update_user_msi_retry_interval": 0.05,
        }
        values.update(overrides)
        return MicSettings(**values)

    async def start_mic(self, **overrides: Any) -> Mic:
        """Start one controller replica (``nmi mic``) against the emulators."""
        self.ensure_namespace(MIC_NAMESPACE)
        mic = Mic(self.mic_settings(**overrides), environ=self.cloud_environ())
        self.mics.append(mic)
        await mic.start()
        return mic

    async def stop_mic(self, mic: Mic) -> None:
        if mic in self.mics:
            self.mics.remove(mic)
            await mic.stop()

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "node_name": self.node,
            "listen_address": "127.0.0.1",
            "port": 0,
            "metadata_ip": self.imds.host,
            "metadata_port": self.imds.port,
            "http_probe_port": 0,
            "prometheus_port": 0,
            "probe_address": "127.0.0.1",
            "metrics_address": "127.0.0.1",
            "kubeconfig": str(self.kubeconfig),
            "allowed_authority_hosts": frozenset({self.aad.authority_host}),
            "find_identity_retry_interval": 1.0,
            "pod_lookup_timeout": 0.5,
            "upstream_timeout": 10.0,
            "shutdown_grace": 2.0,
            # Loopback tests run in the host's network namespace: never touch its iptables.
            "manage_iptables": False,
        }
        values.update(overrides)
        return Settings(**values)

    async def start_daemon(self, **overrides: Any) -> Daemon:
        self.daemon = Daemon(self.settings(**overrides))
        await self.daemon.start()
        return self.daemon

    async def stop_daemon(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop()
            self.daemon = None

    async def stop(self) -> None:
        for mic in list(self.mics):
            await self.stop_mic(mic)
        await self.stop_daemon()
        await self.arm.stop()
        await self.imds.stop()
        await self.aad.stop()
        await self.kube.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._tmp is not None:
            self._tmp.cleanup()

    async def __aenter__(self) -> LoopbackWorld:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- scenario steps -----------------------------------------------------

    def new_pod_ip(self) -> str:
        self._next_ip += 1
        if self._next_ip > 250:
            raise RuntimeError("out of loopback pod addresses")
        return f"127.0.0.{self._next_ip}"

    def ensure_namespace(self, name: str) -> None:
        if self.kube.get("v1", "Namespace", name) is None:
            self.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def add_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        selector: str | None = None,
        labels: dict[str, str] | None = None,
        ip: str | None = None,
        phase: str = "Running",
        service_account: str = "",
    ) -> dict[str, Any]:
        """A pod of this node (running as ``service_account``, created if missing)."""
        all_labels = dict(labels or {})
        if selector is not None:
            all_labels["aadpodidbinding"] = selector
        self.ensure_namespace(namespace)
        if service_account:
            self.ensure_service_account(namespace, service_account)
        manifest = m.pod(
            name=name,
            namespace=namespace,
            node=self.node,
            ip=ip or self.new_pod_ip(),
            labels=all_labels,
            phase=phase,
            service_account=service_account,
        )
        status = manifest.pop("status")
        self.kube.create(manifest)
        # The API server ignores status on create; the kubelet reports it afterwards.
        return self.kube.patch(
            "v1", "Pod", name, namespace, {"status": status}, subresource="status"
        )

    def ensure_service_account(self, namespace: str, name: str) -> None:
        self.ensure_namespace(namespace)
        if self.kube.get("v1", "ServiceAccount", name, namespace) is None:
            self.kube.create(m.service_account(name=name, namespace=namespace))

    def add_federated_identity(
        self,
        name: str,
        *,
        namespace: str = "default",
        selector: str | None = None,
        service_accounts: tuple[str, ...] = ("default",),
        managed_identity: bool = False,
        audience: str = "",
        bind: bool = True,
        in_azure_ad: bool = True,
        **extra: Any,
    ) -> Identity:
        """A federated identity (type 3): an application (or, ``managed_identity``, a
        user-assigned managed identity known only to Azure AD, on no VM) trusting the
        cluster's service-account issuer for each of ``service_accounts`` of ``namespace``
        (none: Azure AD will refuse), its AzureIdentity and (``bind``) a binding.
        ``in_azure_ad=False``: the AzureIdentity names a client id Azure AD does not know."""
        client_id = str(uuid.uuid4())
        object_id = ""
        if not in_azure_ad:
            service_accounts = ()
        elif managed_identity:
            object_id = self.aad.add_managed_identity(tenant_id=TENANT, client_id=client_id)
        else:
            object_id = self.aad.add_app(tenant_id=TENANT, client_id=client_id)
        for account in service_accounts:
            self.federate(client_id, namespace, account, audience=audience)
        annotations = (
            {"aadpodidentity.k8s.io/federated-token-audience": audience} if audience else None
        )
        self.ensure_namespace(namespace)
        manifest = self.kube.create(
            m.azure_identity(
                name=name,
                namespace=namespace,
                type=3,
                client_id=client_id,
                tenant_id=TENANT,
                annotations=annotations,
                **{"ad_endpoint": f"{self.aad.url}/", **extra},
            )
        )
        return self._bind(
            name, namespace, 3, client_id, "", object_id, selector, manifest, bind=bind
        )

    def federate(
        self, client_id: str, namespace: str, service_account: str, *, audience: str = ""
    ) -> str:
        """A federated identity credential on ``client_id`` for a service account of this
        cluster (issuer: the API server's), as ``az identity federated-credential create``."""
        return self.aad.add_federated_credential(
            client_id,
            issuer=self.kube.issuer,
            subject=f"system:serviceaccount:{namespace}:{service_account}",
            audiences=(audience or "api://AzureADTokenExchange",),
        )

    def pod_ip(self, pod: dict[str, Any]) -> str:
        return str(pod["status"]["podIP"])

    def add_user_assigned_identity(
        self,
        name: str,
        *,
        namespace: str = "default",
        selector: str | None = None,
        arm_name: str | None = None,
        bind: bool = True,
        **extra: Any,
    ) -> Identity:
        """A user-assigned managed identity (type 0): in ARM (``arm_name``, default ``name``),
        known to the node's IMDS, its AzureIdentity and (``bind``) a binding."""
        client_id = str(uuid.uuid4())
        object_id = str(uuid.uuid4())
        resource_id = self.arm.add_identity(
            arm_name or name, client_id=client_id, principal_id=object_id
        ).resource_id
        self.imds.add_user_assigned(
            client_id=client_id, object_id=object_id, resource_id=resource_id
        )
        self.ensure_namespace(namespace)
        manifest = self.kube.create(
            m.azure_identity(
                name=name,
                namespace=namespace,
                type=0,
                client_id=client_id,
                resource_id=resource_id,
                **extra,
            )
        )
        return self._bind(
            name, namespace, 0, client_id, resource_id, object_id, selector, manifest, bind=bind
        )

    def add_service_principal(
        self,
        name: str,
        *,
        namespace: str = "default",
        selector: str | None = None,
        certificate: bool = False,
        pkcs12_password: str | None = None,
        secret_namespace: str = "",
        **extra: Any,
    ) -> Identity:
        """A service principal with a secret (type 1) or a certificate (type 2)."""
        client_id = str(uuid.uuid4())
        secret_name = f"{name}-credential"
        self.ensure_namespace(namespace)
        self.ensure_namespace(secret_namespace or namespace)
        value = ""
        if certificate:
            cert = make_client_certificate(name)
            object_id = self.aad.add_app(
                tenant_id=TENANT, client_id=client_id, certificates=[cert.cert_pem]
            )
            data: dict[str, bytes] = {"certificate": cert.pkcs12(pkcs12_password)}
            if pkcs12_password:
                data["password"] = pkcs12_password.encode()
        else:
            value = f"s3cr3t-{uuid.uuid4()}"
            object_id = self.aad.add_app(tenant_id=TENANT, client_id=client_id, secrets=[value])
            data = {"clientsecret": value.encode()}
        self.kube.create(
            m.secret(name=secret_name, namespace=secret_namespace or namespace, data=data)
        )
        manifest = self.kube.create(
            m.azure_identity(
                name=name,
                namespace=namespace,
                type=2 if certificate else 1,
                client_id=client_id,
                tenant_id=TENANT,
                secret_name=secret_name,
                secret_namespace=secret_namespace or namespace,
                **{"ad_endpoint": f"{self.aad.url}/", **extra},
            )
        )
        ident = self._bind(
            name, namespace, 2 if certificate else 1, client_id, "", object_id, selector, manifest
        )
        ident.secret_value = value
        return ident

    def _bind(
        self,
        name: str,
        namespace: str,
        id_type: int,
        client_id: str,
        resource_id: str,
        object_id: str,
        selector: str | None,
        manifest: dict[str, Any],
        *,
        bind: bool = True,
    ) -> Identity:
        sel = selector if selector is not None else name
        if bind:
            self.kube.create(
                m.binding(name=f"{name}-binding", namespace=namespace, identity=name, selector=sel)
            )
        ident = Identity(
            name=name,
            namespace=namespace,
            type=id_type,
            client_id=client_id,
            resource_id=resource_id,
            object_id=object_id,
            selector=sel,
            manifest=manifest,
        )
        self.identities[name] = ident
        return ident

    def rotate_secret(self, identity: Identity) -> str:
        """Rotate a type-1 secret in Azure AD and in the Kubernetes Secret."""
        value = f"s3cr3t-{uuid.uuid4()}"
        self.aad.set_secrets(identity.client_id, [value])
        self.kube.patch(
            "v1",
            "Secret",
            f"{identity.name}-credential",
            identity.namespace,
            {"data": {"clientsecret": base64.b64encode(value.encode()).decode()}},
        )
        identity.secret_value = value
        return value

    def assign(
        self, pod: dict[str, Any], identity: Identity, *, state: str = "Assigned"
    ) -> dict[str, Any]:
        """Create (or move to ``state``) the AzureAssignedIdentity, as MIC would."""
        meta = pod["metadata"]
        obj = m.assigned_identity(
            pod_name=meta["name"],
            pod_namespace=meta["namespace"],
            node=self.node,
            identity=self.kube.get(
                "aadpodidentity.k8s.io/v1", "AzureIdentity", identity.name, identity.namespace
            )
            or identity.manifest,
            binding_obj=self.kube.get(
                "aadpodidentity.k8s.io/v1",
                "AzureIdentityBinding",
                f"{identity.name}-binding",
                identity.namespace,
            ),
            state=state,
        )
        name = obj["metadata"]["name"]
        existing = self.kube.get(
            "aadpodidentity.k8s.io/v1", "AzureAssignedIdentity", name, "default"
        )
        if existing is None:
            return self.kube.create(obj)  # MIC creates it with its status filled in
        return self.set_assignment_state(pod, identity, state)

    def set_assignment_state(
        self, pod: dict[str, Any], identity: Identity, state: str
    ) -> dict[str, Any]:
        meta = pod["metadata"]
        name = f"{meta['name']}-{meta['namespace']}-{identity.name}"
        # MIC patches the status on the main resource (the CRD has no status subresource).
        return self.kube.patch(
            "aadpodidentity.k8s.io/v1",
            "AzureAssignedIdentity",
            name,
            "default",
            {"status": {"status": state}},
        )

    def unassign(self, pod: dict[str, Any], identity: Identity) -> None:
        meta = pod["metadata"]
        name = f"{meta['name']}-{meta['namespace']}-{identity.name}"
        self.kube.patch(
            "aadpodidentity.k8s.io/v1",
            "AzureAssignedIdentity",
            name,
            "default",
            {"metadata": {"finalizers": None}},
        )
        self.kube.delete("aadpodidentity.k8s.io/v1", "AzureAssignedIdentity", name, "default")

    async def synced(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until the daemon's view satisfies ``predicate(index)``."""
        assert self.daemon is not None
        index = self.daemon.index
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(index):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or not await index.changed.wait(remaining):
                if predicate(index):
                    return
                raise TimeoutError("the daemon's cluster view did not reach the expected state")

    async def binding_visible(self, identity: Identity) -> None:
        """Wait until nmi sees the identity and its binding (they arrive on other watches)."""
        await self.synced(
            lambda index: (
                index.identity(identity.namespace, identity.name) is not None
                and any(
                    b.meta.namespace == identity.namespace
                    for b in index.bindings_with_selector(identity.selector)
                )
            )
        )

    async def pod_visible(self, pod: dict[str, Any]) -> None:
        ip = self.pod_ip(pod)
        await self.synced(lambda index: bool(index.pods_with_ip(ip)))

    # -- acting as a pod ----------------------------------------------------

    @property
    def token_url(self) -> str:
        assert self.daemon is not None
        return f"http://127.0.0.1:{self.daemon.port}"

    async def request(
        self,
        source_ip: str,
        target: str,
        *,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        timeout: float = 30.0,
    ) -> Reply:
        """Send ``method target`` to nmi from ``source_ip`` (the pod's address)."""
        connector = aiohttp.TCPConnector(local_addr=(source_ip, 0), force_close=True)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session:
            url = self.token_url + target
            async with session.request(
                method, URL(url, encoded=True), headers=headers or {}
            ) as resp:
                raw = await resp.read()
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                if not isinstance(body, dict):
                    body = {"_value": body}
                return Reply(status=resp.status, body=body, headers=dict(resp.headers))

    async def get_token(
        self,
        source_ip: str,
        resource: str = "https://management.azure.com",
        *,
        metadata: bool = True,
        **params: str,
    ) -> Reply:
        from urllib.parse import urlencode

        query = urlencode({"api-version": "2018-02-01", "resource": resource, **params})
        headers = {"Metadata": "true"} if metadata else {}
        return await self.request(
            source_ip, f"/metadata/identity/oauth2/token?{query}", headers=headers
        )


@contextlib.asynccontextmanager
async def running_world(**daemon_overrides: Any) -> Any:
    """A started world with a started daemon (standard mode unless overridden)."""
    world = LoopbackWorld()
    await world.start()
    try:
        await world.start_daemon(**daemon_overrides)
        yield world
    finally:
        await world.stop()


__all__ = [
    "MIC_NAMESPACE",
    "NODE",
    "TENANT",
    "VMSS",
    "Identity",
    "LoopbackWorld",
    "OperationMode",
    "Reply",
    "running_world",
]
