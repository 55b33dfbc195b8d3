"""A pod's own service-account token, from the Kubernetes TokenRequest API.

Why: a federated identity (``spec.type: 3``) has no stored credential; Azure AD
trusts the cluster's service-account issuer, and the calling pod's own token
*is* the credential.  nmi asks for it the way the kubelet does for a projected
volume — ``POST /api/v1/namespaces/<ns>/serviceaccounts/<sa>/token`` — with
the audience Azure AD expects, a short expiry, and bound to the pod (name and
UID): the API server refuses to issue it for a pod that no longer exists, and
the token is invalid as soon as the pod is deleted.  The only permission this
needs is ``create`` on ``serviceaccounts/token``.

The token is never logged; only its (unverified) ``iss``, ``sub`` and ``aud``
claims are kept beside it, to tell operators what Azure AD was shown.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import aiohttp

from ..jwt_claims import unverified_claims
from .objects import Pod

EXPIRATION_SECONDS = 600  # the shortest expiry the API server allows
TIMEOUT = aiohttp.ClientTimeout(total=10)
MAX_BODY = 64 << 10


class TokenApi(Protocol):
    """What a TokenRequest needs from an API client: one raw POST."""

    async def post(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse: ...


@dataclass(frozen=True, slots=True)
class ServiceAccountToken:
    """A bound service-account token and what it says (claims read, not verified:
    it came from the API server over its authenticated connection)."""

    token: str = field(repr=False)
    expires_at: float
    issued_at: float
    issuer: str
    subject: str
    audience: str
    pod_uid: str

    @property
    def lifetime(self) -> float:
        return max(self.expires_at - self.issued_at, 1.0)

    def remaining(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)


class TokenRequestError(Exception):
    """The API server did not issue the token.

    ``retryable``: the API server was unreachable, overloaded or timed out.
    Otherwise it is a refusal operators must act on (a missing service
    account, nmi lacking ``create`` on ``serviceaccounts/token``) or a pod that
    is gone.
    """

    def __init__(self, message: str, *, status: int | None, reason: str, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retryable = retryable


class DiscoveryApi(Protocol):
    async def get(
        self, path: str, params: list[tuple[str, str]], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse: ...


async def service_account_issuer(api: DiscoveryApi) -> str:
    """The cluster's service-account issuer, from the API server's OIDC discovery
    document (``/.well-known/openid-configuration``, readable by every service
    account by default); "" when it cannot be read."""
    try:
        response = await api.get("/.well-known/openid-configuration", [], timeout=TIMEOUT)
        status, document = await _json_answer(response)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return ""
    issuer = document.get("issuer") if status == 200 else None
    return issuer if isinstance(issuer, str) else ""


async def _json_answer(response: aiohttp.ClientResponse) -> tuple[int, dict[str, Any]]:
    """The status and JSON object of an answer read to its end (at most :data:`MAX_BODY`
    bytes; a larger, non-JSON or non-object body reads as {}), the response released."""
    body = bytearray()
    try:
        while len(body) <= MAX_BODY:
            chunk = await response.content.read(MAX_BODY + 1 - len(body))
            if not chunk:
                break
            body += chunk
        status = response.status
    finally:
        response.release()
    try:
        document = json.loads(body) if len(body) <= MAX_BODY else {}
    except ValueError:
        document = {}
    return status, document if isinstance(document, dict) else {}


def subject_of(pod: Pod) -> str:
    """The subject Azure AD sees for this pod's service account."""
    return f"system:serviceaccount:{pod.meta.namespace}:{pod.service_account}"


def _expiry(value: Any, fallback: float) -> float:
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    return fallback


async def request_token(
    api: TokenApi, pod: Pod, *, audience: str, expiration_seconds: int = EXPIRATION_SECONDS
) -> ServiceAccountToken:
    """A token of the pod's service account for ``audience``, bound to the pod."""
    namespace, name = pod.meta.namespace, pod.service_account
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [audience],
            "expirationSeconds": expiration_seconds,
            "boundObjectRef": {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": pod.meta.name,
                "uid": pod.meta.uid,
            },
        },
    }
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
    asked = time.time()
    try:
        response = await api.post(path, body, timeout=TIMEOUT)
        status, document = await _json_answer(response)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TokenRequestError(
            f"the API server could not be asked for a token of service account "
            f"{namespace}/{name}: {type(exc).__name__}",
            status=None,
            reason="Unreachable",
            retryable=True,
        ) from None
    if status not in (200, 201):
        raise _refusal(status, document, namespace, name, pod)
    result = document.get("status") or {}
    token = result.get("token") if isinstance(result, dict) else None
    if not isinstance(token, str) or not token:
        raise TokenRequestError(
            "the API server answered a TokenRequest without a token",
            status=status,
            reason="InvalidResponse",
            retryable=True,
        )
    claims = unverified_claims(token)
    expires = _expiry(result.get("expirationTimestamp"), asked + expiration_seconds)
    if isinstance(claims.get("exp"), int | float):
        expires = min(expires, float(claims["exp"]))
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud] if isinstance(aud, str) else []
    return ServiceAccountToken(
        token=token,
        expires_at=expires,
        issued_at=float(claims["iat"]) if isinstance(claims.get("iat"), int | float) else asked,
        issuer=str(claims.get("iss") or ""),
        subject=str(claims.get("sub") or subject_of(pod)),
        audience=",".join(str(a) for a in audiences) or audience,
        pod_uid=pod.meta.uid,
    )


def _refusal(
    status: int, document: dict[str, Any], namespace: str, name: str, pod: Pod
) -> TokenRequestError:
    message = str(document.get("message") or f"HTTP {status}")[:300]
    reason = str(document.get("reason") or status)
    retryable = status == 429 or status >= 500
    if status == 403:
        message = (
            f"nmi may not create tokens of service account {namespace}/{name} ({message}); "
            "its ClusterRole needs 'create' on 'serviceaccounts/token'"
        )
    elif status == 404:
        message = (
            f"no token for service account {namespace}/{name} bound to pod "
            f"{pod.meta.key}: {message}"
        )
    elif status == 409:
        message = f"pod {pod.meta.key} was deleted or recreated: {message}"
    else:
        message = f"TokenRequest for service account {namespace}/{name} refused: {message}"
    return TokenRequestError(message, status=status, reason=reason, retryable=retryable)
