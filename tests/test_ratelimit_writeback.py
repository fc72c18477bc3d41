"""The limiter across Redis outages (docs/contract.md §5), against a real redis-server behind a fault proxy.

- What the local limiter admitted and charged while Redis was away is charged to Redis when it returns:
  in the caller's next check, or by a background write-back for callers who do not come back.
- A request's calls share one deadline; a call given less than the connection's deadline fails alone,
  and the connection's replies still pair with their calls.
- One failed call skips Redis briefly; only repeated failures back off to ``backoff_s``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
import redis as redis_sync

from gateway.ratelimit import RateLimiter, RedisBudget, rate_keys
from gateway.redis_server import RedisServer
from gateway.settings import Tier
from gateway.storage.clients import StoreUnavailable
from gateway.storage.store import Store

from .support.clock import FakeClock
from .support.faultproxy import FaultProxy
from .test_ratelimit_redis import T0, ScriptClient

TIERS = {
    "burst5": Tier(requests_per_minute=6, burst=5, tokens_per_minute=None),
    "tokens": Tier(requests_per_minute=6000, burst=100, tokens_per_minute=1000),
}


@pytest.fixture
async def backend(proxied: tuple[RedisServer, FaultProxy]) -> AsyncIterator[ScriptClient]:
    client = ScriptClient(proxied[1].url, timeout_s=0.3)
    yield client
    await client.close()


def limiter_on(backend: ScriptClient) -> tuple[RateLimiter, FakeClock, list[int]]:
    clock = FakeClock(T0)
    fallbacks: list[int] = []
    limiter = RateLimiter(
        backend,
        TIERS,
        clock=clock,
        script_now=clock,
        timeout_s=0.1,
        backoff_s=1.0,
        on_fallback=lambda: fallbacks.append(1),
    )
    return limiter, clock, fallbacks


async def test_requests_admitted_locally_are_charged_in_the_next_check(
    proxied: tuple[RedisServer, FaultProxy], backend: ScriptClient
) -> None:
    _, proxy = proxied
    limiter, clock, fallbacks = limiter_on(backend)
    proxy.set("refuse")
    away = [await limiter.check("amy", "m", "burst5") for _ in range(6)]
    assert [r.allowed for r in away] == [True] * 5 + [False] and all(r.fallback for r in away)
    proxy.set("pass")
    clock.advance(2.0)  # past the back-off; the bucket drained 2 s of its 50 s of spend
    back = await limiter.check("amy", "m", "burst5")
    assert not back.fallback and not back.allowed and back.code == "rate_limited"
    # Redis holds the spend: 5 intervals of 10 s, less the 2 s that passed (48 s); this request's
    # 10 s would take it 8 s past the burst's 50 s.
    assert back.retry_after_s == 8
    assert len(fallbacks) == 6
    await limiter.close()


async def test_tokens_charged_locally_are_charged_to_redis(
    proxied: tuple[RedisServer, FaultProxy], backend: ScriptClient
) -> None:
    _, proxy = proxied
    limiter, clock, _ = limiter_on(backend)
    proxy.set("refuse")
    assert (await limiter.check("bo", "m", "tokens")).fallback
    await limiter.charge("bo", "m", "tokens", 800, budget=RedisBudget(0.1))
    proxy.set("pass")
    clock.advance(2.0)
    await limiter.charge("bo", "m", "tokens", 300)  # through Redis
    result = await limiter.check("bo", "m", "tokens")
    # 800 charged locally + 300 through Redis: the budget of 1000 is spent (without the write-back,
    # Redis would count only 300).
    assert not result.fallback and result.code == "token_rate_limited"
    await limiter.close()


async def test_callers_who_do_not_come_back_are_written_back_in_the_background(
    proxied: tuple[RedisServer, FaultProxy], backend: ScriptClient
) -> None:
    server, proxy = proxied
    limiter, clock, _ = limiter_on(backend)
    proxy.set("refuse")
    for subject in ("cy", "di"):
        for _ in range(3):
            assert (await limiter.check(subject, "m", "burst5")).allowed
    proxy.set("pass")
    clock.advance(2.0)
    assert not (await limiter.check("ed", "m", "burst5")).fallback  # Redis answers: the write-back starts
    redis = redis_sync.Redis.from_url(server.url)
    try:
        for _ in range(100):
            if all(redis.exists(rate_keys(s, "m")[0]) for s in ("cy", "di")):
                break
            await asyncio.sleep(0.02)
        for subject in ("cy", "di"):
            tat_us = int(redis.get(rate_keys(subject, "m")[0]) or 0)
            # 3 intervals of 10 s admitted, 2 s drained since: TAT 28 s ahead of the scripts' now.
            assert tat_us == round((T0 + 2.0) * 1_000_000) + 28_000_000, subject
    finally:
        redis.close()
    # Written back once: a check now sees 28 s of spend plus its own 10 s (burst 5: 50 s), so it passes
    # with one left, not with four.
    result = await limiter.check("cy", "m", "burst5")
    assert result.allowed and result.remaining == 1
    await limiter.close()


async def test_one_failure_skips_redis_briefly_and_repeated_ones_back_off(
    proxied: tuple[RedisServer, FaultProxy], backend: ScriptClient
) -> None:
    """A single late reply used to send a whole second of traffic to the local limiter."""
    _, proxy = proxied
    limiter, clock, _ = limiter_on(backend)
    proxy.set("refuse")
    # Calls failing together (as every call on a dropped connection does) count as one failure.
    results = await asyncio.gather(*(limiter.check(f"jo{i}", "m", "burst5") for i in range(10)))
    assert all(r.fallback for r in results)
    clock.advance(0.15)
    asked_at: list[float] = []
    for _ in range(160):  # 8 s on the limiter's clock
        calls = backend.calls
        assert (await limiter.check("fay", "m", "burst5")).fallback
        if backend.calls > calls:
            asked_at.append(clock.now)
        clock.advance(0.05)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(asked_at)]
    assert gaps[0] <= 0.25, gaps  # after two failures (the ten together, then one): twice timeout_s
    assert gaps == sorted(gaps) and 0.95 <= gaps[-1] <= 1.05, gaps  # doubling up to backoff_s
    proxy.set("pass")
    clock.advance(1.1)
    assert not (await limiter.check("fay", "m", "burst5")).fallback
    await limiter.close()


async def test_a_call_given_less_than_the_connection_deadline_fails_alone(
    proxied: tuple[RedisServer, FaultProxy],
) -> None:
    _, proxy = proxied
    store = Store.from_url(proxy.url, timeout_s=0.1, lean_wire=True)
    limiter = RateLimiter(store, TIERS, timeout_s=0.1)
    try:
        assert not (await limiter.check("hal", "m", "burst5")).fallback  # connected, script loaded
        proxy.set("delay", delay_s=0.03)  # ~60 ms a round trip
        budget = limiter.budget()
        first = await limiter.check("hal", "m", "burst5", budget=budget)
        assert not first.fallback and 0 < budget.left_s < 0.06
        # What is left is too short for a second round trip: that call fails; the connection stays.
        with pytest.raises(StoreUnavailable):
            await store.run_script(
                "ratelimit", rate_keys("hal", "n"), ("10000000", "5", "0", ""), timeout_s=budget.left_s
            )
        assert store.wire is not None and store.wire._protocol is not None
        assert not store.wire._protocol.closed
        proxy.set("pass")
        # The late reply is read and dropped in order: the next calls get their own replies.
        replies = await asyncio.gather(
            *(
                store.run_script("ratelimit", rate_keys("hal", f"k{i}"), ("10000000", str(i + 1), "0", ""))
                for i in range(5)
            )
        )
        assert [reply[2] for reply in replies] == [0, 1, 2, 3, 4]  # remaining = burst - 1
    finally:
        await limiter.close()
        await store.close()


# --- script failures told apart; no failure without a fault ---------------------------------------------


async def test_a_busy_gateway_on_a_healthy_redis_sees_no_script_failure(redis_url: str) -> None:
    """The soak's load shape (many callers, token charges, refusals) straight to Redis: no error at all.

    The soak's script errors came from its fault proxy (a thread in the load generator's process,
    starved past timeout_s under load), not from the gateway or its scripts.
    """
    store = Store.from_url(redis_url, timeout_s=0.1, lean_wire=True)
    errors: list[str] = []
    store.on_error = errors.append
    tiers = {
        "tight": Tier(requests_per_minute=30, burst=5, tokens_per_minute=None),
        "tokens": Tier(requests_per_minute=600_000, burst=1000, tokens_per_minute=50_000),
    }
    fallbacks: list[int] = []
    limiter = RateLimiter(store, tiers, timeout_s=0.1, on_fallback=lambda: fallbacks.append(1))
    stop = asyncio.Event()
    done = 0

    async def caller(index: int) -> None:
        nonlocal done
        while not stop.is_set():
            tier = "tight" if index % 3 == 0 else "tokens"
            budget = limiter.budget()
            result = await limiter.check(f"soak-{index % 7}", f"m{index % 2}", tier, budget=budget)
            if result.allowed:
                await limiter.charge(f"soak-{index % 7}", f"m{index % 2}", tier, 42 + index, budget=budget)
            done += 1

    try:
        tasks = [asyncio.create_task(caller(i)) for i in range(24)]
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await limiter.close()
        await store.close()
    assert done > 1000
    assert errors == [] and fallbacks == []
