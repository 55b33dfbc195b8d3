"""The "shadow" trial: proving federation works before an identity is switched to it.

Why: moving an identity from a Secret or a VM-assigned managed identity to
federation (``spec.type: 3``) takes a federated credential in Azure AD whose
issuer, subject and audience must match exactly, for every service account
that uses the identity.  Getting one wrong after the switch is an outage.  So
an identity annotated ``aadpodidentity.k8s.io/federation: shadow`` keeps
serving its existing credential, and nmi tries the federated exchange beside
it, in the background, for each service account whose pods use it:

* never on the request path: the request that was served only *notes* the
  trial (:meth:`ShadowTrials.consider`, a dictionary read), a worker runs it;
* bounded: at most one trial per identity·service account per
  ``--federation-shadow-interval``, at most :data:`MAX_PENDING` waiting (more
  are dropped and noted again later), one running at a time, in its own
  queue of the Azure AD lane (pods' own calls are never queued behind it);
* the result is a metric (``nmi_federation_shadow_ready``), an Event on the
  pod (``FederationReady``, or ``FederationNotReady`` with the AADSTS code and
  what Azure AD was shown) and a line of ``nmi explain``.

The application tried is ``aadpodidentity.k8s.io/federation-client-id`` or the
identity's own client id; the tenant is ``spec.tenantID`` or, for a managed
identity (whose AzureIdentity names none), the ``tid`` of the token just
served.  The token the trial obtains is thrown away.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings
from ..kube.objects import AzureIdentity, Pod
from ..kube.token_request import TokenRequestError, subject_of
from ..ops import events
from ..ops.events import EventRecorder
from ..ops.logs import redact_id as redact
from .credentials import CredentialError
from .lanes import Ticket
from .model import Token, UpstreamError
from .service import TokenService

log = logging.getLogger(__name__)

FEDERATION_READY = "FederationReady"
FEDERATION_NOT_READY = "FederationNotReady"
MAX_PENDING = 256
MAX_RESULTS = 4096
REQUESTER = "(federation shadow)"
_AADSTS = re.compile(r"\bAADSTS\d+\b")

Key = tuple[str, str]  # (identity UID, "namespace/serviceaccount")


@dataclass(frozen=True, slots=True)
class TrialResult:
    """One trial's outcome: never a token, client ids redacted."""

    identity: str  # namespace/name
    service_account: str  # namespace/name
    ready: bool
    code: str  # "" when ready; AADSTSnnnn, Azure AD's error, or what failed before it
    detail: str
    client_id: str  # redacted
    issuer: str
    subject: str
    audience: str
    at: float  # epoch seconds

    def describe(self) -> str:
        if self.ready:
            return (
                f"federation ready: Azure AD issued a token to application {self.client_id} "
                f"for the service-account token of {self.subject} (issuer {self.issuer})"
            )
        return (
            f"federation not ready ({self.code}): {self.detail}; create a federated credential "
            f"on application {self.client_id} with issuer {self.issuer or '(unknown)'}, "
            f"subject {self.subject} and audience {self.audience}"
        )


class ShadowTrials:
    def __init__(
        self,
        *,
        settings: Settings,
        tokens: TokenService,
        events: EventRecorder | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.events = events
        self._clock = clock
        self._due: dict[Key, float] = {}
        self._queue: asyncio.Queue[tuple[AzureIdentity, Pod, str, str]] = asyncio.Queue(
            maxsize=max_pending
        )
        self.results: collections.OrderedDict[Key, TrialResult] = collections.OrderedDict()
        self.trials = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Trials noted and not started yet (at most ``max_pending``)."""
        return self._queue.qsize()

    # -- the request path: synchronous, never waits ---------------------------------

    def consider(self, identity: AzureIdentity, pod: Pod, resource: str, token: Token) -> None:
        """Note that ``pod`` was served ``identity``: a trial is queued when one is due."""
        key = (identity.meta.uid_or_key, pod.service_account_key)
        now = self._clock()
        if now < self._due.get(key, 0.0):
            return
        self._due[key] = now + self.settings.federation_shadow_interval
        if len(self._due) > MAX_RESULTS:
            self._due.pop(next(iter(self._due)))
        try:
            self._queue.put_nowait((identity, pod, resource, token.claim("tid") or ""))
        except asyncio.QueueFull:
            self.dropped += 1
            self._due[key] = now + 5.0  # noted again on a later request

    # -- the worker -------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            identity, pod, resource, tenant = await self._queue.get()
            try:
                await self.trial(identity, pod, resource, tenant_hint=tenant)
            except Exception:  # a trial must never end the worker
                log.exception("federation shadow trial failed unexpectedly")

    async def trial(
        self, identity: AzureIdentity, pod: Pod, resource: str, *, tenant_hint: str = ""
    ) -> TrialResult:
        """Try the federated exchange for ``identity`` and ``pod``'s service account."""
        self.trials += 1
        client_id = identity.federation_client_id or identity.client_id
        audience = self.tokens.audience_of(identity)
        issuer, subject, shown_audience = "", subject_of(pod), audience
        ready, code, detail = False, "", ""
        try:
            _, assertion = await self.tokens.federated(
                identity,
                resource,
                Ticket(requester=REQUESTER),
                pod,
                client_id=client_id,
                tenant_id=identity.tenant_id or tenant_hint,
            )
            ready = True
            issuer, subject, shown_audience = (
                assertion.issuer,
                assertion.subject,
                assertion.audience,
            )
        except UpstreamError as exc:
            found = _AADSTS.search(exc.description)
            code = found.group(0) if found else exc.error
            detail = events.scrub(exc.description.split("\r\n", 1)[0].split(" Trace ID", 1)[0])
            if not exc.retryable:
                detail = detail or exc.error
        except TokenRequestError as exc:
            code, detail = f"TokenRequest {exc.status or exc.reason}", str(exc)
        except CredentialError as exc:
            code, detail = "configuration", str(exc)
        held = self.tokens.assertions
        if not issuer and held is not None:  # refused by Azure AD: the token it was shown
            seen = held.peek(pod.meta.uid_or_key, audience)
            issuer = seen.issuer if seen is not None else held.issuer
        result = TrialResult(
            identity=identity.meta.key,
            service_account=f"{pod.meta.namespace}/{pod.service_account}",
            ready=ready,
            code=code,
            detail=detail[:400],
            client_id=redact(client_id) if client_id else "(none)",
            issuer=issuer,
            subject=subject,
            audience=shown_audience,
            at=time.time(),
        )
        key = (identity.meta.uid_or_key, result.service_account)
        self.results[key] = result
        self.results.move_to_end(key)
        while len(self.results) > MAX_RESULTS:
            self.results.popitem(last=False)
        if self.events is not None:
            self.events.record(
                pod,
                reason=FEDERATION_READY if ready else FEDERATION_NOT_READY,
                message=f"AzureIdentity {identity.meta.key} (shadow): {result.describe()}",
                type=events.NORMAL if ready else events.WARNING,
                action="FederationShadow",
            )
        log.info(
            "federation shadow trial",
            extra={
                "fields": {
                    "identity": identity.meta.key,
                    "service_account": result.service_account,
                    "ready": ready,
                    "code": code,
                }
            },
        )
        return result

    def result_for(self, identity: AzureIdentity, pod: Pod) -> TrialResult | None:
        return self.results.get((identity.meta.uid_or_key, pod.service_account_key))
