"""Leases through running gateway processes sharing one real Redis (docs/contract.md §5).

Leases never admit more than the limit (burst + rate x elapsed, however many processes ask), and a
caller over its limit through several processes still gets nearly all of it: units reserved and
not used are given back, and near the limit every unit is decided in Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis as redis_sync

from gateway.ratelimit import rate_keys

from .support.gateway_process import GatewayProcess, gateway_config, post_chat, seed_policy
from .support.tokens import hs_token
from .support.upstream import Upstream

TIERS: dict[str, Any] = {
    "hammered": {"requests_per_minute": 6000, "burst": 100, "stages": ["general"]},
    "doubled": {"requests_per_minute": 3000, "burst": 25, "stages": ["general"]},
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
}


@pytest.fixture
def four_gateways(redis_url: str, upstream: Upstream) -> Iterator[list[GatewayProcess]]:
    seed_policy(redis_url)
    gateways: list[GatewayProcess] = []
    try:
        for _ in range(4):
            config = gateway_config(upstream.url, tiers=TIERS, ratelimit={"lease_ms": 250})
            gateways.append(GatewayProcess(config, redis_url=redis_url).start())
        yield gateways
    finally:
        for gateway in gateways:
            gateway.stop()


async def test_four_processes_hammering_one_caller_admit_no_more_than_the_limit(
    four_gateways: list[GatewayProcess],
) -> None:
    token = hs_token("hammered-caller", tier="hammered")
    rate, burst, seconds = 100.0, 100, 2.5
    statuses: list[int] = []

    async def hammer(client: aiohttp.ClientSession, gateway: GatewayProcess, until: float) -> None:
        while time.monotonic() < until:
            statuses.append(await post_chat(client, gateway, token))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as client:
        started = time.monotonic()
        until = started + seconds
        await asyncio.gather(*(hammer(client, gw, until) for gw in four_gateways for _ in range(6)))
        elapsed = time.monotonic() - started
    admitted = statuses.count(200)
    assert set(statuses) <= {200, 429}, set(statuses)
    assert statuses.count(429) > 0  # the caller was over its limit
    assert burst <= admitted <= burst + rate * elapsed, (admitted, elapsed, len(statuses))


async def test_a_caller_at_twice_its_limit_through_two_processes_gets_its_limit(
    four_gateways: list[GatewayProcess],
) -> None:
    pair = four_gateways[:2]
    token = hs_token("doubled-caller", tier="doubled")
    rate, burst, seconds = 50.0, 25, 3.0
    sends: list[float] = []

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400)) as client:
        tasks = []
        started = time.monotonic()
        for i in range(int(seconds * rate * 2)):  # paced at twice the rate, alternating processes
            await asyncio.sleep(max(0.0, started + i / (2 * rate) - time.monotonic()))
            sends.append(time.monotonic())
            tasks.append(asyncio.ensure_future(post_chat(client, pair[i % 2], token)))
        statuses = await asyncio.gather(*tasks)
        ended = time.monotonic()
    admitted = statuses.count(200)
    owed = burst + rate * (sends[-1] - sends[0])  # what the limit allows over the time requests came
    assert admitted >= 0.95 * owed, (admitted, owed)
    assert admitted <= burst + rate * (ended - started), (admitted, ended - started)


async def test_charges_counted_but_not_sent_reach_redis_when_the_process_stops(
    redis_url: str, clean_upstream: Upstream
) -> None:
    seed_policy(redis_url)
    tiers = {**TIERS, "metered": {"requests_per_minute": 600, "burst": 60, "tokens_per_minute": 1_000_000}}
    # A flush interval far longer than the test: only the stop can send the charges.
    config = gateway_config(clean_upstream.url, tiers=tiers, ratelimit={"charge_flush_ms": 60_000})
    gateway = GatewayProcess(config, redis_url=redis_url).start()
    clean_upstream.usage_tokens = 42
    try:
        async with aiohttp.ClientSession() as client:
            token = hs_token("metered-caller", tier="metered")
            assert [await post_chat(client, gateway, token) for _ in range(3)] == [200] * 3
        window = rate_keys("metered-caller", "gpt-mock")[1]
        direct = redis_sync.Redis.from_url(redis_url)
        # The second check carried the first charge; the later ones are counted, not sent yet.
        assert int(direct.hget(window, "sum") or 0) < 126
    finally:
        assert gateway.stop() == 0  # SIGTERM
    assert direct.hget(window, "sum") == b"126"
    direct.close()
