"""Token buckets: IMDS pacing and per-pod fairness."""

import asyncio
import time

from nmi.ratelimit import Buckets, Pacer, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_burst_then_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == 1
    clock.now += 0.5
    assert bucket.take() and not bucket.take()


def test_buckets_are_per_key_and_bounded() -> None:
    buckets = Buckets(rate=1, burst=2, max_keys=2)
    assert buckets.take("a") is None and buckets.take("a") is None
    over = buckets.take("a")
    assert over is not None and over.retry_after() >= 1
    assert buckets.take("b") is None  # another pod is not affected
    buckets.take("c")  # forgets "a"
    assert buckets.take("a") is None and buckets.limited == 1


async def test_pacer_spaces_calls_at_the_rate() -> None:
    pacer = Pacer(rate=50, burst=1)
    started = time.monotonic()
    await asyncio.gather(*(pacer.wait() for _ in range(6)))
    assert time.monotonic() - started >= 5 / 50 * 0.9
