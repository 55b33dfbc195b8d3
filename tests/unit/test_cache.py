"""Token cache policy: single flight, lifetimes, refresh ahead, failures, bounds."""

import asyncio

import pytest

from nmi.tokens.cache import (
    CLIENT_MARGIN,
    CacheKey,
    TokenCache,
    UpstreamNotAllowed,
    refresh_lead,
    retry_interval,
)
from nmi.tokens.lanes import Ticket
from nmi.tokens.model import Token, UpstreamError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def key(resource: str = "r", owner: str = "id") -> CacheKey:
    return CacheKey(owner, "fp", resource)


K = key()


def token(clock: Clock, lifetime: int, name: str = "t", size: int = 0) -> Token:
    return Token(
        access_token=name + "x" * size,
        expires_on=int(clock.now + lifetime),
        not_before=int(clock.now),
        client_id="c",
        obtained_at=clock.now,
    )


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_concurrent_misses_make_one_call() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = 0
    gate = asyncio.Event()

    async def fetch(_: Ticket) -> Token:
        nonlocal calls
        calls += 1
        await gate.wait()
        return token(clock, 3600)

    tasks = [asyncio.create_task(cache.get(K, fetch, requester="p")) for _ in range(100)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert {r[0].access_token for r in results} == {"t"}
    assert not any(hit for _, hit in results)
    _tok, hit = await cache.get(K, fetch)
    assert hit and calls == 1


async def test_a_token_is_served_until_it_really_expires() -> None:
    """Also after its refreshes failed: a still-valid token beats an error."""
    clock = Clock()
    cache = TokenCache(clock=clock)
    fail = False

    async def fetch(_: Ticket) -> Token:
        if fail:
            raise UpstreamError(error="x", description="down", status=503, retryable=True)
        return token(clock, 3600)

    await cache.get(K, fetch)
    fail = True
    clock.now += 3600 - 1  # one second left, refreshes failing
    tok, hit = await cache.get(K, fetch)
    assert hit and tok.remaining(clock.now) == 1
    clock.now += 1
    with pytest.raises(UpstreamError):
        await cache.get(K, fetch)  # expired: a miss, and upstream is down


async def test_short_lived_tokens_are_served_with_their_true_lifetime() -> None:
    """A source that only issues 240 s tokens (AD FS, a lifetime policy) is not refused."""
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = 0

    async def fetch(_: Ticket) -> Token:
        nonlocal calls
        calls += 1
        return token(clock, 240, name=f"t{calls}")

    tok, hit = await cache.get(K, fetch)
    assert not hit and tok.remaining(clock.now) == 240 < CLIENT_MARGIN
    # Ten minutes of requests every second: served from the cache, renewed about once per
    # half-life (bounded), never once per request.
    for _ in range(600):
        clock.now += 1
        tok, _ = await cache.get(K, fetch)
        assert tok.remaining(clock.now) > 0
        await settle()
    assert 4 <= calls <= 8, calls


def test_refresh_lead_and_retry_are_proportional_to_the_lifetime() -> None:
    day = 86400
    assert refresh_lead(day) == CLIENT_MARGIN + day / 3
    assert refresh_lead(600) == 300 and refresh_lead(120) == 60
    assert retry_interval(day) == 30 and retry_interval(120) == 6 and retry_interval(10) == 2


async def test_an_expired_token_from_upstream_is_a_retryable_error() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)

    async def fetch(_: Ticket) -> Token:
        return token(clock, 0)

    with pytest.raises(UpstreamError) as info:
        await cache.get(K, fetch)
    assert info.value.retryable and info.value.error == "token_expired" and len(cache) == 0


async def test_refresh_ahead_serves_cached_and_refreshes_once() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    n = 0
    release = asyncio.Event()

    async def fetch(_: Ticket) -> Token:
        nonlocal n
        n += 1
        if n > 1:
            await release.wait()
        return token(clock, 3600, name=f"t{n}")

    await cache.get(K, fetch)
    clock.now += 2600  # past the refresh point (lead: 300 + 1200 s), still well valid
    results = [await cache.get(K, fetch) for _ in range(10)]
    assert all(hit and tok.access_token == "t1" for tok, hit in results)
    await asyncio.sleep(0)  # let the background refresh start
    assert n == 2  # one background refresh for ten requests
    release.set()
    for _ in range(100):
        if cache.refreshes:
            break
        await asyncio.sleep(0)
    tok, hit = await cache.get(K, fetch)
    assert hit and tok.access_token == "t2"


async def test_failed_refresh_keeps_token_in_service_and_is_retried_at_a_bounded_rate() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    fail = False
    calls = 0

    async def fetch(_: Ticket) -> Token:
        nonlocal calls
        calls += 1
        if fail:
            raise RuntimeError("aad down")
        return token(clock, 3600)

    await cache.get(K, fetch)
    fail = True
    clock.now += 2600
    for _ in range(100):  # 100 requests within a second: one refresh attempt
        tok, hit = await cache.get(K, fetch)
        assert hit and tok.access_token == "t"
    await settle()
    assert cache.refresh_failures == 1 and calls == 2
    clock.now += retry_interval(3600)
    await cache.get(K, fetch)
    await settle()
    assert calls == 3


async def test_miss_failure_propagates_to_all_waiters_and_is_not_cached() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = 0

    async def fetch(_: Ticket) -> Token:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    results = await asyncio.gather(*(cache.get(K, fetch) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results) and calls == 1
    assert len({id(r) for r in results}) == 1, "every waiter sees the same failure"
    with pytest.raises(RuntimeError):
        await cache.get(K, fetch)
    assert calls == 2


async def test_the_ticket_knows_whether_anyone_still_waits() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    gate = asyncio.Event()
    tickets: list[Ticket] = []

    async def fetch(ticket: Ticket) -> Token:
        tickets.append(ticket)
        await gate.wait()
        return token(clock, 3600)

    first = asyncio.create_task(cache.get(K, fetch, requester="pod-a"))
    second = asyncio.create_task(cache.get(K, fetch, requester="pod-b"))
    await settle()
    [ticket] = tickets
    assert ticket.requester == "pod-a" and ticket.wanted()
    first.cancel()
    await settle()
    assert ticket.wanted()  # the second still waits
    second.cancel()
    await settle()
    assert not ticket.wanted()  # nobody: a queued call is dropped, not sent
    gate.set()
    await settle()
    assert len(cache) == 1  # a call already running completes and is kept


def test_sweep_drops_expired() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)

    async def main() -> None:
        async def fetch(_: Ticket) -> Token:
            return token(clock, 3600)

        await cache.get(K, fetch)

    asyncio.run(main())
    assert len(cache) == 1
    clock.now += 3600
    assert cache.sweep() == 1 and len(cache) == 0 and cache.bytes == 0


async def test_throttled_key_is_not_sent_upstream_before_retry_after() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = 0

    async def fetch(_: Ticket) -> Token:
        nonlocal calls
        calls += 1
        raise UpstreamError(
            error="too_many_requests",
            description="slow down",
            status=429,
            retryable=True,
            retry_after=30,
        )

    with pytest.raises(UpstreamError):
        await cache.get(K, fetch)
    clock.now += 10
    with pytest.raises(UpstreamError) as info:
        await cache.get(K, fetch)
    assert calls == 1 and info.value.retry_after == 20 and cache.throttled == 1
    clock.now += 21

    async def ok(_: Ticket) -> Token:
        return token(clock, 3600)

    tok, hit = await cache.get(K, ok)
    assert not hit and tok.access_token == "t"


async def test_refresher_renews_only_tokens_still_in_use() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    n = {"a": 0, "b": 0}
    a, b = key("a"), key("b")

    def fetcher(name: str):  # type: ignore[no-untyped-def]
        async def fetch(_: Ticket) -> Token:
            n[name] += 1
            return token(clock, 3600, name=f"{name}{n[name]}")

        return fetch

    await cache.get(a, fetcher("a"))
    await cache.get(b, fetcher("b"))
    clock.now += 3000  # both due; only "a" belongs to an identity a pod still has
    assert cache.refresh_due(in_use=lambda k: k == a) == 1
    for _ in range(100):
        if cache.refreshes:
            break
        await asyncio.sleep(0)
    assert n == {"a": 2, "b": 1}
    assert cache.peek(a).access_token == "a2"  # type: ignore[union-attr]
    assert cache.refresh_due(in_use=lambda k: True) == 1  # "b" now; "a" is fresh


async def test_upstream_not_allowed_on_miss() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)

    async def fetch(_: Ticket) -> Token:
        return token(clock, 3600)

    with pytest.raises(UpstreamNotAllowed):
        await cache.get(K, fetch, upstream=False)
    await cache.get(K, fetch)
    _, hit = await cache.get(K, fetch, upstream=False)
    assert hit


async def test_one_pods_storm_of_resources_evicts_only_its_own_entries() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock, max_per_requester=8, max_entries=100)

    async def fetch(_: Ticket) -> Token:
        return token(clock, 3600)

    await cache.get(key("victim"), fetch, requester="good")
    for i in range(50):
        await cache.get(key(f"variant-{i}"), fetch, requester="storm")
    assert len(cache) == 9  # the storm keeps its 8 most recent, the other pod its one
    assert cache.peek(key("victim")) is not None
    assert cache.peek(key("variant-49")) is not None and cache.peek(key("variant-0")) is None
    assert cache.evictions == 42


async def test_entries_and_bytes_are_bounded_in_all() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock, max_per_requester=1000, max_entries=20, max_bytes=40_000)

    async def fetch(_: Ticket) -> Token:
        return token(clock, 3600, size=3000)

    for i in range(100):
        await cache.get(key(f"r{i}"), fetch, requester=f"pod{i % 7}")
        assert len(cache) <= 20 and cache.bytes <= 40_000
    assert len(cache) == 40_000 // (3001 + 600 + len("id") + len("fp") + 3)
    # Least recently used goes first: a token in use survives the churn.
    await cache.get(key("hot"), fetch, requester="p")
    for i in range(100, 130):
        await cache.get(key("hot"), fetch)  # used between every miss
        await cache.get(key(f"r{i}"), fetch, requester="q")
    assert cache.peek(key("hot")) is not None
