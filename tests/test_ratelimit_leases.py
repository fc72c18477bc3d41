"""Leases and batched charges (docs/contract.md §5) against a real redis-server.

A process reserves request units for a caller in the check's own script call and admits from them
locally; near the limit a lease is one unit, so the boundary stays exact. Lapsed leases give back
what they did not use, but only when no one reserved after them. Token charges are counted at once
and reach Redis in batches, or at once near the budget; none is lost to an outage or a stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis as redis_sync

from gateway.ratelimit import MAX_LEASE, RateLimiter, rate_keys
from gateway.redis_server import RedisServer
from gateway.settings import Tier

from .support.clock import FakeClock
from .support.faultproxy import FaultProxy
from .test_ratelimit_redis import T0, ScriptClient

TIERS = {
    "roomy": Tier(requests_per_minute=60_000, burst=10_000, tokens_per_minute=10_000_000),
    "slow": Tier(requests_per_minute=600, burst=1000, tokens_per_minute=None),
    "tight": Tier(requests_per_minute=60, burst=5, tokens_per_minute=None),
    "tokens": Tier(requests_per_minute=60_000, burst=10_000, tokens_per_minute=1000),
}
INTERVAL_US = 100_000  # slow: 600 per minute (units long enough that the keys' TTLs outlive a test)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[ScriptClient]:
    backend = ScriptClient(redis_url)
    yield backend
    await backend.close()


def leasing(backend: ScriptClient, clock: FakeClock, **options: float) -> RateLimiter:
    return RateLimiter(backend, TIERS, clock=clock, script_now=clock, lease_s=0.25, **options)  # type: ignore[arg-type]


def tat(redis_url: str, subject: str, model: str = "m") -> int:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        value = client.get(rate_keys(subject, model)[0])
        return int(value) if value is not None else 0
    finally:
        client.close()


async def test_a_lease_admits_locally_and_every_unit_is_reserved_in_redis(client: ScriptClient, redis_url: str) -> None:
    clock = FakeClock(T0)
    limiter = leasing(client, clock)
    results = [await limiter.check("ann", "m", "slow") for _ in range(300)]
    assert all(r.allowed and not r.fallback for r in results)
    # Units asked for double while a lease is used up: 1, 2, 4, ... a handful of calls, not 300.
    assert client.calls <= 12, client.calls
    # Redis holds at least every unit admitted here (at most the last lease's unused ones more).
    reserved = (tat(redis_url, "ann") - round(T0 * 1_000_000)) // INTERVAL_US
    assert 300 <= reserved <= 300 + MAX_LEASE
    # The headers count what is left in Redis and in the lease: one less per request.
    assert results[-2].remaining - results[-1].remaining == 1
    await limiter.close()


async def test_a_lapsed_lease_gives_back_its_unused_units(client: ScriptClient, redis_url: str) -> None:
    clock = FakeClock(T0)
    limiter = leasing(client, clock)
    start = round(T0 * 1_000_000)
    for _ in range(40):  # leases of 1, 2, 4, 8, 16 and 32 units of 100 ms (TTLs outlive the test)
        assert (await limiter.check("bea", "m", "slow")).allowed
    assert tat(redis_url, "bea") == start + 63 * 100_000
    clock.advance(0.3)
    assert await limiter.release_lapsed() == 1
    # The last lease's 23 unused units were still ahead: given back, so only the 40 used stay spent.
    assert tat(redis_url, "bea") == start + 40 * 100_000
    clock.advance(0.5)
    assert await limiter.release_lapsed() == 0  # forgotten: nothing more to give back
    await limiter.close()


async def test_a_lease_is_not_given_back_over_a_later_reservation(client: ScriptClient, redis_url: str) -> None:
    clock = FakeClock(T0)
    first, second = leasing(client, clock), RateLimiter(client, TIERS, clock=clock, script_now=clock)
    # Units of 100 ms: the keys' TTLs (real time) outlive the test.
    for _ in range(20):
        assert (await first.check("cat", "m", "slow")).allowed
    assert (await second.check("cat", "m", "slow")).allowed  # reserves after first's lease
    before = tat(redis_url, "cat")
    assert await first.release_lapsed(all_leases=True) == 1
    # Moving the TAT back would move second's unit too: first's unused units stay spent.
    assert tat(redis_url, "cat") == before
    await first.close()


async def test_requests_in_flight_wait_for_one_renewal_instead_of_each_asking(
    client: ScriptClient, redis_url: str
) -> None:
    """32 requests find their caller's lease spent at once: one of them renews it, the rest take from it."""
    clock = FakeClock(T0)
    limiter = leasing(client, clock)
    for _ in range(64):  # a lease grown past 32 units, then spent
        await limiter.check("eve", "m", "slow")
    while (await limiter.check("eve", "m", "slow")).remaining and limiter._leases[("eve", "m")].left:
        pass
    calls = client.calls
    results = await asyncio.gather(*(limiter.check("eve", "m", "slow") for _ in range(32)))
    assert all(r.allowed and not r.fallback for r in results)
    assert client.calls - calls == 1, client.calls - calls
    # Every unit admitted is reserved in Redis: nothing was taken that no renewal granted.
    reserved = (tat(redis_url, "eve") - round(T0 * 1_000_000)) // INTERVAL_US
    assert reserved >= 64 + 32
    await limiter.close()


async def test_a_charge_made_while_a_renewal_is_out_rides_the_batch(client: ScriptClient, redis_url: str) -> None:
    """Far from the budget, a response ending while its caller's lease is being renewed is charged with
    the next batch, not in a script call of its own."""
    clock = FakeClock(T0)
    limiter = leasing(client, clock, charge_flush_s=60.0)  # the batch leaves only when flushed here
    for _ in range(8):
        await limiter.check("gil", "m", "roomy")
    while limiter._leases[("gil", "m")].left:
        await limiter.check("gil", "m", "roomy")
    calls = client.calls
    renewal = asyncio.create_task(limiter.check("gil", "m", "roomy"))
    await asyncio.sleep(0)  # the renewal's script call is out; the spent lease is gone
    assert ("gil", "m") not in limiter._leases
    await limiter.charge("gil", "m", "roomy", 40)
    assert client.calls == calls + 1  # the renewal only
    assert (await renewal).allowed
    await limiter.flush()
    assert client.calls == calls + 2
    reader = redis_sync.Redis.from_url(redis_url)
    try:
        charged = sum(int(v) for v in reader.hvals(rate_keys("gil", "m")[1]))
    finally:
        reader.close()
    assert charged >= 40
    await limiter.close()


async def test_near_the_limit_requests_in_flight_still_each_ask(client: ScriptClient) -> None:
    """One unit at a time near the limit: no one waits on another's renewal, and exactly the burst passes."""
    clock = FakeClock(T0)
    limiter = leasing(client, clock)
    results = await asyncio.gather(*(limiter.check("fay", "m", "tight") for _ in range(12)))
    assert sum(r.allowed for r in results) == 5
    assert client.calls == 12
    await limiter.close()


async def test_near_the_limit_leases_are_one_unit_and_exactly_the_burst_passes(client: ScriptClient) -> None:
    clock = FakeClock(T0)
    limiters = [leasing(client, clock) for _ in range(3)]
    results = await asyncio.gather(*(limiters[i % 3].check("dan", "m", "tight") for i in range(5 + 9)))
    assert sum(r.allowed for r in results) == 5
    # Burst 5: an eighth of what remains is less than one, so every check asked Redis.
    assert client.calls == 14
    for limiter in limiters:
        await limiter.close()


async def test_charges_are_seen_at_once_here_and_reach_redis_in_one_batch(client: ScriptClient, redis_url: str) -> None:
    clock = FakeClock(T0)
    limiter = leasing(client, clock, charge_flush_s=0.05)
    assert (await limiter.check("eve", "m", "roomy")).allowed
    assert (await limiter.check("eve", "m", "roomy")).allowed
    calls = client.calls
    await limiter.charge("eve", "m", "roomy", 700)
    await limiter.charge("eve", "m", "roomy", 300)
    assert client.calls == calls  # counted, not sent
    seen = await limiter.check("eve", "m", "roomy")  # decided on the lease, with the charge in it
    assert seen.tokens_remaining == 10_000_000 - 1000
    await asyncio.sleep(0.2)
    assert client.calls == calls + 1  # one call for both charges
    window = redis_sync.Redis.from_url(redis_url).hget(rate_keys("eve", "m")[1], "sum")
    assert window == b"1000"
    await limiter.close()


async def test_a_charge_near_the_budget_is_sent_before_it_returns(client: ScriptClient) -> None:
    clock = FakeClock(T0)
    limiter, other = leasing(client, clock, charge_flush_s=10), leasing(client, clock, charge_flush_s=10)
    assert (await limiter.check("fay", "m", "tokens")).allowed
    await limiter.charge("fay", "m", "tokens", 600)  # more than an eighth of the 1000 left
    assert (await other.check("fay", "m", "tokens")).tokens_remaining == 400
    await other.charge("fay", "m", "tokens", 600)
    refused = await limiter.check("fay", "m", "tokens")
    assert not refused.allowed and refused.code == "token_rate_limited"
    await limiter.close()
    await other.close()


async def test_charges_are_held_through_an_outage_and_sent_on_close(
    proxied: tuple[RedisServer, FaultProxy],
) -> None:
    server, proxy = proxied
    backend = ScriptClient(proxy.url, timeout_s=0.3)
    clock = FakeClock(T0)
    limiter = RateLimiter(
        backend, TIERS, clock=clock, script_now=clock, lease_s=0.25, charge_flush_s=0.02, timeout_s=0.1
    )
    assert (await limiter.check("gus", "m", "roomy")).allowed
    assert (await limiter.check("gus", "m", "roomy")).allowed
    proxy.set("refuse")
    await limiter.charge("gus", "m", "roomy", 500)
    await asyncio.sleep(0.2)  # the batch failed: held here, where the local limiter sees it
    assert limiter.local.take_unsynced("gus", "m")[1] == 500
    limiter.local.give_back("gus", "m", 0, 500)
    proxy.set("pass")
    clock.advance(2)  # past the back-off
    await limiter.close()  # a stopping process sends what it holds
    direct = redis_sync.Redis(port=server.port)
    assert direct.hget(rate_keys("gus", "m")[1], "sum") == b"500"
    direct.close()
    await backend.close()


@pytest.mark.parametrize("key", ["charge_flush_ms", "lease_ms"])
def test_a_bad_ratelimit_setting_is_refused_naming_its_key(key: str) -> None:
    from gateway.settings import ConfigError, parse_settings

    with pytest.raises(ConfigError, match=rf"ratelimit\.{key}"):
        parse_settings({"upstream": {"url": "http://127.0.0.1:1"}, "ratelimit": {key: -1}}, environ={})
