"""Redis faults through a running gateway (docs/hardening.md 19-22, 24, 25): a TCP fault proxy, CLIENT PAUSE, FLUSHALL.

Two callers run through every fault: ``alice`` (US, allowed: 200) and ``ivan`` (IR, on the deny list:
451). The invariant under every fault is the same: a request is answered from a confirmed policy or
refused with 503 ``policy_stale``; never a 200 without a decision, never a hang, never a 500.
Case 23 (Sentinel failover) is tests/test_sentinel.py.
"""

from __future__ import annotations

import asyncio
import copy
import random
import re
import socket
import struct
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import redis as redis_sync

from gateway.redis_server import RedisServer

from .support.faultproxy import FaultProxy
from .support.gateway_process import BASE_POLICY, CHAT, GatewayProcess, gateway_config, seed_policy
from .support.tokens import hs_token
from .support.upstream import Upstream

ALLOWED = hs_token("alice", country="US", tier="partner")
DENIED = hs_token("ivan", country="IR", tier="partner")
TIERS: dict[str, Any] = {
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
    "partner": {"requests_per_minute": 600_000, "burst": 100_000, "stages": ["partners", "general"]},
    "internal": {"requests_per_minute": 6000, "burst": 600, "stages": ["internal", "partners", "general"]},
    # For counting: a refill every 10 or 20 s, so "remaining" moves by exactly one per request.
    "count-a": {"requests_per_minute": 6, "burst": 50, "stages": ["general"]},
    "count-b": {"requests_per_minute": 3, "burst": 30, "stages": ["general"]},
}


@dataclass
class Answer:
    status: int
    code: str
    elapsed: float
    headers: Any
    at: float


async def post(
    client: aiohttp.ClientSession, gw: GatewayProcess, token: str, *, request_id: str | None = None
) -> Answer:
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {token}"}
    if request_id:
        headers["X-Request-Id"] = request_id
    async with client.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers) as response:
        raw = await response.read()
        code = ""
        if response.status >= 400:
            code = orjson.loads(raw)["error"]["code"]
        return Answer(response.status, code, time.monotonic() - started, response.headers, started)


def metric(gw: GatewayProcess, name: str) -> float:
    with urllib.request.urlopen(gw.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def config(upstream: Upstream, *, staleness: float, timeout: float = 0.1, poll: float = 0.1) -> dict[str, Any]:
    return gateway_config(
        upstream.url,
        tiers=TIERS,
        redis={"timeout_s": timeout},
        policy={"max_staleness_s": staleness, "poll_interval_s": poll},
    )


@pytest.fixture
def redis_and_proxy() -> Iterator[tuple[RedisServer, FaultProxy]]:
    with RedisServer() as server:
        seed_policy(server.url)
        proxy = FaultProxy(server.port).start()
        try:
            yield server, proxy
        finally:
            proxy.stop()


async def until(client: aiohttp.ClientSession, gw: GatewayProcess, token: str, status: int, within: float) -> Answer:
    deadline = time.monotonic() + within
    while True:
        answer = await post(client, gw, token)
        if answer.status == status or time.monotonic() > deadline:
            assert answer.status == status, (answer.status, answer.code)
            return answer
        await asyncio.sleep(0.02)


# --- 19: refused connections --------------------------------------------------------------------------


async def test_refused_redis_decides_from_the_snapshot_until_stale_then_503(
    redis_and_proxy: tuple[RedisServer, FaultProxy], upstream: Upstream
) -> None:
    _, proxy = redis_and_proxy
    staleness = 2.0
    gw = GatewayProcess(config(upstream, staleness=staleness), redis_url=proxy.url).start()
    try:
        async with aiohttp.ClientSession() as client:
            assert (await post(client, gw, ALLOWED)).status == 200
            assert (await post(client, gw, DENIED)).status == 451
            proxy.set("refuse")
            cut = time.monotonic()
            timeline: list[tuple[str, Answer]] = []
            while time.monotonic() - cut < staleness + 1.0:
                allowed, denied = await asyncio.gather(post(client, gw, ALLOWED), post(client, gw, DENIED))
                timeline += [("alice", allowed), ("ivan", denied)]
                await asyncio.sleep(0.02)
            for who, answer in timeline:
                assert answer.status in (200, 451, 503), (who, answer.status, answer.code)
                assert answer.elapsed < 0.1 + 0.5, (who, answer.elapsed)
                if answer.status == 503:
                    assert answer.code == "policy_stale"
            # The deny-listed caller is never admitted: its decision comes from the snapshot, then 503.
            assert all(a.status in (451, 503) for who, a in timeline if who == "ivan")
            alice = [a for who, a in timeline if who == "alice"]
            served = [a.at - cut for a in alice if a.status == 200]
            refused = [a.at - cut for a in alice if a.status == 503]
            assert served and refused, "decided from the snapshot first, refused once stale"
            assert max(served) < min(refused), "a 200 after the gateway had failed closed"
            assert max(served) < staleness + 0.3
            assert min(refused) > staleness - 0.4
            proxy.set("pass")
            await until(client, gw, ALLOWED, 200, within=3)
            assert (await post(client, gw, DENIED)).status == 451
    finally:
        gw.stop()


async def test_a_gateway_that_never_reached_redis_admits_no_one(
    redis_and_proxy: tuple[RedisServer, FaultProxy], upstream: Upstream
) -> None:
    _, proxy = redis_and_proxy
    proxy.set("refuse")
    gw = GatewayProcess(config(upstream, staleness=30), redis_url=proxy.url).start(wait_ready=False)
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(10):
                for token in (ALLOWED, DENIED):
                    answer = await post(client, gw, token)
                    assert (answer.status, answer.code) == (503, "policy_stale")
                    assert answer.headers["X-Gateway-Policy-Version"] == "0"
            proxy.set("pass")
            await until(client, gw, ALLOWED, 200, within=5)
            assert (await post(client, gw, DENIED)).status == 451
    finally:
        gw.stop()


# --- 20 and 21: blackholed, slow and jittery ---------------------------------------------------------


async def test_blackholed_redis_bounds_every_request_and_builds_no_queue(
    redis_and_proxy: tuple[RedisServer, FaultProxy], upstream: Upstream
) -> None:
    _, proxy = redis_and_proxy
    timeout = 0.2
    gw = GatewayProcess(config(upstream, staleness=30, timeout=timeout), redis_url=proxy.url).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as client:
            assert (await post(client, gw, ALLOWED)).status == 200
            fallback_before = metric(gw, "gateway_ratelimit_fallback_total")
            proxy.set("blackhole")
            answers: list[Answer] = []
            for _ in range(6):  # waves of concurrent callers, across more than one limiter back-off
                answers += await asyncio.gather(*(post(client, gw, token) for token in [ALLOWED, DENIED] * 25))
                await asyncio.sleep(0.3)
            assert sorted({a.status for a in answers}) == [200, 451]
            assert max(a.elapsed for a in answers) < timeout + 0.6, max(a.elapsed for a in answers)
            assert metric(gw, "gateway_ratelimit_fallback_total") > fallback_before
            assert metric(gw, "gateway_in_flight_requests") == 0
            proxy.set("pass")
            await asyncio.sleep(1.5)  # the limiter's back-off, then it asks Redis again
            for _ in range(3):
                assert (await post(client, gw, ALLOWED)).status == 200
            settled = metric(gw, "gateway_ratelimit_fallback_total")
            for _ in range(5):
                answer = await post(client, gw, ALLOWED)
                assert answer.status == 200 and answer.elapsed < 0.5
            assert metric(gw, "gateway_ratelimit_fallback_total") == settled, "still limited locally"
    finally:
        gw.stop()


async def test_slow_jittery_redis_is_cut_at_the_deadline_and_the_fallback_counted(
    redis_and_proxy: tuple[RedisServer, FaultProxy], upstream: Upstream
) -> None:
    _, proxy = redis_and_proxy
    timeout = 0.1
    gw = GatewayProcess(config(upstream, staleness=30, timeout=timeout), redis_url=proxy.url).start()
    try:
        async with aiohttp.ClientSession() as client:
            assert (await post(client, gw, ALLOWED)).status == 200
            fallback_before = metric(gw, "gateway_ratelimit_fallback_total")
            proxy.set("delay", delay_s=0.275, jitter_s=0.225)  # 50-500 ms
            answers = []
            started = time.monotonic()
            while time.monotonic() - started < 3.0:
                answers += await asyncio.gather(post(client, gw, ALLOWED), post(client, gw, DENIED))
            assert [a.status for a in answers[0::2]] == [200] * (len(answers) // 2)
            assert [a.status for a in answers[1::2]] == [451] * (len(answers) // 2)
            assert max(a.elapsed for a in answers) < timeout + 0.4, max(a.elapsed for a in answers)
            assert metric(gw, "gateway_ratelimit_fallback_total") > fallback_before
            assert metric(gw, "gateway_in_flight_requests") == 0
    finally:
        gw.stop()


# --- 22: the policy vanishes -------------------------------------------------------------------------


async def test_flushall_is_no_policy_and_fails_closed_until_restored(upstream: Upstream) -> None:
    with RedisServer() as server:
        seed_policy(server.url)
        gw = GatewayProcess(config(upstream, staleness=30), redis_url=server.url).start()
        direct = redis_sync.Redis.from_url(server.url)
        try:
            async with aiohttp.ClientSession() as client:
                assert (await post(client, gw, ALLOWED)).status == 200
                direct.flushall()
                flushed = time.monotonic()
                answer = await until(client, gw, ALLOWED, 503, within=1.0)
                assert time.monotonic() - flushed < 1.0
                assert answer.code == "policy_stale"
                assert answer.headers["X-Gateway-Policy-Version"] == "0"
                # Not "empty lists": the deny-listed caller and a caller with no credentials are refused too.
                assert (await post(client, gw, DENIED)).status == 503
                async with client.get(gw.url + "/v1/models") as response:
                    assert response.status == 503
                async with client.get(gw.admin_url + "/readyz") as response:
                    assert response.status == 503
                seed_policy(server.url)
                await until(client, gw, ALLOWED, 200, within=1.0)
                assert (await post(client, gw, DENIED)).status == 451
        finally:
            direct.close()
            gw.stop()


async def test_client_pause_keeps_latency_bounded_and_decisions_right(upstream: Upstream) -> None:
    with RedisServer() as server:
        seed_policy(server.url)
        timeout = 0.1
        gw = GatewayProcess(config(upstream, staleness=30, timeout=timeout), redis_url=server.url).start()
        direct = redis_sync.Redis.from_url(server.url)
        try:
            async with aiohttp.ClientSession() as client:
                assert (await post(client, gw, ALLOWED)).status == 200
                assert direct.execute_command("CLIENT", "PAUSE", "3000", "ALL")
                paused = time.monotonic()
                answers = []
                while time.monotonic() - paused < 2.5:
                    answers += await asyncio.gather(post(client, gw, ALLOWED), post(client, gw, DENIED))
                assert [a.status for a in answers[0::2]] == [200] * (len(answers) // 2)
                assert [a.status for a in answers[1::2]] == [451] * (len(answers) // 2)
                assert max(a.elapsed for a in answers) < timeout + 0.4, max(a.elapsed for a in answers)
                await asyncio.sleep(max(0.0, 3.2 - (time.monotonic() - paused)))
                assert (await post(client, gw, ALLOWED)).status == 200
                assert metric(gw, "gateway_in_flight_requests") == 0
        finally:
            direct.execute_command("CLIENT", "UNPAUSE")
            direct.close()
            gw.stop()


# --- 24: a storm of cancelled in-flight commands --------------------------------------------------------


async def _abort_soon(port: int, token: str, after_s: float) -> None:
    body = orjson.dumps(CHAT)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    await writer.drain()
    await asyncio.sleep(after_s)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST: the caller is gone while its rate-limit call is in flight


def _remaining(answers: list[Answer]) -> list[int]:
    return sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in answers)


async def test_cancellation_storm_leaves_replies_matched_to_their_requests(
    redis_and_proxy: tuple[RedisServer, FaultProxy], upstream: Upstream
) -> None:
    _, proxy = redis_and_proxy
    # Slow enough that every rate-limit call is still in flight when its caller leaves; well inside the deadline.
    gw = GatewayProcess(config(upstream, staleness=30, timeout=0.5), redis_url=proxy.url).start()
    port = int(gw.config["listen"]["port"])
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as client:
            assert (await post(client, gw, ALLOWED)).status == 200
            proxy.set("delay", delay_s=0.06, jitter_s=0.03)
            storm_tokens = [hs_token(f"storm-{i}", country="US", tier="partner") for i in range(20)]
            await asyncio.gather(
                *(_abort_soon(port, storm_tokens[i % 20], random.uniform(0.0, 0.05)) for i in range(300))
            )
            # Past any limiter back-off the storm may have caused; its late replies may still be arriving.
            await asyncio.sleep(1.2)
            fallback_before = metric(gw, "gateway_ratelimit_fallback_total")
            # Two callers with different limits, concurrently, while the storm's late replies still arrive.
            a_subject, b_subject = f"count-a-{uuid.uuid4().hex[:6]}", f"count-b-{uuid.uuid4().hex[:6]}"
            token_a = hs_token(a_subject, country="US", tier="count-a")
            token_b = hs_token(b_subject, country="US", tier="count-b")
            calls = [post(client, gw, token_a, request_id=f"{a_subject}-{i}") for i in range(20)]
            calls += [post(client, gw, token_b, request_id=f"{b_subject}-{i}") for i in range(20)]
            calls += [post(client, gw, DENIED) for _ in range(10)]
            random.shuffle(calls)
            answers = await asyncio.gather(*calls)
            assert metric(gw, "gateway_ratelimit_fallback_total") == fallback_before, "decided by Redis"
            by_a = [a for a in answers if a.headers.get("X-Request-Id", "").startswith(a_subject)]
            by_b = [a for a in answers if a.headers.get("X-Request-Id", "").startswith(b_subject)]
            assert [a.status for a in by_a + by_b] == [200] * 40
            # Each reply belongs to its own request: every count used exactly once, none from the other caller.
            assert _remaining(by_a) == list(range(30, 50))
            assert _remaining(by_b) == list(range(10, 30))
            assert {a.headers["x-ratelimit-limit-requests"] for a in by_a} == {"6"}
            assert {a.headers["x-ratelimit-limit-requests"] for a in by_b} == {"3"}
            assert [a.status for a in answers if a.headers.get("X-Gateway-Reason")] == [451] * 10
            # The upstream saw each admitted request under its own caller's name.
            for seen in upstream.seen:
                headers = {k.lower(): v for k, v in seen.headers}
                rid = headers.get("x-request-id", "")
                for subject in (a_subject, b_subject):
                    if rid.startswith(subject):
                        assert headers["x-gateway-subject"] == subject
            proxy.set("pass")
            await asyncio.sleep(0.5)
            assert metric(gw, "gateway_in_flight_requests") == 0
            assert "unhandled error" not in gw.log_path.read_text(errors="replace")
    finally:
        gw.stop()


# --- 25: a lost pub/sub message ------------------------------------------------------------------------


def _write_unannounced(url: str, country: str, *, add: bool) -> int:
    """Change deny-countries and bump the version in one MULTI, as a write whose PUBLISH was lost."""
    client = redis_sync.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.incr("{gw}:version")
        if add:
            entry = {
                "reason": "lost announcement",
                "source": "test",
                "added_by": "test",
                "added_at": "2026-01-01T00:00:00Z",
                "expires_at": None,
            }
            pipe.hset("{gw}:list:deny-countries", country, orjson.dumps(entry))
        else:
            pipe.hdel("{gw}:list:deny-countries", country)
        version, _ = pipe.execute()
        return int(version)
    finally:
        client.close()


async def test_a_change_without_its_announcement_converges_within_a_second(upstream: Upstream) -> None:
    with RedisServer() as server:
        seed_policy(server.url, copy.deepcopy(BASE_POLICY))
        # The product's default poll interval, not the tests' faster one.
        gw = GatewayProcess(config(upstream, staleness=30, poll=0.25), redis_url=server.url).start()
        german = hs_token("gretchen", country="DE", tier="partner")
        try:
            async with aiohttp.ClientSession() as client:
                assert (await post(client, gw, german)).status == 200
                for add, status in ((True, 451), (False, 200)):
                    version = _write_unannounced(server.url, "DE", add=add)
                    written = time.monotonic()
                    answer = await until(client, gw, german, status, within=1.0)
                    assert time.monotonic() - written < 1.0
                    if status == 451:
                        assert answer.code == "country_denied"
                        assert answer.headers["X-Gateway-Policy-Version"] == str(version)
                assert (await post(client, gw, DENIED)).status == 451
        finally:
            gw.stop()


def test_admin_reads_while_redis_resets_connections_are_never_500(upstream: Upstream) -> None:
    """redis-py under uvloop may raise RuntimeError on a reset transport: still 'Redis unavailable'."""
    import collections
    import urllib.error
    import urllib.request

    from .support.gateway_process import ADMIN_TOKEN

    with RedisServer() as redis:
        seed_policy(redis.url)
        proxy = FaultProxy(redis.port).start()
        gateway = GatewayProcess(
            gateway_config(upstream.url, policy={"max_staleness_s": 30, "poll_interval_s": 0.1}), redis_url=proxy.url
        ).start()
        statuses: collections.Counter[int] = collections.Counter()
        try:
            for i in range(30):
                proxy.set("reset" if i % 2 == 0 else "pass")
                for _ in range(4):
                    request = urllib.request.Request(
                        gateway.admin_url + "/admin/v1/lists/deny-countries",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    )
                    try:
                        with urllib.request.urlopen(request, timeout=5) as response:
                            statuses[response.status] += 1
                    except urllib.error.HTTPError as exc:
                        statuses[exc.code] += 1
                    time.sleep(0.02)
        finally:
            proxy.set("pass")
            gateway.stop()
            proxy.stop()
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[200] > 0
        assert "policy reload failed" not in gateway.log()
