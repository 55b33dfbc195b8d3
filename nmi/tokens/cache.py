"""The token cache: correct first, then fast.

* The key names everything that produced the credential: the identity's UID,
  a fingerprint of its spec, the version of its Secret, and the resource.  A
  rotated Secret or an edited identity is a different key, so the new
  credential is used on the very next request without a restart.
* Concurrent misses for one key share one upstream call (single flight); the
  call is shielded, so a client that hangs up does not cancel it for others.
* A token is never handed out with :data:`SERVE_FLOOR` seconds or less left
  (clients treat tokens with 5 minutes or less as expired and would fetch on
  every call).
* A token is refreshed ahead of expiry, with jitter: a background refresher
  renews the tokens whose identity a pod on the node still has (SDKs cache
  tokens and return only near expiry, so recency of requests is no measure),
  once for all pods of the identity;
  a request that finds a token past its refresh time is answered from the
  cache at once.  A failed refresh keeps the still-valid token in service.
* Throttling is honoured: after an upstream 429 with ``Retry-After`` the key
  is not sent upstream again before that time; misses meanwhile get the same
  retryable error at once (cached tokens keep being served).

The cache is consulted only after the identity decision for the request has
passed: it stores tokens, never permissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .model import Token, UpstreamError

log = logging.getLogger(__name__)

CLIENT_EXPIRY_MARGIN = 300  # SDKs treat tokens with 5 minutes or less left as expired
SERVE_FLOOR = 330  # seconds a cached token must still have to be served
MIN_REFRESH_LEAD = 600  # refresh at least this long before SERVE_FLOOR is reached
RETRY_REFRESH_AFTER = 30.0  # after a failed or useless refresh
REFRESH_IDLE_LIMIT = 86400.0  # tokens nobody asked for in a day are left to expire


Fetch = Callable[[], Awaitable[Token]]


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What a cached token was made from.

    ``owner`` is the AzureIdentity (its UID, see ``Meta.uid_or_key``) or
    ``identity.decide.NODE_IDENTITY``; ``credential`` names everything that produced the
    credential (the identity's spec fingerprint and its Secret's version, or the
    identity selector sent to the node IMDS); ``resource`` is as requested.
    A changed spec or a rotated Secret is another key: never served again.
    """

    owner: str
    credential: str
    resource: str


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """A read-only view of one cache entry (never the token itself)."""

    key: CacheKey
    expires_on: int
    refresh_at: float
    last_used: float
    refreshing: bool


class UpstreamNotAllowed(Exception):
    """The caller may not cause an upstream call now (see ``get(upstream=False)``)."""


@dataclass(slots=True)
class _Entry:
    token: Token
    refresh_at: float
    fetch: Fetch
    next_attempt: float = 0.0
    last_used: float = 0.0
    last_refresh: float = 0.0


class TokenCache:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[CacheKey, _Entry] = {}
        self._flights: dict[CacheKey, asyncio.Task[Token]] = {}
        self._refreshing: set[asyncio.Task[Token]] = set()
        self._cooldown: dict[CacheKey, tuple[float, UpstreamError]] = {}
        self.hits = 0
        self.misses = 0
        self.refreshes = 0
        self.refresh_failures = 0
        self.throttled = 0

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self, owner: str | None = None) -> list[CachedEntry]:
        """The entries (of one owner), for ``nmi explain`` and metrics; no token."""
        return [
            CachedEntry(
                key=key,
                expires_on=entry.token.expires_on,
                refresh_at=entry.refresh_at,
                last_used=entry.last_used,
                refreshing=key in self._flights,
            )
            for key, entry in self._entries.items()
            if owner is None or key.owner == owner
        ]

    def peek(self, key: CacheKey) -> Token | None:
        entry = self._entries.get(key)
        return entry.token if entry is not None else None

    async def get(
        self, key: CacheKey, fetch: Fetch, *, upstream: bool = True
    ) -> tuple[Token, bool]:
        """The token for ``key`` and whether it came from the cache.

        With ``upstream=False`` a miss raises :class:`UpstreamNotAllowed`
        instead of calling upstream (joining a call already in flight is fine).
        """
        token = self.hit(key)
        if token is not None:
            return token, True
        if not upstream:
            joined = self._flights.get(key)
            if joined is None:
                raise UpstreamNotAllowed()
            return await asyncio.shield(joined), False  # joining costs no upstream call
        self.misses += 1
        now = self._clock()
        cooling = self._cooldown.get(key)
        if cooling is not None:
            until, error = cooling
            if now < until:
                self.throttled += 1
                raise UpstreamError(
                    error=error.error,
                    description=error.description,
                    status=error.status,
                    retryable=True,
                    retry_after=max(1, int(until - now + 0.999)),
                    source=error.source,
                )
            del self._cooldown[key]
        flight = self._flights.get(key) or self._start(key, fetch, background=False)
        return await asyncio.shield(flight), False

    def hit(self, key: CacheKey) -> Token | None:
        """A servable cached token, or None; synchronous (the hot path)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if entry.token.expires_on - now <= SERVE_FLOOR:
            return None
        entry.last_used = now
        self.hits += 1
        if now >= entry.refresh_at and now >= entry.next_attempt and key not in self._flights:
            entry.next_attempt = now + RETRY_REFRESH_AFTER
            self._start(key, entry.fetch, background=True)
        return entry.token

    async def run_refresher(
        self, *, in_use: Callable[[CacheKey], bool], interval: float = 1.0
    ) -> None:
        """Renew, ahead of expiry, the tokens pods still use; forever."""
        while True:
            await asyncio.sleep(interval)
            self.refresh_due(in_use=in_use)

    def refresh_due(self, *, in_use: Callable[[CacheKey], bool]) -> int:
        """Start a background refresh for every due token still in use."""
        now = self._clock()
        started = 0
        for key, entry in list(self._entries.items()):
            if now < entry.refresh_at or now < entry.next_attempt or key in self._flights:
                continue
            # SDKs cache tokens themselves and come back only near expiry, so "in use" is
            # the identity still being a pod's on this node (and asked for within a day).
            if now - entry.last_used > REFRESH_IDLE_LIMIT or not in_use(key):
                continue
            entry.next_attempt = now + RETRY_REFRESH_AFTER
            self._start(key, entry.fetch, background=True)
            started += 1
        return started

    def _start(self, key: CacheKey, fetch: Fetch, *, background: bool) -> asyncio.Task[Token]:
        task = asyncio.create_task(self._fetch(key, fetch, background=background))
        self._flights[key] = task
        if background:
            self._refreshing.add(task)
            task.add_done_callback(self._refreshing.discard)
            task.add_done_callback(_consume)
        return task

    async def _fetch(self, key: CacheKey, fetch: Fetch, *, background: bool) -> Token:
        try:
            token = await fetch()
        except UpstreamError as exc:
            if exc.status == 429 and exc.retry_after:
                self._cooldown[key] = (self._clock() + exc.retry_after, exc)
            if background:
                self.refresh_failures += 1
                log.warning("background token refresh failed; the cached token stays in service")
            raise
        except Exception:
            if background:
                self.refresh_failures += 1
                log.warning("background token refresh failed; the cached token stays in service")
            raise
        finally:
            self._flights.pop(key, None)
        if token.expires_on - self._clock() <= CLIENT_EXPIRY_MARGIN:
            # Clients would treat it as expired and ask again at once.
            raise UpstreamError(
                error="token_expires_too_soon",
                description="the upstream returned a token with 5 minutes or less left",
                status=None,
                retryable=True,
                retry_after=5,
            )
        if background:
            self.refreshes += 1
        self._store(key, token, fetch)
        return token

    def _store(self, key: CacheKey, token: Token, fetch: Fetch) -> None:
        now = self._clock()
        remaining = token.expires_on - now
        lead = max(token.lifetime / 3, MIN_REFRESH_LEAD)
        # Jitter so that tokens obtained together are not refreshed together.
        refresh_at = token.expires_on - SERVE_FLOOR - lead * random.uniform(0.8, 1.0)  # noqa: S311
        previous = self._entries.get(key)
        if previous is not None and previous.token.expires_on >= token.expires_on:
            # Upstream returned the same (cached) token: do not ask again at once.
            previous.next_attempt = now + max(RETRY_REFRESH_AFTER, min(300.0, remaining / 10))
            previous.last_refresh = now
            return
        self._entries[key] = _Entry(
            token=token,
            refresh_at=refresh_at,
            fetch=fetch,
            last_used=previous.last_used if previous is not None else now,
            last_refresh=now,
        )

    def sweep(self, *, idle: float = 3600.0) -> int:
        """Drop expired entries and those nobody asked for in ``idle`` seconds."""
        now = self._clock()
        doomed = [
            k
            for k, e in self._entries.items()
            if e.token.expires_on - now <= SERVE_FLOOR or now - e.last_used > idle
        ]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    async def close(self) -> None:
        tasks = list(self._flights.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def _consume(task: asyncio.Task[Token]) -> None:
    """Background refreshes are awaited by nobody: retrieve their exception."""
    if not task.cancelled():
        task.exception()
