"""The archive end to end: two gateways with ``stream_maxlen: 1000`` and archiving on, requests through
both, the archiver killed (SIGKILL) at random points and restarted; every request archived exactly once.

``make test`` runs it with 1,000 + 1,000 requests and 5 kills, and with three gateways on three audit
shards (each shard its own chain); ``make soak`` with 10,000 + 10,000 and 20.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.archive.segments import audit_streams
from gateway.archive.verify import verify_archive
from gateway.redis_server import RedisServer
from gateway.storage.keys import audit_key

from .support.archive import archive_config, archived
from .support.gateway_process import ROOT, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth
from .support.upstream import Upstream
from .support.waiting import wait_until
from .test_audit import stream_length
from .test_metrics import scrape, value

MAXLEN = 1000
ARCHIVE_COMMAND = (sys.executable, "-m", "gateway", "audit", "archive")
SEGMENTS = ("--segment-records", "300", "--segment-seconds", "0.2")  # small segments: many kill points


async def _send(gateways: list[GatewayProcess], prefix: str, count: int, ids: list[str]) -> None:
    """``count`` requests, alternating between the gateways, 16 at a time; each is decided (allowed or
    rate limited) and so audited."""
    queue = list(range(count))

    async def worker(client: aiohttp.ClientSession) -> None:
        while queue:
            index = queue.pop()
            request_id = f"{prefix}-{index:05d}"
            gateway = gateways[index % len(gateways)]
            headers = {**auth(), "X-Request-Id": request_id}
            async with client.post(
                gateway.url + "/v1/chat/completions", json={"model": "gpt-mock"}, headers=headers
            ) as response:
                assert response.status in (200, 429), await response.text()
                await response.read()
            ids.append(request_id)

    async with aiohttp.ClientSession() as client:
        await asyncio.gather(*(worker(client) for _ in range(16)))


def _archiver(config: Path, root: Path) -> subprocess.Popen[bytes]:
    """The archiver as its own process; its log goes to ``archiver.log`` beside the config."""
    with open(config.parent / "archiver.log", "ab") as log:
        return subprocess.Popen(
            [*ARCHIVE_COMMAND, "--config", str(config), "--dir", str(root), *SEGMENTS],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _audit_length(redis_url: str, shards: int) -> int:
    """Entries in every audit shard."""
    return sum(stream_length(redis_url, audit_key(shard)) for shard in range(shards))


async def _run(
    tmp_path: Path,
    redis: RedisServer,
    upstream: Upstream,
    *,
    count: int,
    kills: int,
    processes: int = 2,
    shards: int = 1,
) -> None:
    seed_policy(redis.url)
    audit = {"stream_maxlen": MAXLEN, "archive": True, "flush_ms": 50, "shards": shards}
    gateways = [
        GatewayProcess(gateway_config(upstream.url, audit=audit), redis_url=redis.url).start() for _ in range(processes)
    ]
    root = tmp_path / "archive"
    config = archive_config(tmp_path, redis.url, maxlen=MAXLEN, shards=shards)
    ids: list[str] = []
    try:
        # The archiver not running: Redis keeps every record, and the gauge says how many wait.
        await _send(gateways, "before", count, ids)
        await wait_until(lambda: _audit_length(redis.url, shards) == count, 10)

        async def backlog() -> float:
            return value(await scrape(gateways[0].admin_url), "gateway_audit_unarchived_records")

        await wait_until(lambda: _equals(backlog(), count), 10)
        for gateway in gateways:
            assert value(await scrape(gateway.admin_url), "gateway_audit_trimmed_total") == 0

        # Now archive while more requests come in, killing the archiver at random moments.
        rng = random.Random(count)
        process = _archiver(config, root)
        sending = asyncio.create_task(_send(gateways, "during", count, ids))
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            process = _archiver(config, root)
        await sending
        await wait_until(
            lambda: all(stream_length(redis.url, audit_key(s)) <= MAXLEN + 200 for s in range(shards)), 120
        )
        await wait_until(lambda: _equals(backlog(), 0), 60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, (tmp_path / "archiver.log").read_text()
    finally:
        for gateway in gateways:
            gateway.stop()
    # Each shard one whole chain; together every request, once.
    request_ids: list[str] = []
    for stream in audit_streams(root):
        records = archived(root, stream)
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        request_ids += [r["request_id"] for r in records]
    assert len(request_ids) == len(set(request_ids)) == 2 * count
    assert set(request_ids) == set(ids)
    summaries = [s for s in verify_archive(root) if s.stream != "changes"]
    assert sum(s.records for s in summaries) == 2 * count


async def _equals(reading: object, expected: float) -> bool:
    assert asyncio.iscoroutine(reading)
    return bool(await reading == expected)


async def test_two_gateways_and_a_killed_archiver_archive_every_request_once(
    tmp_path: Path, fresh_redis: RedisServer, upstream: Upstream
) -> None:
    await _run(tmp_path, fresh_redis, upstream, count=1000, kills=5)


async def test_three_gateways_on_three_audit_shards_and_a_killed_archiver_archive_every_request_once(
    tmp_path: Path, fresh_redis: RedisServer, upstream: Upstream
) -> None:
    await _run(tmp_path, fresh_redis, upstream, count=600, kills=5, processes=3, shards=3)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_soak_20000_requests_and_20_archiver_kills_archive_every_request_once(
    tmp_path: Path, fresh_redis: RedisServer, upstream: Upstream
) -> None:
    started = time.monotonic()
    await _run(tmp_path, fresh_redis, upstream, count=10_000, kills=20)
    print(f"20,000 requests archived across 20 kills in {time.monotonic() - started:.1f} s")


async def test_with_archiving_off_every_record_the_cap_trims_is_counted(
    fresh_redis: RedisServer, upstream: Upstream
) -> None:
    seed_policy(fresh_redis.url)
    config = gateway_config(upstream.url, audit={"stream_maxlen": 100, "archive": False, "flush_ms": 20})
    gateway = GatewayProcess(config, redis_url=fresh_redis.url).start()
    ids: list[str] = []
    try:
        await _send([gateway], "capped", 600, ids)

        async def accounted() -> bool:
            trimmed = value(await scrape(gateway.admin_url), "gateway_audit_trimmed_total")
            return trimmed > 0 and trimmed + stream_length(fresh_redis.url) == 600

        await wait_until(accounted, 10)
        assert value(await scrape(gateway.admin_url), "gateway_audit_unarchived_records") == 0  # not reported
    finally:
        gateway.stop()
