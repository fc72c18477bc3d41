"""Batch entries in the audit stream (gateway/storage/audit_entries.py, gateway/lua/audit.lua): several
records per entry, exactly once per (producer, sequence), capped by records, and read by every reader
beside the single-record entries older gateways wrote."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from gateway.archive.archiver import Archiver, stream_specs
from gateway.archive.verify import verify_archive
from gateway.storage.audit_entries import ENTRY_BYTES, ENTRY_RECORDS, trim_slack
from gateway.storage.keys import AUDIT_KEY, audit_counts_key, audit_key
from gateway.storage.store import Store

from .support.archive import archived
from .support.audit_entries import stream_records


def _records(first: int, last: int, **fields: Any) -> list[tuple[int, bytes]]:
    return [(seq, orjson.dumps({"n": seq, "subject": f"s{seq % 2}", **fields})) for seq in range(first, last + 1)]


async def _raw(store: Store, key: str = AUDIT_KEY) -> list[tuple[bytes, dict[bytes, Any]]]:
    return list(await store.client.xrange(key))


async def _single(store: Store, n: int, key: str = AUDIT_KEY) -> None:
    """A single-record entry as gateways before batch entries wrote it."""
    record = orjson.dumps({"n": n, "subject": f"s{n % 2}"})
    await store.client.xadd(key, {"r": record, "id": f"old:{n}"})


async def _window(store: Store, *, limit: int = 10_000, page: int = 2000) -> list[int]:
    return [orjson.loads(r)["n"] async for batch in store.read_audit_window(0, limit=limit, page=page) for r in batch]


# --- exactly once -----------------------------------------------------------------------------


async def test_a_replay_that_overlaps_a_batch_partly_appends_only_what_is_past_the_mark(store: Store) -> None:
    assert await store.append_audit("p1", _records(1, 5), maxlen=1000) == 5
    # 3..5 are in; 6..8 are not: the entry loses its first three records, the rest land once.
    assert await store.append_audit("p1", _records(3, 8), maxlen=1000) == 3
    # A replay wholly at or below the mark adds nothing; one straddling two entries skips the first.
    assert await store.append_audit("p1", _records(1, 8), maxlen=1000) == 0
    assert await store.append_audit("p1", _records(2, 300), maxlen=1000) == 292
    raw = await _raw(store)
    pairs = stream_records(raw)
    assert [record["n"] for record, _id in pairs] == list(range(1, 301))
    assert [producer_seq for _record, producer_seq in pairs] == [f"p1:{n}" for n in range(1, 301)]
    assert [(fields[b"id"], int(fields[b"n"])) for _id, fields in raw] == [
        (b"p1:1-5", 5),
        (b"p1:6-8", 3),
        (b"p1:9-257", 249),  # the first entry of the replay (2..257) less the 7 already in
        (b"p1:258-300", 43),
    ]
    assert [int(fields[b"total"]) for _id, fields in raw] == [5, 8, 257, 300]
    assert await store.audit_length() == 300


async def test_a_gap_in_the_sequences_ends_an_entry(store: Store) -> None:
    """A torn spool line dropped leaves a gap: the entries on either side each keep consecutive ones."""
    records = _records(1, 4) + _records(6, 7)
    assert await store.append_audit("p1", records, maxlen=1000) == 6
    assert await store.append_audit("p1", _records(5, 7), maxlen=1000) == 0  # 5 is below the mark now
    raw = await _raw(store)
    assert [fields[b"id"] for _id, fields in raw] == [b"p1:1-4", b"p1:6-7"]
    assert await _window(store) == [7, 6, 4, 3, 2, 1]


async def test_batches_over_256_records_or_512_kib_are_split(store: Store) -> None:
    assert await store.append_audit("p1", _records(1, 600), maxlen=100_000) == 600
    assert [int(f[b"n"]) for _id, f in await _raw(store)] == [ENTRY_RECORDS, ENTRY_RECORDS, 600 - 2 * ENTRY_RECORDS]
    await store.client.delete(AUDIT_KEY)
    padding = "x" * 5000  # about 5 KB a record: 512 KiB hold about a hundred
    assert await store.append_audit("p2", _records(1, 300, pad=padding), maxlen=100_000) == 300
    raw = await _raw(store)
    assert len(raw) >= 3
    assert all(len(fields[b"b"]) <= ENTRY_BYTES + 2 for _id, fields in raw)
    assert [record["n"] for record, _id in stream_records(raw)] == list(range(1, 301))


async def test_a_record_with_line_breaks_is_stored_compact(store: Store) -> None:
    pretty = b'{\n  "n": 1,\n  "note": "a\\nb"\n}'
    assert await store.append_audit("p1", [(1, pretty), *_records(2, 3)], maxlen=1000) == 3
    assert [r["n"] for r in await store.read_audit(10)] == [3, 2, 1]
    assert (await store.read_audit(10))[2]["note"] == "a\nb"


# --- reading both formats ---------------------------------------------------------------------


def _shifted(first: int, last: int, by: int) -> list[tuple[int, bytes]]:
    """Sequences ``first``..``last`` holding the records ``n`` = sequence + ``by``."""
    return [(seq, orjson.dumps({"n": seq + by, "subject": f"s{(seq + by) % 2}"})) for seq in range(first, last + 1)]


async def _mixed(store: Store) -> list[int]:
    """Single-record entries, batch entries, single ones again: n 1..20, appended in that order."""
    for n in (1, 2, 3):
        await _single(store, n)
    await store.append_audit("p1", _shifted(1, 7, 3), maxlen=1000)
    for n in (11, 12):
        await _single(store, n)
    await store.append_audit("p1", _shifted(8, 15, 5), maxlen=1000)
    return list(range(20, 0, -1))  # newest first


async def test_old_and_new_entries_are_read_alike_by_every_reader(store: Store) -> None:
    newest_first = await _mixed(store)
    assert await store.client.xlen(AUDIT_KEY) == 7  # 3 + 1 + 2 + 1
    # The admin read (and `gateway audit tail`, its client): limit counts records, not entries.
    assert [r["n"] for r in await store.read_audit(100)] == newest_first
    assert [r["n"] for r in await store.read_audit(3)] == newest_first[:3]
    assert [r["n"] for r in await store.read_audit(9)] == newest_first[:9]  # ends inside a batch
    # The window (impact preview, console chart), in pages of records; a page ends with its last entry.
    assert await _window(store) == newest_first
    assert await _window(store, page=2) == newest_first
    assert await _window(store, limit=5, page=2) == newest_first[:5]
    pages = [page async for page in store.read_audit_window(0, limit=100, page=4)]
    assert all(len(page) <= 4 + ENTRY_RECORDS - 1 for page in pages)
    # The filtered search: scanned and the scan cap count records.
    odd = await store.search_audit(100, lambda record: record["subject"] == "s1")
    assert [r["n"] for r in odd.records] == [n for n in newest_first if n % 2] and odd.scanned == 20 and odd.complete
    capped = await store.search_audit(100, lambda record: record["subject"] == "s1", scan_cap=6)
    assert [r["n"] for r in capped.records] == [19, 17, 15] and capped.scanned == 6 and not capped.complete
    assert await store.audit_length() == 20
    assert await store.audit_backlog() == 20  # no archiver yet: every record waits


async def test_shards_with_batch_entries_merge_by_entry_keeping_each_batch_together(redis_url: str) -> None:
    store = Store.from_url(redis_url, timeout_s=1, audit_shards=2)
    try:
        # A millisecond apart: entries of two shards with one id would come in shard order.
        await store.append_audit("a", _records(1, 3, shard=0), maxlen=1000, shard=0)
        await asyncio.sleep(0.002)
        await _single(store, 100, key=audit_key(1))
        await asyncio.sleep(0.002)
        await store.append_audit("b", _records(4, 6, shard=1), maxlen=1000, shard=1)
        await asyncio.sleep(0.002)
        await store.append_audit("a", _records(7, 8, shard=0), maxlen=1000, shard=0)
        expected = [8, 7, 6, 5, 4, 100, 3, 2, 1]
        assert [r["n"] for r in await store.read_audit(100)] == expected
        assert [r["n"] for r in await store.read_audit(4)] == expected[:4]
        assert await _window(store, page=1) == expected
        found = await store.search_audit(100, lambda record: record.get("shard") == 1)
        assert [r["n"] for r in found.records] == [6, 5, 4]
        assert await store.audit_length() == 9
    finally:
        await store.close()


async def test_the_archiver_archives_mixed_entries_once_in_order_and_verify_passes(
    store: Store, tmp_path: Path
) -> None:
    newest_first = await _mixed(store)
    archiver = Archiver(store, tmp_path, stream_specs(1000), segment_records=4)
    archiver.open()
    try:
        assert await archiver.run(once=True) == 20
        assert await store.audit_backlog() == 0
        more = [(seq, orjson.dumps({"n": seq + 5})) for seq in range(16, 19)]
        await store.append_audit("p1", more, maxlen=1000)
        await _single(store, 24)
        assert await store.audit_backlog() == 4  # the single one after the batch counted too
        assert await archiver.run(once=True) == 24
    finally:
        archiver.close()
    records = archived(tmp_path)
    assert [r["n"] for r in records] == [*reversed(newest_first), 21, 22, 23, 24]
    assert [r["seq"] for r in records] == list(range(1, 25))
    # Each record carries the id of the entry it came from; a batch's records share theirs.
    ids = [r["stream_id"] for r in records]
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-"))) and len(set(ids)) == 3 + 1 + 2 + 1 + 2
    [summary] = verify_archive(tmp_path)
    assert summary.records == 24


# --- trimming by records ----------------------------------------------------------------------


async def test_archiving_off_trims_to_about_maxlen_records(store: Store) -> None:
    maxlen = 1000
    appended = trimmed = 0
    for first in range(1, 6001, 100):
        added, cut = await store.append_audit_counted("p1", _records(first, first + 99), maxlen=maxlen)
        appended, trimmed = appended + added, trimmed + cut
        held = await store.audit_length()
        assert held == appended - trimmed
        assert held <= maxlen + trim_slack(maxlen) + 100  # never far past the cap
    assert maxlen <= held <= maxlen + trim_slack(maxlen) + 100
    window = await _window(store)
    assert window == list(range(6000, 6000 - held, -1))  # the newest, none lost in the middle
    counts = await store.client.hgetall(audit_counts_key(0))
    assert int(counts[b"appended"]) - int(counts[b"trimmed"]) == held


async def test_archiving_on_never_trims_an_unarchived_record(store: Store, tmp_path: Path) -> None:
    for first in range(1, 3001, 300):
        _added, cut = await store.append_audit_counted("p1", _records(first, first + 299), maxlen=500, archive=True)
        assert cut == 0  # no archiver has acknowledged anything
    assert await store.audit_length() == 3000
    archiver = Archiver(store, tmp_path, stream_specs(500), segment_records=1000)
    archiver.open()
    try:
        assert await archiver.run(once=True) == 3000
    finally:
        archiver.close()
    # Acknowledged: trimmed down to about the cap, whole entries, never below it.
    assert 500 <= await store.audit_length() <= 500 + ENTRY_RECORDS
    for first in range(3001, 4501, 300):
        await store.append_audit("p1", _records(first, first + 299), maxlen=500, archive=True)
    # The archived ones went; the 1,500 unarchived all stay, whatever the cap says.
    assert await store.audit_length() == 1500
    assert await store.audit_backlog() == 1500
    assert await _window(store) == list(range(4500, 3000, -1))


async def test_missing_counts_are_rebuilt_from_the_streams_ends(store: Store) -> None:
    await store.append_audit("p1", _records(1, 700), maxlen=100_000)
    await store.client.delete(audit_counts_key(0))  # a restore without it
    assert await store.append_audit("p1", _records(701, 710), maxlen=100_000) == 10
    counts = await store.client.hgetall(audit_counts_key(0))
    assert int(counts[b"appended"]) == 710 and int(counts[b"trimmed"]) == 0
    assert [int(f[b"total"]) for _id, f in await _raw(store)][-1] == 710  # the totals go on
    # A stream of single-record entries (before batch entries): each entry one record.
    await store.client.delete(AUDIT_KEY, audit_counts_key(0))
    for n in range(5):
        await _single(store, n)
    await store.append_audit("p2", _records(1, 3), maxlen=100_000)
    assert await store.audit_length() == 8
    counts = await store.client.hgetall(audit_counts_key(0))
    assert int(counts[b"appended"]) - int(counts[b"trimmed"]) == 8
