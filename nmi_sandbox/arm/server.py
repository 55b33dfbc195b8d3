"""The HTTPS server of the emulated Azure Resource Manager (see :mod:`nmi_sandbox.arm`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import ipaddress
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from nmi_sandbox.aad import TokenSigner
from nmi_sandbox.tls import CertificateAuthority

from .gateway import (
    COMPUTE_BUCKETS,
    DEFAULT_AUDIENCES,
    TYPES,
    Throttle,
    ThrottleCode,
    ThrottleKind,
    Window,
    authenticate,
    check_api_version,
    injected_failure,
    route,
    str_claim,
    throttled,
)
from .resources import (
    COMPUTE_API_VERSIONS,
    DEFAULT_IDENTITY_RESOURCE_GROUP,
    DEFAULT_LOCATION,
    DEFAULT_RESOURCE_GROUP,
    DEFAULT_SUBSCRIPTION,
    DEFAULT_TENANT_ID,
    ArmError,
    IdentityState,
    InjectedIdentityFailure,
    NodeRef,
    Operation,
    Resource,
    ResourceKind,
    UserAssignedIdentity,
    identity_resource_id,
    invalid_content,
    merge_identity,
    parse_node_id,
)

__all__ = ["ArmServer", "PatchRecord", "RecordedRequest"]

logger = logging.getLogger("nmi_sandbox.arm")

_MAX_RECORDED: Final = 1000
_MAX_OPERATIONS: Final = 10000
_PREEMPTED: Final = {
    "code": "OperationPreempted",
    "message": "Operation execution has been preempted by a more recent operation.",
}

IdentityFailureCode = Literal["FailedIdentityOperation", "LinkedAuthorizationFailed"]


class RecordedRequest(NamedTuple):
    """One request: what was asked, by whom, and the answer's status."""

    method: str
    path_qs: str
    key: str
    status: int
    appid: str | None
    oid: str | None
    api_version: str | None


@dataclass
class PatchRecord:
    """A PATCH that reached the resource: its body as sent and the status answered."""

    resource_id: str
    body: dict[str, Any]
    appid: str | None
    status: int


def _json(
    body: Mapping[str, Any] | None, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    response = web.Response(
        status=status,
        body=b"" if body is None else json.dumps(body).encode(),
        headers=dict(headers or {}),
    )
    if body is not None:
        response.content_type = "application/json"
        response.charset = "utf-8"
    return response


def _key(*parts: str) -> tuple[str, ...]:
    return tuple(p.casefold() for p in parts)


class ArmServer:
    """An HTTPS Azure Resource Manager (Microsoft.Compute VMs and scale sets) on the loop.

    Register identities, VMs and scale sets, ``await start()``, and point
    ``azure.mgmt.compute.aio.ComputeManagementClient(credential, subscription,
    base_url=server.url)`` at it with a session trusting :attr:`ca_pem`.
    Bearer tokens must be RS256 JWTs from one of ``signers`` (the Azure AD
    and/or IMDS emulators' :class:`~nmi_sandbox.aad.TokenSigner`) for one of
    ``audiences``.  All knobs and counters are plain attributes, changed and
    read on the loop.
    """

    def __init__(
        self,
        *,
        signers: Iterable[TokenSigner | rsa.RSAPublicKey],
        host: str = "127.0.0.1",
        port: int = 0,
        ca: CertificateAuthority | None = None,
        hostnames: Sequence[str] = ("localhost",),
        audiences: Sequence[str] = DEFAULT_AUDIENCES,
        tenant_id: str | None = None,
        authority: str = "https://login.windows.net/",
        api_versions: Iterable[str] = COMPUTE_API_VERSIONS,
        operation_duration: float = 0.5,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._ca = ca if ca is not None else CertificateAuthority()
        self._hostnames = list(hostnames)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._keys: list[tuple[str | None, rsa.RSAPublicKey]] = []
        for signer in signers:
            self.add_signer(signer)
        self._audiences = list(audiences)
        self._api_versions = list(api_versions)
        self._authority = authority

        self._subscriptions: dict[str, str] = {}
        self._resource_groups: set[tuple[str, ...]] = set()
        self._resources: dict[tuple[str, ...], Resource] = {}
        self._identities: dict[str, UserAssignedIdentity] = {}
        self._operations: dict[str, Operation] = {}
        self._throttles: dict[ThrottleKind, collections.deque[Throttle]] = {
            "read": collections.deque(),
            "write": collections.deque(),
        }
        self._identity_failures: dict[str, InjectedIdentityFailure] = {}
        self._operation_failures: collections.deque[dict[str, str]] = collections.deque()
        self._failures: collections.deque[tuple[int, float | None]] = collections.deque()
        self._windows: dict[str, Window] = {
            "read": Window(12000, 3600),
            "write": Window(1200, 3600),
        }
        self._changed = asyncio.Condition()

        #: Seconds (without blocking the loop) before a PATCH is processed and answered.
        self.patch_latency: float = 0.0
        #: Seconds before a GET (resource or operation status) is answered.
        self.get_latency: float = 0.0
        #: Seconds a long-running operation takes from PATCH to ``Succeeded``.
        self.operation_duration: float = operation_duration
        #: ``Retry-After`` (seconds) on PATCH answers and running operation polls; None: absent.
        self.operation_retry_after: int | None = None
        #: User-assigned identities one VM or scale set may carry.
        self.max_identities: int = 100
        #: A PATCH while an operation runs: "preempt" it (compute) or answer 409 "conflict".
        self.concurrent_patches: Literal["preempt", "conflict"] = "preempt"
        #: When set, tokens must come from this tenant (``tid``), as for a subscription of it.
        self.tenant_id: str | None = tenant_id
        #: The tenant of system-assigned identities.
        self.identity_tenant_id: str = tenant_id or DEFAULT_TENANT_ID

        #: Requests by kind: ``"GET vm"``, ``"PATCH vmss"``, ``"GET vmss vm"``, ``"GET operation"``…
        self.requests: collections.Counter[str] = collections.Counter()
        #: Answers by (kind, status).
        self.outcomes: collections.Counter[tuple[str, int]] = collections.Counter()
        #: ``api-version`` values received.
        self.api_versions: collections.Counter[str] = collections.Counter()
        #: The last 1000 requests, oldest first, with the caller's ``appid`` / ``oid``.
        self.log: list[RecordedRequest] = []
        #: Every PATCH that got past authentication, throttling and the api-version check.
        self.patches: list[PatchRecord] = []
        #: HTTP requests of any kind.
        self.http_requests_total: int = 0

    # ------------------------------------------------------------------ registry

    def add_signer(self, signer: TokenSigner | rsa.RSAPublicKey) -> None:
        """Trust tokens signed by ``signer`` (a :class:`TokenSigner` or an RSA public key)."""
        if isinstance(signer, TokenSigner):
            self._keys.append((signer.kid, signer.public_key))
        else:
            self._keys.append((None, signer))

    def add_identity(
        self,
        name: str,
        *,
        resource_group: str = DEFAULT_IDENTITY_RESOURCE_GROUP,
        subscription: str = DEFAULT_SUBSCRIPTION,
        client_id: str | None = None,
        principal_id: str | None = None,
    ) -> UserAssignedIdentity:
        """Create a user-assigned identity; returns its resource id, client id and principal id."""
        identity = UserAssignedIdentity(
            identity_resource_id(subscription, resource_group, name),
            client_id or str(uuid.uuid4()),
            principal_id or str(uuid.uuid4()),
        )
        self._identities[identity.resource_id.casefold()] = identity
        self._subscriptions.setdefault(subscription.casefold(), subscription)
        return identity

    def delete_identity(self, identity_id: str) -> None:
        """Delete an identity from the registry; VMs and scale sets keep showing it."""
        if self._identities.pop(identity_id.casefold(), None) is None:
            raise KeyError(f"no user-assigned identity {identity_id!r}")

    def identity(self, identity_id: str) -> UserAssignedIdentity:
        """A registered identity by resource id (case-insensitive)."""
        try:
            return self._identities[identity_id.casefold()]
        except KeyError:
            raise KeyError(f"no user-assigned identity {identity_id!r}") from None

    def add_vm(
        self,
        name: str,
        *,
        resource_group: str = DEFAULT_RESOURCE_GROUP,
        subscription: str = DEFAULT_SUBSCRIPTION,
        location: str = DEFAULT_LOCATION,
        system_assigned: bool = False,
        identities: Iterable[str] = (),
    ) -> str:
        """Create a VM (a node); returns its ARM id."""
        identities = [self.identity(i).resource_id for i in identities]
        resource = self._add("vm", name, resource_group, subscription, location, {})
        return self._assign_initial(resource, system_assigned, identities)

    def add_vmss(
        self,
        name: str,
        *,
        instances: int | Iterable[str | int] = 1,
        resource_group: str = DEFAULT_RESOURCE_GROUP,
        subscription: str = DEFAULT_SUBSCRIPTION,
        location: str = DEFAULT_LOCATION,
        system_assigned: bool = False,
        identities: Iterable[str] = (),
    ) -> str:
        """Create a scale set with ``instances`` (a count, or instance ids); returns its ARM id.

        Instance ``i`` is the VM ``{name}_{i}``, computer (node) name ``{name}`` +
        ``i`` in base 36 on six digits, as AKS names nodes.
        """
        identities = [self.identity(i).resource_id for i in identities]
        ids = [str(i) for i in (range(instances) if isinstance(instances, int) else instances)]
        members = {i: f"{name}{_base36(int(i)) if i.isdigit() else i:0>6}" for i in ids}
        resource = self._add("vmss", name, resource_group, subscription, location, members)
        return self._assign_initial(resource, system_assigned, identities)

    def _add(
        self,
        kind: ResourceKind,
        name: str,
        resource_group: str,
        subscription: str,
        location: str,
        instances: dict[str, str],
    ) -> Resource:
        resource = Resource(
            kind=kind,
            subscription=subscription,
            resource_group=resource_group,
            name=name,
            location=location,
            identity=IdentityState(),
            instances=instances,
        )
        self._subscriptions.setdefault(subscription.casefold(), subscription)
        self._resource_groups.add(_key(subscription, resource_group))
        self._resources[_key(subscription, resource_group, kind, name)] = resource
        return resource

    def _assign_initial(
        self, resource: Resource, system_assigned: bool, identities: Iterable[str]
    ) -> str:
        self.set_identities(resource.id, identities, system_assigned=system_assigned)
        resource.etag = 1
        return resource.id

    def set_identities(
        self,
        resource_id: str,
        identity_ids: Iterable[str],
        *,
        system_assigned: bool | None = None,
    ) -> None:
        """Replace the user-assigned identities at once, out of band (a portal edit: drift)."""
        resource = self._resource(resource_id)
        state = resource.identity.copy()
        state.user_assigned = {i.casefold(): self.identity(i) for i in identity_ids}
        if system_assigned is not None and system_assigned != state.system_assigned:
            state.system_assigned = system_assigned
            state.principal_id = str(uuid.uuid4()) if system_assigned else None
            state.tenant_id = self.identity_tenant_id if system_assigned else None
        resource.identity = state
        resource.etag += 1

    def identities_on(self, resource_id: str) -> set[str]:
        """Resource ids of the user-assigned identities in effect on a VM or scale set.

        ``resource_id`` may also be a node providerID or a scale-set instance id
        (then the scale set's).  Identities of a running operation are not in
        effect until it succeeds.
        """
        return {i.resource_id for i in self._resource(resource_id).identity.user_assigned.values()}

    def client_ids_on_node(self, provider_id: str) -> set[str]:
        """Client ids a node's IMDS serves: the VM's, or its scale set's; empty if unknown."""
        try:
            resource = self._resource(provider_id)
        except KeyError:
            return set()
        return {i.client_id for i in resource.identity.user_assigned.values() if i.client_id}

    def system_identity(self, resource_id: str) -> tuple[str, str] | None:
        """``(principalId, tenantId)`` of the system-assigned identity, if enabled."""
        state = self._resource(resource_id).identity
        if not state.system_assigned or state.principal_id is None or state.tenant_id is None:
            return None
        return state.principal_id, state.tenant_id

    def provisioning_state(self, resource_id: str) -> str:
        return self._resource(resource_id).provisioning_state

    def instances(self, resource_id: str) -> dict[str, str]:
        """Instance id -> computer (node) name of a scale set."""
        return dict(self._resource(resource_id).instances)

    def provider_id(
        self,
        *,
        vm: str | None = None,
        vmss: str | None = None,
        instance: str | int | None = None,
        resource_group: str = DEFAULT_RESOURCE_GROUP,
        subscription: str = DEFAULT_SUBSCRIPTION,
    ) -> str:
        """A node's ``spec.providerID``: ``azure:///subscriptions/.../virtualMachines/<vm>``
        or ``.../virtualMachineScaleSets/<vmss>/virtualMachines/<instance>``."""
        base = f"azure:///subscriptions/{subscription}/resourceGroups/{resource_group}"
        base += "/providers/Microsoft.Compute"
        if vm is not None and vmss is None and instance is None:
            return f"{base}/virtualMachines/{vm}"
        if vmss is not None and vm is None and instance is not None:
            return f"{base}/virtualMachineScaleSets/{vmss}/virtualMachines/{instance}"
        raise ValueError("give vm=, or vmss= and instance=")

    @property
    def operations_in_flight(self) -> int:
        return sum(1 for op in self._operations.values() if op.status == "InProgress")

    def _resource(self, resource_id: str) -> Resource:
        try:
            ref: NodeRef = parse_node_id(resource_id)
        except ValueError as exc:
            raise KeyError(str(exc)) from None
        resource = self._resources.get(
            _key(ref.subscription, ref.resource_group, ref.kind, ref.name)
        )
        if resource is None or (
            ref.instance is not None and ref.instance not in resource.instances
        ):
            raise KeyError(f"no such VM or scale set: {resource_id!r}")
        return resource

    # --------------------------------------------------------------------- knobs

    def throttle(
        self,
        kind: ThrottleKind,
        n: int,
        *,
        retry_after: float = 5,
        code: ThrottleCode = "TooManyRequests",
    ) -> None:
        """Answer the next ``n`` reads (GET) or writes (PATCH) with 429 and ``Retry-After``.

        ``TooManyRequests`` is compute's own throttling (``x-ms-ratelimit-remaining-resource``
        at 0); ``SubscriptionRequestsThrottled`` is ARM's per-subscription limit
        (``x-ms-ratelimit-remaining-subscription-reads``/``-writes`` at 0).
        ARM sends whole seconds; a fraction is allowed here to keep tests short.
        """
        self._throttles[kind].extend(Throttle(retry_after, code) for _ in range(n))

    def fail_identity(
        self,
        identity_id: str,
        code: IdentityFailureCode = "FailedIdentityOperation",
        *,
        status: int | None = None,
    ) -> None:
        """Make every PATCH that assigns ``identity_id`` fail with ``code`` naming it.

        ``FailedIdentityOperation`` answers 400 (the managed-identity provider's
        NotFound, wrapped by compute), ``LinkedAuthorizationFailed`` 403.
        """
        default = 403 if code == "LinkedAuthorizationFailed" else 400
        self._identity_failures[identity_id.casefold()] = InjectedIdentityFailure(
            code, status or default
        )

    def clear_identity_failures(self) -> None:
        self._identity_failures.clear()

    def fail_next_operation(
        self,
        n: int = 1,
        *,
        code: str = "InternalExecutionError",
        message: str = "An internal execution error occurred. Please retry later.",
    ) -> None:
        """Make the next ``n`` long-running operations end ``Failed`` (nothing changes)."""
        self._operation_failures.extend({"code": code, "message": message} for _ in range(n))

    def fail_next(self, n: int, *, status: int = 500, retry_after: float | None = None) -> None:
        """Answer the next ``n`` authenticated requests with ``status`` (500, 502, 503, 504)."""
        self._failures.extend((status, retry_after) for _ in range(n))

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen on ``host:port`` with TLS."""
        if self._runner is not None:
            raise RuntimeError("already started")
        ips: list[str] = []
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(self._host)
            ips.append("127.0.0.1" if address.is_unspecified else self._host)
        tls = self._ca.issue_server(self._hostnames, ips).ssl_context()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port, ssl_context=tls)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        logger.info("ARM emulator listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening; running operations are abandoned."""
        tasks = [op.task for op in self._operations.values() if op.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            logger.info("ARM emulator stopped")

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def url(self) -> str:
        """``https://host:port``: the ``base_url`` of the compute client."""
        host = self._host
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            if address.is_unspecified:
                host = "127.0.0.1"
            elif address.version == 6:
                host = f"[{host}]"
        return f"https://{host}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem

    # ------------------------------------------------------------------- waiting

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; re-checked after every request and operation end."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout} s") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.http_requests_total += 1
        route_name, match = route(request.path)
        key = f"{request.method} {route_name}"
        self.requests[key] += 1
        claims: dict[str, Any] = {}
        api_version = request.query.get("api-version")
        if api_version is not None:
            self.api_versions[api_version] += 1
        request_id = str(uuid.uuid4())
        try:
            claims = authenticate(
                request.headers.get("Authorization"),
                keys=self._keys,
                audiences=self._audiences,
                tenant_id=self.tenant_id,
                authority=self._authority,
            )
            self._check_limits(request, key, match, claims)
            check_api_version(
                api_version,
                route_name=route_name,
                supported=self._api_versions,
                location=self._location_of(route_name, match),
                locations=[r.location for r in self._resources.values()],
            )
            if request.method == "GET" and self.get_latency > 0:
                await asyncio.sleep(self.get_latency)
            elif request.method == "PATCH" and self.patch_latency > 0:
                await asyncio.sleep(self.patch_latency)
            response, request_id = await self._handle(request, route_name, match, claims)
        except ArmError as exc:
            response = _json(exc.body(), status=exc.status, headers=exc.headers)
            logger.info("ARM %s %s -> %d %s", request.method, request.path, exc.status, exc.code)
        self._decorate(request, response, key, request_id)
        self.log.append(
            RecordedRequest(
                request.method,
                request.raw_path,
                key,
                response.status,
                str_claim(claims, "appid") or str_claim(claims, "azp"),
                str_claim(claims, "oid"),
                api_version,
            )
        )
        if len(self.log) > _MAX_RECORDED:
            del self.log[: len(self.log) - _MAX_RECORDED]
        self.outcomes[(key, response.status)] += 1
        await self._notify()
        return response

    def _check_limits(
        self,
        request: web.Request,
        key: str,
        match: re.Match[str] | None,
        claims: Mapping[str, Any],
    ) -> None:
        kind: ThrottleKind = "read" if request.method in ("GET", "HEAD") else "write"
        if self._throttles[kind]:
            raise throttled(
                self._throttles[kind].popleft(),
                kind=kind,
                key=key,
                subscription=match["sub"] if match is not None else DEFAULT_SUBSCRIPTION,
                oid=str_claim(claims, "oid"),
            )
        if self._failures:
            raise injected_failure(*self._failures.popleft())

    def _location_of(self, route_name: str, match: re.Match[str] | None) -> str:
        if match is None:
            return DEFAULT_LOCATION
        if route_name == "operation":
            return match["loc"]
        kind = "vm" if route_name == "vm" else "vmss"
        found = self._resources.get(_key(match["sub"], match["rg"], kind, match["name"]))
        return found.location if found else DEFAULT_LOCATION

    def _decorate(
        self, request: web.Request, response: web.Response, key: str, request_id: str
    ) -> None:
        correlation = request.headers.get("x-ms-correlation-request-id") or str(uuid.uuid4())
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        headers = {
            "Cache-Control": "no-cache",
            "Pragma": "no-cache",
            "Expires": "-1",
            "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
            "X-Content-Type-Options": "nosniff",
            "x-ms-request-id": request_id,
            "x-ms-correlation-request-id": correlation,
            "x-ms-routing-request-id": f"{DEFAULT_LOCATION.upper()}:{stamp}:{correlation}",
            "Server": "Microsoft-HTTPAPI/2.0",
        }
        if response.status != 429:
            kind = "write" if request.method in ("PUT", "PATCH", "POST", "DELETE") else "read"
            remaining = str(self._windows[kind].take())
            headers[f"x-ms-ratelimit-remaining-subscription-{kind}s"] = remaining
            headers[f"x-ms-ratelimit-remaining-subscription-global-{kind}s"] = remaining
            bucket = COMPUTE_BUCKETS.get(key)
            if bucket is not None and response.status < 400:
                headers["x-ms-ratelimit-remaining-resource"] = self._compute_budget(*bucket)
        for name, value in headers.items():
            response.headers.setdefault(name, value)

    def _compute_budget(self, bucket: str, short: int, long: int) -> str:
        left = []
        for suffix, limit, seconds in (("3Min", short, 180), ("30Min", long, 1800)):
            window = self._windows.setdefault(bucket + suffix, Window(limit, seconds))
            left.append(f"Microsoft.Compute/{bucket}{suffix};{window.take()}")
        return ",".join(left)

    # ------------------------------------------------------------------ handlers

    async def _handle(
        self,
        request: web.Request,
        route: str,
        match: re.Match[str] | None,
        claims: Mapping[str, Any],
    ) -> tuple[web.Response, str]:
        request_id = str(uuid.uuid4())
        if match is None:
            raise ArmError(
                404,
                "InvalidResourceType",
                f"The resource type could not be found for the path '{request.path}'.",
            )
        method = request.method
        if route == "operation":
            if method != "GET":
                raise _not_implemented(method, TYPES[route])
            return self._operation(request, match), request_id
        resource = self._lookup(route, match)
        if method == "GET":
            if route == "vmss vm":
                return _json(resource.render_instance(match["instance"])), request_id
            body = resource.render(resource.identity, resource.provisioning_state)
            return _json(body), request_id
        if method == "PATCH" and route in ("vm", "vmss"):
            return await self._patch(request, resource, claims)
        raise _not_implemented(method, TYPES[route])

    def _lookup(self, route: str, match: re.Match[str]) -> Resource:
        sub, rg, name = match["sub"], match["rg"], match["name"]
        if sub.casefold() not in self._subscriptions:
            raise ArmError(
                404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found."
            )
        if _key(sub, rg) not in self._resource_groups:
            raise ArmError(
                404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found."
            )
        kind: ResourceKind = "vm" if route == "vm" else "vmss"
        resource = self._resources.get(_key(sub, rg, kind, name))
        if resource is None:
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.Compute/{TYPES[kind]}/{name}' under resource group "
                f"'{rg}' was not found. For more details please go to "
                "https://aka.ms/ARMResourceNotFoundFix",
            )
        if route == "vmss vm" and match["instance"] not in resource.instances:
            raise ArmError(404, "NotFound", "The entity was not found in this Azure location.")
        return resource

    async def _patch(
        self, request: web.Request, resource: Resource, claims: Mapping[str, Any]
    ) -> tuple[web.Response, str]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            raise invalid_content(
                "Unexpected character encountered while parsing value. Path '', line 1, position 0"
            ) from None
        if not isinstance(body, dict):
            raise invalid_content("The request content is not a JSON object. Path ''")
        caller = str_claim(claims, "appid") or str_claim(claims, "azp")
        record = PatchRecord(resource.id, body, caller, 0)
        self.patches.append(record)
        try:
            response, op = self._accept_patch(request, resource, body, claims)
        except ArmError as exc:
            record.status = exc.status
            raise
        record.status = response.status
        return response, op.id

    def _accept_patch(
        self,
        request: web.Request,
        resource: Resource,
        body: Mapping[str, Any],
        claims: Mapping[str, Any],
    ) -> tuple[web.Response, Operation]:
        if_match = request.headers.get("If-Match")
        if if_match not in (None, "*", f'"{resource.etag}"'):
            raise ArmError(
                412,
                "PreconditionFailed",
                f"The specified precondition 'If-Match = {if_match}' failed.",
            )
        running = resource.pending
        if running is not None and self.concurrent_patches == "conflict":
            raise ArmError(
                409,
                "Conflict",
                "The request failed due to conflict with a concurrent request. To resolve it, "
                "please refer to https://aka.ms/activitylog to get more details on the "
                "conflicting requests.",
            )
        base = running.target if running is not None else resource.identity
        target = base
        if body.get("identity") is not None:
            target = merge_identity(
                base,
                body["identity"],
                resource_id=resource.id,
                resource_type=TYPES[resource.kind],
                caller=str_claim(claims, "oid") or "",
                registry=self._identities,
                failures=self._identity_failures,
                limit=self.max_identities,
                tenant_id=self.identity_tenant_id,
            )
        if running is not None:
            running.finish("Canceled", dict(_PREEMPTED))
            if running.task is not None:
                running.task.cancel()
        op = Operation(
            id=str(uuid.uuid4()),
            resource=resource,
            target=target,
            duration=self.operation_duration,
            failure=self._operation_failures.popleft() if self._operation_failures else None,
        )
        self._operations[op.id] = op
        if len(self._operations) > _MAX_OPERATIONS:
            finished = [k for k, v in self._operations.items() if v.status != "InProgress"]
            for old in finished[: len(self._operations) - _MAX_OPERATIONS]:
                del self._operations[old]
        resource.pending = op
        resource.provisioning_state = "Updating"
        resource.etag += 1
        op.task = asyncio.get_running_loop().create_task(self._run(op))

        api_version = request.query["api-version"]
        base_url = (
            f"https://{request.host}/subscriptions/{resource.subscription}/providers/"
            f"Microsoft.Compute/locations/{resource.location}/operations/{op.id}"
        )
        partition = uuid.uuid4()
        headers = {
            "Azure-AsyncOperation": f"{base_url}?p={partition}&api-version={api_version}",
            "Location": f"{base_url}?p={partition}&monitor=true&api-version={api_version}",
            "Azure-AsyncNotification": "Enabled",
        }
        if self.operation_retry_after is not None:
            headers["Retry-After"] = str(self.operation_retry_after)
        logger.info(
            "ARM PATCH %s: operation %s, identities -> %s",
            resource.id,
            op.id,
            sorted(i.resource_id for i in target.user_assigned.values()),
        )
        return _json(resource.render(target, "Updating"), headers=headers), op

    async def _run(self, op: Operation) -> None:
        await asyncio.sleep(op.duration)
        resource = op.resource
        if resource.pending is not op:  # pragma: no cover - preempted ops are cancelled
            return
        resource.pending = None
        if op.failure is not None:
            op.finish("Failed", op.failure)
            resource.provisioning_state = "Failed"
        else:
            op.finish("Succeeded")
            resource.identity = op.target
            resource.provisioning_state = "Succeeded"
        logger.info("ARM operation %s on %s: %s", op.id, resource.id, op.status)
        await self._notify()

    def _operation(self, request: web.Request, match: re.Match[str]) -> web.Response:
        op = self._operations.get(match["op"])
        if op is None or op.resource.subscription.casefold() != match["sub"].casefold():
            raise ArmError(404, "NotFound", "The entity was not found in this Azure location.")
        retry = (
            {"Retry-After": str(self.operation_retry_after)}
            if self.operation_retry_after is not None and op.status == "InProgress"
            else {}
        )
        if request.query.get("monitor", "").casefold() != "true":
            return _json(op.render(), headers=retry)
        if op.status == "InProgress":
            return _json(None, status=202, headers={"Location": str(request.url), **retry})
        if op.status == "Succeeded":
            return _json(None)
        assert op.error is not None
        raise ArmError(
            409 if op.status == "Canceled" else 500, op.error["code"], op.error["message"]
        )


def _not_implemented(method: str, resource_type: str) -> ArmError:
    return ArmError(
        405,
        "MethodNotAllowed",
        f"The emulator does not implement {method} on 'Microsoft.Compute/{resource_type}'.",
    )


def _base36(value: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        value, rest = divmod(value, 36)
        out = digits[rest] + out
        if value == 0:
            return out
