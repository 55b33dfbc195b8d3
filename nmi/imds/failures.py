"""Every way a token request can end without a token, mapped in one place.

Why: a refusal or a failure is seen four times — the pod gets an IMDS-style
JSON reply (the status and wording its SDK acts on), the access log gets a
reason, the pod gets a Kubernetes Event, and ``nmi explain`` remembers the
last upstream error of the identity.  Building all four here, from the same
outcome, keeps them in agreement, and keeps the route code a straight line.

The replies follow the IMDS contract (docs/imds-contract.md): design-time
problems are 400 (clients do not retry them), transient ones 503 or 429 with
``Retry-After`` (clients do), and nmi's own transient states (a pod or an
assignment not visible yet) 404, or 503 with ``--set-retry-after-header``.
Event and log texts never carry a token, a secret or a full client id.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from ..identity.caller import CallerProblem
from ..identity.decide import Decision, Deny, IdentitySelector, Wait, owner_of
from ..kube.objects import AzureIdentity
from ..kube.secrets import SecretUnavailable
from ..kube.token_request import TokenRequestError
from ..ops import events
from ..ratelimit import TokenBucket
from ..tokens.credentials import CredentialError
from ..tokens.model import UpstreamError
from . import replies
from .messages import Reply
from .query import QueryError

NOT_ASSIGNED = "The pod's identity is not yet assigned on this node"
UNKNOWN_CALLER = "No pod identity could be determined for this caller"


@dataclass(frozen=True, slots=True)
class Failure:
    """One outcome without a token, as each audience sees it."""

    reply: Reply
    reason: str  # the access log's ``reason``
    event: tuple[str, str] | None = None  # (reason, message) of the pod's Event
    owner: str | None = None  # whose last error this is (``owner_of`` the decision)
    summary: str = ""  # the last error, for ``nmi explain``


def query_error(exc: QueryError) -> Reply:
    if exc.kind == "api_version_missing":
        return replies.api_version_missing()
    if exc.kind == "api_version_invalid":
        return replies.api_version_missing(invalid=True)
    return replies.bad_request(exc.description)


def unknown_caller(problem: CallerProblem, settings: Settings) -> Failure:
    """The source IP is not one pod of this node (yet)."""
    return Failure(
        reply=replies.not_ready(
            f"{UNKNOWN_CALLER} ({problem.kind})",
            retry_after_header=settings.set_retry_after_header,
        ),
        reason=problem.reason,
    )


def refused(
    decision: Deny | Wait, *, resource: str, selector: IdentitySelector, settings: Settings
) -> Failure:
    """The identity decision refused (after any wait it allowed)."""
    asked = "" if selector.empty else f" ({selector.describe()})"
    if isinstance(decision, Wait):
        return Failure(
            reply=replies.not_ready(
                NOT_ASSIGNED, retry_after_header=settings.set_retry_after_header
            ),
            reason=decision.reason,
            event=(
                events.IDENTITY_NOT_ASSIGNED,
                f"Token request for {resource}{asked} refused: the pod's identity was not "
                f"assigned on this node in time ({decision.reason}); MIC may be behind or "
                "failing",
            ),
        )
    if decision.kind == "multiple":
        return Failure(
            reply=replies.multiple_identities(),
            reason=decision.reason,
            event=(
                events.MULTIPLE_IDENTITIES,
                f"Token request for {resource} refused: {decision.reason} and the request "
                "names none; specify client_id or msi_res_id",
            ),
        )
    return Failure(
        reply=replies.identity_not_found(),
        reason=decision.reason,
        event=(
            events.IDENTITY_NOT_FOUND,
            f"Token request for {resource}{asked} refused: Identity not found ({decision.reason})",
        ),
    )


def over_budget(bucket: TokenBucket) -> Failure:
    """The pod spent its budget of requests that cost upstream calls or waits."""
    return Failure(
        reply=replies.error(
            429,
            "too_many_requests",
            "Too many requests from this pod",
            retry_after=bucket.retry_after(),
        ),
        reason="per-pod rate limit",
    )


def _name(identity: AzureIdentity | None) -> str:
    return "the node's identity" if identity is None else f"AzureIdentity {identity.meta.key}"


def _identity(decision: Decision) -> AzureIdentity | None:
    return getattr(decision, "identity", None)


def upstream(exc: UpstreamError, decision: Decision, resource: str) -> Failure:
    """Azure AD or the node IMDS gave no token: the same reply for every waiter."""
    identity = _identity(decision)
    code = exc.status if exc.status is not None else "-"
    reason = f"{exc.source} {code} {exc.error}"
    if exc.retryable:
        if exc.status == 429:
            reply = replies.error(
                429,
                "too_many_requests",
                "The token service is throttling requests",
                retry_after=exc.retry_after or 1,
            )
        else:
            reply = replies.error(
                503,
                "server_error",
                f"The token service failed temporarily ({exc.error})",
                retry_after=exc.retry_after or 5,
            )
    else:
        reply = replies.json_reply(
            400, {"error": exc.error or "invalid_request", "error_description": exc.description}
        )
    # Azure AD repeats client ids in its descriptions: the pod gets them as sent (they
    # are its own identity's), the Event and `nmi explain` only redacted.
    detail = f": {events.scrub(exc.description)}" if exc.description else ""
    if exc.shown:  # a federated exchange: what Azure AD was shown, to fix the credential
        detail += f" (the service-account token presented: {exc.shown})"
    return Failure(
        reply=reply,
        reason=reason,
        event=(
            events.TOKEN_REQUEST_FAILED,
            f"Token request for {resource} with {_name(identity)} failed upstream "
            f"({reason}){detail}",
        ),
        owner=owner_of(decision),
        summary=f"{reason}{detail}",
    )


def misconfigured(detail: str, decision: Decision, resource: str) -> Failure:
    """The identity cannot produce a credential (Secret, authority, spec)."""
    return Failure(
        reply=replies.bad_request(f"The identity cannot be used: {detail}"),
        reason=detail,
        event=(
            events.IDENTITY_MISCONFIGURED,
            f"Token request for {resource} refused: {_name(_identity(decision))} cannot be "
            f"used: {detail}",
        ),
        owner=owner_of(decision),
        summary=f"identity misconfigured: {detail}",
    )


def from_exception(exc: Exception, decision: Decision, resource: str) -> Failure | None:
    """The failure of getting a token, the same for the request that made the upstream
    call and for every request that joined it; None for an exception nmi does not map."""
    if isinstance(exc, UpstreamError):
        return upstream(exc, decision, resource)
    if isinstance(exc, CredentialError):
        return misconfigured(str(exc), decision, resource)
    if isinstance(exc, SecretUnavailable):
        return credential_unavailable(str(exc), decision, resource)
    if isinstance(exc, TokenRequestError):
        return service_account_token(exc, decision, resource)
    return None


def service_account_token(exc: TokenRequestError, decision: Decision, resource: str) -> Failure:
    """The API server gave no service-account token for a federated identity.

    A missing service account or a refused request is the operator's to fix (400:
    clients do not retry); nmi's own RBAC, an unreachable or overloaded API server,
    and a pod that is being replaced are transient for the pod (503, retried).
    """
    design_time = not exc.retryable and exc.status in (400, 404, 422)
    if design_time:
        reply = replies.bad_request(f"The identity cannot be used: {exc}")
    else:
        reply = replies.error(
            503, "server_error", "The pod's service-account token cannot be obtained now"
        )
    return Failure(
        reply=reply,
        reason=f"TokenRequest {exc.status or '-'} {exc.reason}",
        event=(
            events.IDENTITY_MISCONFIGURED if design_time else events.TOKEN_REQUEST_FAILED,
            f"Token request for {resource} with {_name(_identity(decision))} failed: the "
            f"pod's service-account token was not issued: {exc}",
        ),
        owner=owner_of(decision),
        summary=f"service-account token: {exc}",
    )


def credential_unavailable(detail: str, decision: Decision, resource: str) -> Failure:
    """The identity's Secret cannot be read right now (API server, RBAC)."""
    return Failure(
        reply=replies.error(503, "server_error", "The identity's credential cannot be read now"),
        reason=detail,
        event=(
            events.TOKEN_REQUEST_FAILED,
            f"Token request for {resource} failed: the credential of "
            f"{_name(_identity(decision))} cannot be read now (API server unreachable or "
            "access denied)",
        ),
        owner=owner_of(decision),
        summary=f"credential unavailable: {detail}",
    )
