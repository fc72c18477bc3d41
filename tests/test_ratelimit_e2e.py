"""Rate limits through running gateway processes: exact across processes, headers, tokens, Redis faults."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis as redis_sync

from gateway.redis_server import RedisServer

from .support.faultproxy import FaultProxy
from .support.gateway_process import CHAT, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream

TIERS: dict[str, Any] = {
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
    "partner": {"requests_per_minute": 6000, "burst": 600, "stages": ["partners", "general"]},
    "tight": {"requests_per_minute": 1, "burst": 5, "stages": ["general"]},
    "steady": {"requests_per_minute": 60, "burst": 2, "stages": ["general"]},
    "tokens": {"requests_per_minute": 6000, "burst": 100, "tokens_per_minute": 100, "stages": ["general"]},
}


def config(upstream: Upstream, **sections: Any) -> dict[str, Any]:
    return gateway_config(upstream.url, tiers=TIERS, **sections)


@pytest.fixture
def gateway_pair(redis_url: str, upstream: Upstream) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    seed_policy(redis_url)
    first = GatewayProcess(config(upstream), redis_url=redis_url).start()
    second = GatewayProcess(config(upstream), redis_url=redis_url).start()
    yield first, second
    first.stop()
    second.stop()


async def post(
    client: aiohttp.ClientSession, gateway: GatewayProcess, token: str, path: str = "/v1/chat/completions"
) -> aiohttp.ClientResponse:
    async with client.post(gateway.url + path, json=CHAT, headers=auth(token)) as response:
        await response.read()
        return response


async def test_exactly_the_limit_passes_across_two_processes(
    gateway_pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    first, second = gateway_pair
    token = hs_token("burst-user", tier="tight")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as client:
        responses = await asyncio.gather(*(post(client, (first, second)[i % 2], token) for i in range(17)))
    statuses = [r.status for r in responses]
    assert statuses.count(200) == 5
    assert statuses.count(429) == 12
    for response in responses:
        assert response.headers["RateLimit-Policy"] == '"tight";q=1;w=60'
        assert re.fullmatch(r'"tight";r=\d+;t=\d+', response.headers["RateLimit"].split(",")[0])
        assert response.headers["x-ratelimit-limit-requests"] == "1"
        assert "x-ratelimit-remaining-requests" in response.headers
        assert "x-ratelimit-reset-requests" in response.headers
        if response.status == 429:
            assert response.headers["X-Gateway-Reason"] == "rate_limited"
            assert int(response.headers["Retry-After"]) >= 1


async def test_retry_after_is_honest_and_burst_matches_config(
    gateway_pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    first, second = gateway_pair
    token = hs_token("steady-user", tier="steady")
    async with aiohttp.ClientSession() as client:
        statuses = [(await post(client, first, token)).status for _ in range(2)]
        assert statuses == [200, 200]  # burst 2
        blocked = await post(client, second, token)
        assert blocked.status == 429
        retry_after = int(blocked.headers["Retry-After"])
        assert 1 <= retry_after <= 1  # 60 per minute: one more a second
        await asyncio.sleep(retry_after)
        assert (await post(client, second, token)).status == 200
        assert (await post(client, first, token)).status == 429


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/stream"])
async def test_token_budget_charged_from_usage(
    gateway_pair: tuple[GatewayProcess, GatewayProcess], clean_upstream: Upstream, path: str
) -> None:
    first, second = gateway_pair
    clean_upstream.release.set()  # streams run to the end at once
    clean_upstream.usage_tokens = 60
    token = hs_token(f"token-user-{path}", tier="tokens")
    async with aiohttp.ClientSession() as client:
        first_response = await post(client, first, token, path)
        assert first_response.status == 200
        assert first_response.headers["x-ratelimit-limit-tokens"] == "100"
        assert (await post(client, second, token, path)).status == 200  # 60 charged < 100
        spent = await post(client, first, token, path)  # 120 charged >= 100
        assert spent.status == 429
        assert spent.headers["X-Gateway-Reason"] == "token_rate_limited"
        assert int(spent.headers["Retry-After"]) >= 1


def _fallback_count(gateway: GatewayProcess) -> float:
    import urllib.request

    with urllib.request.urlopen(gateway.admin_url + "/metrics", timeout=2) as response:
        text = response.read().decode()
    match = re.search(r"^gateway_ratelimit_fallback_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("fault", ["refuse", "blackhole", "delay"])
async def test_redis_faults_fall_back_to_local_limits(fault: str, upstream: Upstream) -> None:
    with RedisServer() as redis:
        seed_policy(redis.url)
        proxy = FaultProxy(redis.port).start()
        # Policy staleness is long here: this test is about quotas, not the policy.
        gateway = GatewayProcess(
            config(upstream, policy={"max_staleness_s": 60}, redis={"timeout_s": 0.1}), redis_url=proxy.url
        ).start()
        try:
            async with aiohttp.ClientSession() as client:
                assert (await post(client, gateway, hs_token("warm", tier="tight"))).status == 200
                proxy.set(fault, delay_s=0.2, jitter_s=0.05)
                token = hs_token(f"fault-{fault}", tier="tight")
                durations, statuses = [], []
                for _ in range(8):
                    started = time.monotonic()
                    statuses.append((await post(client, gateway, token)).status)
                    durations.append(time.monotonic() - started)
                # Limited locally with the same limit, never unlimited, never hanging.
                assert statuses == [200] * 5 + [429] * 3
                assert max(durations) < 0.1 + 0.5
                assert _fallback_count(gateway) >= 1
                proxy.set("pass")
                recovered = hs_token(f"recovered-{fault}", tier="tight")
                await asyncio.sleep(1.2)  # the limiter's back-off before it probes Redis again
                assert (await post(client, gateway, recovered)).status == 200
                client_redis = redis_sync.Redis(port=redis.port)
                assert client_redis.dbsize() > 0
                keys = [k for k in client_redis.scan_iter("gw:rl:*")]
                assert keys and all(client_redis.pttl(k) > 0 for k in keys)
        finally:
            gateway.stop()
            proxy.stop()
