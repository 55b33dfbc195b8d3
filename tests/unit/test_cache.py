"""Token cache policy: single flight, serve floor, refresh ahead, failures."""

import asyncio
import time

import pytest

from nmi.tokens.cache import SERVE_FLOOR, TokenCache
from nmi.tokens.model import Token, UpstreamError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def token(clock: Clock, lifetime: int, name: str = "t") -> Token:
    return Token(
        access_token=name,
        expires_on=int(clock.now + lifetime),
        not_before=int(clock.now),
        client_id="c",
        obtained_at=clock.now,
    )


async def test_concurrent_misses_make_one_call() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = 0
    gate = asyncio.Event()

    async def fetch() -> Token:
        nonlocal calls
        calls += 1
        await gate.wait()
        return token(clock, 3600)

    tasks = [asyncio.create_task(cache.get("k", fetch)) for _ in range(100)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert {r[0].access_token for r in results} == {"t"}
    assert not any(hit for _, hit in results)
    _tok, hit = await cache.get("k", fetch)
    assert hit and calls == 1


async def test_never_serves_token_at_or_below_floor() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    n = 0

    async def fetch() -> Token:
        nonlocal n
        n += 1
        return token(clock, 3600, name=f"t{n}")

    await cache.get("k", fetch)
    clock.now += 3600 - SERVE_FLOOR  # exactly at the floor
    tok, hit = await cache.get("k", fetch)
    assert not hit and tok.access_token == "t2"


async def test_refresh_ahead_serves_cached_and_refreshes_once() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    n = 0
    release = asyncio.Event()

    async def fetch() -> Token:
        nonlocal n
        n += 1
        if n > 1:
            await release.wait()
        return token(clock, 3600, name=f"t{n}")

    await cache.get("k", fetch)
    clock.now += 3000  # past the refresh point, still well valid
    results = [await cache.get("k", fetch) for _ in range(10)]
    assert all(hit and tok.access_token == "t1" for tok, hit in results)
    await asyncio.sleep(0)  # let the background refresh start
    assert n == 2  # one background refresh for ten requests
    release.set()
    for _ in range(100):
        if cache.refreshes:
            break
        await asyncio.sleep(0)
    tok, hit = await cache.get("k", fetch)
    assert hit and tok.access_token == "t2"


async def test_failed_refresh_keeps_token_in_service() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    fail = False

    async def fetch() -> Token:
        if fail:
            raise RuntimeError("aad down")
        return token(clock, 3600)

    await cache.get("k", fetch)
    fail = True
    clock.now += 3000
    tok, hit = await cache.get("k", fetch)
    assert hit
    for _ in range(100):
        if cache.refresh_failures:
            break
        await asyncio.sleep(0)
    assert cache.refresh_failures == 1
    tok, hit = await cache.get("k", fetch)
    assert hit and tok.access_token == "t"


async def test_miss_failure_propagates_to_all_waiters_and_is_not_cached() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = 0

    async def fetch() -> Token:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    results = await asyncio.gather(
        *(cache.get("k", fetch) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results) and calls == 1
    with pytest.raises(RuntimeError):
        await cache.get("k", fetch)
    assert calls == 2


async def test_cancelled_waiter_does_not_cancel_the_flight() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    gate = asyncio.Event()

    async def fetch() -> Token:
        await gate.wait()
        return token(clock, 3600)

    first = asyncio.create_task(cache.get("k", fetch))
    second = asyncio.create_task(cache.get("k", fetch))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    tok, _ = await second
    assert tok.access_token == "t"


def test_sweep_drops_expired() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)

    async def main() -> None:
        async def fetch() -> Token:
            return token(clock, 3600)

        await cache.get("k", fetch)

    asyncio.run(main())
    assert len(cache) == 1
    clock.now += 3600
    assert cache.sweep() == 1 and len(cache) == 0
    assert time.time() > 0


async def test_fresh_token_with_five_minutes_or_less_is_refused() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)

    async def fetch() -> Token:
        return token(clock, 299)

    with pytest.raises(UpstreamError) as info:
        await cache.get("k", fetch)
    assert info.value.retryable and len(cache) == 0


async def test_throttled_key_is_not_sent_upstream_before_retry_after() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = 0

    async def fetch() -> Token:
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
        await cache.get("k", fetch)
    clock.now += 10
    with pytest.raises(UpstreamError) as info:
        await cache.get("k", fetch)
    assert calls == 1 and info.value.retry_after == 20 and cache.throttled == 1
    clock.now += 21

    async def ok() -> Token:
        return token(clock, 3600)

    tok, hit = await cache.get("k", ok)
    assert not hit and tok.access_token == "t"


async def test_refresher_renews_only_tokens_still_in_use() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    n = {"a": 0, "b": 0}

    def fetcher(key: str):  # type: ignore[no-untyped-def]
        async def fetch() -> Token:
            n[key] += 1
            return token(clock, 3600, name=f"{key}{n[key]}")

        return fetch

    await cache.get("a", fetcher("a"))
    await cache.get("b", fetcher("b"))
    clock.now += 3000  # both due; only "a" belongs to an identity a pod still has
    assert cache.refresh_due(in_use=lambda key: key == "a") == 1
    for _ in range(100):
        if cache.refreshes:
            break
        await asyncio.sleep(0)
    assert n == {"a": 2, "b": 1}
    assert cache.peek("a").access_token == "a2"  # type: ignore[union-attr]
    assert cache.refresh_due(in_use=lambda key: True) == 1  # "b" now; "a" is fresh


async def test_upstream_not_allowed_on_miss() -> None:
    from nmi.tokens.cache import UpstreamNotAllowed

    clock = Clock()
    cache = TokenCache(clock=clock)

    async def fetch() -> Token:
        return token(clock, 3600)

    with pytest.raises(UpstreamNotAllowed):
        await cache.get("k", fetch, upstream=False)
    await cache.get("k", fetch)
    _, hit = await cache.get("k", fetch, upstream=False)
    assert hit
