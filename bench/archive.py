"""The audit archive's figures: records/s archived from Redis, and query, report and verify times on
an archive of a million records (``make bench`` runs it; ``python -m bench.archive`` alone).

The million-record archive is written by the archiver's own segment writer from synthesized stream
entries (no Redis: only the query side is measured on it); the Redis figure archives real entries
through the consumer group, acknowledgements and trimming included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.archive.archiver import Archiver, stream_specs
from gateway.archive.query import Filters, parse_time, query, report
from gateway.archive.verify import verify_archive
from gateway.redis_server import RedisServer
from gateway.storage.archive_stream import StreamEntry
from gateway.storage.store import Store

COUNTRIES = ("US", "DE", "FR", "GB", "JP", "IR", "CN", "IN", "BR", "CA")
MODELS = ("frontier-x", "gpt-mock", "small-1", "medium-2")
CODES = ("", "", "", "", "", "", "country_denied", "rate_limited", "model_not_allowed", "export_suspended")


def _record(i: int, epoch: float) -> dict[str, Any]:
    code = CODES[i % len(CODES)]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{i % 1000:03d}Z",
        "request_id": f"{i:016x}",
        "subject": f"user-{i % 5000}",
        "org": f"org-{i % 300}",
        "org_name": None,
        "tier": ("public", "partner", "internal")[i % 3],
        "claimed_country": COUNTRIES[i % len(COUNTRIES)],
        "client_ip": f"198.51.100.{i % 250}",
        "ip_country": COUNTRIES[(i // 7) % len(COUNTRIES)],
        "model": MODELS[i % len(MODELS)],
        "decision": "allow" if not code else ("rate_limit" if code == "rate_limited" else "block"),
        "code": code,
        "policy_version": 100 + i // 100_000,
        "status": 200 if not code else 451,
        "upstream_status": 200 if not code else None,
        "duration_ms": 12.5,
    }


def build_archive(root: Path, records: int, per_segment: int = 100_000) -> float:
    """A ``records``-record audit archive over 30 days ending now; returns seconds taken."""
    archiver = Archiver(None, root, stream_specs(1000))  # type: ignore[arg-type]  # no Redis needed here
    archiver.open()
    spec = archiver.specs[0]
    start_ms = int(time.time() * 1000) - 30 * 86_400_000
    step_ms = 30 * 86_400_000 // records
    started = time.perf_counter()
    try:
        for first in range(0, records, per_segment):
            batch: list[StreamEntry] = []
            day = None
            for i in range(first, min(first + per_segment, records)):
                ms = start_ms + i * step_ms
                if day is not None and ms // 86_400_000 != day:
                    archiver._write_segment(spec, batch)
                    batch = []
                day = ms // 86_400_000
                batch.append(StreamEntry(f"{ms}-0", [orjson.dumps(_record(i, ms / 1000))]))
            if batch:
                archiver._write_segment(spec, batch)
    finally:
        archiver.close()
    return time.perf_counter() - started


async def _archive_from_redis(root: Path, records: int) -> dict[str, float]:
    with RedisServer() as redis:
        store = Store.from_url(redis.url, timeout_s=1)
        try:
            now = time.time()
            for first in range(1, records + 1, 500):
                batch = [(i, orjson.dumps(_record(i, now))) for i in range(first, min(first + 500, records + 1))]
                await store.append_audit("bench", batch, maxlen=1000, archive=True)
            archiver = Archiver(store, root, stream_specs(1000), segment_records=50_000)
            archiver.open()
            started = time.perf_counter()
            try:
                archived = await archiver.run(once=True)
            finally:
                archiver.close()
            elapsed = time.perf_counter() - started
            left = await store.audit_length()
        finally:
            await store.close()
    assert archived == records, archived
    return {"records": records, "seconds": round(elapsed, 2), "records_per_s": round(records / elapsed), "left": left}


def _timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - started, 2)


def archive_bench(records: int = 1_000_000, redis_records: int = 200_000) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gw-archive-bench-"))
    try:
        results: dict[str, Any] = {"from_redis": asyncio.run(_archive_from_redis(work / "redis", redis_records))}
        root = work / "million"
        results["records"] = records
        results["build_s"] = round(build_archive(root, records), 2)
        results["bytes"] = sum(p.stat().st_size for p in root.rglob("*.jsonl.gz"))
        by = ["country", "model", "code"]
        answer, results["report_by_country_model_code_s"] = _timed(report, root, Filters(), by)
        rows = answer[1]
        assert sum(row[3] for row in rows) == records, rows[:3]
        results["report_groups"] = len(rows)
        since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 10 * 86_400))
        until = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 4 * 86_400))
        window = Filters(since=parse_time(since), until=parse_time(until, end=True), model="frontier-x", country="IR")
        _rows, results["query_one_week_model_country_s"] = _timed(query, root, window, limit=None)
        _rows, results["query_subject_all_time_s"] = _timed(query, root, Filters(subject="user-42"), limit=None)
        [summary], results["verify_s"] = _timed(verify_archive, root)
        assert summary.records == records
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_archive(results: dict[str, Any]) -> None:
    redis = results["from_redis"]
    print(f"\naudit archive ({results['records']:,} records, {results['bytes'] / 1e6:.0f} MB gzipped)")
    print(f"  archived from Redis      {redis['records_per_s']:>10,} records/s ({redis['records']:,} records)")
    print(f"  report by country,model,code  {results['report_by_country_model_code_s']:>6} s")
    print(f"  query one week, model+country {results['query_one_week_model_country_s']:>6} s")
    print(f"  query one subject, all time   {results['query_subject_all_time_s']:>6} s")
    print(f"  verify                        {results['verify_s']:>6} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--redis-records", type=int, default=200_000)
    args = parser.parse_args()
    results = archive_bench(args.records, args.redis_records)
    print(json.dumps(results))
    print_archive(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
