"""An Azure Instance Metadata Service (IMDS) emulator for the node.

Why it exists: the daemon stands in for IMDS towards pods, but it is itself a
client of the *node's* IMDS (user-assigned managed identities, identity type 0,
and the node identity for exception pods), and it proxies the non-identity
metadata paths.  No VM exists here, so this module serves the node IMDS on
plain HTTP - as the real one does - with the behaviour real clients and the
daemon rely on (see docs/imds-contract.md):

* ``GET /metadata/identity/oauth2/token`` - ``Metadata: true`` required (checked
  first), ``api-version`` and ``resource`` required, identity selectors
  ``client_id`` / ``object_id`` / ``msi_res_id`` (alias ``mi_res_id``) mutually
  exclusive, the real "Identity not found" and "Multiple user assigned
  identities exist" answers, AADSTS500011 for an unknown resource, and a
  success body whose values are all strings.  Tokens are RS256 JWTs cached per
  (identity, resource) until five minutes before expiry, as IMDS does, so
  ``expires_in`` counts down between calls;
* requests carrying ``X-Forwarded-For`` are refused (IMDS rejects proxied
  requests; the daemon must not add that header);
* the managed-identity limits: 5 concurrent requests and 20 requests per
  second, beyond which 429 with ``Retry-After``;
* optionally (``identities_on_node``), only the user-assigned identities the
  node's VM or scale set carries in ARM - e.g.
  :meth:`nmi_sandbox.arm.ArmServer.client_ids_on_node` - are served: any other
  is "Identity not found", as on Azure before MIC has assigned it;
* ``/metadata/instance`` (and sub-paths, ``format=json|text``),
  ``/metadata/versions`` and ``/metadata/scheduledevents`` with realistic
  bodies; everything else is a JSON 404.

Paths are normalised the way the daemon has to (repeated and trailing ``/``
collapsed, case-insensitive) because msal-node sends
``/metadata/identity/oauth2/token/``.

Knobs (``latency``, :meth:`ImdsServer.fail_next`, ``token_lifetime``,
``cache_tokens``, ``enforce_limits``) and counters (``token_requests``,
``requests``, ``max_in_flight``) let tests drive and observe the daemon.

Deliberate limits: IMDS v2 (``/metadata/identity/issuecredential``,
``getplatformmetadata``), attested documents, the load balancer and
``/metadata/identity/info`` paths are not emulated and answer 404.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from nmi_sandbox.aad import DEFAULT_RESOURCES, TokenSigner, resource_key

__all__ = [
    "DEFAULT_TENANT_ID",
    "ImdsServer",
    "ManagedIdentity",
    "RecordedRequest",
]

logger = logging.getLogger("nmi_sandbox.imds")

DEFAULT_TENANT_ID: Final = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SERVER_HEADER: Final = "IMDS/150.870.65.1325"
TOKEN_PATH: Final = "/metadata/identity/oauth2/token"
REFRESH_MARGIN: Final = 300
"""IMDS hands out a cached token until it is this close (seconds) to expiry."""

_TOKEN_API_VERSIONS_NEWEST: Final = ["2018-02-01"]
_INSTANCE_API_VERSIONS: Final = [
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2022-02-01",
    "2022-03-01",
    "2022-07-01",
    "2022-08-01",
    "2022-11-01",
    "2023-03-01",
    "2023-07-01",
]
_SCHEDULED_EVENTS_API_VERSIONS: Final = ["2017-11-01", "2019-01-01", "2019-08-01", "2020-07-01"]
_API_VERSION_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MAX_RECORDED: Final = 1000
_SELECTORS: Final = ("client_id", "object_id", "msi_res_id", "mi_res_id")


@dataclass(frozen=True)
class ManagedIdentity:
    """A managed identity assigned to the emulated VM."""

    client_id: str
    object_id: str
    resource_id: str
    system_assigned: bool = False


class RecordedRequest(NamedTuple):
    """One request as received: method, raw target and headers (case-insensitive)."""

    method: str
    path_qs: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class _Failure:
    status: int
    retry_after: int | None


@dataclass
class _CachedToken:
    access_token: str
    expires_on: int
    not_before: int


def _json(
    body: Mapping[str, Any] | list[Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    all_headers = {"Server": SERVER_HEADER}
    all_headers.update(headers or {})
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        charset="utf-8",
        headers=all_headers,
    )


def _error(
    status: int, error: str, description: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    return _json({"error": error, "error_description": description}, status=status, headers=headers)


def _normalise(path: str) -> str:
    collapsed = re.sub(r"/{2,}", "/", path).rstrip("/")
    return (collapsed or "/").casefold()


def default_instance_metadata(
    *,
    subscription_id: str = "6f2b3c1e-1d3a-4c55-9a7e-0f4a6b2c9d10",
    resource_group: str = "MC_nmi-rg_nmi-aks_westeurope",
    vmss_name: str = "aks-nodepool1-12345678-vmss",
    instance: int = 0,
    private_ip: str = "10.224.0.4",
    location: str = "westeurope",
) -> dict[str, Any]:
    """A realistic ``/metadata/instance`` document for an AKS VMSS node."""
    vm_name = f"{vmss_name}_{instance}"
    vmss_id = (
        f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}"
        f"/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss_name}"
    )
    return {
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "additionalCapabilities": {"hibernationEnabled": "false"},
            "customData": "",
            "evictionPolicy": "",
            "extendedLocation": {"type": "", "name": ""},
            "host": {"id": ""},
            "hostGroup": {"id": ""},
            "isHostCompatibilityLayerVm": "false",
            "licenseType": "",
            "location": location,
            "name": vm_name,
            "offer": "",
            "osProfile": {
                "adminUsername": "azureuser",
                "computerName": f"{vmss_name}{instance:06d}",
                "disablePasswordAuthentication": "true",
            },
            "osType": "Linux",
            "placementGroupId": "",
            "plan": {"name": "", "product": "", "publisher": ""},
            "platformFaultDomain": "0",
            "platformSubFaultDomain": "",
            "platformUpdateDomain": "0",
            "priority": "",
            "provider": "Microsoft.Compute",
            "publicKeys": [],
            "publisher": "",
            "resourceGroupName": resource_group,
            "resourceId": f"{vmss_id}/virtualMachines/{instance}",
            "securityProfile": {
                "encryptionAtHost": "false",
                "secureBootEnabled": "false",
                "securityType": "",
                "virtualTpmEnabled": "false",
            },
            "sku": "",
            "storageProfile": {
                "dataDisks": [],
                "imageReference": {
                    "id": (
                        "/subscriptions/109a5e88-712a-48ae-9078-9ca8b3c81345/resourceGroups/"
                        "AKS-Ubuntu/providers/Microsoft.Compute/galleries/AKSUbuntu/images/"
                        "2204gen2containerd/versions/202411.12.0"
                    ),
                    "offer": "",
                    "publisher": "",
                    "sku": "",
                    "version": "",
                },
                "osDisk": {
                    "caching": "ReadOnly",
                    "createOption": "FromImage",
                    "diffDiskSettings": {"option": ""},
                    "diskSizeGB": "128",
                    "encryptionSettings": {"enabled": "false"},
                    "image": {"uri": ""},
                    "managedDisk": {"id": "", "storageAccountType": "Premium_LRS"},
                    "name": f"{vmss_name}_{instance}_OsDisk_1",
                    "osType": "Linux",
                    "vhd": {"uri": ""},
                    "writeAcceleratorEnabled": "false",
                },
                "resourceDisk": {"size": "16384"},
            },
            "subscriptionId": subscription_id,
            "tags": "aks-managed-poolName:nodepool1",
            "tagsList": [{"name": "aks-managed-poolName", "value": "nodepool1"}],
            "userData": "",
            "version": "202411.12.0",
            "vmId": "5c2a9f0e-3b1d-4e8a-9c57-2d1e6f0a4b83",
            "vmScaleSetName": vmss_name,
            "vmSize": "Standard_D4s_v3",
            "zone": "",
        },
        "network": {
            "interface": [
                {
                    "ipv4": {
                        "ipAddress": [{"privateIpAddress": private_ip, "publicIpAddress": ""}],
                        "subnet": [{"address": "10.224.0.0", "prefix": "16"}],
                    },
                    "ipv6": {"ipAddress": []},
                    "macAddress": "000D3A2B4C5D",
                }
            ]
        },
    }


class ImdsServer:
    """An HTTP node IMDS on the running asyncio loop.

    Assign identities with :meth:`add_user_assigned` / :meth:`set_system_assigned`,
    ``await start()`` and point clients at :attr:`url` (for MSAL and
    azure-identity: ``AZURE_POD_IDENTITY_AUTHORITY_HOST``).  All knobs and
    counters are plain attributes, changed and read on the loop.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_lifetime: int = 86399,
        enforce_limits: bool = True,
        tenant_id: str = DEFAULT_TENANT_ID,
        signer: TokenSigner | None = None,
        identities_on_node: Callable[[], set[str]] | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._signer = signer or TokenSigner(common_name="nmi emulated IMDS token signing")
        self._user_assigned: dict[str, ManagedIdentity] = {}
        self._system_assigned: ManagedIdentity | None = None
        self._resources: set[str] = {resource_key(r) for r in DEFAULT_RESOURCES}
        self._cache: dict[tuple[str, str], _CachedToken] = {}
        self._failures: collections.deque[_Failure] = collections.deque()
        self._recent: collections.deque[float] = collections.deque()
        self._in_flight = 0
        self._changed = asyncio.Condition()

        #: The tenant the identities live in (``tid`` / ``iss`` of tokens).
        self.tenant_id: str = tenant_id
        #: Lifetime in seconds of newly minted tokens.
        self.token_lifetime: int = token_lifetime
        #: Apply the managed-identity limits (5 concurrent, 20 per second).
        self.enforce_limits: bool = enforce_limits
        #: Concurrent managed-identity requests allowed per VM.
        self.concurrency_limit: int = 5
        #: Managed-identity requests allowed per second per VM.
        self.rate_limit: int = 20
        #: Return the cached token per (identity, resource) until 5 min before expiry.
        self.cache_tokens: bool = True
        #: Seconds to wait (without blocking the loop) inside each admitted token request.
        self.latency: float = 0.0
        #: The ``/metadata/instance`` document.
        self.instance_metadata: dict[str, Any] = default_instance_metadata()
        #: Client ids of the user-assigned identities on the node's VM or scale set,
        #: asked on every token request; None serves every added user-assigned identity.
        self.identities_on_node: Callable[[], set[str]] | None = identities_on_node

        #: Token requests that resolved an identity, by (identity client_id, resource).
        self.token_requests: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Successful token responses, by (identity client_id, resource).
        self.issued: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Tokens newly signed (cache misses), by (identity client_id, resource).
        self.minted: collections.Counter[tuple[str, str]] = collections.Counter()
        #: The last 1000 requests of any kind, oldest first.
        self.requests: list[RecordedRequest] = []
        #: Requests to the token path (any outcome).
        self.requests_total: int = 0
        #: HTTP requests of any kind.
        self.http_requests_total: int = 0
        #: Highest number of token requests seen in flight at once (the one
        #: being admitted included, so a 6th concurrent request shows as 6).
        self.max_in_flight: int = 0

    # --------------------------------------------------------------- identities

    def add_user_assigned(self, *, client_id: str, object_id: str, resource_id: str) -> None:
        """Assign a user-assigned identity to the VM."""
        self._user_assigned[client_id.casefold()] = ManagedIdentity(
            client_id=client_id, object_id=object_id, resource_id=resource_id
        )

    def remove_user_assigned(self, client_id: str) -> None:
        """Unassign a user-assigned identity; its cached tokens are dropped."""
        identity = self._user_assigned.pop(client_id.casefold(), None)
        if identity is None:
            raise KeyError(f"no user-assigned identity with client id {client_id!r}")
        self._drop_cache(identity)

    def set_system_assigned(self, *, client_id: str, object_id: str) -> None:
        """Enable the VM's (scale set's) system-assigned identity."""
        compute = self.instance_metadata.get("compute", {})
        resource_id = str(compute.get("resourceId", ""))
        # The system identity of a scale-set instance belongs to the scale set.
        resource_id = re.sub(r"/virtualMachines/[^/]+$", "", resource_id)
        self._system_assigned = ManagedIdentity(
            client_id=client_id,
            object_id=object_id,
            resource_id=resource_id,
            system_assigned=True,
        )

    def remove_system_assigned(self) -> None:
        """Disable the system-assigned identity."""
        if self._system_assigned is not None:
            self._drop_cache(self._system_assigned)
        self._system_assigned = None

    @property
    def identities(self) -> list[ManagedIdentity]:
        """Every assigned identity, the system-assigned one first."""
        system = [self._system_assigned] if self._system_assigned else []
        return [*system, *self._user_assigned.values()]

    def add_resource(self, resource_uri: str) -> None:
        """Make ``resource_uri`` a resource Entra ID knows (besides the defaults)."""
        self._resources.add(resource_key(resource_uri))

    def clear_token_cache(self) -> None:
        """Forget every cached token (as after an IMDS restart)."""
        self._cache.clear()

    def _drop_cache(self, identity: ManagedIdentity) -> None:
        key = identity.client_id.casefold()
        for cache_key in [k for k in self._cache if k[0] == key]:
            del self._cache[cache_key]

    # -------------------------------------------------------------------- knobs

    def fail_next(self, n: int, *, status: int = 500, retry_after: int | None = None) -> None:
        """Make the next ``n`` admitted token requests fail with ``status`` (JSON body).

        ``Retry-After`` is sent only when ``retry_after`` is given.
        """
        self._failures.extend(_Failure(status, retry_after) for _ in range(n))

    @property
    def signer(self) -> TokenSigner:
        """The token-signing key (for verifying issued tokens in tests)."""
        return self._signer

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen on ``host:port`` (plain HTTP)."""
        if self._runner is not None:
            raise RuntimeError("already started")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        logger.info("IMDS emulator listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            logger.info("IMDS emulator stopped")

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def url(self) -> str:
        """``http://host:port`` (the value for ``AZURE_POD_IDENTITY_AUTHORITY_HOST``)."""
        host = self._host
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            if address.is_unspecified:
                host = "127.0.0.1"
            elif address.version == 6:
                host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # ----------------------------------------------------------------- waiting

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; it is re-checked after every request event."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout} s") from None

    async def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:
        """Wait until at least ``n`` requests have reached the token path."""
        try:
            await self.wait_for(lambda: self.requests_total >= n, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(
                f"expected {n} token requests, saw {self.requests_total} within {timeout} s"
            ) from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ----------------------------------------------------------------- dispatch

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.http_requests_total += 1
        raw = request.raw_path
        path, _, query_string = raw.partition("?")
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path_qs=raw,
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            )
        )
        if len(self.requests) > _MAX_RECORDED:
            del self.requests[: len(self.requests) - _MAX_RECORDED]
        query: dict[str, str] = {}
        for key, value in parse_qsl(query_string, keep_blank_values=True):
            query.setdefault(key, value)
        normalised = _normalise(path)

        if normalised == TOKEN_PATH:
            self.requests_total += 1
            await self._notify()
            try:
                response = await self._token(request, query)
            finally:
                await self._notify()
        elif normalised == "/metadata/instance" or normalised.startswith("/metadata/instance/"):
            response = self._metadata(request, query, normalised, self._instance)
        elif normalised == "/metadata/versions":
            response = self._metadata(request, query, normalised, self._versions)
        elif normalised == "/metadata/scheduledevents":
            response = self._metadata(request, query, normalised, self._scheduled_events)
        else:
            response = _error(404, "not_found", f"The requested path {path} was not found.")
        logger.debug("IMDS %s %s -> %d", request.method, path, response.status)
        return response

    def _metadata(
        self,
        request: web.Request,
        query: Mapping[str, str],
        path: str,
        handler: Callable[[Mapping[str, str], str], web.Response],
    ) -> web.Response:
        if request.method != "GET":
            return _error(405, "method_not_allowed", "The requested method is not allowed.")
        if request.headers.get("Metadata", "").casefold() != "true":
            return _json(
                {"error": "Bad request. Required metadata header not specified"}, status=400
            )
        if "X-Forwarded-For" in request.headers:
            return _forwarded_rejected()
        return handler(query, path)

    # --------------------------------------------------------- non-identity paths

    def _instance(self, query: Mapping[str, str], path: str) -> web.Response:
        rejected = _check_api_version(query, _INSTANCE_API_VERSIONS, newest_first=True)
        if rejected is not None:
            return rejected
        node: Any = self.instance_metadata
        for segment in [s for s in path.split("/")[3:] if s]:
            match = _child(node, segment)
            if match is None:
                return _error(404, "not_found", f"The requested path {path} was not found.")
            node = match
        is_leaf = not isinstance(node, dict | list)
        fmt = query.get("format", "text" if is_leaf else "json").casefold()
        if fmt == "text":
            if not is_leaf:
                return _json(
                    {
                        "error": "Bad request. Text format is supported only for leaf "
                        "nodes. For more information refer to aka.ms/azureimds"
                    },
                    status=400,
                )
            return web.Response(
                text=str(node),
                content_type="text/plain",
                charset="utf-8",
                headers={"Server": SERVER_HEADER},
            )
        if fmt != "json":
            return _json({"error": f"Bad request. Invalid format '{fmt}'."}, status=400)
        if is_leaf:
            return web.Response(
                text=json.dumps(node),
                content_type="application/json",
                charset="utf-8",
                headers={"Server": SERVER_HEADER},
            )
        return _json(copy.deepcopy(node))

    def _versions(self, query: Mapping[str, str], path: str) -> web.Response:
        return _json({"apiVersions": list(_INSTANCE_API_VERSIONS)})

    def _scheduled_events(self, query: Mapping[str, str], path: str) -> web.Response:
        rejected = _check_api_version(query, _SCHEDULED_EVENTS_API_VERSIONS, newest_first=True)
        if rejected is not None:
            return rejected
        return _json({"DocumentIncarnation": 0, "Events": []})

    # -------------------------------------------------------------- token path

    async def _token(self, request: web.Request, query: Mapping[str, str]) -> web.Response:
        if request.method != "GET":
            return _error(405, "method_not_allowed", "The requested method is not allowed.")
        if request.headers.get("Metadata", "").casefold() != "true":
            return _error(400, "invalid_request", "Required metadata header not specified")
        if "X-Forwarded-For" in request.headers:
            return _forwarded_rejected()

        self._in_flight += 1
        try:
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            limited = self._check_limits()
            if limited is not None:
                return limited
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if self._failures:
                return _injected(self._failures.popleft())
            return self._issue(query)
        finally:
            self._in_flight -= 1

    def _check_limits(self) -> web.Response | None:
        if not self.enforce_limits:
            return None
        now = time.monotonic()
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        if self._in_flight > self.concurrency_limit or len(self._recent) >= self.rate_limit:
            logger.info(
                "IMDS throttled a token request (in flight %d, last second %d)",
                self._in_flight,
                len(self._recent),
            )
            return _error(
                429, "too_many_requests", "Too many requests", headers={"Retry-After": "1"}
            )
        self._recent.append(now)
        return None

    def _issue(self, query: Mapping[str, str]) -> web.Response:
        rejected = _check_api_version(query, None, newest_first=False)
        if rejected is not None:
            return rejected
        resource = query.get("resource", "")
        if not resource:
            return _error(400, "invalid_request", "Required query variable 'resource' is missing")
        selectors = {k: query[k] for k in _SELECTORS if query.get(k)}
        if len(selectors) > 1:
            return _error(
                400,
                "invalid_request",
                "Only one of client_id, object_id and msi_res_id may be specified: "
                f"{', '.join(sorted(selectors))} were given",
            )
        identity, problem = self._select(selectors)
        if identity is None:
            return _error(400, "invalid_request", problem)

        key = (identity.client_id, resource)
        self.token_requests[key] += 1
        if resource_key(resource) not in self._resources:
            return self._invalid_resource(resource)

        now = int(time.time())
        cache_key = (identity.client_id.casefold(), resource)
        cached = self._cache.get(cache_key)
        bypass = query.get("bypass_cache", "").casefold() == "true"
        if (
            cached is None
            or not self.cache_tokens
            or bypass
            or cached.expires_on - now <= REFRESH_MARGIN
        ):
            cached = self._mint(identity, resource, now)
            self.minted[key] += 1
            if self.cache_tokens:
                self._cache[cache_key] = cached
        self.issued[key] += 1
        expires_in = str(max(cached.expires_on - now, 0))
        logger.info(
            "IMDS issued token client_id=%s resource=%s expires_in=%s",
            identity.client_id,
            resource,
            expires_in,
        )
        return _json(
            {
                "access_token": cached.access_token,
                "client_id": identity.client_id,
                "expires_in": expires_in,
                "expires_on": str(cached.expires_on),
                "ext_expires_in": expires_in,
                "not_before": str(cached.not_before),
                "resource": resource,
                "token_type": "Bearer",
            }
        )

    def _user_assigned_on_node(self) -> list[ManagedIdentity]:
        """The added user-assigned identities the node carries (all without the hook)."""
        identities = list(self._user_assigned.values())
        if self.identities_on_node is None:
            return identities
        on_node = {client_id.casefold() for client_id in self.identities_on_node()}
        return [i for i in identities if i.client_id.casefold() in on_node]

    def _select(self, selectors: Mapping[str, str]) -> tuple[ManagedIdentity | None, str]:
        not_found = "Identity not found"
        user_assigned = self._user_assigned_on_node()
        if not selectors:
            if self._system_assigned is not None:
                return self._system_assigned, ""
            if len(user_assigned) == 1:
                return user_assigned[0], ""
            if len(user_assigned) > 1:
                return None, (
                    "Multiple user assigned identities exist, please specify the clientId / "
                    "resourceId of the identity in the token request"
                )
            return None, not_found
        ((name, value),) = selectors.items()
        wanted = value.casefold()
        system = [self._system_assigned] if self._system_assigned else []
        for identity in [*system, *user_assigned]:
            if name == "client_id":
                candidate = identity.client_id
            elif name == "object_id":
                candidate = identity.object_id
            elif identity.system_assigned:
                continue
            else:
                candidate = identity.resource_id
            if candidate.casefold() == wanted:
                return identity, ""
        return None, not_found

    def _mint(self, identity: ManagedIdentity, resource: str, now: int) -> _CachedToken:
        lifetime = int(self.token_lifetime)
        issuer = f"https://sts.windows.net/{self.tenant_id}/"
        not_before = now - REFRESH_MARGIN  # Entra ID back-dates iat/nbf by five minutes
        expires_on = now + lifetime
        claims = {
            "aud": resource,
            "iss": issuer,
            "iat": not_before,
            "nbf": not_before,
            "exp": expires_on,
            "appid": identity.client_id,
            "appidacr": "2",
            "idp": issuer,
            "idtyp": "app",
            "oid": identity.object_id,
            "sub": identity.object_id,
            "tid": self.tenant_id,
            "uti": uuid.uuid4().hex[:22],
            "ver": "1.0",
            "xms_mirid": identity.resource_id,
        }
        return _CachedToken(
            access_token=self._signer.sign(claims),
            expires_on=expires_on,
            not_before=not_before,
        )

    def _invalid_resource(self, resource: str) -> web.Response:
        timestamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        trace_id = str(uuid.uuid4())
        correlation_id = str(uuid.uuid4())
        logger.info("IMDS rejected unknown resource %s", resource)
        return _json(
            {
                "error": "invalid_resource",
                "error_description": (
                    f"AADSTS500011: The resource principal named {resource} was not found in "
                    f"the tenant named {self.tenant_id}. This can happen if the application "
                    "has not been installed by the administrator of the tenant or consented "
                    "to by any user in the tenant. You might have sent your authentication "
                    f"request to the wrong tenant.\r\nTrace ID: {trace_id}\r\nCorrelation ID: "
                    f"{correlation_id}\r\nTimestamp: {timestamp}"
                ),
                "error_codes": [500011],
                "timestamp": timestamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": "https://login.microsoftonline.com/error?code=500011",
            },
            status=400,
        )


def _child(node: Any, segment: str) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key.casefold() == segment:
                return value
        return None
    if isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
        return node[int(segment)]
    return None


def _check_api_version(
    query: Mapping[str, str], supported: list[str] | None, *, newest_first: bool
) -> web.Response | None:
    newest = (
        sorted(supported, reverse=True)[:3]
        if supported and newest_first
        else list(_TOKEN_API_VERSIONS_NEWEST)
    )
    version = query.get("api-version")
    if not version:
        return _json(
            {
                "error": "Bad request. api-version was not specified in the request. For more "
                "information refer to aka.ms/azureimds",
                "newest-versions": newest,
            },
            status=400,
        )
    valid = (
        version in supported
        if supported is not None
        else bool(_API_VERSION_RE.match(version)) and version >= "2018-02-01"
    )
    if not valid:
        return _json(
            {
                "error": "Bad request. api-version is invalid or was not specified in the "
                "request. For more information refer to aka.ms/azureimds",
                "newest-versions": newest,
            },
            status=400,
        )
    return None


def _forwarded_rejected() -> web.Response:
    return _error(
        400,
        "invalid_request",
        "Request contains an X-Forwarded-For header: requests relayed through a proxy are "
        "not accepted",
    )


def _injected(failure: _Failure) -> web.Response:
    headers = {} if failure.retry_after is None else {"Retry-After": str(failure.retry_after)}
    descriptions = {
        404: ("not_found", "IMDS endpoint is updating"),
        410: ("gone", "IMDS is going through updates, available within 70 seconds"),
        429: ("too_many_requests", "Too many requests"),
        500: ("unknown", "Failed to retrieve token from the Active directory."),
        503: ("server_error", "Service is temporarily unavailable"),
    }
    error, description = descriptions.get(
        failure.status,
        ("server_error", "Injected failure")
        if failure.status >= 500
        else ("invalid_request", "Injected failure"),
    )
    logger.info("IMDS injected failure %d", failure.status)
    return _error(failure.status, error, description, headers=headers)
