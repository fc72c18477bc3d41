"""Rate limits against a real redis-server: the Lua scripts, shared limits, TTLs, fallback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.ratelimit import BackendUnavailable, RateLimiter, rate_keys
from gateway.redis_server import RedisServer, free_port
from gateway.settings import Tier
from gateway.storage.scripts import lua_source

from .support.clock import FakeClock

LUA_DIR = Path(__file__).resolve().parent.parent / "gateway" / "lua"


class ScriptClient:
    """The ScriptBackend contract over redis.asyncio: EVALSHA, reload on NOSCRIPT, bounded time."""

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self.redis = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), socket_connect_timeout=timeout_s)
        self.timeout_s = timeout_s
        self.calls = 0
        self._sources = {path.stem: lua_source(path.stem) for path in LUA_DIR.glob("*.lua")}
        self._shas: dict[str, str] = {}

    async def run_script(
        self, name: str, keys: Sequence[str], args: Sequence[str | int | float], *, timeout_s: float | None = None
    ) -> Any:
        self.calls += 1
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)):
                sha = self._shas.get(name)
                if sha is None:
                    sha = self._shas[name] = await self.redis.script_load(self._sources[name])
                try:
                    return await self.redis.evalsha(sha, len(keys), *keys, *args)
                except NoScriptError:
                    self._shas[name] = await self.redis.script_load(self._sources[name])
                    return await self.redis.evalsha(self._shas[name], len(keys), *keys, *args)
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self.redis.aclose()


TIERS = {
    "steady": Tier(requests_per_minute=60, burst=5, tokens_per_minute=None),
    "odd": Tier(requests_per_minute=7, burst=1, tokens_per_minute=None),
    "tiny": Tier(requests_per_minute=1, burst=10, tokens_per_minute=None),
    "tokens": Tier(requests_per_minute=6000, burst=100, tokens_per_minute=1000),
    "public": Tier(requests_per_minute=60, burst=10, tokens_per_minute=100_000),
    "fast": Tier(requests_per_minute=6000, burst=1, tokens_per_minute=None),
}
T0 = 1_700_000_000.0  # the scripts' injected wall clock, seconds


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[ScriptClient]:
    backend = ScriptClient(redis_url)
    yield backend
    await backend.close()


def scripted(backend: ScriptClient, start: float = T0) -> tuple[RateLimiter, FakeClock]:
    """A limiter whose scripts run on an injected clock, for exact timing."""
    clock = FakeClock(start)
    return RateLimiter(backend, TIERS, clock=clock, script_now=clock), clock


async def test_burst_then_steady_rate(client: ScriptClient) -> None:
    limiter, clock = scripted(client)
    results = [await limiter.check("alice", "m", "steady") for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0, 0]
    assert not any(r.fallback for r in results)
    assert results[5].code == "rate_limited" and results[5].retry_after_s == 1
    for _ in range(3):
        clock.advance(1.0)
        assert (await limiter.check("alice", "m", "steady")).allowed
        assert not (await limiter.check("alice", "m", "steady")).allowed
    clock.advance(0.5)
    assert not (await limiter.check("alice", "m", "steady")).allowed
    clock.advance(5.0)
    passed = [(await limiter.check("alice", "m", "steady")).allowed for _ in range(8)]
    assert sum(passed) == 5


async def test_retry_after_passes(client: ScriptClient) -> None:
    limiter, clock = scripted(client)
    assert (await limiter.check("bob", None, "odd")).allowed
    blocked = await limiter.check("bob", None, "odd")
    assert not blocked.allowed and blocked.retry_after_s == 9  # 8.57 s rounded up
    assert dict(blocked.headers("odd"))["Retry-After"] == "9"
    clock.advance(blocked.retry_after_s - 1)
    assert not (await limiter.check("bob", None, "odd")).allowed
    clock.advance(1)
    assert (await limiter.check("bob", None, "odd")).allowed


@pytest.mark.parametrize("tier", ["tokens", "public", "odd"])
async def test_scripts_match_the_local_limiter(client: ScriptClient, tier: str) -> None:
    # One algorithm, two implementations: the same calls give the same answers.
    limiter, clock = scripted(client)
    local = limiter.local
    pattern = [
        0.0,
        0.0,
        0.3,
        0.0,
        1.7,
        0.0,
        0.0,
        0.01,
        9.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        31.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.4,
        30.0,
    ]
    seen: set[str] = set()
    for step, gap in enumerate(pattern):
        clock.advance(gap)
        if step % 3 == 1:
            await limiter.charge("carol", "m", tier, 300)
            local.charge("carol-local", "m", TIERS[tier], 300)
        remote = await limiter.check("carol", "m", tier)
        here = local.check("carol-local", "m", TIERS[tier])
        seen.add(remote.code)
        assert (remote.allowed, remote.code, remote.remaining, remote.retry_after_s, remote.tokens_remaining) == (
            here.allowed,
            here.code,
            here.remaining,
            here.retry_after_s,
            here.tokens_remaining,
        )
        assert remote.reset_s == pytest.approx(here.reset_s, abs=1e-3)
        assert remote.token_reset_s == pytest.approx(here.token_reset_s, abs=1e-3)
    assert len(seen) > 1  # the pattern reaches a block, not only passes


async def test_running_token_sum_matches_the_buckets_over_minutes(client: ScriptClient) -> None:
    # A hot caller charged in most seconds for three minutes: the script keeps a running sum and
    # prunes only when the oldest second leaves the window; its answers must still match the local
    # limiter's (which sums every time), and the sum must match the buckets it stands for.
    import random

    rng = random.Random(7)
    limiter, clock = scripted(client)
    local = limiter.local
    _, window_key = rate_keys("hot", "m")
    for _step in range(400):
        clock.advance(rng.choice((0.0, 0.05, 0.3, 0.7, 1.0, 2.5)))
        tokens = rng.randint(1, 40)
        await limiter.charge("hot", "m", "tokens", tokens)
        local.charge("hot-local", "m", TIERS["tokens"], tokens)
        remote = await limiter.check("hot", "m", "tokens")
        here = local.check("hot-local", "m", TIERS["tokens"])
        assert (remote.allowed, remote.code, remote.tokens_remaining, remote.retry_after_s) == (
            here.allowed,
            here.code,
            here.tokens_remaining,
            here.retry_after_s,
        )
        assert remote.token_reset_s == pytest.approx(here.token_reset_s, abs=1e-3)
        fields = {k.decode(): int(v) for k, v in (await client.redis.hgetall(window_key)).items()}
        seconds = {int(k): v for k, v in fields.items() if k.isdigit()}
        assert fields["sum"] == sum(seconds.values())
        assert (fields["lo"], fields["hi"]) == (min(seconds), max(seconds))
        assert len(seconds) <= 64


async def test_uses_redis_time_when_no_clock_is_injected(client: ScriptClient) -> None:
    limiter = RateLimiter(client, TIERS)
    results = [await limiter.check("dave", "m", "tiny") for _ in range(11)]
    assert [r.allowed for r in results] == [True] * 10 + [False]
    assert 59 <= results[10].retry_after_s <= 60


async def test_concurrent_checks_from_two_processes(redis_url: str) -> None:
    # Two clients, two limiters: as two gateway processes sharing one Redis. The test counts, it does not
    # time: a deadline long enough for 35 first connections on a loaded machine, so none falls back.
    first, second = ScriptClient(redis_url, timeout_s=10), ScriptClient(redis_url, timeout_s=10)
    try:
        limiters = [RateLimiter(first, TIERS), RateLimiter(second, TIERS)]
        burst, extra = TIERS["tiny"].burst, 25
        results = await asyncio.gather(*(limiters[i % 2].check("eve", "m", "tiny") for i in range(burst + extra)))
        assert not any(r.fallback for r in results)
        assert sum(r.allowed for r in results) == burst
        assert {r.code for r in results if not r.allowed} == {"rate_limited"}
    finally:
        await first.close()
        await second.close()


async def test_token_limit_and_sliding_window(client: ScriptClient) -> None:
    limiter, clock = scripted(client)
    assert (await limiter.check("fay", "m", "tokens")).tokens_remaining == 1000
    await limiter.charge("fay", "m", "tokens", 600)
    clock.advance(30)
    result = await limiter.check("fay", "m", "tokens")
    assert result.allowed and result.tokens_remaining == 400
    await limiter.charge("fay", "m", "tokens", 400)
    clock.advance(1)
    spent = await limiter.check("fay", "m", "tokens")
    assert not spent.allowed and spent.code == "token_rate_limited"
    assert spent.retry_after_s == 29  # when the 600 from 31 s ago leave the minute
    headers = dict(spent.headers("tokens"))
    assert headers["x-ratelimit-remaining-tokens"] == "0" and headers["Retry-After"] == "29"
    # Other models of the same subject have budgets of their own.
    assert (await limiter.check("fay", "other", "tokens")).allowed
    clock.advance(28)
    assert not (await limiter.check("fay", "m", "tokens")).allowed
    clock.advance(1)
    reopened = await limiter.check("fay", "m", "tokens")
    assert reopened.allowed and reopened.tokens_remaining == 600
    clock.advance(31)
    assert (await limiter.check("fay", "m", "tokens")).tokens_remaining == 1000


async def test_every_key_has_a_ttl(client: ScriptClient) -> None:
    limiter, _ = scripted(client)
    await limiter.check("gus", "m", "public")
    await limiter.charge("gus", "m", "public", 50)
    request_key, token_key = rate_keys("gus", "m")
    # public: 1 s per request, so the request key outlives its state by nothing.
    assert 0 < await client.redis.pttl(request_key) <= 1000
    assert 0 < await client.redis.pttl(token_key) <= 60_000
    assert sorted(await client.redis.keys("*")) == sorted([request_key.encode(), token_key.encode()])


async def test_keys_expire_by_themselves(client: ScriptClient) -> None:
    limiter = RateLimiter(client, TIERS)
    assert (await limiter.check("hal", "m", "fast")).allowed  # 10 ms per request
    (key,) = await client.redis.keys("*")
    assert 0 < await client.redis.pttl(key) <= 10
    await asyncio.sleep(0.1)
    # DBSIZE still counts a key Redis has not yet reclaimed; KEYS and EXISTS see it as gone.
    assert await client.redis.keys("*") == []
    assert await client.redis.exists(key) == 0


async def test_ten_thousand_callers_leave_bounded_memory(redis_url: str) -> None:
    backend = ScriptClient(redis_url, timeout_s=5.0)
    fallbacks: list[int] = []
    limiter = RateLimiter(backend, TIERS, on_fallback=lambda: fallbacks.append(1))
    callers = 10_000
    try:
        for start in range(0, callers, 100):
            batch = range(start, start + 100)
            await asyncio.gather(*(limiter.check(f"user-{i}", "m", "public") for i in batch))
            await asyncio.gather(*(limiter.charge(f"user-{i}", "m", "public", 10) for i in batch))
        assert not fallbacks  # every call reached Redis, so Redis holds every key
        # Request keys of this tier live 1 s, token keys at most one minute.
        assert callers <= await backend.redis.dbsize() <= 2 * callers
        ttls: list[int] = []
        async for batch_keys in _key_batches(backend.redis):
            async with backend.redis.pipeline(transaction=False) as pipe:
                for key in batch_keys:
                    pipe.pttl(key)
                ttls += await pipe.execute()
        assert len(ttls) >= callers
        # -2 or 0: a 1 s request key expiring between SCAN and PTTL; -1 (no TTL) never.
        assert [t for t in ttls if not (t == -2 or 0 <= t <= 61_000)] == []
        assert sum(ttl > 0 for ttl in ttls) >= callers
    finally:
        await backend.close()


async def _key_batches(redis: aioredis.Redis) -> AsyncIterator[list[bytes]]:
    batch: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        batch.append(key)
        if len(batch) == 1000:
            yield batch
            batch = []
    if batch:
        yield batch


async def test_script_cache_flush_is_survived(client: ScriptClient) -> None:
    limiter = RateLimiter(client, TIERS)
    assert not (await limiter.check("ian", "m", "steady")).fallback
    await client.redis.script_flush()
    result = await limiter.check("ian", "m", "steady")
    assert not result.fallback and result.remaining == 3


async def test_fallback_when_redis_is_unreachable() -> None:
    backend = ScriptClient(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    fallbacks: list[int] = []
    clock = FakeClock(100.0)
    limiter = RateLimiter(backend, TIERS, clock=clock, on_fallback=lambda: fallbacks.append(1))
    try:
        results = [await limiter.check("jo", "m", "steady") for _ in range(7)]
        assert all(r.fallback for r in results)
        # Limited, not unlimited: the same burst of 5 as through Redis.
        assert [r.allowed for r in results] == [True] * 5 + [False, False]
        assert results[5].code == "rate_limited" and results[5].retry_after_s == 1
        assert len(fallbacks) == 7
        # Within the back-off no call waits on the dead Redis again.
        assert backend.calls == 1
        await limiter.charge("jo", "m", "public", 100_000)
        assert (await limiter.check("jo", "m", "public")).code == "token_rate_limited"
        assert len(fallbacks) == 8  # checks are counted; the charge decided nothing
    finally:
        await backend.close()


async def test_fallback_and_recovery_across_a_redis_restart(fresh_redis: RedisServer) -> None:
    backend = ScriptClient(fresh_redis.url, timeout_s=0.5)
    fallbacks: list[int] = []
    clock = FakeClock(100.0)
    limiter = RateLimiter(backend, TIERS, clock=clock, on_fallback=lambda: fallbacks.append(1))
    try:
        assert not (await limiter.check("kim", "m", "steady")).fallback
        fresh_redis.stop()
        down = [await limiter.check("kim", "m", "steady") for _ in range(6)]
        assert all(r.fallback for r in down) and len(fallbacks) == 6
        assert sum(r.allowed for r in down) == 5
        fresh_redis.start()
        # Still inside the back-off: local, without touching Redis.
        calls = backend.calls
        assert (await limiter.check("kim", "other", "steady")).fallback
        assert backend.calls == calls
        clock.advance(1.0)
        back = await limiter.check("kim", "m", "steady")
        assert not back.fallback and back.allowed
        assert len(fallbacks) == 7
    finally:
        fresh_redis.resume()
        await backend.close()


async def test_paused_redis_is_bounded_by_the_timeout(fresh_redis: RedisServer) -> None:
    backend = ScriptClient(fresh_redis.url, timeout_s=0.2)
    fallbacks: list[int] = []
    clock = FakeClock(100.0)
    limiter = RateLimiter(backend, TIERS, clock=clock, on_fallback=lambda: fallbacks.append(1))
    try:
        assert not (await limiter.check("lee", "m", "steady")).fallback
        fresh_redis.pause()
        # Concurrent requests during a blackhole: each answered locally, none hangs.
        results = await asyncio.wait_for(
            asyncio.gather(*(limiter.check("lee", "m", "steady") for _ in range(10))), timeout=5
        )
        assert all(r.fallback for r in results) and len(fallbacks) == 10
        assert sum(r.allowed for r in results) == 5
        fresh_redis.resume()
        clock.advance(1.0)
        assert not (await limiter.check("lee", "m", "steady")).fallback
    finally:
        fresh_redis.resume()
        await backend.close()
