"""RateLimiter.check_blocked against a real redis-server: refusals per caller, on keys of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.ratelimit import RateLimiter
from gateway.redis_server import free_port
from gateway.settings import Tier

from .support.clock import FakeClock
from .test_ratelimit_redis import ScriptClient

T0 = 1_700_000_000.0
TIERS = {
    "public": Tier(requests_per_minute=60, burst=10, blocked_per_minute=3),
    "partner": Tier(requests_per_minute=6, burst=2),  # blocked_per_minute: its requests_per_minute
}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[ScriptClient]:
    backend = ScriptClient(redis_url)
    yield backend
    await backend.close()


def limiter_for(backend: ScriptClient) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock(T0)
    return RateLimiter(backend, TIERS, clock=clock, script_now=clock), clock


async def test_refusals_pass_up_to_the_limit_then_pace(client: ScriptClient) -> None:
    limiter, clock = limiter_for(client)
    results = [await limiter.check_blocked("s:mallory", "public") for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    refused = results[3]
    assert refused.code == "rate_limited" and refused.limit == 3 and refused.retry_after_s == 20
    assert dict(refused.headers("public-refused"))["Retry-After"] == "20"
    clock.advance(20)
    assert (await limiter.check_blocked("s:mallory", "public")).allowed
    assert not (await limiter.check_blocked("s:mallory", "public")).allowed
    # Another caller, and the same caller's served requests, have budgets of their own.
    assert (await limiter.check_blocked("s:alice", "public")).allowed
    assert (await limiter.check("mallory", None, "public")).allowed


async def test_default_is_the_tiers_request_rate(client: ScriptClient) -> None:
    limiter, _clock = limiter_for(client)
    assert [(await limiter.check_blocked("s:p", "partner")).allowed for _ in range(7)] == [True] * 6 + [False]


async def test_an_unknown_tier_gets_the_strictest_limit(client: ScriptClient) -> None:
    limiter, _clock = limiter_for(client)
    assert [(await limiter.check_blocked("ip:192.0.2.1", None)).allowed for _ in range(4)] == [True] * 3 + [False]


async def test_keys_are_their_own_and_expire_within_a_minute(client: ScriptClient, redis_url: str) -> None:
    limiter, _clock = limiter_for(client)
    await limiter.check_blocked("s:" + "x" * 100_000, "public")  # a huge key name costs a digest, no more
    await limiter.check("x", None, "public")
    redis = aioredis.Redis.from_url(redis_url)
    try:
        refused = [key async for key in redis.scan_iter("gw:rb:*")]
        assert len(refused) == 1 and len(refused[0]) < 64
        assert 0 < await redis.pttl(refused[0]) <= 60_000
        assert [key async for key in redis.scan_iter("gw:rl:*")]  # the served budget's keys are apart
    finally:
        await redis.aclose()


async def test_without_redis_the_local_limiter_counts_refusals() -> None:
    backend = ScriptClient(f"redis://127.0.0.1:{free_port()}", timeout_s=0.2)
    try:
        limiter, _clock = limiter_for(backend)
        results = [await limiter.check_blocked("s:mallory", "public") for _ in range(4)]
        assert [r.allowed for r in results] == [True, True, True, False]
        assert all(r.fallback for r in results)
        # The local state of refusals is not the caller's served budget.
        assert limiter.local.check("s:mallory", None, TIERS["public"]).allowed
    finally:
        await backend.close()
