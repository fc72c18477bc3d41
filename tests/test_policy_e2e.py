"""Live policy through running gateway processes and a real Redis: propagation, staleness, restarts."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.redis_server import RedisServer
from gateway.storage.keys import list_key

from .support.gateway_process import BASE_POLICY, CHAT, GatewayProcess, gateway_config, seed_policy, write_entry
from .support.tokens import auth, hs_token
from .support.upstream import Upstream


def policy_with(**models: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(BASE_POLICY)
    document["models"].update(models)
    return document


async def status_of(
    client: aiohttp.ClientSession, gateway: GatewayProcess, token: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    async with client.post(gateway.url + "/v1/chat/completions", json=body or CHAT, headers=auth(token)) as response:
        data = await response.read()
        return response.status, orjson.loads(data) if data else {}


@pytest.fixture
def two_gateways(redis_url: str, upstream: Upstream) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    seed_policy(
        redis_url,
        policy_with(
            **{"frontier": {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}}
        ),
    )
    first = GatewayProcess(gateway_config(upstream.url), redis_url=redis_url).start()
    second = GatewayProcess(gateway_config(upstream.url), redis_url=redis_url).start()
    yield first, second
    first.stop()
    second.stop()


async def _wait_status(
    client: aiohttp.ClientSession,
    gateway: GatewayProcess,
    token: str,
    status: int,
    body: dict[str, Any] | None = None,
    within: float = 3.0,
) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        got, _ = await status_of(client, gateway, token, body)
        if got == status:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"{gateway.url} did not answer {status} within {within}s")


async def test_list_change_enforced_on_every_process_within_a_second(
    two_gateways: tuple[GatewayProcess, GatewayProcess], redis_url: str
) -> None:
    first, second = two_gateways
    token = hs_token("bob", country="DE")
    async with aiohttp.ClientSession() as client:
        assert (await status_of(client, first, token))[0] == 200
        assert (await status_of(client, second, token))[0] == 200
        entry = {
            "reason": "test",
            "source": "test",
            "added_by": "test",
            "added_at": "2026-01-01T00:00:00Z",
            "expires_at": None,
        }
        await write_entry(redis_url, list_key("deny-countries"), "DE", entry)
        waits = await asyncio.gather(_wait_status(client, first, token, 451), _wait_status(client, second, token, 451))
        assert max(waits) < 1.0
        _, body = await status_of(client, second, token)
        assert body["error"]["code"] == "country_denied"
        assert "DE" in body["error"]["message"]


async def test_export_suspension_and_lifting_take_effect_without_restart(
    two_gateways: tuple[GatewayProcess, GatewayProcess], redis_url: str
) -> None:
    first, _ = two_gateways
    abroad = hs_token("carol", country="FR")
    home = hs_token("dave", country="US")
    body = {"model": "frontier", "messages": []}
    suspended = {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": True}
    lifted = {**suspended, "export_suspended": False}
    async with aiohttp.ClientSession() as client:
        assert (await status_of(client, first, abroad, body))[0] == 200
        await write_entry(redis_url, "{gw}:models", "frontier", suspended)
        await _wait_status(client, first, abroad, 451, body)
        _, error = await status_of(client, first, abroad, body)
        assert error["error"]["code"] == "export_suspended"
        assert (await status_of(client, first, home, body))[0] == 200  # home country still served
        await write_entry(redis_url, "{gw}:models", "frontier", lifted)
        await _wait_status(client, first, abroad, 200, body)


async def test_redis_away_serves_last_snapshot_then_fails_closed_then_recovers(upstream: Upstream) -> None:
    # The server saves its data on shutdown, so coming back it still holds the policy.
    with RedisServer(extra_args=["--save", "3600 1"]) as redis:
        seed_policy(redis.url)
        gateway = GatewayProcess(
            gateway_config(upstream.url, policy={"max_staleness_s": 2}), redis_url=redis.url
        ).start()
        try:
            token = hs_token("erin")
            async with aiohttp.ClientSession() as client:
                assert (await status_of(client, gateway, token))[0] == 200
                redis.stop()
                stopped = time.monotonic()
                status, _ = await status_of(client, gateway, token)
                assert status == 200  # last confirmed snapshot, limits served locally
                await _wait_status(client, gateway, token, 503, within=5)
                assert time.monotonic() - stopped >= 1.5  # max_staleness_s less one poll interval and slack
                status, body = await status_of(client, gateway, token)
                assert body["error"]["code"] == "policy_stale"
                async with client.get(gateway.admin_url + "/readyz") as ready:
                    assert ready.status == 503
                redis.start()
                await _wait_status(client, gateway, token, 200, within=5)
                async with client.get(gateway.admin_url + "/readyz") as ready:
                    assert ready.status == 200
        finally:
            gateway.stop()


async def test_redis_restarted_empty_fails_closed_until_policy_restored(
    fresh_redis: RedisServer, upstream: Upstream
) -> None:
    for _ in range(5):  # several changes, so the restored generation's version is lower
        seed_policy(fresh_redis.url)
    gateway = GatewayProcess(gateway_config(upstream.url), redis_url=fresh_redis.url).start()
    try:
        token = hs_token("frank")
        async with aiohttp.ClientSession() as client:
            status, _ = await status_of(client, gateway, token)
            assert status == 200
            fresh_redis.restart()  # no persistence: comes back empty
            await _wait_status(client, gateway, token, 503, within=3)
            status, body = await status_of(client, gateway, token)
            assert body["error"]["code"] == "policy_stale"
            # Even an otherwise unknown caller is refused, not allowed by "empty lists".
            async with client.get(gateway.url + "/v1/models") as response:
                assert response.status == 503
            version = seed_policy(fresh_redis.url)
            assert version == 1
            await _wait_status(client, gateway, token, 200, within=3)
            async with client.post(
                gateway.url + "/v1/chat/completions", json=CHAT, headers=auth(hs_token("frank", country="IR"))
            ) as response:
                assert response.status == 451
                assert response.headers["X-Gateway-Policy-Version"] == "1"
    finally:
        gateway.stop()


async def test_no_policy_ever_loaded_is_503_with_version_zero(fresh_redis: RedisServer, upstream: Upstream) -> None:
    gateway = GatewayProcess(gateway_config(upstream.url), redis_url=fresh_redis.url).start(wait_ready=False)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(gateway.url + "/v1/models", headers=auth()) as response:
                assert response.status == 503
                assert response.headers["X-Gateway-Policy-Version"] == "0"
                assert response.headers["X-Gateway-Reason"] == "policy_stale"
                body = await response.json()
                assert body["error"]["type"] == "service_unavailable"
            async with client.get(gateway.admin_url + "/readyz") as ready:
                assert ready.status == 503
    finally:
        gateway.stop()


async def test_451_carries_blocked_by_link(redis_url: str, upstream: Upstream) -> None:
    seed_policy(redis_url)
    config = gateway_config(upstream.url, policy={"blocked_by_url": "https://example.com/why"})
    gateway = GatewayProcess(config, redis_url=redis_url).start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(
                gateway.url + "/v1/chat/completions", json=CHAT, headers=auth(hs_token(country="IR"))
            ) as response:
                assert response.status == 451
                assert response.headers["Link"] == '<https://example.com/why>; rel="blocked-by"'
                body = await response.json()
                assert body["error"]["type"] == "legal_block"
    finally:
        gateway.stop()


async def test_openai_block_style_for_country_blocks(redis_url: str, upstream: Upstream) -> None:
    seed_policy(redis_url)
    gateway = GatewayProcess(
        gateway_config(upstream.url, policy={"block_style": "openai"}), redis_url=redis_url
    ).start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(
                gateway.url + "/v1/chat/completions", json=CHAT, headers=auth(hs_token(country="IR"))
            ) as response:
                assert response.status == 403
                assert response.headers["X-Gateway-Reason"] == "country_denied"
                body = await response.json()
                assert body["error"]["code"] == "unsupported_country_region_territory"
                assert body["error"]["type"] == "request_forbidden"
    finally:
        gateway.stop()
