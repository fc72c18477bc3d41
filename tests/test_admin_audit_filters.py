"""``GET /admin/v1/audit`` filters (subject, org, model, code, since, until) and ``gateway audit tail``
with the same flags, against a real gateway and its Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from gateway.redis_server import RedisServer

from .support.archive import gateway_cli
from .support.gateway_process import ADMIN_TOKEN, BASE_POLICY, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until

CALLERS = [("ivan", "IR"), ("alice", "US"), ("bob", "DE")]


@pytest.fixture(scope="module")
def gateway(upstream: Upstream) -> Iterator[GatewayProcess]:
    with RedisServer() as redis:
        seed_policy(redis.url, BASE_POLICY)
        process = GatewayProcess(gateway_config(upstream.url, audit={"flush_ms": 20}), redis_url=redis.url).start()
        try:
            yield process
        finally:
            process.stop()


@pytest.fixture(scope="module")
def sent(gateway: GatewayProcess) -> dict[str, Any]:
    """Three requests per caller; the time before and after them."""
    import asyncio

    async def send() -> dict[str, Any]:
        before = datetime.now(UTC) - timedelta(milliseconds=5)
        async with aiohttp.ClientSession() as client:
            for round_ in range(3):
                for subject, country in CALLERS:
                    headers = {**auth(hs_token(subject, country=country)), "X-Request-Id": f"{subject}-{round_}"}
                    async with client.post(
                        gateway.url + "/v1/chat/completions", json={"model": "gpt-mock"}, headers=headers
                    ) as response:
                        await response.read()
            after = datetime.now(UTC) + timedelta(milliseconds=5)

            async def flushed() -> bool:
                async with client.get(
                    gateway.admin_url + "/admin/v1/audit",
                    params={"limit": "100"},
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                ) as response:
                    return len((await response.json())["records"]) >= 9

            await wait_until(flushed, 5)
        return {"before": before, "after": after}

    return asyncio.run(send())


async def _audit(gateway: GatewayProcess, **query: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(
            gateway.admin_url + "/admin/v1/audit",
            params=query,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response,
    ):
        return response.status, await response.json()


async def test_filters_by_subject_code_and_model(gateway: GatewayProcess, sent: dict[str, Any]) -> None:
    status, answer = await _audit(gateway, subject="ivan")
    assert status == 200
    assert [r["request_id"] for r in answer["records"]] == ["ivan-2", "ivan-1", "ivan-0"]
    assert answer["complete"] is True
    _status, blocked = await _audit(gateway, code="country_denied")
    assert {r["subject"] for r in blocked["records"]} == {"ivan"}
    _status, allowed = await _audit(gateway, code="", model="gpt-mock", org="acme")
    assert {r["subject"] for r in allowed["records"]} == {"alice", "bob"} and len(allowed["records"]) == 6
    _status, limited = await _audit(gateway, subject="bob", limit="2")
    assert [r["request_id"] for r in limited["records"]] == ["bob-2", "bob-1"]
    _status, none = await _audit(gateway, model="frontier-x")
    assert none["records"] == []


async def test_filters_by_time(gateway: GatewayProcess, sent: dict[str, Any]) -> None:
    before, after = sent["before"].isoformat(), sent["after"].isoformat()
    _status, inside = await _audit(gateway, since=before, until=after, subject="alice")
    assert len(inside["records"]) == 3
    _status, later = await _audit(gateway, since=after)
    assert later["records"] == []
    _status, earlier = await _audit(gateway, until=before)
    assert earlier["records"] == []
    status, ancient = await _audit(gateway, until="0119-12-14T07:36:04Z")  # before stream ids begin
    assert (status, ancient["records"]) == (200, [])


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2025-13-01T00:00:00Z"}, "until"),
        ({"since": "2025-03-02T00:00:00Z", "until": "2025-03-01T00:00:00Z"}, "until"),
        ({"subject": ""}, "subject"),
        ({"org": "x" * 257}, "org"),
    ],
)
async def test_bad_filters_are_400_naming_the_field(gateway: GatewayProcess, query: dict[str, str], field: str) -> None:
    status, answer = await _audit(gateway, **query)
    assert status == 400
    assert answer["error"]["code"] == "invalid_request" and field in answer["error"]["message"]


def cli(gateway: GatewayProcess, *args: str) -> Any:
    return gateway_cli(*args, env={"GATEWAY_ADMIN_URL": gateway.admin_url, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN})


def test_audit_tail_takes_the_same_filters(gateway: GatewayProcess, sent: dict[str, Any]) -> None:
    done = cli(gateway, "audit", "tail", "--json", "--subject", "ivan", "--code", "country_denied", "--limit", "5")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["request_id"] for r in records] == ["ivan-0", "ivan-1", "ivan-2"]  # oldest first
    later = cli(gateway, "audit", "tail", "--json", "--since", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(2e9)))
    assert later.returncode == 0 and later.stdout == ""
    bad = cli(gateway, "audit", "tail", "--since", "soon")
    assert bad.returncode != 0 and "since" in bad.stderr
