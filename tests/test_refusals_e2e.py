"""Refused requests are bounded too: counted per caller (``blocked_per_minute``), echoed and audited in
at most 256 bytes of any caller value, so a refused caller can neither flood nor grow Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.storage.audit_entries import entry_records
from gateway.storage.keys import AUDIT_KEY

from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, GatewayProcess, gateway_config, seeded_gateway
from .support.tokens import auth, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until

BLOCKED_PER_MINUTE = 5
TIERS: dict[str, Any] = {
    "public": {
        "requests_per_minute": 600,
        "burst": 100,
        "stages": ["general"],
        "blocked_per_minute": BLOCKED_PER_MINUTE,
    },
    "partner": {"requests_per_minute": 600, "burst": 100, "stages": ["partners", "general"]},
}
POLICY: dict[str, Any] = {
    "lists": BASE_POLICY["lists"],
    "models": {
        **BASE_POLICY["models"],
        "frontier-x": {"stage": "general", "timeline": [], "allowed_countries": ["US"], "export_suspended": False},
    },
}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gateway(upstream: Upstream) -> Iterator[GatewayProcess]:
    # The test client is a trusted proxy, so X-Forwarded-For gives each test a client address of its own.
    config = gateway_config(upstream.url, tiers=TIERS, network={"trusted_proxies": ["127.0.0.1/32"]})
    with seeded_gateway(config, POLICY) as process:
        yield process


async def _audit_records(redis: aioredis.Redis) -> int:
    """Records in ``gw:audit`` (a batch entry holds several)."""
    return sum(int(fields.get(b"n", 1)) for _id, fields in await redis.xrange("gw:audit"))


def _unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns()}"


async def _chat(
    client: aiohttp.ClientSession, gateway: GatewayProcess, model: str, *, token: str | None, ip: str = "198.51.100.1"
) -> tuple[int, Any, dict[str, Any]]:
    headers = {"X-Forwarded-For": ip, **({"Authorization": f"Bearer {token}"} if token else {})}
    async with client.post(
        gateway.url + "/v1/chat/completions", json={"model": model, **CHAT}, headers=headers
    ) as response:
        return response.status, response.headers, orjson.loads(await response.read())


async def test_refused_answers_past_blocked_per_minute_are_429(
    gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    token = hs_token(_unique("cn"), country="CN", tier="public")
    async with aiohttp.ClientSession() as client:
        for _ in range(BLOCKED_PER_MINUTE):
            status, headers, _body = await _chat(client, gateway, "frontier-x", token=token)
            assert (status, headers["X-Gateway-Reason"]) == (451, "export_restricted")
        status, headers, body = await _chat(client, gateway, "frontier-x", token=token)
        assert status == 429, body
        assert body["error"]["code"] == "rate_limited" and body["error"]["type"] == "rate_limit_error"
        assert int(headers["Retry-After"]) >= 1
        assert headers["x-ratelimit-limit-requests"] == str(BLOCKED_PER_MINUTE)
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert "RateLimit-Policy" in headers and "RateLimit" in headers
        # The refusal budget is the caller's own: another caller is still answered 451, and this caller's
        # allowed requests spend their own budget.
        other = hs_token(_unique("cn"), country="CN", tier="public")
        assert (await _chat(client, gateway, "frontier-x", token=other))[0] == 451
        assert (await _chat(client, gateway, "gpt-mock", token=token))[0] == 200
    assert [orjson.loads(s.body)["model"] for s in clean_upstream.seen] == ["gpt-mock"]


async def test_every_refusal_kind_counts(gateway: GatewayProcess, clean_upstream: Upstream) -> None:
    token = hs_token(_unique("mixed"), country="CN", tier="public")
    async with aiohttp.ClientSession() as client:
        statuses = [
            (await _chat(client, gateway, model, token=token))[0]
            for model in ("frontier-x", "no-such-model", "frontier-x", "no-such-model", "frontier-x", "no-such-model")
        ]
    assert statuses == [451, 403, 451, 403, 451, 429]
    assert clean_upstream.seen == []


async def test_unauthenticated_refusals_are_limited_per_client_address(
    gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    # No verified caller: the client address is the key, with the strictest tier's limit.
    address = f"203.0.113.{time.time_ns() % 200 + 1}"
    async with aiohttp.ClientSession() as client:
        for _ in range(BLOCKED_PER_MINUTE):
            assert (await _chat(client, gateway, "gpt-mock", token="not-a-token", ip=address))[0] == 401
        status, headers, body = await _chat(client, gateway, "gpt-mock", token=None, ip=address)
        assert status == 429 and body["error"]["code"] == "rate_limited"
        assert int(headers["Retry-After"]) >= 1
        assert (await _chat(client, gateway, "gpt-mock", token="not-a-token", ip="192.0.2.77"))[0] == 401
    assert clean_upstream.seen == []


async def test_refusal_counters_expire_within_a_minute(gateway: GatewayProcess) -> None:
    token = hs_token(_unique("ttl"), country="CN", tier="public")
    async with aiohttp.ClientSession() as client:
        await _chat(client, gateway, "frontier-x", token=token)
        await _chat(client, gateway, "gpt-mock", token="garbage", ip="192.0.2.99")
    redis = aioredis.Redis.from_url(gateway.config["redis"]["url"])
    try:
        keys = [key async for key in redis.scan_iter("gw:rb:*")]
        assert keys
        for key in keys:
            assert 0 < await redis.pttl(key) <= 60_000, key
    finally:
        await redis.aclose()


async def test_refused_requests_add_no_keys_per_request(gateway: GatewayProcess) -> None:
    # However many refusals one caller collects, Redis holds one counter for it (and the audit stream).
    token = hs_token(_unique("many"), country="CN", tier="public")
    redis = aioredis.Redis.from_url(gateway.config["redis"]["url"])
    try:
        async with aiohttp.ClientSession() as client:
            await _chat(client, gateway, "frontier-x", token=token)
            # The first record's flush creates the audit stream and its producer's mark: counted before.
            await wait_until(lambda: redis.exists(AUDIT_KEY), 5.0)
            await asyncio.sleep(0.3)
            before = await redis.dbsize()
            statuses = [(await _chat(client, gateway, "frontier-x", token=token))[0] for _ in range(40)]
        assert statuses.count(451) == BLOCKED_PER_MINUTE - 1 and statuses.count(429) == 40 - statuses.count(451)
        assert await redis.dbsize() - before <= 1  # never a key per request
    finally:
        await redis.aclose()


async def _audit_record(gateway: GatewayProcess, request_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers=auth(ADMIN_TOKEN)) as admin:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            async with admin.get(gateway.admin_url + "/admin/v1/audit?limit=200") as response:
                for record in (await response.json())["records"]:
                    if record["request_id"] == request_id:
                        return dict(record)
            await asyncio.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


async def test_a_long_model_name_is_echoed_and_audited_in_at_most_256_bytes(
    gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    name = "m" * 300
    request_id = _unique("long-model")
    token = hs_token(_unique("long"), country="US", tier="partner")
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            gateway.url + "/v1/chat/completions",
            json={"model": name, **CHAT},
            headers={**auth(token), "X-Request-Id": request_id},
        ) as response,
    ):
        raw = await response.read()
        assert response.status in (400, 403), raw  # refused: too long (400), or not registered (403)
    assert "m" * 257 not in raw.decode()
    record = await _audit_record(gateway, request_id)
    assert record["model"] is None or len(record["model"]) <= 256
    assert clean_upstream.seen == []


async def test_audit_records_do_not_grow_with_a_callers_claims(
    gateway: GatewayProcess, clean_upstream: Upstream
) -> None:
    # A token's claims reach the audit record; a 5,000-character org must not be stored 5,000 times.
    big = "o" * 5000
    token = hs_token(_unique("big-org"), org=big, country="US", tier="partner")
    redis = aioredis.Redis.from_url(gateway.config["redis"]["url"])
    try:
        before_len = await _audit_records(redis)
        before = await redis.memory_usage("gw:audit", samples=0) or 0
        count = 20
        async with aiohttp.ClientSession() as client:
            for _ in range(count):
                assert (await _chat(client, gateway, "gpt-mock", token=token))[0] == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # records are written in batches, off the request path
            if await _audit_records(redis) >= before_len + count:
                break
            await asyncio.sleep(0.05)
        assert await _audit_records(redis) >= before_len + count
        grown = (await redis.memory_usage("gw:audit", samples=0) or 0) - before
        entries = await redis.xrevrange("gw:audit", count=count)
    finally:
        await redis.aclose()
    print(f"audit stream grew {grown / count:.0f} bytes a record")
    # The newest records: the entries newest first, each entry's records newest (last) first.
    stored = [record for _id, fields in entries for record in reversed(entry_records(fields) or [])][:count]
    assert len(stored) == count
    # Each record as stored: unbounded, each one alone held the 5,000-byte org.
    assert all(len(record) < 1500 for record in stored)
    # And the stream as Redis holds it (unbounded: about 6,300 bytes a record). Redis allocates stream nodes
    # in blocks, so a 20-record sample varies with where earlier tests left the last node: a loose bound.
    assert grown < count * 3000, grown
    for raw in stored:
        record = orjson.loads(raw)
        assert all(len(value) <= 256 for value in record.values() if isinstance(value, str))
