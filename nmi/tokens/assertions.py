"""Service-account tokens of the node's pods, cached per pod for federated identities.

Why: every Azure AD exchange of a federated identity presents the calling
pod's own service-account token (:mod:`nmi.kube.token_request`).  Asking the
API server for one on every exchange would cost a TokenRequest per token
refresh per resource; holding one for too long would present Azure AD an
assertion close to expiry.  So, per pod (its UID) and audience:

* one TokenRequest is shared by every concurrent caller (single flight);
* the token is reused while more than :func:`renew_before` of its life is
  left, and a fresh one is requested after that: an assertion near its expiry
  is never presented (at most one TokenRequest per pod per token lifetime);
* a refusal (no such service account, RBAC, a pod that is gone) is
  remembered for :data:`FAILURE_HOLD` seconds, so a pod calling in a loop
  cannot turn its misconfiguration into a stream of API requests;
* a deleted pod's tokens are dropped at once (:meth:`AssertionCache.forget`),
  and a request that completes after the pod is gone is not kept;
* bounded: :data:`MAX_ENTRIES` tokens in all, least recently used dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable

from ..kube.objects import Pod
from ..kube.token_request import (
    EXPIRATION_SECONDS,
    ServiceAccountToken,
    TokenApi,
    TokenRequestError,
    request_token,
)

MAX_ENTRIES = 4096
FAILURE_HOLD = 5.0
MIN_REMAINING = 120.0  # an assertion is never presented with less left than this

Key = tuple[str, str]  # (pod UID, audience)


def renew_before(lifetime: float) -> float:
    """Seconds of life left at which a cached token is no longer presented: a fifth
    of its lifetime, never under two minutes (queueing and clock skew)."""
    return max(MIN_REMAINING, lifetime / 5)


class AssertionCache:
    """``await get(pod, audience)`` -> the pod's service-account token for ``audience``."""

    def __init__(
        self,
        *,
        api: TokenApi,
        alive: Callable[[Pod], bool] = lambda _pod: True,
        expiration_seconds: int = EXPIRATION_SECONDS,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._api = api
        self._alive = alive
        self._expiration = expiration_seconds
        self._clock = clock
        self._max_entries = max_entries
        self._entries: collections.OrderedDict[Key, ServiceAccountToken] = collections.OrderedDict()
        self._flights: dict[Key, asyncio.Task[ServiceAccountToken]] = {}
        self._failures: dict[Key, tuple[float, TokenRequestError]] = {}
        self.issuer = ""  # the ``iss`` of the last token issued (the cluster's issuer)
        self.requests = 0  # TokenRequests sent
        self.refused = 0  # ... that the API server refused or that failed

    def __len__(self) -> int:
        return len(self._entries)

    def usable(self, token: ServiceAccountToken, now: float | None = None) -> bool:
        return token.remaining(now if now is not None else self._clock()) > renew_before(
            token.lifetime
        )

    def peek(self, pod_uid: str, audience: str) -> ServiceAccountToken | None:
        """The cached token (usable or not), without I/O: for ``nmi explain``."""
        return self._entries.get((pod_uid, audience))

    async def get(self, pod: Pod, audience: str) -> ServiceAccountToken:
        key = (pod.meta.uid_or_key, audience)
        now = self._clock()
        cached = self._entries.get(key)
        if cached is not None and self.usable(cached, now):
            self._entries.move_to_end(key)
            return cached
        failed = self._failures.get(key)
        if failed is not None:
            until, error = failed
            if now < until:
                raise error
            del self._failures[key]
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.create_task(self._request(key, pod, audience))
            flight.add_done_callback(_consume)
            self._flights[key] = flight
        return await asyncio.shield(flight)

    async def _request(self, key: Key, pod: Pod, audience: str) -> ServiceAccountToken:
        self.requests += 1
        try:
            token = await request_token(
                self._api, pod, audience=audience, expiration_seconds=self._expiration
            )
        except TokenRequestError as exc:
            self.refused += 1
            if not exc.retryable:
                self._failures[key] = (self._clock() + FAILURE_HOLD, exc)
                while len(self._failures) > self._max_entries:
                    self._failures.pop(next(iter(self._failures)))
            raise
        finally:
            self._flights.pop(key, None)
        self.issuer = token.issuer or self.issuer
        if self._alive(pod):
            self._entries[key] = token
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return token

    def forget(self, pod_uid: str) -> int:
        """Drop a deleted pod's tokens (every audience); returns how many."""
        doomed = [k for k in self._entries if k[0] == pod_uid]
        for key in doomed:
            del self._entries[key]
        for key in [k for k in self._failures if k[0] == pod_uid]:
            del self._failures[key]
        return len(doomed)

    def sweep(self) -> int:
        """Drop tokens that can no longer be presented."""
        now = self._clock()
        doomed = [k for k, t in self._entries.items() if not self.usable(t, now)]
        for key in doomed:
            del self._entries[key]
        for key in [k for k, (until, _) in self._failures.items() if until <= now]:
            del self._failures[key]
        return len(doomed)

    async def close(self) -> None:
        flights = list(self._flights.values())
        for task in flights:
            task.cancel()
        for task in flights:
            with contextlib.suppress(BaseException):
                await task


def _consume(task: asyncio.Task[ServiceAccountToken]) -> None:
    if not task.cancelled():
        task.exception()
