"""The audit archive (gateway/archive/): exactly once into hash-chained segments, trimming only what is
archived, verify naming the first bad place, and DuckDB answering from the archive."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from gateway.archive.archiver import Archiver, stream_specs
from gateway.archive.segments import audit_stream_name, list_segments, read_manifest
from gateway.archive.verify import ChainBroken, verify_archive
from gateway.storage.keys import AUDIT_KEY
from gateway.storage.store import Store

from .support.archive import archive_config, archived, fill, gateway_cli


async def _archive_once(store: Store, root: Path, *, segment_records: int = 400, keep: int = 1000) -> int:
    archiver = Archiver(store, root, stream_specs(keep), segment_records=segment_records)
    archiver.open()
    try:
        return await archiver.run(once=True)
    finally:
        archiver.close()


def _assert_whole(root: Path, count: int, *, stream: str = "audit", first: int = 1) -> None:
    """``stream`` holds records ``req-<first>`` on, ``count`` of them, once each, as one whole chain."""
    records = archived(root, stream)
    assert [r["seq"] for r in records] == list(range(1, count + 1))
    assert [r["request_id"] for r in records] == [f"req-{i}" for i in range(first, first + count)]
    summaries = {summary.stream: summary for summary in verify_archive(root)}
    assert summaries[stream].records == count


async def test_archiving_on_keeps_every_unarchived_record_and_trims_only_archived_ones(
    redis_url: str, tmp_path: Path
) -> None:
    store = Store.from_url(redis_url, timeout_s=1)
    try:
        assert await fill(store, 3000, maxlen=1000) == 0
        # No archiver has run yet: nothing trimmed unread, the whole stream is the backlog.
        assert await store.audit_length() == 3000
        assert await store.archive_backlog(AUDIT_KEY) == 3000
        assert await _archive_once(store, tmp_path / "archive") == 3000
        assert await store.archive_backlog(AUDIT_KEY) == 0
        # Archived records go down to about stream_maxlen (whole stream nodes: approximate).
        assert 1000 <= await store.audit_length() <= 1200
        # New records with the archiver behind: the archived ones go, trimming stops at the first
        # unarchived one, whatever stream_maxlen says.
        assert await fill(store, 2000, maxlen=1000, start=3001) > 0
        assert await store.archive_backlog(AUDIT_KEY) == 2000
        assert 2000 <= await store.audit_length() <= 2100
        assert await _archive_once(store, tmp_path / "archive") == 2000
    finally:
        await store.close()
    _assert_whole(tmp_path / "archive", 5000)
    manifest = read_manifest(tmp_path / "archive" / "audit")
    assert manifest is not None and manifest.seq == 5000


async def test_archiving_off_counts_what_maxlen_trimmed_unread(redis_url: str) -> None:
    store = Store.from_url(redis_url, timeout_s=1)
    try:
        trimmed = await fill(store, 3000, maxlen=1000, archive=False)
        length = await store.audit_length()
    finally:
        await store.close()
    assert trimmed > 0
    assert trimmed + length == 3000


async def test_segments_are_chained_gzipped_json_lines_named_by_seq(redis_url: str, tmp_path: Path) -> None:
    store = Store.from_url(redis_url, timeout_s=1)
    try:
        await fill(store, 1000, batch=200)  # stream entries of 200 records: a segment ends on an entry's end
        await _archive_once(store, tmp_path, segment_records=400)
    finally:
        await store.close()
    segments, strays = list_segments(tmp_path / "audit")
    assert strays == []
    assert [(s.first, s.last) for s in segments] == [(1, 400), (401, 800), (801, 1000)]
    assert segments[0].path.name == "000000000001-000000000400.jsonl.gz"
    first = orjson.loads(gzip.open(segments[0].path).readline())
    assert first["seq"] == 1 and len(first["hash"]) == 64 and first["request_id"] == "req-1"


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("point", ["tmp", "segment", "index", "manifest", "ack"])
async def test_a_sigkill_at_each_step_and_a_restart_archive_each_record_exactly_once(
    redis_url: str, tmp_path: Path, point: str, shards: int
) -> None:
    """With three audit shards each is its own chain, and each is whole after the kill and restart."""
    per_shard = 1500 // shards
    store = Store.from_url(redis_url, timeout_s=1)
    try:
        for shard in range(shards):
            await fill(store, per_shard, start=shard * per_shard + 1, producer=f"producer-{shard}", shard=shard)
    finally:
        await store.close()
    config = archive_config(tmp_path, redis_url, shards=shards)
    root = tmp_path / "archive"
    args = ("audit", "archive", "--config", str(config), "--dir", str(root), "--once", "--segment-records", "400")
    killed = gateway_cli(*args, env={"GATEWAY_ARCHIVE_CRASH_AT": f"{point}:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = gateway_cli(*args)
    assert done.returncode == 0, done.stderr
    for shard in range(shards):
        _assert_whole(root, per_shard, stream=audit_stream_name(shard), first=shard * per_shard + 1)
        segments, _strays = list_segments(root / audit_stream_name(shard))
        assert all(s.index.exists() for s in segments)
    assert not list(root.rglob("*.tmp"))


async def test_an_archiver_told_fewer_shards_archives_every_shard_gateways_appended_to(
    redis_url: str, tmp_path: Path
) -> None:
    """``audit.shards`` lowered (or an archiver's config behind the gateways'): the shards gateways
    appended to are still archived, each its own chain, and queries read them together."""
    gateways = Store.from_url(redis_url, timeout_s=1, audit_shards=3)
    try:
        for shard in range(3):
            await fill(gateways, 200, start=shard * 200 + 1, producer=f"producer-{shard}", shard=shard)
        # One more record in shard 0, appended after the others: its chain goes on.
        await fill(gateways, 1, start=601, producer="producer-0", shard=0)
    finally:
        await gateways.close()
    root = tmp_path / "archive"
    config = archive_config(tmp_path, redis_url, shards=1)
    done = gateway_cli("audit", "archive", "--config", str(config), "--dir", str(root), "--once")
    assert done.returncode == 0, done.stderr
    assert "archived 601 records" in done.stdout
    _assert_whole(root, 200, stream="audit-1", first=201)
    _assert_whole(root, 200, stream="audit-2", first=401)
    assert [r["request_id"] for r in archived(root, "audit")][-1] == "req-601"
    check = gateway_cli("audit", "verify", "--dir", str(root), "--json")
    assert check.returncode == 0, check.stderr
    streams = {s["stream"]: s["records"] for s in orjson.loads(check.stdout)["streams"]}
    assert streams == {"audit": 201, "audit-1": 200, "audit-2": 200}
    query = gateway_cli("audit", "query", "--dir", str(root), "--json", "--limit", "0")
    assert query.returncode == 0, query.stderr
    rows = [orjson.loads(line) for line in query.stdout.splitlines()]
    assert sorted(r["request_id"] for r in rows) == sorted(f"req-{i}" for i in range(1, 602))
    # In the order the records reached Redis (by stream id, whichever shard holds them).
    places = [tuple(int(part) for part in r["stream_id"].split("-")) for r in rows]
    assert places == sorted(places)
    report = gateway_cli("audit", "report", "--dir", str(root), "--by", "decision", "--json")
    assert sum(orjson.loads(line)["requests"] for line in report.stdout.splitlines()) == 601


async def test_the_cli_archives_verifies_queries_and_reports(redis_url: str, tmp_path: Path) -> None:
    store = Store.from_url(redis_url, timeout_s=1)
    try:
        await fill(store, 800)
        # A change-history entry is archived too, in its own chain.
        await store.client.xadd("{gw}:changes", {"c": orjson.dumps({"actor": "admin", "time": "2025-03-01T00:00:00Z"})})
    finally:
        await store.close()
    root = tmp_path / "archive"
    config = archive_config(tmp_path, redis_url)
    done = gateway_cli("audit", "archive", "--config", str(config), "--dir", str(root), "--once")
    assert done.returncode == 0, done.stderr
    assert "archived 801 records" in done.stdout
    check = gateway_cli("audit", "verify", "--dir", str(root), "--json")
    assert check.returncode == 0, check.stderr
    streams = {s["stream"]: s for s in orjson.loads(check.stdout)["streams"]}
    assert streams["audit"]["records"] == 800 and streams["changes"]["records"] == 1
    report = gateway_cli("audit", "report", "--dir", str(root), "--by", "country,model,code", "--json")
    assert report.returncode == 0, report.stderr
    rows = [orjson.loads(line) for line in report.stdout.splitlines()]
    assert sum(r["requests"] for r in rows) == 800
    ir = [r for r in rows if r["country"] == "IR"]
    assert {r["code"] for r in ir} == {"country_blocked"} and sum(r["blocked"] for r in ir) == 200
    query = gateway_cli(
        "audit", "query", "--dir", str(root), "--country", "IR", "--model", "frontier-x", "--csv", "--limit", "0"
    )
    assert query.returncode == 0, query.stderr
    lines = query.stdout.splitlines()
    assert lines[0].startswith("time,request_id,")
    assert len(lines) - 1 == 200  # i % 4 == 2 -> IR, and i even -> frontier-x
    screened = gateway_cli("audit", "query", "--dir", str(root), "--subject", "user-3", "--json", "--limit", "0")
    rows = [orjson.loads(line) for line in screened.stdout.splitlines()]
    assert {r["request_id"] for r in rows} == {f"req-{i}" for i in range(1, 801) if i % 7 == 3}
    row = next(r for r in rows if r["request_id"] == "req-10")
    assert orjson.loads(row["screening"]) == {"entry": "Example Trading LLC", "score": 0.87}
    changes = gateway_cli("audit", "query", "--dir", str(root), "--stream", "changes", "--json")
    assert changes.returncode == 0, changes.stderr
    [change] = [orjson.loads(line) for line in changes.stdout.splitlines()]
    assert (change["actor"], change["seq"]) == ("admin", 1)
    bad = gateway_cli("audit", "report", "--dir", str(root), "--by", "colour")
    assert bad.returncode == 2 and "--by" in bad.stderr


# --- tampering ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, redis_server: object) -> Path:
    """One archive of 1,000 records in segments of 250, built once; each test tampers with a copy."""
    import asyncio

    url = redis_server.url  # type: ignore[attr-defined]
    root = tmp_path_factory.mktemp("pristine")

    async def build() -> None:
        store = Store.from_url(url, timeout_s=1)
        try:
            await store.client.flushall()
            await fill(store, 1000, batch=250)  # stream entries of 250 records: segments end on entry ends
            await _archive_once(store, root, segment_records=250)
        finally:
            await store.close()

    asyncio.run(build())
    return root


def _lines(path: Path) -> list[bytes]:
    with gzip.open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def _rewrite(path: Path, lines: list[bytes]) -> None:
    with gzip.open(path, "wb") as f:
        f.write(b"".join(lines))


def _fault(root: Path) -> str:
    with pytest.raises(ChainBroken) as caught:
        verify_archive(root)
    cli = gateway_cli("audit", "verify", "--dir", str(root))
    assert cli.returncode == 1
    assert str(caught.value.fault) in cli.stderr
    return str(caught.value.fault)


SECOND = "audit/*/*/*/000000000251-000000000500.jsonl.gz"


def _copy(pristine: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "copy"
    shutil.copytree(pristine, root)
    [second] = root.glob(SECOND)
    return root, second


def test_the_untouched_archive_verifies(pristine: Path) -> None:
    [summary] = verify_archive(pristine)
    assert (summary.records, summary.segments) == (1000, 4)


def test_verify_names_an_edited_byte(pristine: Path, tmp_path: Path) -> None:
    root, second = _copy(pristine, tmp_path)
    lines = _lines(second)
    lines[9] = lines[9].replace(b'"user-', b'"usex-', 1)
    _rewrite(second, lines)
    fault = _fault(root)
    assert "000000000251-000000000500.jsonl.gz" in fault and "line 10" in fault and "seq 260" in fault
    assert "edited" in fault


def test_verify_names_a_deleted_line(pristine: Path, tmp_path: Path) -> None:
    root, second = _copy(pristine, tmp_path)
    lines = _lines(second)
    del lines[4]
    _rewrite(second, lines)
    fault = _fault(root)
    assert "000000000251-000000000500" in fault and "line 5" in fault and "seq 256 where 255 was due" in fault


def test_verify_names_two_swapped_lines(pristine: Path, tmp_path: Path) -> None:
    root, second = _copy(pristine, tmp_path)
    lines = _lines(second)
    lines[20], lines[21] = lines[21], lines[20]
    _rewrite(second, lines)
    fault = _fault(root)
    assert "line 21" in fault and "seq 272 where 271 was due" in fault


def test_verify_names_an_inserted_line(pristine: Path, tmp_path: Path) -> None:
    root, second = _copy(pristine, tmp_path)
    lines = _lines(second)
    lines.insert(30, lines[29])
    _rewrite(second, lines)
    fault = _fault(root)
    assert "line 31" in fault and "seq 280 where 281 was due" in fault


def test_verify_names_a_dropped_segment(pristine: Path, tmp_path: Path) -> None:
    root, second = _copy(pristine, tmp_path)
    second.unlink()
    fault = _fault(root)
    assert "000000000501-000000000750" in fault and "segment starts at seq 501" in fault and "seq 251" in fault


def test_verify_names_the_newest_segment_dropped(pristine: Path, tmp_path: Path) -> None:
    root, _second = _copy(pristine, tmp_path)
    [last] = root.glob("audit/*/*/*/000000000751-000000001000.jsonl.gz")
    last.unlink()
    fault = _fault(root)
    assert "manifest says 1000 records" in fault and "seq 751" in fault


def test_verify_names_a_truncated_segment(pristine: Path, tmp_path: Path) -> None:
    root, second = _copy(pristine, tmp_path)
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])
    fault = _fault(root)
    assert "000000000251-000000000500" in fault and "truncated or damaged" in fault


def test_verify_names_an_edited_query_index(pristine: Path, tmp_path: Path) -> None:
    import duckdb

    root, second = _copy(pristine, tmp_path)
    index = second.with_name(second.name.replace(".jsonl.gz", ".parquet"))
    edited = index.with_name("edited.parquet")
    with duckdb.connect() as db:
        db.execute(
            f"COPY (SELECT * REPLACE (CASE WHEN seq = 300 THEN 'XX' ELSE claimed_country END AS claimed_country) "
            f"FROM read_parquet('{index}')) TO '{edited}' (FORMAT parquet)"
        )
    edited.replace(index)
    fault = _fault(root)
    assert "000000000251-000000000500.parquet" in fault and "seq 300" in fault


def test_a_query_reads_a_segment_without_its_index(pristine: Path, tmp_path: Path) -> None:
    from gateway.archive.query import Filters, report

    root, second = _copy(pristine, tmp_path)
    second.with_name(second.name.replace(".jsonl.gz", ".parquet")).unlink()
    _columns, rows = report(root, Filters(), ["country"])
    assert sum(row[1] for row in rows) == 1000
    assert verify_archive(root)[0].records == 1000


def test_verify_names_a_segment_cut_at_a_line(pristine: Path, tmp_path: Path) -> None:
    root, second = _copy(pristine, tmp_path)
    _rewrite(second, _lines(second)[:100])
    fault = _fault(root)
    assert "000000000251-000000000500" in fault and "ends at seq 350, its name says 500" in fault


# --- refusals -----------------------------------------------------------------------------------


def test_the_archiver_refuses_an_archive_whose_manifest_and_segments_disagree(pristine: Path, tmp_path: Path) -> None:
    from gateway.archive.archiver import recover
    from gateway.archive.segments import ArchiveError

    root, _second = _copy(pristine, tmp_path)
    [last] = root.glob("audit/*/*/*/000000000751-000000001000.jsonl.gz")
    last.unlink()
    with pytest.raises(ArchiveError, match="manifest ends at seq 1000"):
        recover(root, "audit")


def test_one_archiver_per_directory_and_a_redis_it_can_reach(redis_url: str, tmp_path: Path) -> None:
    import fcntl
    import os

    import yaml

    config = archive_config(tmp_path, redis_url)
    root = tmp_path / "archive"
    root.mkdir()
    fd = os.open(root / ".archiver.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        second = gateway_cli("audit", "archive", "--config", str(config), "--dir", str(root), "--once")
    finally:
        os.close(fd)
    assert second.returncode == 1 and "another archiver" in second.stderr
    embedded = tmp_path / "embedded.yaml"
    embedded.write_text(yaml.safe_dump({"upstream": {"url": "http://127.0.0.1:9"}}))
    refused = gateway_cli("audit", "archive", "--config", str(embedded), "--dir", str(root), "--once")
    assert refused.returncode == 2 and "redis.url" in refused.stderr


def test_verify_in_worker_processes_names_the_same_first_fault(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.archive import verify

    monkeypatch.setattr(verify, "PARALLEL_FROM", 2)
    assert verify_archive(pristine, workers=2) == verify_archive(pristine, workers=1)
    root, second = _copy(pristine, tmp_path)
    lines = _lines(second)
    # The first record of a segment: its link to the previous segment is checked in order, here.
    lines[0] = lines[0].replace(b'"user-', b'"usex-', 1)
    _rewrite(second, lines)
    [third] = root.glob("audit/*/*/*/000000000501-000000000750.jsonl.gz")
    _rewrite(third, _lines(third)[:-1])
    faults = []
    for workers in (2, 1):
        with pytest.raises(ChainBroken) as caught:
            verify_archive(root, workers=workers)
        faults.append(caught.value.fault)
    assert faults[0] == faults[1]
    assert faults[0].line == 1 and faults[0].seq == 251 and "edited" in faults[0].reason


async def test_the_archiver_rides_out_a_redis_outage(tmp_path: Path) -> None:
    import asyncio

    from gateway.redis_server import RedisServer

    from .support.waiting import wait_until

    root = tmp_path / "archive"
    with RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as redis:
        store = Store.from_url(redis.url, timeout_s=1)
        archiver = Archiver(store, root, stream_specs(1000), segment_records=200, segment_seconds=0.05, poll_s=0.05)
        try:
            async with running(archiver) as task:
                await fill(store, 500)
                await wait_until(lambda: archiver.archived == 500, 10)
                redis.stop()
                await asyncio.sleep(0.5)  # rounds fail meanwhile; the archiver keeps going
                assert not task.done()
                redis.start()
                await fill(store, 700, start=501)
                await wait_until(lambda: archiver.archived == 1200, 20)
                await wait_until(lambda: _backlog_is_zero(store), 10)
        finally:
            await store.close()
    _assert_whole(root, 1200)


@contextlib.asynccontextmanager
async def running(archiver: Archiver) -> AsyncIterator[asyncio.Task[None]]:
    """``archiver`` running as ``gateway audit archive`` does until the block ends; then stopped and closed."""
    archiver.open()
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(once=False, stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await task
        archiver.close()


async def _backlog_is_zero(store: Store) -> bool:
    return await store.archive_backlog(AUDIT_KEY) == 0


async def test_a_running_archiver_takes_up_a_shard_gateways_start_appending_to(redis_url: str, tmp_path: Path) -> None:
    """``audit.shards`` raised while the archiver runs: within SHARD_CHECK_S it archives the new shard too."""
    import asyncio

    from gateway.archive.archiver import SHARD_CHECK_S

    from .support.clock import FakeClock
    from .support.waiting import wait_until

    root = tmp_path / "archive"
    clock = FakeClock(0.0)
    store = Store.from_url(redis_url, timeout_s=1)  # its config: one shard
    raised = Store.from_url(redis_url, timeout_s=1, audit_shards=3)  # a gateway with the new count
    archiver = Archiver(store, root, stream_specs(1000), segment_records=100, poll_s=0.02, monotonic=clock)
    try:
        async with running(archiver):
            await fill(store, 200)
            await wait_until(lambda: archiver.archived == 200, 10)
            await fill(raised, 300, start=201, producer="producer-2", shard=2, batch=100)  # whole segments of 100
            await asyncio.sleep(0.2)
            assert archiver.archived == 200 and not (root / "audit-2").exists()  # not looked again yet
            clock.advance(SHARD_CHECK_S)
            await wait_until(lambda: archiver.archived == 500, 10)
            assert await store.audit_backlog() == 0
    finally:
        await store.close()
        await raised.close()
    _assert_whole(root, 200)
    _assert_whole(root, 300, stream="audit-2", first=201)
