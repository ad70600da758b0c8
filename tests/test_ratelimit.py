"""Per-key rate limits on ``limits`` (S5): in memory, shared across replicas in a real Redis, and what a Redis
outage does (S7: fail open to per-replica limits by default, or closed with 503).

Two ``RateLimiter`` objects on one Redis stand for two replicas (the process-level version, through haproxy,
is in test_scale_cluster.py). Redis is a private ``redis-server`` on an ephemeral loopback port.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gkt.backing import Redis
from shared.errors import ErrorCode, GKTError
from shared.ratelimit import RateLimiter

needs_redis = pytest.mark.skipif(not Redis.available(), reason="redis-server missing: make system-deps")


@pytest.fixture
def redis() -> Iterator[Redis]:
    server = Redis(Path(tempfile.mkdtemp(prefix="gkt-redis-"))).start()
    try:
        yield server
    finally:
        server.stop()


async def spend(limiter: RateLimiter, tenant: str, n: int) -> int:
    """How many of ``n`` requests pass."""
    passed = 0
    for _ in range(n):
        try:
            await limiter.take(tenant)
            passed += 1
        except GKTError as err:
            assert err.code is ErrorCode.rate_limited and err.retry_after is not None and err.retry_after >= 1
    return passed


async def test_burst_then_refusal_per_key_in_memory() -> None:
    limiter = RateLimiter(per_min=0.001, burst=3)
    assert await spend(limiter, "a", 5) == 3
    assert await spend(limiter, "b", 1) == 1  # other keys unaffected
    assert limiter.limited == {"a": 2}


async def test_refill_at_the_rate() -> None:
    limiter = RateLimiter(per_min=120, burst=2)  # a window of 2 requests per second
    assert await spend(limiter, "a", 3) == 2
    time.sleep(1.1)
    assert await spend(limiter, "a", 1) == 1


async def test_a_batch_larger_than_the_burst_costs_the_whole_window() -> None:
    limiter = RateLimiter(per_min=0.001, burst=4)
    await limiter.take("a", 10)
    assert await spend(limiter, "a", 1) == 0


@needs_redis
async def test_the_limit_holds_across_replicas_sharing_redis(redis: Redis) -> None:
    one, two = (RateLimiter(per_min=0.001, burst=4, storage_url=redis.url) for _ in range(2))
    passed = [await spend(r, "edge-a", 1) for r in (one, two) * 4]
    assert sum(passed) == 4  # not 4 per replica
    assert await spend(two, "edge-b", 1) == 1


@needs_redis
async def test_redis_outage_fails_open_to_per_replica_limits(redis: Redis) -> None:
    """S7, default: nobody is refused for the outage, and each replica still limits its own traffic."""
    one, two = (RateLimiter(per_min=0.001, burst=2, storage_url=redis.url) for _ in range(2))
    assert await spend(one, "a", 1) == 1
    redis.kill()
    t0 = time.monotonic()
    assert await spend(one, "b", 3) == 2 and await spend(two, "b", 3) == 2  # local windows: 2 per replica
    assert time.monotonic() - t0 < 2.0  # refused connections fail fast; a dead store is probed once a second
    assert one.store_down and one.outages >= 1
    redis.start()  # same port: shared again once the store answers
    time.sleep(1.1)
    assert await spend(one, "c", 1) == 1 and not one.store_down


@needs_redis
async def test_redis_outage_fails_closed_when_configured(redis: Redis) -> None:
    limiter = RateLimiter(per_min=600, burst=10, storage_url=redis.url, on_outage="closed")
    await limiter.take("a")
    redis.kill()
    with pytest.raises(GKTError) as info:
        await limiter.take("a")
    assert info.value.code is ErrorCode.store_unavailable and info.value.status == 503
    assert info.value.retry_after == 1.0
