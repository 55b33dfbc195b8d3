"""The controller's only door to Azure Resource Manager: the identity blocks of VMs and scale sets.

Why: everything MIC does in Azure is reading and changing the ``identity``
block of a node's VM or scale set, and that is where aad-pod-identity hurt
its users: ARM throttling that it made worse (#676, #677, #988, #1139,
#1267), a PATCH per change, a stale first error returned after a retry had
succeeded.  :class:`IdentityClient` does it with the Azure SDK's ARM
runtime - ``azure.mgmt.core``'s ``AsyncARMPipelineClient`` with the policies
azure-mgmt-compute's client builds (ARM challenge authentication over the
credential of :mod:`nmi.azure.credentials`, resource-provider registration,
ARM's HTTP logging, request ids, redirects, the retry policy below) - sending
the two requests it needs as JSON: GET and PATCH of a VM or scale set at
``api-version`` :data:`COMPUTE_API_VERSION`.  azure-mgmt-compute itself is
not used at run time: its generated models cost 20.6 MB of resident memory
in the controller (measured: import ``azure.mgmt.compute.aio`` after the rest
of the controller, 75.4 - 54.9 MB), a fifth of the 100 MB the controller
must fit in at 5,000 pods, for two operations whose JSON is four fields; the
tests still drive the ARM emulator with it, so the wire format stays the
SDK's.  The rules:

* one coalesced change per call: a PATCH of the ``identity`` block only,
  additions as ``{}``, removals as ``null``, ``SystemAssigned`` kept, and the
  type computed as aad-pod-identity did (``SystemAssigned, UserAssigned`` /
  ``UserAssigned`` while user identities remain, else ``SystemAssigned`` /
  ``None`` with no map); at most 150 identities per PATCH
  (``pkg/cloudprovider/truncate.go``), larger changes in successive PATCHes;
* the long-running operation followed to its end on
  ``Azure-AsyncOperation`` (else ``Location``), at the pace ARM asks with
  ``Retry-After``, else every ``polling_interval`` (1 s) - and without the
  SDK poller's final GET of the whole resource (one read per PATCH saved);
* ``FailedIdentityOperation`` / ``LinkedAuthorizationFailed`` naming
  identities: those are dropped and reported, the rest applied, up to
  ``max_retry`` more PATCHes ``retry_interval`` apart (aad-pod-identity's
  ``extractIdentitiesFromError`` and ``--update-user-msi-max-retry`` /
  ``--update-user-msi-retry-interval``); the result tells what was applied
  and what failed with ARM's code and message - never a stale error;
* throttling: an answer with ``Retry-After`` (or a 429) blocks further reads
  - or writes - in that subscription until then; calls meanwhile raise
  :class:`Throttled` at once, without a request.  azure-core's own retry of
  such answers is switched off (``retry_status=0``); it keeps one retry of a
  GET whose connection failed before an answer (a pooled connection the
  server closed), never of a PATCH;
* typed errors (:class:`ArmError`, :class:`NotFound`, :class:`Throttled`,
  :class:`OperationFailed`, :class:`ResourceDeleting`,
  :class:`AuthenticationFailed`, :class:`Unreachable`) so the controller can
  decide, and an ``observe(operation, seconds, error)`` hook for the
  ``cloud_provider_operations_*`` metrics (``vm_get``, ``vm_update``,
  ``vmss_get``, ``vmss_update``).

Concurrent updates of one VM or scale set are serialised here (compute would
otherwise cancel the first operation with ``OperationPreempted``).  Logs
carry identity ids and ARM's messages, never a secret or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import policies
from azure.core.rest import AsyncHttpResponse, HttpRequest
from azure.mgmt.core import AsyncARMPipelineClient
from azure.mgmt.core.exceptions import ARMErrorFormat
from azure.mgmt.core.policies import (
    ARMHttpLoggingPolicy,
    AsyncARMAutoResourceProviderRegistrationPolicy,
    AsyncARMChallengeAuthenticationPolicy,
)

from .. import __version__
from .credentials import CredentialError, CredentialSource, Generation
from .provider_id import NodeResource, is_identity_id, normalise_id

__all__ = [
    "MAX_IDENTITIES_PER_PATCH",
    "RETRIABLE_IDENTITY_ERRORS",
    "ArmError",
    "AuthenticationFailed",
    "CloudError",
    "IdentityClient",
    "IdentityFailure",
    "IdentityState",
    "NotFound",
    "Observer",
    "OperationFailed",
    "ResourceDeleting",
    "Throttled",
    "Unreachable",
    "UpdateResult",
    "extract_identity_ids",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)

Kind = Literal["read", "write"]
#: ``observe(operation, seconds, error)``; operation is vm_get, vm_update, vmss_get or vmss_update.
Observer = Callable[[str, float, bool], None]

ArmClient = AsyncARMPipelineClient[HttpRequest, AsyncHttpResponse]
#: The Microsoft.Compute ``api-version`` sent (azure-mgmt-compute 39's, with the
#: ``userAssignedIdentities`` map every version since 2018-06-01 has).
COMPUTE_API_VERSION: Final = "2026-04-01"
MAX_IDENTITIES_PER_PATCH: Final = 150
RETRIABLE_IDENTITY_ERRORS: Final = frozenset(
    {"FailedIdentityOperation", "LinkedAuthorizationFailed"}
)
#: How long a 429 without ``Retry-After`` blocks (ARM always sends one).
DEFAULT_THROTTLE_SECONDS: Final = 5.0
#: A ``Retry-After`` is honoured up to an hour.
MAX_RETRY_AFTER: Final = 3600.0
#: azure-core's retry policy: no retry on any status (429 and Retry-After are ours), one
#: retry of an idempotent request whose connection failed (PATCH is never retried by it).
CLIENT_RETRY: Final[Mapping[str, int]] = {"retry_total": 1, "retry_status": 0}
_DELETING: Final = "deleting"
_SYSTEM: Final = "systemassigned"
_USER: Final = "userassigned"

# aad-pod-identity's userAssignedIdentitiesPattern (pkg/cloudprovider/cloudprovider.go), with
# Go's mid-pattern (?i) as IGNORECASE; resource-group names may also hold '.', '(' and ')'.
_IDENTITIES_IN_ERROR: Final = re.compile(
    r"'(,?/subscriptions/[a-zA-Z0-9-_]+/resourcegroups/[-\w.()]+/providers/"
    r"Microsoft.ManagedIdentity/userAssignedIdentities/[a-zA-Z0-9-_]+)+'",
    re.IGNORECASE,
)


# -------------------------------------------------------------------------------- errors


class CloudError(Exception):
    """Any failure of an ARM call.  After a partly applied :meth:`IdentityClient.update`,
    :attr:`partial` says what was applied before it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.partial: UpdateResult | None = None


class ArmError(CloudError):
    """ARM answered with an error: HTTP status, ``error.code``, ``error.message``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        request_id: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        #: ``x-ms-request-id`` of the answer (for Azure support).
        self.request_id = request_id
        #: ``Retry-After`` of the answer, in seconds.
        self.retry_after = retry_after

    @property
    def identities(self) -> list[str]:
        """The identity ids the message names (aad-pod-identity's extraction)."""
        return extract_identity_ids(self.message)


class NotFound(ArmError):
    """404: the VM, scale set, resource group or subscription does not exist."""


class OperationFailed(ArmError):
    """The PATCH was accepted but its long-running operation ended Failed or Canceled
    (``status`` is the HTTP status of the poll that said so; 0 for a time-out)."""


class Throttled(CloudError):
    """ARM asked us to wait: nothing of this ``kind`` is sent before ``retry_after`` seconds.

    ``error`` is ARM's answer when this very call was throttled; None when the
    call was refused without a request because an earlier answer still holds.
    """

    def __init__(self, retry_after: float, kind: Kind, *, error: ArmError | None = None) -> None:
        what = f"ARM {kind}s throttled for another {retry_after:.1f} s"
        super().__init__(f"{what}: {error}" if error is not None else what)
        self.retry_after = retry_after
        self.kind = kind
        self.error = error


class ResourceDeleting(CloudError):
    """The VM or scale set is being deleted: no PATCH is sent (aad-pod-identity did the same)."""

    def __init__(self, resource_id: str, provisioning_state: str) -> None:
        super().__init__(f"{resource_id} is in provisioning state {provisioning_state}")
        self.resource_id = resource_id
        self.provisioning_state = provisioning_state


class AuthenticationFailed(CloudError):
    """No ARM token: Azure AD (or the managed-identity endpoint) refused or was unreachable."""


class Unreachable(CloudError):
    """ARM could not be reached, or the connection failed before an answer."""


# --------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class IdentityState:
    """The identity block of a VM or scale set."""

    resource_id: str
    system_assigned: bool
    #: User-assigned identity ids, normalised (:func:`~nmi.azure.provider_id.normalise_id`).
    user_assigned: frozenset[str]
    provisioning_state: str | None
    #: The same ids as ARM spelled them.
    spelled: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def identity_type(self) -> str:
        if self.system_assigned and self.user_assigned:
            return "SystemAssigned, UserAssigned"
        if self.system_assigned:
            return "SystemAssigned"
        return "UserAssigned" if self.user_assigned else "None"


@dataclass(frozen=True)
class IdentityFailure:
    """Why ARM refused one identity: the HTTP status, ``error.code`` and ``error.message``."""

    status: int
    code: str
    message: str


@dataclass(frozen=True)
class UpdateResult:
    """What :meth:`IdentityClient.update` achieved (identity ids normalised).

    ``added``: requested additions now on the resource (also those that already
    were); ``removed``: requested removals now absent; ``failed``: identities
    ARM refused, with its answer (never applied); ``unapplied``: requested
    changes left undone because the retry budget ran out; ``patches``: PATCH
    requests sent; ``state``: the identity block after the last successful
    PATCH (or as read before, or None when nothing had to be read or sent).
    """

    added: frozenset[str]
    removed: frozenset[str]
    failed: Mapping[str, IdentityFailure]
    unapplied: frozenset[str]
    patches: int
    state: IdentityState | None

    @property
    def complete(self) -> bool:
        return not self.failed and not self.unapplied


# ------------------------------------------------------------------------------- parsing


def extract_identity_ids(message: str) -> list[str]:
    """Identity ids an ARM error message names (aad-pod-identity's ``extractIdentitiesFromError``):
    the first quoted, comma-separated list of user-assigned identity ids."""
    match = _IDENTITIES_IN_ERROR.search(message)
    if match is None:
        return []
    return [i for i in match.group(0)[1:-1].split(",") if is_identity_id(i)]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds - delta-seconds or an HTTP-date - clamped to [0, 1 h]; None if
    absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = headers.get(name)
        if value:
            try:
                return min(max(float(value) / 1000.0, 0.0), MAX_RETRY_AFTER)
            except ValueError:
                pass
    return parse_retry_after(headers.get("Retry-After"))


def _error_parts(body: Any) -> tuple[str, str] | None:
    """``(code, message)`` of an ARM error body (``{"error": {...}}`` or the bare object)."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and (inner.get("code") or inner.get("message")):
            return str(inner.get("code") or ""), str(inner.get("message") or "")
    return None


def _arm_error(status: int, headers: Mapping[str, str], body: Any, fallback: str) -> ArmError:
    parts = _error_parts(body) or (f"HTTP{status}", fallback)
    cls = NotFound if status == 404 else ArmError
    return cls(
        status,
        parts[0] or f"HTTP{status}",
        parts[1],
        request_id=headers.get("x-ms-request-id", ""),
        retry_after=_retry_after(headers),
    )


def _error_of(exc: HttpResponseError) -> ArmError:
    response: Any = exc.response
    status = int(exc.status_code or (response.status_code if response is not None else 0))
    headers: Mapping[str, str] = response.headers if response is not None else {}
    body: Any = None
    if exc.error is not None and (exc.error.code or exc.error.message):
        body = {"code": exc.error.code, "message": exc.error.message}
    elif response is not None:
        with contextlib.suppress(Exception):
            body = response.json()
    return _arm_error(status, headers, body, " ".join(str(exc.message or exc).split()))


def _state(
    resource_id: str,
    identity_type: str | None,
    identities: Iterable[str],
    provisioning_state: str | None,
) -> IdentityState:
    kinds = {part.strip().lower() for part in (identity_type or "").split(",")}
    spelled = tuple(identities)
    return IdentityState(
        resource_id=resource_id,
        system_assigned=_SYSTEM in kinds,
        user_assigned=frozenset(normalise_id(i) for i in spelled),
        provisioning_state=provisioning_state,
        spelled=spelled,
    )


def _state_of(resource_id: str, body: Any) -> IdentityState:
    """The state of a VM or scale set as ARM answered it (JSON)."""
    doc: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    identity = _mapping(doc.get("identity"))
    properties = _mapping(doc.get("properties"))
    users = identity.get("userAssignedIdentities")
    kind = identity.get("type")
    state = properties.get("provisioningState")
    return _state(
        resource_id,
        kind if isinstance(kind, str) else None,
        [str(k) for k in users] if isinstance(users, Mapping) else [],
        state if isinstance(state, str) else None,
    )


# --------------------------------------------------------------------------------- client


class _Gate:
    """Read and write blocks per subscription, until a monotonic time."""

    def __init__(self) -> None:
        self._until: dict[tuple[str, Kind], float] = {}

    def remaining(self, subscription: str, kind: Kind) -> float:
        until = self._until.get((subscription.lower(), kind))
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._until[(subscription.lower(), kind)]
            return 0.0
        return left

    def check(self, subscription: str, kind: Kind) -> None:
        left = self.remaining(subscription, kind)
        if left > 0:
            raise Throttled(left, kind)

    def block(self, subscription: str, kind: Kind, seconds: float) -> None:
        key = (subscription.lower(), kind)
        until = time.monotonic() + seconds
        self._until[key] = max(until, self._until.get(key, 0.0))


@dataclass
class _Progress:
    """The bookkeeping of one update: what is still to do, done, refused."""

    present: set[str]
    spelled: dict[str, str]
    system: bool
    add: dict[str, str]
    remove: dict[str, str]
    added: set[str]
    removed: set[str]
    failed: dict[str, IdentityFailure]
    patches: int = 0
    succeeded: int = 0
    state: IdentityState | None = None

    def result(self) -> UpdateResult:
        return UpdateResult(
            added=frozenset(self.added),
            removed=frozenset(self.removed),
            failed=dict(self.failed),
            unapplied=frozenset(self.add) | frozenset(self.remove),
            patches=self.patches,
            state=self.state,
        )


class IdentityClient:
    """Reads and changes the identity blocks of nodes' VMs and scale sets.

    One ARM pipeline client per subscription, made on first use with
    the current credential of ``credentials`` (and made again after the cloud
    configuration changed); :meth:`close` closes them and the credentials.
    """

    def __init__(
        self,
        credentials: CredentialSource,
        *,
        max_retry: int = 2,
        retry_interval: float = 1.0,
        polling_interval: float = 1.0,
        operation_timeout: float = 900.0,
        max_per_patch: int = MAX_IDENTITIES_PER_PATCH,
        observe: Observer | None = None,
    ) -> None:
        if max_retry < 0 or retry_interval < 0 or polling_interval <= 0 or max_per_patch < 1:
            raise ValueError("invalid IdentityClient settings")
        self._credentials = credentials
        self._max_retry = max_retry
        self._retry_interval = retry_interval
        self._polling_interval = polling_interval
        self._operation_timeout = operation_timeout
        self._max_per_patch = max_per_patch
        self._observe_hook = observe
        self._gate = _Gate()
        self._clients: dict[tuple[int, str], ArmClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: Counter[str] = Counter()

    # ---------------------------------------------------------------- public

    @property
    def credentials(self) -> CredentialSource:
        """Where the ARM credential comes from (owned: :meth:`close` closes it)."""
        return self._credentials

    def throttled_for(self, subscription: str, kind: Kind) -> float:
        """Seconds until ``kind`` calls in ``subscription`` may be sent again (0: now)."""
        return self._gate.remaining(subscription, kind)

    async def get(self, node: NodeResource) -> IdentityState:
        """The identity block of the node's VM or scale set."""
        return await self._read(node)

    async def update(
        self,
        node: NodeResource,
        *,
        add: Iterable[str],
        remove: Iterable[str],
        current: IdentityState | None = None,
    ) -> UpdateResult:
        """Assign ``add`` and unassign ``remove`` on the node's VM or scale set, in one change.

        The identity block is read first (a GET), unless ``current`` - a state
        just read with :meth:`get` - is given.  An identity in both lists is
        kept (aad-pod-identity did the same); identities already in the wanted
        state cost nothing, and with nothing to change no request is sent.
        Identities ARM refuses by name end in :attr:`UpdateResult.failed`;
        any other failure raises a :class:`CloudError` (with
        :attr:`CloudError.partial` if some PATCH had already succeeded).
        """
        additions = _by_key(add)
        removals = _by_key(remove)
        for key in additions:
            removals.pop(key, None)
        failed: dict[str, IdentityFailure] = {}
        for wanted in (additions, removals):
            for key, spelled in list(wanted.items()):
                if not is_identity_id(spelled):
                    del wanted[key]
                    failed[key] = IdentityFailure(
                        0,
                        "InvalidIdentityId",
                        f"'{spelled}' is not a user-assigned identity resource id "
                        "(/subscriptions/<sub>/resourcegroups/<rg>/providers/"
                        "Microsoft.ManagedIdentity/userAssignedIdentities/<name>)",
                    )
        if not additions and not removals:
            return UpdateResult(frozenset(), frozenset(), failed, frozenset(), 0, current)

        operation = f"{node.kind}_update"
        async with self._exclusive(node.key):
            try:
                self._gate.check(node.subscription, "write")  # before the GET: nothing is sent
                state = current if current is not None else await self._read(node)
                if (state.provisioning_state or "").lower() == _DELETING:
                    raise ResourceDeleting(node.resource_id, state.provisioning_state or "")
            except CloudError:
                self._observe(operation, 0.0, True)  # an update that failed before its PATCH
                raise
            progress = _Progress(
                present=set(state.user_assigned),
                spelled={normalise_id(s): s for s in state.spelled},
                system=state.system_assigned,
                add={k: v for k, v in additions.items() if k not in state.user_assigned},
                remove={k: v for k, v in removals.items() if k in state.user_assigned},
                added={k for k in additions if k in state.user_assigned},
                removed={k for k in removals if k not in state.user_assigned},
                failed=failed,
                state=state,
            )
            try:
                await self._apply(node, progress)
            except CloudError as exc:
                if progress.succeeded:
                    exc.partial = progress.result()
                raise
            return progress.result()

    async def close(self) -> None:
        """Close the ARM clients and the credentials."""
        self._clients.clear()
        await self._credentials.close()

    # ----------------------------------------------------------------- reads

    async def _read(self, node: NodeResource) -> IdentityState:
        with self._observed(f"{node.kind}_get"):
            self._gate.check(node.subscription, "read")
            async with self._credentials.use() as generation:
                client = self._compute(generation, node.subscription)
                try:
                    answer = await self._send(client, HttpRequest("GET", _url(node)))
                except (AzureError, CredentialError) as exc:
                    raise self._failure(exc, node.subscription, "read") from exc
            return _state_of(node.resource_id, _json(answer))

    # ---------------------------------------------------------------- writes

    async def _apply(self, node: NodeResource, progress: _Progress) -> None:
        retries_left = self._max_retry
        while progress.add or progress.remove:
            entries, type_only = self._next_patch(progress)
            try:
                await self._patch(node, progress, entries, type_only)
            except ArmError as exc:
                named = {normalise_id(i) for i in exc.identities} & set(entries)
                if exc.code not in RETRIABLE_IDENTITY_ERRORS or not named:
                    raise
                for key in sorted(named):
                    progress.failed[key] = IdentityFailure(exc.status, exc.code, exc.message)
                    progress.add.pop(key, None)
                    progress.remove.pop(key, None)
                logger.warning(
                    "ARM refused identities on %s (%s): %s",
                    node.resource_id,
                    exc.code,
                    ", ".join(sorted(named)),
                )
                if not (progress.add or progress.remove):
                    return
                if retries_left == 0:
                    logger.warning(
                        "ARM update of %s: retries spent, %d changes left for the next attempt",
                        node.resource_id,
                        len(progress.add) + len(progress.remove),
                    )
                    return
                retries_left -= 1
                await asyncio.sleep(self._retry_interval)
                continue
            retries_left = self._max_retry
            progress.succeeded += 1
            for key, adding in entries.items():
                if adding:
                    progress.present.add(key)
                    progress.added.add(key)
                    progress.add.pop(key, None)
                else:
                    progress.present.discard(key)
                    progress.removed.add(key)
                    progress.remove.pop(key, None)

    def _next_patch(self, progress: _Progress) -> tuple[dict[str, bool], bool]:
        """The next PATCH's entries (key -> add?) and whether it drops every user identity.

        Removals go first (room under ARM's per-resource limit); a PATCH never
        leaves the resource without user identities while additions remain
        (ARM refuses an empty ``UserAssigned`` set).
        """
        final = (progress.present - set(progress.remove)) | set(progress.add)
        if not final:
            return dict.fromkeys(progress.remove, False), True
        removals = sorted(progress.remove)[: self._max_per_patch]
        additions = sorted(progress.add)[: self._max_per_patch - len(removals)]
        if not additions and progress.add and not (progress.present - set(removals)):
            removals = removals[:-1]
            additions = sorted(progress.add)[:1]
        entries = dict.fromkeys(removals, False)
        entries.update(dict.fromkeys(additions, True))
        return entries, False

    async def _patch(
        self,
        node: NodeResource,
        progress: _Progress,
        entries: Mapping[str, bool],
        type_only: bool,
    ) -> None:
        if type_only:
            identity_type = "SystemAssigned" if progress.system else "None"
            map_: dict[str, Any] | None = None
        else:
            identity_type = "SystemAssigned, UserAssigned" if progress.system else "UserAssigned"
            map_ = {}
            for key, adding in entries.items():
                if adding:
                    map_[progress.add[key]] = {}
                else:
                    map_[progress.spelled.get(key, progress.remove[key])] = None
        adds = sorted(k for k, v in entries.items() if v)
        removes = sorted(k for k, v in entries.items() if not v)
        logger.info(
            "ARM PATCH %s: identity type %s, assign %d, unassign %d",
            node.resource_id,
            identity_type,
            len(adds),
            len(removes),
        )
        logger.debug("ARM PATCH %s: assign %s, unassign %s", node.resource_id, adds, removes)
        with self._observed(f"{node.kind}_update"):
            self._gate.check(node.subscription, "write")
            async with self._credentials.use() as generation:
                client = self._compute(generation, node.subscription)
                progress.patches += 1
                try:
                    answer = await self._send_patch(client, node, identity_type, map_)
                except (AzureError, CredentialError) as exc:
                    if isinstance(exc, CredentialError):
                        progress.patches -= 1  # no token: the PATCH never left
                    raise self._failure(exc, node.subscription, "write") from exc
                state = _state_of(node.resource_id, answer[1])
                await self._follow(client, node, answer[0])
        progress.state = IdentityState(
            state.resource_id,
            state.system_assigned,
            state.user_assigned,
            "Succeeded",
            state.spelled,
        )
        progress.spelled.update({normalise_id(s): s for s in state.spelled})

    async def _send_patch(
        self,
        client: ArmClient,
        node: NodeResource,
        identity_type: str,
        identities: dict[str, Any] | None,
    ) -> tuple[AsyncHttpResponse, Any]:
        identity: dict[str, Any] = {"type": identity_type}
        if identities is not None:
            identity["userAssignedIdentities"] = identities
        answer = await self._send(
            client, HttpRequest("PATCH", _url(node), json={"identity": identity})
        )
        return answer, _json(answer)

    async def _send(self, client: ArmClient, request: HttpRequest) -> AsyncHttpResponse:
        """One request through the ARM pipeline; an error answer raised as the SDK raises it."""
        request.url = client.format_url(request.url)
        request.headers.setdefault("Accept", "application/json")
        answer = await client.send_request(request)
        await answer.read()
        if answer.status_code >= 400:
            raise HttpResponseError(response=answer, error_format=ARMErrorFormat)
        return answer

    async def _follow(
        self, client: ArmClient, node: NodeResource, answer: AsyncHttpResponse
    ) -> None:
        """Wait for the PATCH's long-running operation to end; raise if it did not succeed."""
        url = answer.headers.get("Azure-AsyncOperation")
        monitor = False
        if not url:
            url = answer.headers.get("Location")
            monitor = True
        if not url:
            return  # answered synchronously
        deadline = time.monotonic() + self._operation_timeout
        delay = _retry_after(answer.headers) or self._polling_interval
        while True:
            delay = max(delay, self._gate.remaining(node.subscription, "read"))
            if time.monotonic() + delay > deadline:
                raise OperationFailed(
                    0,
                    "OperationTimedOut",
                    f"the operation on {node.resource_id} did not end within "
                    f"{self._operation_timeout:.0f} s ({url})",
                )
            await asyncio.sleep(delay)
            try:
                poll = await client.send_request(HttpRequest("GET", url))
            except (AzureError, CredentialError) as exc:
                raise self._failure(exc, node.subscription, "read") from exc
            after = _retry_after(poll.headers)
            if poll.status_code == 429 or (poll.status_code >= 400 and after is not None):
                wait = after if after is not None else DEFAULT_THROTTLE_SECONDS
                self._gate.block(node.subscription, "read", wait)
                logger.warning(
                    "ARM throttled the operation status of %s for %.1f s; still following it",
                    node.resource_id,
                    wait,
                )
                delay = wait
                continue
            body = _json(poll)
            if poll.status_code >= 400:
                error = _arm_error(poll.status_code, poll.headers, body, poll.reason or "")
                raise OperationFailed(
                    error.status, error.code, error.message, request_id=error.request_id
                )
            delay = after or self._polling_interval
            if monitor:
                if poll.status_code == 202:
                    continue
                return
            status = str(body.get("status", "") if isinstance(body, Mapping) else "").lower()
            if status == "succeeded":
                return
            if status in ("failed", "canceled", "cancelled"):
                code, message = _error_parts(body) or (status.capitalize(), "")
                raise OperationFailed(
                    poll.status_code,
                    code,
                    message,
                    request_id=answer.headers.get("x-ms-request-id", ""),
                )

    # --------------------------------------------------------------- helpers

    def _compute(self, generation: Generation, subscription: str) -> ArmClient:
        key = (generation.number, subscription.lower())
        client = self._clients.get(key)
        if client is None:
            config = generation.config
            client = _arm_client(
                generation.credential,
                config.arm_endpoint,
                config.arm_scope,
                self._credentials.pool.transport(),
            )
            # Clients of retired generations are closed with them; forget them here.
            self._clients = {k: v for k, v in self._clients.items() if k[0] == generation.number}
            self._clients[key] = client
            generation.resources[f"compute {id(self)} {subscription.lower()}"] = client
        return client

    def _failure(self, exc: Exception, subscription: str, kind: Kind) -> CloudError:
        if isinstance(exc, CredentialError):
            return AuthenticationFailed(exc.message)
        if isinstance(exc, HttpResponseError) and (
            exc.status_code or (exc.response is not None and exc.response.status_code)
        ):
            error = _error_of(exc)
            if error.status == 429 or (error.status >= 400 and error.retry_after is not None):
                wait = (
                    error.retry_after if error.retry_after is not None else DEFAULT_THROTTLE_SECONDS
                )
                self._gate.block(subscription, kind, wait)
                logger.warning(
                    "ARM throttled %ss in subscription %s for %.1f s: %s %s",
                    kind,
                    subscription,
                    wait,
                    error.code,
                    error.message,
                )
                return Throttled(wait, kind, error=error)
            if error.code not in RETRIABLE_IDENTITY_ERRORS:  # those are logged by update()
                logger.warning("ARM %s failed: %s", kind, error)
            return error
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            return Unreachable(f"ARM unreachable: {' '.join(str(exc).split())}")
        return Unreachable(f"ARM call failed: {type(exc).__name__}: {' '.join(str(exc).split())}")

    def _observe(self, operation: str, seconds: float, error: bool) -> None:
        if self._observe_hook is None:
            return
        try:
            self._observe_hook(operation, seconds, error)
        except Exception:  # pragma: no cover - metrics must not break the controller
            logger.exception("observe(%s) failed", operation)

    @contextlib.contextmanager
    def _observed(self, operation: str) -> Iterator[None]:
        start = time.perf_counter()
        error = True
        try:
            yield
            error = False
        finally:
            self._observe(operation, time.perf_counter() - start, error)

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._lock_users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[key] -= 1
            if self._lock_users[key] == 0:
                del self._lock_users[key]
                del self._locks[key]


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _url(node: NodeResource) -> str:
    return f"{node.resource_id}?api-version={COMPUTE_API_VERSION}"


def _arm_client(credential: Any, endpoint: str, scope: str, transport: Any) -> ArmClient:
    """The pipeline azure-mgmt-compute's ``ComputeManagementClient`` builds, in its order."""
    kwargs: dict[str, Any] = {
        "user_agent": f"nmi-mic/{__version__}",
        "retry_total": CLIENT_RETRY["retry_total"],
        "retry_status": CLIENT_RETRY["retry_status"],
    }
    pipeline = [
        policies.RequestIdPolicy(**kwargs),
        policies.HeadersPolicy(**kwargs),
        policies.UserAgentPolicy(**kwargs),
        policies.ProxyPolicy(**kwargs),
        policies.ContentDecodePolicy(**kwargs),
        AsyncARMAutoResourceProviderRegistrationPolicy(),
        policies.AsyncRedirectPolicy(**kwargs),
        policies.AsyncRetryPolicy(**kwargs),
        AsyncARMChallengeAuthenticationPolicy(credential, scope, **kwargs),
        policies.CustomHookPolicy(**kwargs),
        policies.NetworkTraceLoggingPolicy(**kwargs),
        policies.DistributedTracingPolicy(**kwargs),
        policies.SensitiveHeaderCleanupPolicy(**kwargs),
        ARMHttpLoggingPolicy(**kwargs),
    ]
    return AsyncARMPipelineClient(
        base_url=endpoint, policies=pipeline, transport=transport, **kwargs
    )


def _by_key(ids: Iterable[str]) -> dict[str, str]:
    """Normalised id -> the first spelling given (blank entries dropped)."""
    out: dict[str, str] = {}
    for value in ids:
        spelled = value.strip()
        if spelled:
            out.setdefault(normalise_id(spelled), spelled)
    return out


def _json(response: AsyncHttpResponse) -> Any:
    try:
        return response.json()
    except Exception:
        return None
