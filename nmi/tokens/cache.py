"""The token cache: correct first, then fast, then bounded.

* The key names everything that produced the credential (:class:`CacheKey`):
  the identity's UID, a fingerprint of its spec and the version of its Secret,
  and the resource.  A rotated Secret or an edited identity is a different
  key, so the new credential is used on the very next request.
* Concurrent misses for one key share one upstream call (single flight).  The
  call is shielded from any one client hanging up, but it knows how many
  still wait (:class:`~nmi.tokens.lanes.Ticket`): if all hung up before its
  turn in the upstream queue, it is never sent.
* Lifetimes (one constant, :data:`CLIENT_MARGIN`: SDKs treat a token with five
  minutes or less left as expired).  Any token that has not expired is served,
  with its true remaining lifetime — also one that is born short (a token
  lifetime policy, AD FS, an IMDS cache near expiry) or whose refresh keeps
  failing.  Refreshing starts well ahead of expiry (:func:`refresh_lead`,
  proportional to the lifetime) and is retried at a rate bounded by the
  lifetime too, so a source that keeps issuing short tokens costs one call per
  half-life, not one per request.  Only a token that has really expired is
  refused.
* Throttling is honoured: after an upstream 429 with ``Retry-After`` the key
  is not sent upstream again before that time.
* Bounded: at most :data:`MAX_ENTRIES_PER_REQUESTER` entries created by one
  pod (one pod asking for a storm of resource variants evicts its own least
  recently used entries, nobody else's), :data:`MAX_ENTRIES` and
  :data:`MAX_BYTES` in all (least recently used evicted).

The cache is consulted only after the identity decision for the request has
passed: it stores tokens, never permissions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .lanes import REFRESH, Abandoned, Ticket
from .model import Token, UpstreamError

log = logging.getLogger(__name__)

CLIENT_MARGIN = 300  # SDKs treat tokens with 5 minutes or less left as expired
MAX_ENTRIES = 4096
MAX_ENTRIES_PER_REQUESTER = 64
MAX_BYTES = 32 << 20
ENTRY_OVERHEAD = 600  # bytes of bookkeeping per entry besides the token and the key's strings


def refresh_lead(lifetime: float) -> float:
    """Seconds before expiry at which a token of this lifetime is renewed: the SDK margin
    plus a third of the lifetime (a day-long token: ~8 h ahead), but never before its
    half-life (a 10-minute token: at 5 minutes)."""
    return min(CLIENT_MARGIN + lifetime / 3, lifetime / 2)


def retry_interval(lifetime: float) -> float:
    """Seconds between two attempts to renew one token: 30 s for long-lived tokens,
    a twentieth of the lifetime for short ones (never under 2 s)."""
    return max(2.0, min(30.0, lifetime / 20))


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What a cached token was made from.

    ``owner`` is the AzureIdentity (its UID, see ``Meta.uid_or_key``) or
    ``identity.decide.NODE_IDENTITY``; ``credential`` names everything that
    produced the credential (the identity's spec fingerprint and its Secret's
    version, or the identity selector sent to the node IMDS); ``resource`` is as
    requested; ``subject`` is the service account whose token obtained a federated
    identity's token, so it is never served to a pod of another service account.
    A changed spec or a rotated Secret is another key.
    """

    owner: str
    credential: str
    resource: str
    subject: str = ""  # federated identities: the service account (namespace/name)


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """A read-only view of one cache entry (never the token itself)."""

    key: CacheKey
    expires_on: int
    refresh_at: float
    last_used: float
    refreshing: bool


Fetch = Callable[[Ticket], Awaitable[Token]]


class UpstreamNotAllowed(Exception):
    """The caller may not cause an upstream call now (see ``get(upstream=False)``)."""


@dataclass(slots=True)
class _Entry:
    token: Token
    refresh_at: float
    retry_every: float
    fetch: Fetch
    requester: str
    size: int
    next_attempt: float = 0.0
    last_used: float = 0.0


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[Token]
    waiters: int = 0
    background: bool = False

    def wanted(self) -> bool:
        return self.background or self.waiters > 0


class TokenCache:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
        max_per_requester: int = MAX_ENTRIES_PER_REQUESTER,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self._clock = clock
        self.max_entries = max_entries
        self.max_per_requester = max_per_requester
        self.max_bytes = max_bytes
        # Least recently used first.
        self._entries: collections.OrderedDict[CacheKey, _Entry] = collections.OrderedDict()
        self._by_requester: dict[str, collections.OrderedDict[CacheKey, None]] = {}
        self._flights: dict[CacheKey, _Flight] = {}
        self._cooldown: dict[CacheKey, tuple[float, UpstreamError]] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.refreshes = 0
        self.refresh_failures = 0
        self.throttled = 0
        self.evictions = 0
        self.abandoned = 0

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: CacheKey) -> Token | None:
        entry = self._entries.get(key)
        return entry.token if entry is not None else None

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

    # -- the request path ---------------------------------------------------------

    def hit(self, key: CacheKey) -> Token | None:
        """A servable cached token, or None; synchronous (the hot path)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if entry.token.expires_on <= now:
            return None
        entry.last_used = now
        self._entries.move_to_end(key)
        self.hits += 1
        if now >= entry.refresh_at and now >= entry.next_attempt and key not in self._flights:
            entry.next_attempt = now + entry.retry_every
            self._start(key, entry.fetch, requester=REFRESH, background=True)
        return entry.token

    async def get(
        self, key: CacheKey, fetch: Fetch, *, requester: str = "", upstream: bool = True
    ) -> tuple[Token, bool]:
        """The token for ``key`` and whether it came from the cache.

        ``requester`` (the pod) is whose upstream queue a miss waits in, and who a
        new entry counts against.  With ``upstream=False`` a miss raises
        :class:`UpstreamNotAllowed` instead of calling upstream (joining a call
        already in flight is fine: it costs nothing).
        """
        token = self.hit(key)
        if token is not None:
            return token, True
        while True:
            try:
                return await self._join(key, fetch, requester=requester, upstream=upstream)
            except Abandoned:
                # Joined a call in the instant it was dropped for want of waiters: this
                # request does want it, so it asks again.
                continue

    async def _join(
        self, key: CacheKey, fetch: Fetch, *, requester: str, upstream: bool
    ) -> tuple[Token, bool]:
        flight = self._flights.get(key)
        if flight is None:
            if not upstream:
                raise UpstreamNotAllowed()
            self.misses += 1
            cooling = self._cooldown.get(key)
            if cooling is not None:
                until, error = cooling
                now = self._clock()
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
            flight = self._start(key, fetch, requester=requester or REFRESH, background=False)
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task), False
        finally:
            flight.waiters -= 1

    # -- refreshing ---------------------------------------------------------------

    async def run_refresher(
        self, *, in_use: Callable[[CacheKey], bool], interval: float = 1.0
    ) -> None:
        """Renew, ahead of expiry, the tokens pods still use; forever."""
        while True:
            await asyncio.sleep(interval)
            self.refresh_due(in_use=in_use)

    def refresh_due(self, *, in_use: Callable[[CacheKey], bool]) -> int:
        """Start a background refresh for every due token still in use.

        SDKs cache tokens themselves and come back only near expiry, so "in use" is
        the identity still being a pod's on this node, not a recent request.
        """
        now = self._clock()
        started = 0
        for key, entry in list(self._entries.items()):
            if now < entry.refresh_at or now < entry.next_attempt or key in self._flights:
                continue
            if not in_use(key):
                continue
            entry.next_attempt = now + entry.retry_every
            self._start(key, entry.fetch, requester=REFRESH, background=True)
            started += 1
        return started

    # -- flights ------------------------------------------------------------------

    def _start(self, key: CacheKey, fetch: Fetch, *, requester: str, background: bool) -> _Flight:
        flight: _Flight
        ticket = Ticket(requester=requester, wanted=lambda: flight.wanted())
        task = asyncio.create_task(self._fetch(key, fetch, ticket, background=background))
        flight = _Flight(task=task, background=background)
        self._flights[key] = flight
        task.add_done_callback(_consume)
        return flight

    async def _fetch(
        self, key: CacheKey, fetch: Fetch, ticket: Ticket, *, background: bool
    ) -> Token:
        try:
            token = await fetch(ticket)
        except Abandoned:
            self.abandoned += 1
            raise
        except Exception as exc:
            if isinstance(exc, UpstreamError) and exc.status == 429 and exc.retry_after:
                self._cooldown[key] = (self._clock() + exc.retry_after, exc)
                if len(self._cooldown) > self.max_entries:
                    self._cooldown.pop(next(iter(self._cooldown)))
            if background:
                self.refresh_failures += 1
                log.warning("background token refresh failed; the cached token stays in service")
            raise
        finally:
            self._flights.pop(key, None)
        if token.expires_on <= self._clock():
            raise UpstreamError(
                error="token_expired",
                description="the token service returned a token that has already expired",
                status=None,
                retryable=True,
                retry_after=5,
            )
        if background:
            self.refreshes += 1
        self._store(key, token, fetch, ticket.requester)
        return token

    # -- storage --------------------------------------------------------------------

    def _store(self, key: CacheKey, token: Token, fetch: Fetch, requester: str) -> None:
        now = self._clock()
        lifetime = max(token.expires_on - (token.obtained_at or now), 1.0)
        retry_every = retry_interval(lifetime)
        previous = self._entries.get(key)
        if previous is not None and previous.token.expires_on >= token.expires_on:
            # Upstream returned the same (its own cached) token: do not ask again at once.
            previous.next_attempt = now + max(retry_every, (token.expires_on - now) / 10)
            return
        # Jitter so that tokens obtained together are not renewed together.
        lead = refresh_lead(lifetime) * random.uniform(0.9, 1.0)  # noqa: S311
        owner = previous.requester if previous is not None else requester
        if previous is not None:
            self._drop(key)
        entry = _Entry(
            token=token,
            refresh_at=token.expires_on - lead,
            retry_every=retry_every,
            fetch=fetch,
            requester=owner,
            size=len(token.access_token)
            + len(key.owner)
            + len(key.credential)
            + len(key.resource)
            + len(key.subject)
            + ENTRY_OVERHEAD,
            last_used=previous.last_used if previous is not None else now,
        )
        mine = self._by_requester.setdefault(owner, collections.OrderedDict())
        while len(mine) >= self.max_per_requester:
            self._evict(next(iter(mine)))  # the requester's own least recently stored
        while self._entries and (
            len(self._entries) >= self.max_entries or self.bytes + entry.size > self.max_bytes
        ):
            self._evict(next(iter(self._entries)))  # the least recently used of all
        self._entries[key] = entry
        mine = self._by_requester.setdefault(owner, collections.OrderedDict())
        mine[key] = None
        self.bytes += entry.size

    def _evict(self, key: CacheKey) -> None:
        self.evictions += 1
        self._drop(key)

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= entry.size
        mine = self._by_requester.get(entry.requester)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_requester[entry.requester]

    def drop_where(self, predicate: Callable[[CacheKey], bool]) -> int:
        """Drop the entries whose key matches (a service account's last pod is gone)."""
        doomed = [key for key in self._entries if predicate(key)]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def sweep(self, *, idle: float = 86400.0) -> int:
        """Drop expired entries and those nobody asked for in ``idle`` seconds."""
        now = self._clock()
        doomed = [
            k
            for k, e in self._entries.items()
            if e.token.expires_on <= now or now - e.last_used > idle
        ]
        for key in doomed:
            self._drop(key)
        stale = [k for k, (until, _) in self._cooldown.items() if until <= now]
        for key in stale:
            del self._cooldown[key]
        return len(doomed)

    async def close(self) -> None:
        tasks = [f.task for f in self._flights.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def _consume(task: asyncio.Task[Token]) -> None:
    """Flights may end with nobody awaiting them: retrieve their exception."""
    if not task.cancelled():
        task.exception()
