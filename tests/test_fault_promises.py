"""Promises that must hold whatever Redis does (docs/contract.md §5, §10): real redis-server processes
frozen (SIGSTOP), stopped and slowed through a TCP delay proxy, and real gateway processes killed.

- A gateway killed while Redis hangs loses no answered decision older than ``audit.flush_ms``.
- ``redis.timeout_s`` bounds a request's whole wait on Redis, however many calls it makes.
- Policy polls have a deadline of their own (``redis.policy_timeout_s``): a slow Redis is not "no policy".
- What the local limiter admitted while Redis was away is charged to Redis when it returns.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.redis_server import RedisServer, free_port

from .support.faultproxy import FaultProxy
from .support.gateway_process import GatewayProcess, gateway_config, seed_policy
from .support.tokens import hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until_blocking
from .test_audit import assert_exactly, send, stream, stream_length
from .test_redis_faults import metric, post

# --- the audit trail: killed while Redis hangs ------------------------------------------------------


def restarted(config: dict[str, Any]) -> dict[str, Any]:
    """The same configuration (the same spool directory) on new ports."""
    return {
        **config,
        "listen": {**config["listen"], "port": free_port()},
        "admin": {**config["admin"], "port": free_port()},
    }


async def test_a_gateway_killed_while_redis_hangs_loses_no_decision_older_than_flush_ms(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Records reach the spool within flush_ms even while the Redis send hangs; the next start sends them once.

    Before, the drain task waited up to a second on the frozen Redis with the records in memory only,
    and a SIGKILL in that second lost every one of them.
    """
    flush_ms = 100
    with RedisServer() as redis:
        seed_policy(redis.url)
        config = gateway_config(
            upstream.url,
            policy={"max_staleness_s": 60},
            redis={"timeout_s": 0.1},
            audit={"flush_ms": flush_ms, "spool_dir": str(tmp_path / "spool")},
        )
        first = GatewayProcess(config, redis_url=redis.url).start()
        answered: list[str] = []
        try:
            await send(first, answered, prefix="before", count=3)
            wait_until_blocking(lambda: stream_length(redis.url) == 3, 5, message=first.log)
            redis.pause()
            # The first record's batch is sent to the frozen Redis, and its send hangs: the command
            # waits in Redis's socket buffer, and lands when Redis resumes. Everything after it
            # queues behind that send.
            await send(first, answered, prefix="first", count=1)
            frozen_at = time.monotonic()
            await asyncio.sleep(flush_ms / 1000 * 2)
            await send(first, answered, prefix="behind", count=15)
            # Every decision is now older than flush_ms plus a margin for a busy machine; the
            # frozen Redis has held the sender shorter than its one-second send deadline.
            await asyncio.sleep(flush_ms / 1000 * 2.5)
            assert time.monotonic() - frozen_at < 0.9, "too slow to prove anything about a hung send"
        finally:
            first.stop(signal.SIGKILL)
            redis.resume()
        second = GatewayProcess(restarted(config), redis_url=redis.url).start()
        try:
            wait_until_blocking(lambda: stream_length(redis.url) >= len(answered), 10, message=second.log)
            await asyncio.sleep(0.5)  # a duplicate would land now
            assert_exactly(redis.url, answered)
        finally:
            second.stop()


async def test_the_spool_is_cut_back_once_redis_holds_every_record(upstream: Upstream, tmp_path: Path) -> None:
    """The write-ahead file does not grow with traffic while Redis takes everything."""
    spool = tmp_path / "spool"
    with RedisServer() as redis:
        seed_policy(redis.url)
        config = gateway_config(upstream.url, audit={"flush_ms": 20, "spool_dir": str(spool)})
        gateway = GatewayProcess(config, redis_url=redis.url).start()
        answered: list[str] = []
        try:
            await send(gateway, answered, prefix="r", count=30)
            wait_until_blocking(lambda: stream_length(redis.url) == 30, 5, message=gateway.log)
            wait_until_blocking(lambda: all(p.stat().st_size == 0 for p in spool.glob("*.jsonl")), 5)
        finally:
            assert gateway.stop() == 0
        assert not list(spool.glob("*.jsonl"))  # a clean stop with everything sent leaves no file
        assert_exactly(redis.url, answered)


# --- Redis slow or away: one deadline per request, polls apart, spend written back ----------------------

TIERS: dict[str, Any] = {
    # Every response's usage is charged: a request makes two Redis calls, the check and the charge.
    "partner": {
        "requests_per_minute": 600_000,
        "burst": 100_000,
        "tokens_per_minute": 1_000_000_000,
        "stages": ["partners", "general"],
    },
    "public": {"requests_per_minute": 60, "burst": 10, "stages": ["general"]},
    "internal": {"requests_per_minute": 6000, "burst": 600, "stages": ["internal", "partners", "general"]},
    # One request every 10 s after a burst of 5: nothing refills within the test.
    "tight": {"requests_per_minute": 6, "burst": 5, "stages": ["general"]},
}


@pytest.fixture
def slow_redis() -> Iterator[FaultProxy]:
    """A seeded redis-server behind a TCP fault proxy (pass, delay, refuse...)."""
    with RedisServer() as server:
        seed_policy(server.url)
        proxy = FaultProxy(server.port).start()
        try:
            yield proxy
        finally:
            proxy.stop()


def ready(gateway: GatewayProcess) -> int:
    try:
        with urllib.request.urlopen(gateway.admin_url + "/readyz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_a_request_waits_on_redis_at_most_timeout_s_over_all_its_calls(
    slow_redis: FaultProxy, upstream: Upstream
) -> None:
    """Each call fits in timeout_s, the check and the charge together do not: the charge gets what is left.

    Before, every call had its own deadline: ~130 ms a request on Redis, and never a fallback.
    """
    # No leases: every check asks Redis, and with no lease to decide on, the charge is sent before
    # the last byte, so each request makes the two calls whose shared deadline this test is about.
    config = gateway_config(
        upstream.url,
        tiers=TIERS,
        redis={"timeout_s": 0.1},
        policy={"max_staleness_s": 60, "poll_interval_s": 0.1},
        ratelimit={"lease_ms": 0},
    )
    gateway = GatewayProcess(config, redis_url=slow_redis.url).start()
    token = hs_token("tess", tier="partner")
    try:
        async with aiohttp.ClientSession() as client:
            assert (await post(client, gateway, token)).status == 200  # connected, scripts loaded
            round_trip = 0.065
            slow_redis.set("delay", delay_s=round_trip / 2)
            answers = [await post(client, gateway, token) for _ in range(10)]
        assert all(answer.status == 200 for answer in answers), [a.code for a in answers]
        # The charge that would have passed the deadline went to the local limiter, which then
        # decided while Redis was skipped.
        assert metric(gateway, "gateway_ratelimit_fallback_total") > 0
        # Two calls in series would take at least two round trips; one deadline ends at timeout_s.
        assert statistics.median(a.elapsed for a in answers) < 2 * round_trip, [a.elapsed for a in answers]
    finally:
        gateway.stop()


async def test_policy_polls_outlast_a_redis_slower_than_the_hot_path_deadline(
    slow_redis: FaultProxy, upstream: Upstream
) -> None:
    """At a round trip above redis.timeout_s, the version poll still confirms: ready past max_staleness_s.

    Before, polls shared the hot path's deadline: each failed, and the gateway answered 503 after
    max_staleness_s although Redis answered every poll.
    """
    staleness = 1.5
    config = gateway_config(
        upstream.url,
        tiers=TIERS,
        redis={"timeout_s": 0.1},
        policy={"max_staleness_s": staleness, "poll_interval_s": 0.1},
    )
    gateway = GatewayProcess(config, redis_url=slow_redis.url).start()
    allowed, denied = hs_token("alice", tier="partner"), hs_token("ivan", country="IR", tier="partner")
    try:
        async with aiohttp.ClientSession() as client:
            slow_redis.set("delay", delay_s=0.075)  # 150 ms a round trip
            started = time.monotonic()
            seen: list[tuple[int, int, int]] = []
            while time.monotonic() - started < 2.5 * staleness:
                ok, blocked = await post(client, gateway, allowed), await post(client, gateway, denied)
                seen.append((ok.status, blocked.status, ready(gateway)))
                await asyncio.sleep(0.1)
        assert set(seen) == {(200, 451, 200)}, seen
        assert metric(gateway, "gateway_ratelimit_fallback_total") > 0  # rate limits: local, as Redis is slow
        assert metric(gateway, "gateway_policy_age_seconds") < staleness
    finally:
        gateway.stop()


async def test_what_the_local_limiter_admitted_is_charged_to_redis_when_it_returns(
    slow_redis: FaultProxy, upstream: Upstream
) -> None:
    """A burst of 5 spent locally while Redis is away is not handed out again when Redis returns."""
    config = gateway_config(
        upstream.url, tiers=TIERS, redis={"timeout_s": 0.1}, policy={"max_staleness_s": 60, "poll_interval_s": 0.1}
    )
    gateway = GatewayProcess(config, redis_url=slow_redis.url).start()
    token = hs_token("tina", tier="tight")
    try:
        async with aiohttp.ClientSession() as client:
            slow_redis.set("refuse")
            away = [(await post(client, gateway, token)).status for _ in range(6)]
            assert away == [200] * 5 + [429]
            assert metric(gateway, "gateway_ratelimit_fallback_total") >= 6
            slow_redis.set("pass")
            await asyncio.sleep(1.5)  # past the longest back-off: the next checks ask Redis
            fallbacks = metric(gateway, "gateway_ratelimit_fallback_total")
            back = [await post(client, gateway, token) for _ in range(3)]
            assert metric(gateway, "gateway_ratelimit_fallback_total") == fallbacks  # decided by Redis
        assert [answer.status for answer in back] == [429] * 3, [a.code for a in back]
        assert all(answer.code == "rate_limited" for answer in back)
    finally:
        gateway.stop()


async def test_a_redis_slower_than_the_audit_loses_and_repeats_nothing(
    slow_redis: FaultProxy, upstream: Upstream
) -> None:
    """Appends slower than the records come: the sender falls back to the file, then catches up, in order."""
    config = gateway_config(
        upstream.url,
        tiers=TIERS,
        redis={"timeout_s": 0.1},
        policy={"max_staleness_s": 60, "poll_interval_s": 0.1},
        audit={"flush_ms": 20},
    )
    gateway = GatewayProcess(config, redis_url=slow_redis.url).start()
    answered: list[str] = []
    try:
        # 1.2 s a round trip: every append outlasts the sender's deadline; records wait in the file.
        slow_redis.set("delay", delay_s=0.6)
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            await asyncio.gather(
                *(send(gateway, answered, prefix=f"slow{len(answered)}-{n}", count=10) for n in range(4))
            )
        assert metric(gateway, "gateway_audit_spooled_total") > 0
        slow_redis.set("pass")
        wait_until_blocking(lambda: stream_length(slow_redis.url) >= len(answered), 15, message=gateway.log)
        await asyncio.sleep(0.5)
    finally:
        gateway.stop()
    got = [record["request_id"] for record, _id in stream(slow_redis.url)]
    assert sorted(got) == sorted(answered) and len(set(got)) == len(got)
