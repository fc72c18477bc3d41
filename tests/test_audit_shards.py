"""The audit stream in shards (``audit.shards``): keys and slots, which shard a producer appends to, and
every reader merging the shards newest first; then several real gateway processes on three shards."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis as redis_sync
from redis.crc import key_slot

from gateway.audit import encode_line
from gateway.settings import ConfigError, parse_settings
from gateway.storage.keys import AUDIT_KEY, AUDIT_SHARDS_KEY, audit_key, audit_mark_key, audit_shard
from gateway.storage.store import Store

from .support.archive import archive_config, gateway_cli
from .support.audit_entries import records_of
from .support.gateway_process import ADMIN_TOKEN, GatewayProcess, gateway_config, seed_policy
from .support.tokens import auth, hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until, wait_until_blocking
from .test_metrics import scrape, value

# --- keys, slots and the choice of a shard ------------------------------------------------------


def test_shard_0_keeps_the_stream_and_marks_of_an_unsharded_trail() -> None:
    assert audit_key(0) == AUDIT_KEY == "gw:audit"
    assert audit_mark_key(0, "p1") == "{gw:audit}:seq:p1"
    assert audit_key(5) == "gw:audit:5" and audit_mark_key(5, "p1") == "{gw:audit:5}:seq:p1"


@pytest.mark.parametrize("shard", [0, 1, 2, 3, 7, 16, 100, 1023])
def test_each_shard_stream_shares_its_cluster_slot_with_its_producers_marks(shard: int) -> None:
    stream_slot = key_slot(audit_key(shard).encode())
    assert all(key_slot(audit_mark_key(shard, p).encode()) == stream_slot for p in ("a", "4242-17-ab", "x" * 40))


def test_shards_land_in_different_slots() -> None:
    slots = {key_slot(audit_key(shard).encode()) for shard in range(16)}
    assert len(slots) == 16


def test_a_producers_shard_is_a_stable_hash_of_its_id() -> None:
    # CRC-32 of the id, the same in every process (Python's own hash() is salted per process).
    assert [audit_shard("4242-1700000000000-abcdef", n) for n in (1, 2, 3, 7)] == [0, 0, 2, 6]
    assert audit_shard("anything", 1) == 0
    spread = {audit_shard(f"{pid}-1700000000000-abcdef", 3) for pid in range(100, 130)}
    assert spread == {0, 1, 2}


def test_audit_shards_is_1_to_1024_and_1_by_default() -> None:
    assert parse_settings({"upstream": {"url": "http://up"}}, environ={}).audit.shards == 1
    assert (
        parse_settings({"upstream": {"url": "http://up"}, "audit": {"shards": 1024}}, environ={}).audit.shards == 1024
    )
    for bad in (0, 1025, "many"):
        with pytest.raises(ConfigError, match=r"audit\.shards"):
            parse_settings({"upstream": {"url": "http://up"}, "audit": {"shards": bad}}, environ={})


# --- the store: appends to a shard, reads merged ------------------------------------------------


def producer_in(shard: int, shards: int = 3, *, prefix: str = "p") -> str:
    """A producer id whose hash picks ``shard`` among ``shards``."""
    return next(f"{prefix}-{n}" for n in range(1000) if audit_shard(f"{prefix}-{n}", shards) == shard)


@pytest.fixture
async def store3(redis_url: str) -> Any:
    store = Store.from_url(redis_url, timeout_s=1, audit_shards=3)
    yield store
    await store.close()


async def _add(store: Store, shard: int, entry_id: str, n: int) -> None:
    record = orjson.dumps({"n": n, "subject": f"s{n % 2}", "time": "2026-01-01T00:00:00Z"})
    await store.client.xadd(audit_key(shard), {"r": record, "id": f"t:{n}"}, id=entry_id)


async def window_ns(store: Store, since_ms: int, *, limit: int, page: int = 2000) -> list[int]:
    """The ``n`` of each record of an audit window, in the order read."""
    return [
        orjson.loads(r)["n"] async for batch in store.read_audit_window(since_ms, limit=limit, page=page) for r in batch
    ]


async def test_each_producer_appends_to_its_own_shard_once_per_sequence(store3: Store, redis_url: str) -> None:
    records = [(seq, orjson.dumps({"seq": seq})) for seq in (1, 2, 3)]
    for shard in range(3):
        producer = producer_in(shard)
        assert await store3.append_audit(producer, records, maxlen=1000) == 3
        assert await store3.append_audit(producer, records, maxlen=1000) == 0  # its mark is in its shard
    client = redis_sync.Redis.from_url(redis_url)
    try:
        assert [client.xlen(audit_key(shard)) for shard in range(3)] == [1, 1, 1]  # one batch entry each
        assert client.exists(audit_mark_key(2, producer_in(2))) and not client.exists(audit_mark_key(0, producer_in(2)))
        assert client.smembers(AUDIT_SHARDS_KEY) == {b"3"}
    finally:
        client.close()
    assert await store3.audit_length() == 9


async def test_one_shard_writes_nothing_beyond_the_stream_and_its_marks(redis_url: str) -> None:
    store = Store.from_url(redis_url, timeout_s=1)
    try:
        assert await store.append_audit("p1", [(1, b"{}")], maxlen=1000) == 1
        assert sorted(await store.client.keys("*")) == [b"gw:audit", b"{gw:audit}:records", b"{gw:audit}:seq:p1"]
    finally:
        await store.close()


async def test_reads_merge_the_shards_newest_first_ties_in_shard_order(store3: Store) -> None:
    # Entry ids chosen so the shards interleave, and two ids are equal in two shards.
    layout = [
        (0, "1000-0", 1),
        (1, "1001-0", 2),
        (2, "1002-0", 3),
        (0, "1003-0", 4),
        (1, "1003-0", 5),
        (2, "1004-0", 6),
        (2, "1004-1", 7),
        (1, "1005-0", 8),
        (0, "1006-0", 9),
        (0, "1006-1", 10),
        (2, "1007-0", 11),
    ]
    for shard, entry_id, n in layout:
        await _add(store3, shard, entry_id, n)
    newest_first = [11, 10, 9, 8, 7, 6, 4, 5, 3, 2, 1]  # 1003-0 in shards 0 and 1: shard 0 first
    assert [r["n"] for r in await store3.read_audit(100)] == newest_first
    assert [r["n"] for r in await store3.read_audit(4)] == newest_first[:4]

    pages = [page async for page in store3.read_audit_window(0, limit=100, page=2)]
    assert [orjson.loads(r)["n"] for page in pages for r in page] == newest_first
    assert all(len(page) <= 2 * 3 for page in pages)  # at most one read's worth of each shard at a time
    assert await window_ns(store3, 0, limit=5, page=2) == newest_first[:5]
    assert await window_ns(store3, 1004, limit=100) == [11, 10, 9, 8, 7, 6]

    odd = await store3.search_audit(100, lambda record: record["subject"] == "s1")
    assert [r["n"] for r in odd.records] == [n for n in newest_first if n % 2] and odd.complete
    assert odd.scanned == len(layout)
    capped = await store3.search_audit(100, lambda record: record["subject"] == "s1", scan_cap=4)
    assert [r["n"] for r in capped.records] == [11, 9] and capped.scanned == 4 and not capped.complete
    few = await store3.search_audit(2, lambda record: True)
    assert [r["n"] for r in few.records] == [11, 10] and few.complete


async def test_a_long_merge_is_exact_across_many_reads(store3: Store) -> None:
    """Three shards of unequal sizes, read in small pages: the merge equals sorting everything by id."""
    expected: list[tuple[int, int, int, int]] = []
    for n in range(600):
        shard = (n * 7) % 3 if n % 5 else 0
        ms, seq = 2000 + n // 4, n % 4
        await _add(store3, shard, f"{ms}-{seq}", n)
        expected.append((ms, seq, -shard, n))
    order = [n for *_key, n in sorted(expected, reverse=True)]
    assert await window_ns(store3, 0, limit=10_000, page=7) == order
    assert [r["n"] for r in await store3.read_audit(250)] == order[:250]


async def test_a_store_told_fewer_shards_still_reads_every_shard_gateways_appended_to(
    store3: Store, redis_url: str
) -> None:
    for shard in range(3):
        await store3.append_audit(producer_in(shard), [(1, orjson.dumps({"shard": shard}))], maxlen=1000)
    lowered = Store.from_url(redis_url, timeout_s=1)  # audit.shards: 1
    try:
        assert await lowered.audit_shard_count() == 3
        assert sorted(r["shard"] for r in await lowered.read_audit(10)) == [0, 1, 2]
        assert await lowered.audit_length() == 3
        assert await lowered.audit_backlog() == 3  # no archiver yet: every shard is backlog
    finally:
        await lowered.close()


async def test_a_stopped_producers_records_go_where_its_mark_is(store3: Store) -> None:
    """A spool replayed after ``audit.shards`` changed: the mark, not today's hash, picks the shard."""
    producer = producer_in(2)
    assert await store3.audit_shard_of(producer, 3) == 2  # no mark anywhere: its hash
    await store3.append_audit(producer, [(1, b"{}"), (2, b"{}")], maxlen=1000, shard=1)
    assert await store3.audit_shard_of(producer, 3) == 1
    assert await store3.audit_shard_of(producer, 5) == 1


# --- real gateway processes on three shards -----------------------------------------------------

SHARDED = {"shards": 3, "flush_ms": 20, "archive": True}


def shard_entries(redis_url: str, shards: int = 3) -> list[tuple[tuple[int, int, int, int], dict[str, Any]]]:
    """Every record of every shard with its place in the merged order: ((ms, seq, -shard, place in its
    entry), record)."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        found = []
        for shard in range(shards):
            for entry_id, fields in client.xrange(audit_key(shard)):
                ms, seq = (int(part) for part in entry_id.decode().split("-"))
                found += [((ms, seq, -shard, i), record) for i, record in enumerate(records_of(fields))]
        return found
    finally:
        client.close()


def shard_of_request(redis_url: str, request_id: str) -> int | None:
    for (_ms, _seq, negated, _place), record in shard_entries(redis_url):
        if record.get("request_id") == request_id:
            return -negated
    return None


async def _request(client: aiohttp.ClientSession, gateway: GatewayProcess, token: str, request_id: str) -> int:
    headers = {**auth(token), "X-Request-Id": request_id}
    async with client.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-mock"}, headers=headers) as r:
        await r.read()
        return r.status


async def _admin(client: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with client.request(method, gateway.admin_url + path, headers=headers, **kw) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_gateways_on_three_shards_read_filter_preview_and_archive_as_one_trail(
    redis_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    seed_policy(redis_url)
    gateways: list[GatewayProcess] = []
    shards: list[int] = []
    try:
        async with aiohttp.ClientSession() as client:
            # A process's shard is the hash of its random producer id: start processes (at least three)
            # until their records are in at least two shards.
            while len(gateways) < 3 or len(set(shards)) < 2:
                assert len(gateways) < 12, f"twelve processes, all on shard {shards[0]}"
                gateway = GatewayProcess(gateway_config(upstream.url, audit=SHARDED), redis_url=redis_url).start()
                gateways.append(gateway)
                k = len(gateways) - 1
                assert await _request(client, gateway, hs_token(f"user-{k}"), f"first-{k}") == 200
                await wait_until(lambda k=k: shard_of_request(redis_url, f"first-{k}") is not None, 5)
                shards.append(shard_of_request(redis_url, f"first-{k}"))  # type: ignore[arg-type]
            # Each process: five allowed requests of its own subject, and one from a denied country.
            for k, gateway in enumerate(gateways):
                for i in range(5):
                    assert await _request(client, gateway, hs_token(f"user-{k}"), f"ok-{k}-{i}") == 200
                blocked = hs_token(f"user-{k}-ir", country="IR")
                assert await _request(client, gateway, blocked, f"ir-{k}") == 451
            total = 7 * len(gateways)
            await wait_until(lambda: len(shard_entries(redis_url)) == total, 10)
            entries = shard_entries(redis_url)
            assert {-key[2] for key, _record in entries} == set(shards)
            newest_first = [record["request_id"] for _key, record in sorted(entries, key=lambda e: e[0], reverse=True)]

            # The admin API (and `gateway audit tail`, its client) reads every shard, newest first.
            reader = gateways[-1]
            body = await _admin(client, reader, "GET", "/admin/v1/audit", params={"limit": "500"})
            assert [r["request_id"] for r in body["records"]] == newest_first
            body = await _admin(client, reader, "GET", "/admin/v1/audit", params={"limit": "3"})
            assert [r["request_id"] for r in body["records"]] == newest_first[:3]
            # Filters search every shard.
            body = await _admin(client, reader, "GET", "/admin/v1/audit", params={"code": "country_denied"})
            assert [r["request_id"] for r in body["records"]] == [i for i in newest_first if i.startswith("ir-")]
            assert body["complete"] is True
            for k in (0, len(gateways) - 1):
                body = await _admin(client, reader, "GET", "/admin/v1/audit", params={"subject": f"user-{k}"})
                assert {r["request_id"] for r in body["records"]} == {f"first-{k}"} | {f"ok-{k}-{i}" for i in range(5)}
            # The impact preview decides again the callers of every shard.
            deny_us = {"method": "PUT", "path": "/admin/v1/lists/deny-countries/US", "body": {"reason": "preview"}}
            body = await _admin(client, reader, "POST", "/admin/v1/impact", json={"change": deny_us, "hours": 1})
            assert {row["subject"] for row in body["would_block"]} == {f"user-{k}" for k in range(len(gateways))}
            assert body["would_block_requests"] == 6 * len(gateways) and body["records"] == total
            # The archiver's backlog: every shard's records, summed.
            await wait_until(lambda: _gauge(reader, "gateway_audit_unarchived_records", total), 10)

            # The archiver: one chain per shard, each record once; verify and query read them all.
            root = tmp_path / "archive"
            config = archive_config(tmp_path, redis_url, shards=3)
            done = gateway_cli("audit", "archive", "--config", str(config), "--dir", str(root), "--once")
            assert done.returncode == 0, done.stderr
            with redis_sync.Redis.from_url(redis_url) as plain:
                changes = int(plain.xlen("{gw}:changes"))  # the seeded policy's
            assert f"archived {total + changes} records" in done.stdout
            check = gateway_cli("audit", "verify", "--dir", str(root), "--json")
            assert check.returncode == 0, check.stderr
            streams = {s["stream"]: s["records"] for s in orjson.loads(check.stdout)["streams"]}
            per_shard = {shard: sum(1 for key, _r in entries if -key[2] == shard) for shard in set(shards)}
            assert streams == {
                "changes": changes,
                **{("audit" if s == 0 else f"audit-{s}"): n for s, n in per_shard.items()},
            }
            query = gateway_cli("audit", "query", "--dir", str(root), "--json", "--limit", "0")
            assert query.returncode == 0, query.stderr
            rows = [orjson.loads(line) for line in query.stdout.splitlines()]
            assert [r["request_id"] for r in rows] == newest_first[::-1]
            await wait_until(lambda: _gauge(reader, "gateway_audit_unarchived_records", 0), 10)
    finally:
        for gateway in gateways:
            gateway.stop()


async def _gauge(gateway: GatewayProcess, name: str, expected: float) -> bool:
    return bool(value(await scrape(gateway.admin_url), name) == expected)


async def test_a_stopped_processes_spool_is_replayed_into_its_own_shard_once(
    redis_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """Orphaned spools land in their producers' shards: one by its hash, one where its mark already is
    (it had appended part of its spool before it stopped, when the hash would have picked another)."""
    seed_policy(redis_url)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    by_hash = producer_in(2, prefix="4242-1700000000000")
    by_mark = producer_in(2, prefix="4343-1700000000000")
    store = Store.from_url(redis_url, timeout_s=1, audit_shards=3)
    try:
        early = [(seq, orjson.dumps({"request_id": f"mark-{seq}"})) for seq in (1, 2, 3)]
        await store.append_audit(by_mark, early, maxlen=1000, shard=1)
    finally:
        await store.close()
    for producer, name in ((by_hash, "hash"), (by_mark, "mark")):
        lines = [encode_line(producer, seq, orjson.dumps({"request_id": f"{name}-{seq}"})) for seq in range(1, 6)]
        (spool_dir / f"{producer}.jsonl").write_bytes(b"".join(lines))
    config = gateway_config(upstream.url, audit={"shards": 3, "flush_ms": 20, "spool_dir": str(spool_dir)})
    gateway = GatewayProcess(config, redis_url=redis_url).start()
    try:
        wait_until_blocking(lambda: not list(spool_dir.glob("4*.jsonl")), 10, message=gateway.log)
    finally:
        gateway.stop()
    placed = sorted((record["request_id"], -key[2]) for key, record in shard_entries(redis_url))
    assert placed == sorted([(f"hash-{seq}", 2) for seq in range(1, 6)] + [(f"mark-{seq}", 1) for seq in range(1, 6)])


async def test_concurrent_producers_spread_over_the_shards_and_each_record_is_read_once(store3: Store) -> None:
    """Many producers appending at once land in all three shards, and a read sees each record once."""
    producers = [f"load-{n}" for n in range(12)]

    async def produce(producer: str) -> None:
        for first in range(1, 101, 20):
            batch = [(seq, orjson.dumps({"p": producer, "seq": seq})) for seq in range(first, first + 20)]
            await store3.append_audit(producer, batch, maxlen=100_000)

    await asyncio.gather(*(produce(p) for p in producers))
    assert {audit_shard(p, 3) for p in producers} == {0, 1, 2}
    seen = [(r["p"], r["seq"]) for r in await store3.read_audit(2000)]
    assert len(seen) == len(set(seen)) == 1200
