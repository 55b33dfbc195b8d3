"""Getting tokens from upstream with MSAL, off the event loop.

MSAL is synchronous (``requests`` underneath), so every call runs on the
threads of its :class:`~nmi.tokens.lanes.Lane` — one lane per source, queued
fairly per pod and bounded; the token cache in front makes sure concurrent
requests for one key share one call.  Two sources:

* the node's IMDS (``--metadata-ip:--metadata-port``) through
  ``msal.ManagedIdentityClient`` for user-assigned identities (type 0) and for
  exception pods (the node's own identity).  MSAL builds the IMDS URL from
  ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` or 169.254.169.254; the HTTP session
  given to it re-targets whatever it built to the configured endpoint, so the
  daemon's own environment can never redirect it.  nmi's own packets leave
  the node through OUTPUT and are not intercepted by its PREROUTING rules.
* Azure AD through ``msal.ConfidentialClientApplication`` for service
  principals with a secret (type 1) or a certificate (type 2), and for
  federated identities (type 3), whose client assertion is the calling pod's
  service-account token (given per call: :data:`ASSERTION`).  One
  application object is kept per credential (so OIDC discovery happens once),
  and its MSAL cache is cleared before each call: nmi's cache decides when a
  new token is needed, and MSAL must then really fetch one.

TLS trust follows ``REQUESTS_CA_BUNDLE``, else ``SSL_CERT_FILE``, else the
system store.  Upstream answers are classified into retryable and
design-time failures with the HTTP status and ``Retry-After`` they came with.
"""

from __future__ import annotations

import email.utils
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msal
import requests
from cachetools import LRUCache

from ..config import Settings
from ..ratelimit import Pacer
from .credentials import Authority, ClientAssertion, Credential
from .lanes import Lane, Ticket
from .model import Token, UpstreamError

log = logging.getLogger(__name__)

IMDS_MAX_IN_FLIGHT = 5  # Azure's per-VM limit for managed-identity token requests
IMDS_RATE = 15.0  # requests/s, paced below Azure's 20/s per VM
IMDS_BURST = 5.0
AAD_MAX_IN_FLIGHT = 8  # threads for Azure AD calls (apart from the IMDS ones)
AAD_RATE_PER_APP = 5.0  # requests/s per application (client id), burst below
AAD_BURST_PER_APP = 10.0


class _Recording(threading.local):
    """What the last upstream response said, per thread (one MSAL call per thread)."""

    status: int | None = None
    retry_after: int | None = None
    request_id: str = ""

    def reset(self) -> None:
        self.status = None
        self.retry_after = None
        self.request_id = ""


LAST = _Recording()


class _Assertion(threading.local):
    """The client assertion of the call running on this thread (federated identities)."""

    value: str = ""


ASSERTION = _Assertion()


def current_assertion() -> str:
    """MSAL's ``client_assertion`` callable: the assertion of this thread's call."""
    if not ASSERTION.value:
        raise RuntimeError("no client assertion set for this call")
    return ASSERTION.value


FEDERATED = ClientAssertion(current_assertion)


class UpstreamSession(requests.Session):
    """A ``requests.Session`` with timeouts, trust roots and response capture.

    ``base`` (scheme://host:port) re-targets every request to that origin,
    keeping path and query: used to pin MSAL's IMDS calls to the configured
    metadata endpoint.
    """

    def __init__(self, *, timeout: float, base: str | None = None) -> None:
        super().__init__()
        self._timeout = (min(5.0, timeout), timeout)
        self._base = urlsplit(base) if base else None
        self.trust_env = False  # no proxies from the environment for credential traffic
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
        if bundle:
            self.verify = bundle

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if isinstance(url, bytes):
            url = url.decode()
        if self._base is not None:
            parts = urlsplit(url)
            url = urlunsplit((self._base.scheme, self._base.netloc, parts.path, parts.query, ""))
        kwargs.setdefault("timeout", self._timeout)
        response = super().request(method, url, *args, **kwargs)
        LAST.status = response.status_code
        LAST.retry_after = _retry_after(response.headers.get("Retry-After"))
        LAST.request_id = response.headers.get("x-ms-request-id", "") or response.headers.get(
            "client-request-id", ""
        )
        return response


def _retry_after(value: str | None) -> int | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP-date), clamped to an hour."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return int(max(0.0, min(seconds, 3600.0)))


TRANSIENT_ERRORS = {
    "temporarily_unavailable",
    "server_error",
    "service_unavailable",
    "too_many_requests",
}


def classify(result: Mapping[str, Any], *, source: str) -> UpstreamError:
    """Turn an MSAL error result into an :class:`UpstreamError`."""
    status = LAST.status
    error = str(result.get("error") or "unknown_error")
    description = str(result.get("error_description") or "")
    retryable = (
        status is None  # MSAL replayed a throttled answer without sending anything
        or status == 429
        or status >= 500
        or error in TRANSIENT_ERRORS
    )
    retry_after = LAST.retry_after
    if retryable and retry_after is None:
        retry_after = 5
    return UpstreamError(
        error=error,
        description=description[:1000],
        status=status,
        retryable=retryable,
        retry_after=retry_after,
        source=source,
    )


def _from_status(status: int, *, source: str) -> UpstreamError:
    """An upstream answer MSAL raised on instead of returning (e.g. 5xx without JSON)."""
    retryable = status == 429 or status >= 500
    return UpstreamError(
        error="too_many_requests" if status == 429 else "server_error",
        description=f"{source} answered HTTP {status}",
        status=status,
        retryable=retryable,
        retry_after=(LAST.retry_after or 5) if retryable else None,
        source=source,
    )


def _token_from(
    result: Mapping[str, Any], *, client_id: str, started: float, request_id: str
) -> Token:
    expires_in = int(result.get("expires_in") or 0)
    now = time.time()
    return Token(
        access_token=str(result["access_token"]),
        expires_on=int(started + expires_in),
        not_before=int(started),
        client_id=client_id,
        token_type=str(result.get("token_type") or "Bearer"),
        obtained_at=now,
        request_id=request_id,
    )


class Upstream:
    """The two upstream token sources, each on its own lane."""

    def __init__(self, *, settings: Settings) -> None:
        self.settings = settings
        self.imds_lane = Lane(
            name="imds",
            slots=IMDS_MAX_IN_FLIGHT,
            pacer=Pacer(rate=IMDS_RATE, burst=IMDS_BURST),
            queue_timeout=settings.upstream_timeout,
        )
        self.aad_lane = Lane(
            name="aad",
            slots=AAD_MAX_IN_FLIGHT,
            key_rate=AAD_RATE_PER_APP,
            key_burst=AAD_BURST_PER_APP,
            queue_timeout=settings.upstream_timeout,
        )
        self._apps: LRUCache[tuple[str, ...], Any] = LRUCache(maxsize=1024)
        self._apps_lock = threading.Lock()

    @property
    def calls(self) -> int:
        return self.imds_lane.calls + self.aad_lane.calls

    # -- node IMDS ----------------------------------------------------------

    async def from_imds(
        self,
        *,
        ticket: Ticket,
        resource: str,
        client_id: str = "",
        object_id: str = "",
        resource_id: str = "",
    ) -> Token:
        """A managed-identity token from the node's IMDS (no selector: system-assigned)."""
        if client_id:
            mi: Any = msal.UserAssignedManagedIdentity(client_id=client_id)
        elif object_id:
            mi = msal.UserAssignedManagedIdentity(object_id=object_id)
        elif resource_id:
            mi = msal.UserAssignedManagedIdentity(resource_id=resource_id)
        else:
            mi = msal.SystemAssignedManagedIdentity()

        def call() -> Token:
            LAST.reset()
            session = UpstreamSession(
                timeout=self.settings.upstream_timeout, base=self.settings.metadata_endpoint
            )
            try:
                client = msal.ManagedIdentityClient(
                    mi, http_client=session, token_cache=msal.TokenCache()
                )
                started = time.time()
                try:
                    result = client.acquire_token_for_client(resource=resource)
                except Exception as exc:  # MSAL raises many kinds
                    if LAST.status is not None and LAST.status != 200:
                        raise _from_status(LAST.status, source="imds") from None
                    raise UpstreamError(
                        error="imds_unreachable",
                        description=f"node IMDS request failed: {type(exc).__name__}",
                        status=None,
                        retryable=True,
                        retry_after=5,
                        source="imds",
                    ) from None
                if "access_token" not in result:
                    raise classify(result, source="imds")
                token = _token_from(
                    result, client_id=client_id, started=started, request_id=LAST.request_id
                )
                return token
            finally:
                session.close()

        return await self.imds_lane.run(ticket, call)

    # -- Azure AD -----------------------------------------------------------

    async def from_aad(
        self,
        *,
        ticket: Ticket,
        client_id: str,
        authority: Authority,
        credential: Credential,
        credential_key: str,
        resource: str,
        assertion: str = "",
    ) -> Token:
        """A client-credentials token for a service principal, or for a federated
        identity (``credential`` :data:`FEDERATED` and the pod's ``assertion``;
        ``credential_key`` then names the service account, so that each has its
        own MSAL application and cache)."""
        scope = f"{resource}/.default"

        def call() -> Token:
            LAST.reset()
            ASSERTION.value = assertion
            started = time.time()
            try:
                app = self._app(client_id, authority, credential, credential_key)
                app.remove_tokens_for_client()
                result = app.acquire_token_for_client(scopes=[scope])
            except Exception as exc:  # MSAL raises many kinds
                # Drop the app: a failed discovery must be retried next time.
                with self._apps_lock:
                    self._apps.pop((client_id, authority.url, credential_key), None)
                if LAST.status is not None and 400 <= LAST.status < 500 and LAST.status != 429:
                    raise UpstreamError(
                        error="invalid_request",
                        description=f"Azure AD rejected authority {authority.url}: "
                        f"HTTP {LAST.status} (unknown tenant?)",
                        status=LAST.status,
                        retryable=False,
                        source="aad",
                    ) from None
                if LAST.status is not None and (LAST.status == 429 or LAST.status >= 500):
                    raise _from_status(LAST.status, source="aad") from None
                raise UpstreamError(
                    error="aad_unreachable",
                    description=f"Azure AD request failed: {type(exc).__name__}: {_safe(exc)}",
                    status=None,
                    retryable=True,
                    retry_after=5,
                    source="aad",
                ) from None
            finally:
                ASSERTION.value = ""
            if not result or "access_token" not in result:
                # Drop the app: MSAL replays a refused request's answer from its own HTTP
                # cache for a while, and the fix (a federated credential just created, a
                # secret just corrected in Azure AD) must be seen on the next request.
                with self._apps_lock:
                    self._apps.pop((client_id, authority.url, credential_key), None)
                raise classify(result or {}, source="aad")
            return _token_from(
                result, client_id=client_id, started=started, request_id=LAST.request_id
            )

        return await self.aad_lane.run(ticket, call, key=client_id.lower())

    def _app(
        self, client_id: str, authority: Authority, credential: Credential, credential_key: str
    ) -> Any:
        key = (client_id, authority.url, credential_key)
        with self._apps_lock:
            found = self._apps.get(key)
        if found is not None:
            return found
        session = UpstreamSession(timeout=self.settings.upstream_timeout)
        app = msal.ConfidentialClientApplication(
            client_id,
            client_credential=credential.for_msal(),
            authority=authority.url,
            http_client=session,
            instance_discovery=authority.known_cloud,
            token_cache=msal.TokenCache(),
        )
        with self._apps_lock:
            self._apps[key] = app
        return app

    def close(self) -> None:
        self.imds_lane.close()
        self.aad_lane.close()


def _safe(exc: BaseException) -> str:
    """An exception message trimmed of anything that might echo a request body."""
    text = str(exc).split("\n", 1)[0]
    return text[:200]
