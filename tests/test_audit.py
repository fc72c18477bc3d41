"""Contract §10 audit trail: one record per decision, nothing lost across outages, kills and stops."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis as redis_sync

from gateway.audit import Spool, decode_line, encode_line
from gateway.public import _rfc3339
from gateway.redis_server import RedisServer, free_port
from gateway.screening import parse_csl

from .support.audit_entries import stream_records
from .support.gateway_process import BASE_POLICY, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until_blocking
from .test_metrics import scrape, value

FIELDS = {
    "time",
    "request_id",
    "subject",
    "org",
    "org_name",
    "tier",
    "claimed_country",
    "client_ip",
    "ip_country",
    "model",
    "decision",
    "code",
    "policy_version",
    "status",
    "upstream_status",
    "duration_ms",
}


def stream(redis_url: str) -> list[tuple[dict[str, Any], str]]:
    """The audit stream oldest first: (record, producer:sequence id) per record."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        return stream_records(client.xrange("gw:audit"))
    finally:
        client.close()


def stream_length(redis_url: str, key: str = "gw:audit") -> int:
    """Records in the stream (a batch entry holds several)."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        return sum(int(fields.get(b"n", 1)) for _id, fields in client.xrange(key))
    except redis_sync.RedisError:
        return -1
    finally:
        client.close()


def spool_files(spool_dir: Path) -> list[Path]:
    return list(spool_dir.glob("*.jsonl"))


def spool_lines(spool_dir: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in spool_files(spool_dir))


async def send(gateway: GatewayProcess, request_ids: list[str], *, prefix: str, count: int) -> None:
    """``count`` allowed requests one after another, each with its own X-Request-Id."""
    async with aiohttp.ClientSession() as client:
        for index in range(count):
            request_id = f"{prefix}-{index:03d}"
            headers = {**auth(), "X-Request-Id": request_id}
            async with client.post(
                gateway.url + "/v1/chat/completions", json={"model": "gpt-mock"}, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()
            request_ids.append(request_id)


def assert_exactly(redis_url: str, request_ids: list[str]) -> None:
    """The stream holds these requests' records, once each, in the order they were made."""
    entries = stream(redis_url)
    got = [record["request_id"] for record, _id in entries]
    assert got == request_ids, f"{len(got)} records, expected {len(request_ids)}"
    ids = [entry_id for _record, entry_id in entries]
    assert len(set(ids)) == len(ids)
    times = [record["time"] for record, _id in entries]
    assert times == sorted(times)


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A Redis that keeps its data across stop and start (append-only file), like a production one."""
    with RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


def outage_config(upstream: Upstream, **audit: Any) -> dict[str, Any]:
    # Longer staleness than any outage here, so the gateway keeps deciding from its snapshot.
    return gateway_config(
        upstream.url, policy={"max_staleness_s": 60}, redis={"timeout_s": 0.2}, audit={"flush_ms": 50, **audit}
    )


async def test_one_record_per_decision_with_the_contract_fields(redis_url: str, upstream: Upstream) -> None:
    entries = parse_csl(resources.files("gateway").joinpath("data", "csl_sample.json").read_bytes())
    version = seed_policy(redis_url, {**BASE_POLICY, "screening": {"entries": entries}})
    config = gateway_config(upstream.url, audit={"flush_ms": 20}, limits={"max_body_bytes": 1024})
    gateway = GatewayProcess(config, redis_url=redis_url).start()
    cases = [
        ("ok-1", auth(), {"model": "gpt-mock"}, 200, "allow", ""),
        (
            "ir-1",
            auth(hs_token("carol", org="corp", country="IR")),
            {"model": "gpt-mock"},
            451,
            "block",
            "country_denied",
        ),
        ("anon-1", {}, {"model": "gpt-mock"}, 401, "block", "unauthenticated"),
        ("big-1", auth(), b"x" * 2000, 413, "error", "request_too_large"),
        (
            "csl-1",
            auth(hs_token("dave", org="sgaf", org_name="Société Générale d'Armement Fictif")),
            {"model": "gpt-mock"},
            451,
            "block",
            "entity_denied",
        ),
        ("ok-2", auth(), {"model": "gpt-mock"}, 200, "allow", ""),
    ]
    started = datetime.now(UTC)
    try:
        async with aiohttp.ClientSession() as client:
            for request_id, headers, body, status, _decision, _code in cases:
                kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
                async with client.post(
                    gateway.url + "/v1/chat/completions", headers={**headers, "X-Request-Id": request_id}, **kwargs
                ) as r:
                    # Read whole: a caller that hangs up unread is audited as 499 (client closed).
                    assert r.status == status, await r.text()
                    await r.read()
        wait_until_blocking(lambda: stream_length(redis_url) >= len(cases), 5)
        await asyncio.sleep(0.1)
    finally:
        gateway.stop()
    records = {record["request_id"]: record for record, _id in stream(redis_url)}
    assert list(records) == [case[0] for case in cases]
    for request_id, _headers, _body, status, decision, code in cases:
        record = records[request_id]
        expected_fields = FIELDS | ({"screening"} if request_id == "csl-1" else set())
        assert set(record) == expected_fields, request_id
        assert (record["status"], record["decision"], record["code"]) == (status, decision, code)
        assert record["policy_version"] == version
        assert record["duration_ms"] > 0
        # The address is resolved after the credentials are checked.
        assert record["client_ip"] == "127.0.0.1"  # known even when the credentials are not
        when = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        assert abs((when - started).total_seconds()) < 30 and record["time"].endswith("Z")
    ok = records["ok-1"]
    assert (ok["subject"], ok["org"], ok["tier"], ok["claimed_country"]) == ("alice", "acme", "partner", "US")
    assert (ok["model"], ok["upstream_status"]) == ("gpt-mock", 200)
    blocked = records["ir-1"]
    assert (blocked["subject"], blocked["claimed_country"], blocked["upstream_status"]) == ("carol", "IR", None)
    assert records["anon-1"]["subject"] is None and records["anon-1"]["tier"] is None
    assert records["big-1"]["model"] is None
    screening = records["csl-1"]["screening"]
    assert screening["score"] >= 0.85 and "Armement Fictif" in orjson.dumps(screening).decode()


async def test_redis_outage_spools_then_replays_exactly_once_in_order(
    durable_redis: RedisServer, upstream: Upstream
) -> None:
    seed_policy(durable_redis.url)
    gateway = GatewayProcess(outage_config(upstream), redis_url=durable_redis.url).start()
    spool_dir = Path(gateway.config["audit"]["spool_dir"])
    sent: list[str] = []
    try:
        await send(gateway, sent, prefix="before", count=5)
        wait_until_blocking(lambda: stream_length(durable_redis.url) == 5, 5)
        durable_redis.stop()
        await send(gateway, sent, prefix="during", count=10)
        wait_until_blocking(lambda: spool_lines(spool_dir) == 10, 5, message=gateway.log)
        spooled = value(await scrape(gateway.admin_url), "gateway_audit_spooled_total")
        assert spooled == 10
        durable_redis.start()
        await send(gateway, sent, prefix="after", count=5)
        wait_until_blocking(lambda: stream_length(durable_redis.url) >= 20, 10, message=gateway.log)
        await asyncio.sleep(0.3)  # any duplicate would land now
        assert_exactly(durable_redis.url, sent)
        # Replayed: the process's spool is cut back to empty (and removed at a clean stop).
        wait_until_blocking(lambda: spool_lines(spool_dir) == 0, 5)
        assert value(await scrape(gateway.admin_url), "gateway_audit_dropped_total") == 0
    finally:
        gateway.stop()


async def test_spool_of_a_killed_process_is_replayed_by_the_next_one(
    durable_redis: RedisServer, upstream: Upstream
) -> None:
    seed_policy(durable_redis.url)
    config = outage_config(upstream)
    first = GatewayProcess(config, redis_url=durable_redis.url).start()
    spool_dir = Path(first.config["audit"]["spool_dir"])
    sent: list[str] = []
    try:
        await send(first, sent, prefix="direct", count=4)
        wait_until_blocking(lambda: stream_length(durable_redis.url) == 4, 5)
        durable_redis.stop()
        await send(first, sent, prefix="spooled", count=6)
        wait_until_blocking(lambda: spool_lines(spool_dir) == 6, 5, message=first.log)
    finally:
        first.stop(signal.SIGKILL)
    assert len(spool_files(spool_dir)) == 1
    orphan_name = spool_files(spool_dir)[0].name
    durable_redis.start()
    # Two workers start together on the same spool: the file lock lets one replay it, once.
    config = {
        **config,
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {**config["admin"], "port": free_port()},
    }
    second = GatewayProcess(config, redis_url=durable_redis.url, workers=2).start()
    try:
        wait_until_blocking(lambda: stream_length(durable_redis.url) >= 10, 10, message=second.log)
        await asyncio.sleep(0.5)
        assert_exactly(durable_redis.url, sent)
        assert not any(p.name.startswith(orphan_name) for p in spool_files(spool_dir))
    finally:
        second.stop()


async def test_sigterm_flushes_the_queue(redis_url: str, upstream: Upstream) -> None:
    seed_policy(redis_url)
    # A flush interval far longer than the test: only the shutdown flush can deliver the records.
    gateway = GatewayProcess(gateway_config(upstream.url, audit={"flush_ms": 60_000}), redis_url=redis_url).start()
    sent: list[str] = []
    try:
        await send(gateway, sent, prefix="queued", count=7)
        assert stream_length(redis_url) == 0
    finally:
        assert gateway.stop(signal.SIGTERM) == 0
    assert_exactly(redis_url, sent)


async def test_sigterm_during_outage_spools_and_next_start_sends(
    durable_redis: RedisServer, upstream: Upstream
) -> None:
    seed_policy(durable_redis.url)
    config = outage_config(upstream, flush_ms=60_000)
    gateway = GatewayProcess(config, redis_url=durable_redis.url).start()
    spool_dir = Path(gateway.config["audit"]["spool_dir"])
    sent: list[str] = []
    try:
        durable_redis.stop()
        await send(gateway, sent, prefix="queued", count=5)
    finally:
        assert gateway.stop(signal.SIGTERM) == 0
    assert spool_lines(spool_dir) == 5
    durable_redis.start()
    restarted = GatewayProcess(config, redis_url=durable_redis.url).start()
    try:
        wait_until_blocking(lambda: stream_length(durable_redis.url) >= 5, 10, message=restarted.log)
        await asyncio.sleep(0.3)
        assert_exactly(durable_redis.url, sent)
    finally:
        restarted.stop()


async def test_full_queue_drops_loudly_and_never_blocks_requests(
    fresh_redis: RedisServer, upstream: Upstream, tmp_path: Path
) -> None:
    seed_policy(fresh_redis.url)
    blocker = tmp_path / "a-file"
    blocker.write_text("the spool cannot be a directory under a file")
    config = outage_config(upstream, queue_size=5, spool_dir=str(blocker / "spool"))
    gateway = GatewayProcess(config, redis_url=fresh_redis.url).start()
    try:
        fresh_redis.stop()
        started = time.monotonic()
        async with aiohttp.ClientSession() as client:
            for _ in range(15):
                async with client.post(
                    gateway.url + "/v1/chat/completions", json={"model": "gpt-mock"}, headers=auth()
                ) as response:
                    assert response.status == 200
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.3)
        samples = await scrape(gateway.admin_url)
    finally:
        gateway.stop()
    assert value(samples, "gateway_audit_dropped_total") >= 10
    assert value(samples, "gateway_audit_spooled_total") == 0
    errors = [orjson.loads(line) for line in gateway.log_path.read_text().splitlines() if '"AUDIT RECORDS LOST' in line]
    assert errors and errors[0]["level"] == "error"


async def test_orphan_spool_with_a_torn_last_line_is_replayed(
    redis_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """A file as a SIGKILL mid-write leaves it: whole lines are sent, the torn one is counted as lost."""
    seed_policy(redis_url)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    records = [
        orjson.dumps({"request_id": f"orphan-{seq}", "time": f"2026-01-01T00:00:0{seq}.000Z"}) for seq in range(1, 6)
    ]
    orphan = spool_dir / "4242-1700000000000-abcdef.jsonl"
    orphan.write_bytes(
        b"".join(encode_line("4242-1700000000000-abcdef", seq, record) for seq, record in enumerate(records, 1))
        + b'{"producer":"4242-17'
    )
    config = gateway_config(upstream.url, audit={"flush_ms": 20, "spool_dir": str(spool_dir)})
    gateway = GatewayProcess(config, redis_url=redis_url).start()
    try:
        wait_until_blocking(lambda: not orphan.exists(), 5, message=gateway.log)
        samples = await scrape(gateway.admin_url)
    finally:
        gateway.stop()
    assert_exactly(redis_url, [f"orphan-{seq}" for seq in range(1, 6)])
    assert value(samples, "gateway_audit_dropped_total") == 1


def test_record_times_are_rfc3339_with_milliseconds_whatever_the_second() -> None:
    """A record's time is its second, formatted once per second, and its milliseconds from a table:
    the same text as formatting each one whole."""

    def formatted(epoch: float) -> str:
        second = int(epoch)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{int((epoch - second) * 1000):03d}Z"

    chosen = random.Random(19)
    now = time.time()
    epochs = [now + chosen.uniform(-5, 5) for _ in range(5000)] + [chosen.uniform(0, 4e9) for _ in range(5000)]
    epochs += [0.0, 0.0005, 0.999, 0.9999999, 1.0, 1_800_000_000.0, 1_800_000_000.999, 1_800_000_000.9999]
    for epoch in epochs:
        assert _rfc3339(epoch) == formatted(epoch), epoch
    assert _rfc3339(1_800_000_000.25) == "2027-01-15T08:00:00.250Z"


def test_spool_lines_are_encode_lines_and_read_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "4242-1700000000000-a1b2c3")
    entries = [(1, b'{"request_id":"r1","subject":"caf\\u00e9"}'), (12_345, b'{"request_id":"r2"}')]
    assert spool.append(entries) == spool.size > 0
    data = spool.path.read_bytes()
    assert data == b"".join(encode_line(spool.producer, seq, record) for seq, record in entries)
    read = [decode_line(line) for line in data.splitlines()]
    assert [(e.producer, e.seq, orjson.loads(e.record)) for e in read if e is not None] == [
        (spool.producer, seq, orjson.loads(record)) for seq, record in entries
    ]
    spool.release()
